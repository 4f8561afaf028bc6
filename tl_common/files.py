"""Finding image files the way ``keras.utils.image_dataset_from_directory`` does, and the test split.

Both trainers get their file lists from here, so they see the same files with the same labels in
the same order. The layout is the recipe's: ``ROOT/train/<class>/...`` and
``ROOT/validation/<class>/...``; the test split is carved out of validation by file, per class,
with a seed, so it is deterministic and disjoint from what stays for validation (the original
recipe takes batches of a reshuffling dataset instead, which overlaps).

Every listed file is decoded once before training (:func:`tl_common.images.scan_images`): a file
neither framework can read stops the run with one line naming it, or, with ``--skip-bad-images``,
is dropped from both frameworks' lists alike.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tl_common.errors import UserError
from tl_common.images import BadImage, scan_images
from tl_common.outputs import atomic_write_text

if TYPE_CHECKING:
    import numpy as np

#: ``keras.src.utils.image_dataset_utils.ALLOWLIST_FORMATS``: matched case-insensitively.
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")

SPLITS = ("train", "validation", "test")

#: Where a run lists every unreadable file it found (in ``--output-dir``), one per line.
BAD_IMAGES_FILE = "bad_images.txt"
#: Unreadable files named in the one-line message; the rest are counted (and listed in the file).
BAD_IMAGES_SHOWN = 3


@dataclass(frozen=True)
class ImageFile:
    """One image: its path relative to the data root (POSIX separators) and its class index."""

    path: str
    label: int


@dataclass(frozen=True)
class FileList:
    """An ordered list of labelled image files under one root."""

    root: Path
    class_names: tuple[str, ...]
    files: tuple[ImageFile, ...]

    def __len__(self) -> int:
        return len(self.files)

    @property
    def paths(self) -> list[str]:
        """Absolute paths, in order."""
        return [str(self.root / f.path) for f in self.files]

    @property
    def labels(self) -> list[int]:
        return [f.label for f in self.files]

    def digest(self) -> str:
        """sha256 of the list (relative path and label per line): equal lists, equal digests."""
        h = hashlib.sha256()
        for f in self.files:
            h.update(f"{f.path}\t{f.label}\n".encode())
        return h.hexdigest()

    def class_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(self.class_names, 0)
        for f in self.files:
            counts[self.class_names[f.label]] += 1
        return counts

    def without(self, paths: set[str]) -> FileList:
        """The same list without the given relative paths."""
        kept = tuple(f for f in self.files if f.path not in paths)
        return FileList(self.root, self.class_names, kept)


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def class_folders(directory: Path) -> list[str]:
    """Sorted names of the visible sub-folders of ``directory``, as Keras lists classes."""
    return sorted(
        name for name in os.listdir(directory)
        if not name.startswith(".") and (directory / name).is_dir()
    )


def find_images(directory: str | os.PathLike[str]) -> FileList:
    """List the images of a class-per-folder directory in Keras' order.

    Classes are the sorted visible sub-folders (labels 0..n-1); each is walked recursively, folders
    in sorted order and files sorted within a folder, keeping the extensions Keras keeps. Hidden
    files and folders (a leading dot: ``.DS_Store``, macOS' ``._x.jpg``) are skipped.
    """
    root = Path(directory)
    if not root.is_dir():
        raise UserError(f"data folder {root} does not exist or is not a folder")
    classes = class_folders(root)
    if not classes:
        raise UserError(f"no class folders in {root}: expected one sub-folder per class, "
                        f"e.g. {root / 'cats'} and {root / 'dogs'}")
    files: list[ImageFile] = []
    for label, name in enumerate(classes):
        found = []
        walk = sorted(os.walk(root / name), key=lambda entry: entry[0])
        for folder, subfolders, names in walk:
            subfolders[:] = [d for d in subfolders if not d.startswith(".")]
            if any(part.startswith(".") for part in Path(folder).relative_to(root).parts):
                continue
            for fname in sorted(names):
                if _is_image(fname):
                    rel = (Path(folder) / fname).relative_to(root).as_posix()
                    found.append(ImageFile(rel, label))
        if not found:
            raise UserError(f"class folder {root / name} holds no images "
                            f"(accepted: {' '.join(IMAGE_EXTENSIONS)})")
        files.extend(found)
    if len(classes) < 2:
        raise UserError(f"{root} has a single class folder ({classes[0]}): "
                        "a classifier needs at least 2")
    return FileList(root, tuple(classes), tuple(files))


def split_test(validation: FileList, fraction: float, seed: int) -> tuple[FileList, FileList]:
    """Set aside ``fraction`` of each class's validation files as the test split.

    Returns ``(validation, test)``: disjoint, both in the original order, the same for a given
    file list, fraction and seed whatever the framework or platform (Python's ``random`` with a
    string seed is stable across versions).
    """
    test_paths: set[str] = set()
    for label, name in enumerate(validation.class_names):
        members = [f.path for f in validation.files if f.label == label]
        k = round(len(members) * fraction)
        test_paths.update(random.Random(f"{seed}:{name}").sample(members, k))
    test = tuple(f for f in validation.files if f.path in test_paths)
    rest = tuple(f for f in validation.files if f.path not in test_paths)
    return (FileList(validation.root, validation.class_names, rest),
            FileList(validation.root, validation.class_names, test))


@dataclass(frozen=True)
class DataSplits:
    """The three file lists of a run, and the unreadable files left out of them."""

    root: Path
    train: FileList
    validation: FileList
    test: FileList
    skipped: tuple[BadImage, ...] = ()

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.train.class_names

    def __getitem__(self, split: str) -> FileList:
        if split not in SPLITS:
            raise KeyError(f"unknown split {split!r}; expected one of {SPLITS}")
        return getattr(self, split)

    def summary(self) -> dict[str, object]:
        """The data section of ``metrics.json``: root, classes, counts and digests per split,
        and the files skipped as unreadable (``--skip-bad-images``)."""
        return {
            "root": str(self.root),
            "class_names": list(self.class_names),
            "files": {
                split: {"count": len(self[split]), "per_class": self[split].class_counts(),
                        "sha256": self[split].digest()}
                for split in SPLITS
            },
            "skipped": [{"path": b.path, "reason": b.reason} for b in self.skipped],
        }


def describe_bad_images(bad: list[BadImage] | tuple[BadImage, ...], root: Path,
                        listed_in: Path | None = None) -> str:
    """``N unreadable image file(s): PATH (reason), ... and K more (all listed in FILE)``."""
    shown = ", ".join(f"{root / b.path} ({b.reason})" for b in bad[:BAD_IMAGES_SHOWN])
    more = len(bad) - BAD_IMAGES_SHOWN
    if more > 0:
        shown += f" and {more} more" + (f" (all listed in {listed_in})" if listed_in else "")
    return f"{len(bad)} unreadable image file{'s' * (len(bad) != 1)}: {shown}"


def _write_bad_list(bad: list[BadImage], root: Path, path: Path | None) -> None:
    if path is None:
        return
    if bad:
        atomic_write_text(path, "".join(f"{root / b.path}\t{b.reason}\n" for b in bad))
    else:  # a list left by an earlier run of this folder is no longer true
        path.unlink(missing_ok=True)


def load_splits(root: str | os.PathLike[str], test_fraction: float, seed: int, *,
                skip_bad_images: bool = False, check_images: bool = True,
                bad_list: Path | None = None,
                keep: Callable[[str, np.ndarray], None] | None = None) -> DataSplits:
    """Read ``root/train`` and ``root/validation``, check that every file decodes, and carve the
    test split out of validation.

    Unreadable files stop the run with a :class:`UserError` naming them, or with
    ``skip_bad_images`` are left out (before the split, so they take no test place) and recorded
    in :attr:`DataSplits.skipped`. ``bad_list``: a file to list them all in (the message names
    only the first few). ``check_images=False`` skips the decoding (the files are trusted).
    ``keep``: given every readable file's full path and pixels as the check decodes them
    (:func:`tl_common.images.scan_images`), so a caller that needs the pixels decodes once.
    """
    root = Path(root)
    for sub in ("train", "validation"):
        if not (root / sub).is_dir():
            raise UserError(f"{root} has no {sub}/ folder: expected {root}/train/<class>/... "
                            f"and {root}/validation/<class>/... (the cats_and_dogs_filtered layout)")
    # File lists are relative to the data root, so the same tree elsewhere gives equal digests.
    train = _rebase(find_images(root / "train"), root, "train")
    validation = _rebase(find_images(root / "validation"), root, "validation")
    if train.class_names != validation.class_names:
        raise UserError(f"class folders differ: train has {list(train.class_names)}, "
                        f"validation has {list(validation.class_names)}")
    bad: list[BadImage] = []
    if check_images:
        bad = scan_images(root, [f.path for f in train.files + validation.files], keep=keep)
        _write_bad_list(bad, root, bad_list)
    if bad:
        if not skip_bad_images:
            raise UserError(f"{describe_bad_images(bad, root, bad_list)}; fix or remove "
                            f"{'them' if len(bad) > 1 else 'it'}, or pass --skip-bad-images to "
                            "train without them")
        dropped = {b.path for b in bad}
        train, validation = train.without(dropped), validation.without(dropped)
        for name, count in train.class_counts().items():
            if count == 0:
                raise UserError(f"every image of class {name!r} in {root / 'train'} is "
                                f"unreadable ({describe_bad_images(bad, root, bad_list)})")
    validation, test = split_test(validation, test_fraction, seed)
    if len(test) == 0 or len(validation) == 0:
        raise UserError(f"{root / 'validation'} holds too few images to set aside a test split of "
                        f"{test_fraction:g} per class and keep some for validation")
    return DataSplits(root, train, validation, test, tuple(bad))


def _rebase(files: FileList, root: Path, sub: str) -> FileList:
    rebased = tuple(ImageFile(f"{sub}/{f.path}", f.label) for f in files.files)
    return FileList(root, files.class_names, rebased)
