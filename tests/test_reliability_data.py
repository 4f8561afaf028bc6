"""Messy folders, framework-free: what tl_common lists, checks, refuses and drops for both trainers.

Layouts (missing folder, no class folders, an empty class, a single class, nested folders,
non-ASCII names, hidden files and other extensions) and bad files (found before training by
decoding each one: stop with one line naming them, or drop them with ``--skip-bad-images``).
All on small folders generated here. Run: ``python -m pytest tests/test_reliability_data.py -q``.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tl_common.errors import UserError
from tl_common.files import (
    BAD_IMAGES_FILE,
    BAD_IMAGES_SHOWN,
    ImageFile,
    find_images,
    load_splits,
)
from tl_common.images import scan_images

#: Images per class: 4 to train on, 5 in validation (round(5 * 0.2) = 1 of them to test).
PER_CLASS = {"train": 4, "validation": 5}
#: Checking the demo set (380 JPEGs) before training: measured ~0.15 s on 2 busy cores; ten times
#: that is still no noticeable delay to a run of minutes.
DEMO_SCAN_MAX_S = 1.5


def jpeg(seed: int, size: tuple[int, int] = (48, 40)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_folder(root: Path, classes: tuple[str, ...] = ("cats", "dogs"),
                per_class: dict[str, int] = PER_CLASS) -> Path:
    for s, (split, count) in enumerate(per_class.items()):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            stem = name[:-1] if name.endswith("s") else name   # cats/cat.0.jpg
            for i in range(count):
                (root / split / name / f"{stem}.{i}.jpg").write_bytes(jpeg(100 * s + 10 * c + i))
    return root


@pytest.fixture
def folder(tmp_path) -> Path:
    return make_folder(tmp_path / "data")


def message(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text, "a user error is one line"
    return text


# ---- layouts ---------------------------------------------------------------------------------

def test_missing_folder(tmp_path):
    with pytest.raises(UserError) as err:
        load_splits(tmp_path / "nowhere", 0.2, 0)
    assert f"{tmp_path / 'nowhere'} has no train/ folder" in message(err)
    with pytest.raises(UserError, match="does not exist or is not a folder"):
        find_images(tmp_path / "nowhere")


def test_no_class_folders(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "validation").mkdir()
    (tmp_path / "train" / "loose.jpg").write_bytes(jpeg(0))
    with pytest.raises(UserError) as err:
        load_splits(tmp_path, 0.2, 0)
    assert "no class folders in" in message(err) and "one sub-folder per class" in message(err)


def test_empty_class_folder(folder):
    for f in (folder / "train" / "dogs").iterdir():
        f.unlink()
    (folder / "train" / "dogs" / "notes.txt").write_text("no images here")
    with pytest.raises(UserError) as err:
        load_splits(folder, 0.2, 0)
    assert f"class folder {folder / 'train' / 'dogs'} holds no images" in message(err)


def test_single_class(tmp_path):
    make_folder(tmp_path, classes=("cats",))
    with pytest.raises(UserError) as err:
        load_splits(tmp_path, 0.2, 0)
    assert "single class folder (cats)" in message(err) and "at least 2" in message(err)


def test_nested_folders_hidden_files_and_other_extensions(folder):
    """Sub-folders are walked (sorted); hidden files and folders and extensions Keras does not
    read are ignored, and never checked: a corrupt one changes nothing."""
    nested = folder / "train" / "cats" / "indoor" / "2024"
    nested.mkdir(parents=True)
    (nested / "deep.JPG").write_bytes(jpeg(7))
    for ignored in (".DS_Store", "._cat.0.jpg", "Thumbs.db", "notes.txt", "cat.tiff",
                    "cat.webp", "cat.jpg.part"):
        (folder / "train" / "cats" / ignored).write_bytes(b"\0 not an image")
    (folder / "train" / "cats" / ".hidden").mkdir()
    (folder / "train" / "cats" / ".hidden" / "x.jpg").write_bytes(b"")
    (folder / "train" / ".cache").mkdir()   # not a class
    splits = load_splits(folder, 0.2, 0)
    cats = [f.path for f in splits.train.files if f.label == 0]
    assert cats == ["train/cats/cat.0.jpg", "train/cats/cat.1.jpg", "train/cats/cat.2.jpg",
                    "train/cats/cat.3.jpg", "train/cats/indoor/2024/deep.JPG"]
    assert splits.class_names == ("cats", "dogs") and splits.skipped == ()


def test_non_ascii_names(tmp_path):
    root = make_folder(tmp_path / "données", classes=("chats 🐱", "chiens"))
    (root / "train" / "chiens" / "café-ñandú 犬.jpg").write_bytes(jpeg(9))
    (root / "validation" / "chats 🐱" / "Ünïcödé.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(UserError) as err:
        load_splits(root, 0.2, 0)
    assert str(root / "validation" / "chats 🐱" / "Ünïcödé.png") in message(err)
    splits = load_splits(root, 0.2, 0, skip_bad_images=True)
    assert splits.class_names == ("chats 🐱", "chiens")
    assert "train/chiens/café-ñandú 犬.jpg" in [f.path for f in splits.train.files]
    assert [b.path for b in splits.skipped] == ["validation/chats 🐱/Ünïcödé.png"]


# ---- bad files -------------------------------------------------------------------------------

BAD_FILES = {
    "train/cats/cat.1.jpg": b"",                                    # zero bytes
    "train/dogs/dog.2.jpg": jpeg(1)[:300],                          # truncated
    "validation/cats/cat.3.jpg": b"<html>404 Not Found</html>",     # text named .jpg
}


def plant(folder: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (folder / rel).write_bytes(data)


def test_scan_finds_every_bad_file_in_order(folder):
    plant(folder, BAD_FILES)
    listed = [ImageFile(f"{split}/{f.path}", f.label) for split in ("train", "validation")
              for f in find_images(folder / split).files]
    bad = scan_images(folder, [f.path for f in listed], workers=2)
    assert [b.path for b in bad] == ["train/cats/cat.1.jpg", "train/dogs/dog.2.jpg",
                                     "validation/cats/cat.3.jpg"]
    assert [b.reason for b in bad] == [
        "empty file (0 bytes)", "truncated JPEG (the data ends before the image does)",
        "not an image TensorFlow reads (JPEG, PNG, GIF, BMP, WebP): it starts with b'<html>40'"]


def test_bad_files_stop_the_run_with_one_line(folder, tmp_path):
    plant(folder, BAD_FILES)
    listed = tmp_path / "out" / BAD_IMAGES_FILE
    listed.parent.mkdir()
    with pytest.raises(UserError) as err:
        load_splits(folder, 0.2, 0, bad_list=listed)
    text = message(err)
    assert text.startswith(f"3 unreadable image files: {folder / 'train/cats/cat.1.jpg'} "
                           "(empty file (0 bytes)), ")
    assert f"{folder / 'validation/cats/cat.3.jpg'} (not an image" in text
    assert text.endswith("; fix or remove them, or pass --skip-bad-images to train without them")
    assert listed.read_text().splitlines() == [
        f"{folder / 'train/cats/cat.1.jpg'}\tempty file (0 bytes)",
        f"{folder / 'train/dogs/dog.2.jpg'}\ttruncated JPEG (the data ends before the image does)",
        f"{folder / 'validation/cats/cat.3.jpg'}\tnot an image TensorFlow reads (JPEG, PNG, GIF, "
        "BMP, WebP): it starts with b'<html>40'"]


def test_many_bad_files_name_the_first_few_and_the_list(folder, tmp_path):
    plant(folder, {f"train/dogs/dog.{i}.jpg": b"" for i in range(4)} | BAD_FILES)
    listed = tmp_path / BAD_IMAGES_FILE
    with pytest.raises(UserError) as err:
        load_splits(folder, 0.2, 0, bad_list=listed)
    text = message(err)
    assert text.startswith("6 unreadable image files: ")
    assert text.count(f"{folder}/") == BAD_IMAGES_SHOWN   # the first three named
    assert f" and {6 - BAD_IMAGES_SHOWN} more (all listed in {listed});" in text
    assert len(listed.read_text().splitlines()) == 6


def test_skip_bad_images_drops_them_before_the_split(folder, tmp_path):
    plant(folder, BAD_FILES)
    listed = tmp_path / BAD_IMAGES_FILE
    splits = load_splits(folder, 0.2, 0, skip_bad_images=True, bad_list=listed)
    kept = {f.path for s in ("train", "validation", "test") for f in splits[s].files}
    assert not kept & set(BAD_FILES)
    assert len(kept) == 2 * 4 + 2 * 5 - 3
    assert splits.summary()["skipped"] == [
        {"path": p, "reason": r} for p, r in (
            ("train/cats/cat.1.jpg", "empty file (0 bytes)"),
            ("train/dogs/dog.2.jpg", "truncated JPEG (the data ends before the image does)"),
            ("validation/cats/cat.3.jpg", "not an image TensorFlow reads (JPEG, PNG, GIF, BMP, "
                                          "WebP): it starts with b'<html>40'"))]
    assert len(listed.read_text().splitlines()) == 3
    # The digests are those of the kept list: the same as a folder without the bad files.
    for rel in BAD_FILES:
        (folder / rel).unlink()
    clean = load_splits(folder, 0.2, 0, bad_list=listed)
    assert [splits[s].digest() for s in ("train", "validation", "test")] == [
        clean[s].digest() for s in ("train", "validation", "test")]
    assert clean.summary()["skipped"] == [] and not listed.exists()   # no stale list


def test_a_class_left_without_images_is_an_error(folder):
    plant(folder, {f"train/dogs/dog.{i}.jpg": b"" for i in range(4)})
    with pytest.raises(UserError) as err:
        load_splits(folder, 0.2, 0, skip_bad_images=True)
    assert message(err).startswith(f"every image of class 'dogs' in {folder / 'train'} is "
                                   "unreadable (4 unreadable image files: ")


def test_checking_the_demo_set_is_quick():
    from tl_common.demo import demo_data_root

    root = demo_data_root()
    start = time.perf_counter()
    splits = load_splits(root, 0.2, 42)
    elapsed = time.perf_counter() - start
    assert sum(len(splits[s]) for s in ("train", "validation", "test")) == 380
    assert splits.skipped == () and elapsed < DEMO_SCAN_MAX_S
