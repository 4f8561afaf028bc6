"""Weight sources, framework-free: what ``--weights`` accepts and which file each source reads.

Both trainers resolve a source to its file here, and record it in ``metrics.json`` with
:func:`weights_record` before training starts, so the two runs of one weights file carry the same
``weights`` entry and nothing about the file is left to fail after training.
"""

from __future__ import annotations

import os
from pathlib import Path

from tl_common.bases import DEFAULT_BASE, base_facts
from tl_common.download import IMAGENET_WAY_OUT, download, keras_home, sha256_of

#: Named weight sources both frameworks read; anything else given to ``--weights`` is a file path.
WEIGHT_SOURCES = ("imagenet", "demo", "none")
#: Sources only the PyTorch port reads: torchvision's own ImageNet weights.
TORCH_WEIGHT_SOURCES = ("torchvision",)
#: The ``source`` that ``metrics.json`` records for a weights file given by its path.
FILE_SOURCE = "file"


def is_named_source(value: str) -> bool:
    """Whether ``value`` names a source (``imagenet`` ...) rather than a file."""
    return value in WEIGHT_SOURCES + TORCH_WEIGHT_SOURCES


def expand_weights(value: str | None) -> str | None:
    """A ``--weights`` value with ``~`` expanded where it is a path (a named source stays)."""
    if value is None or is_named_source(value):
        return value
    return os.path.expanduser(value)


def imagenet_weights_path(image_size: int, *, download_if_missing: bool = True,
                          base: str = DEFAULT_BASE) -> Path:
    """Keras' ImageNet no-top file of ``base`` for this size in ``~/.keras/models``, where Keras
    keeps it; downloaded from Keras' URL when absent (unless ``download_if_missing`` is False)."""
    facts = base_facts(base)
    name = facts.imagenet_weights_name(image_size)
    path = keras_home() / "models" / name
    if download_if_missing and not path.exists():
        download(facts.imagenet_url + name, path, what="the ImageNet weights",
                 way_out=IMAGENET_WAY_OUT)
    return path


def weights_file(source: str | os.PathLike[str] | None, image_size: int,
                 base: str = DEFAULT_BASE) -> Path | None:
    """The file a weight source reads: Keras' cached ImageNet file, the demo file, the given
    path (``~`` expanded), or None (``none``, ``torchvision``: torchvision keeps its own)."""
    if source is None or str(source) in ("none", *TORCH_WEIGHT_SOURCES):
        return None
    if source == "imagenet":
        return imagenet_weights_path(image_size, download_if_missing=False, base=base)
    if source == "demo":
        from tl_common.demo import demo_weights_path

        return demo_weights_path()
    return Path(source).expanduser().absolute()


def weights_record(source: str, image_size: int, base: str = DEFAULT_BASE
                   ) -> dict[str, str | None]:
    """The ``weights`` entry of ``metrics.json``: ``source`` (a named source, or ``file``),
    ``path`` and ``sha256`` of the file read (None where there is none, or where Keras kept its
    download elsewhere because ``~/.keras`` was not writable). Call it once the weights are
    loaded: the file then exists."""
    path = weights_file(source, image_size, base)
    if path is not None and not path.is_file():
        path = None
    return {"source": source if is_named_source(source) else FILE_SOURCE,
            "path": None if path is None else str(path),
            "sha256": None if path is None else sha256_of(path)}
