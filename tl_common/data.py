"""Where a run's images come from: ``--data-dir``, the offline ``--demo`` set, or the recipe's
``cats_and_dogs_filtered`` archive in the Keras cache (downloaded when absent)."""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path

from tl_common.download import download, keras_home, move_into_place
from tl_common.errors import UserError
from tl_common.settings import Settings

CATS_AND_DOGS_URL = "https://storage.googleapis.com/mledu-datasets/cats_and_dogs_filtered.zip"
CATS_AND_DOGS_DIR = "cats_and_dogs_filtered"


def _cats_and_dogs_candidates() -> list[Path]:
    datasets = keras_home() / "datasets"
    return [datasets / CATS_AND_DOGS_DIR,
            datasets / "cats_and_dogs_extracted" / CATS_AND_DOGS_DIR,
            datasets / f"{CATS_AND_DOGS_DIR}_extracted" / CATS_AND_DOGS_DIR]


def _is_dataset(path: Path) -> bool:
    return (path / "train").is_dir() and (path / "validation").is_dir()


def cats_and_dogs_root(*, download_if_missing: bool = True) -> Path:
    """The extracted ``cats_and_dogs_filtered`` folder in ``~/.keras/datasets``.

    Also finds it where ``keras.utils.get_file(..., extract=True)`` leaves it, so a cache filled
    by the original recipe is reused. Downloads and extracts the archive when absent.
    """
    datasets = keras_home() / "datasets"
    candidates = _cats_and_dogs_candidates()
    for candidate in candidates:
        if _is_dataset(candidate):
            return candidate
    if not download_if_missing:
        raise UserError(f"{candidates[0]} is missing")
    archive = datasets / f"{CATS_AND_DOGS_DIR}.zip"
    if not archive.exists():
        download(CATS_AND_DOGS_URL, archive, what="the cats_and_dogs_filtered images",
                 way_out="pass --data-dir with your own train/ and validation/ class folders, "
                         "or --demo for the offline demo")
    with tempfile.TemporaryDirectory(dir=datasets, prefix=".extract-") as tmp:
        try:
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(tmp)
        except zipfile.BadZipFile:
            archive.unlink()
            raise UserError(f"{archive} was not a valid zip archive and was removed; "
                            "run again to download it afresh") from None
        move_into_place(Path(tmp) / CATS_AND_DOGS_DIR, candidates[0])
    return candidates[0]


def resolve_data_root(settings: Settings) -> Path:
    """The data root a run reads: the demo set, ``--data-dir``, or cats_and_dogs_filtered."""
    if settings.demo:
        from tl_common.demo import demo_data_root

        return demo_data_root(settings.demo_set)
    if settings.data_dir is not None:
        check_data_dir(settings)
        return Path(settings.data_dir).expanduser()
    return cats_and_dogs_root()


def check_data_dir(settings: Settings) -> None:
    """A ``--data-dir`` that is not a folder is one line, before anything is created or
    downloaded (the ImageNet weights): a mistyped path is the error a user needs first."""
    if settings.data_dir is not None and not Path(settings.data_dir).expanduser().is_dir():
        raise UserError(f"--data-dir={settings.data_dir!r} is not a folder: expected a folder "
                        "with train/ and validation/ class folders")


def check_output_dir_placement(settings: Settings) -> None:
    """Refuse, with one line and before anything is created, an ``--output-dir`` inside the
    data's ``train/`` or ``validation/`` folder: the run would create a class folder there (or
    files inside one), and its PNG plots would be read as images by the next run. Anywhere else
    in the data folder is fine: only ``train/`` and ``validation/`` are searched for images."""
    if settings.demo:
        from tl_common.demo import demo_data_path

        roots = [demo_data_path(settings.demo_set)]
    elif settings.data_dir is not None:
        roots = [Path(settings.data_dir).expanduser()]
    else:
        roots = _cats_and_dogs_candidates()
    out = Path(os.path.realpath(Path(settings.output_dir).expanduser()))
    for root in roots:
        for sub in ("train", "validation"):
            images = Path(os.path.realpath(root / sub))
            if out == images or images in out.parents:
                raise UserError(f"--output-dir={settings.output_dir!r} is inside {root / sub}, "
                                f"where every sub-folder is read as a class of images: choose a "
                                f"folder outside {root / 'train'} and {root / 'validation'} "
                                f"(e.g. {root / 'runs'})")
