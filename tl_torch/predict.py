"""Classify image files with a model trained by ``python -m tl_torch.train``.

Run ``python -m tl_torch.predict RUN_DIR IMAGE_OR_FOLDER [...]``: prints, per image, the class
name and the probability of that class (two classes: the sigmoid of the logit for class 1, one
minus it for class 0; N classes: the largest softmax probability), with the class order of the
training data's folders. ``RUN_DIR/model.ckpt`` alone is needed: the checkpoint holds the class
names, the image size and the base's settings.
Folders are searched recursively for the image types Keras reads.

A file that cannot be read (damaged, truncated, not an image) is one line on stderr naming it and
why, in the trainers' words; the other files are still predicted, and the exit status is then 1
(``SKIPPED_EXIT``), so that a script knows something was left out. Exit status 2: nothing
was predicted (a bad run folder, no images found).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from tl_common.errors import UserError, fail, run_main
from tl_common.files import IMAGE_EXTENSIONS, describe_bad_images
from tl_common.images import BadImage, UnreadableImage, unreadable_reason
from tl_torch.checkpoint import load_run
from tl_torch.data import load_image
from tl_torch.module import TransferModule
from tl_torch.runtime import keep_freed_memory

#: Images per forward pass.
PREDICT_BATCH = 32
#: Exit status when some files could not be read and the others were predicted (a user error that
#: stops everything exits with 2, tl_common.errors.USER_ERROR_EXIT).
SKIPPED_EXIT = 1


def image_paths(inputs: Sequence[str]) -> list[Path]:
    """Files as given, and the image files under folders, sorted; unknown paths are an error."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and
                            not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)
        elif path.is_file():
            found.append(path)
        else:
            raise UserError(f"{item} is neither an image file nor a folder")
    if not found:
        raise UserError(f"no images ({' '.join(IMAGE_EXTENSIONS)}) in {', '.join(inputs)}")
    return found


def predict(module: TransferModule, paths: Sequence[Path], class_names: Sequence[str],
            image_size: int, *, skipped: list[BadImage] | None = None
            ) -> Iterator[tuple[Path, str, float]]:
    """(path, class name, probability of that class) per image. A file that cannot be read is
    left out and added to ``skipped`` (its path and why); without ``skipped`` it is a
    :class:`UserError` naming it."""
    for start in range(0, len(paths), PREDICT_BATCH):
        chunk, images = [], []
        for path in paths[start:start + PREDICT_BATCH]:
            try:
                images.append(load_image(str(path), image_size))
            except (UnreadableImage, OSError) as err:
                bad = BadImage(str(path), unreadable_reason(err))
                if skipped is None:
                    raise UserError(describe_bad_images([bad], Path())) from None
                skipped.append(bad)
                print(f"skipped {describe_bad_images([bad], Path())}", file=sys.stderr,
                      flush=True)
                continue
            chunk.append(path)
        if not chunk:
            continue
        with torch.no_grad():
            logits = module(torch.stack(images))
        # As the accuracy counts it: the logit's sign (two classes), the largest logit (N).
        labels, probs = (t.tolist() for t in module.probabilities(logits))
        for path, label, prob in zip(chunk, labels, probs, strict=True):
            yield path, class_names[int(label)], prob


def main(argv: list[str] | None = None) -> list[tuple[Path, str, float]]:
    """Print and return the predictions; exit with :data:`SKIPPED_EXIT` after them when some
    files could not be read."""
    parser = argparse.ArgumentParser(prog="python -m tl_torch.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="output folder of python -m tl_torch.train")
    parser.add_argument("images", nargs="+", help="image files or folders")
    args = parser.parse_args(argv)
    keep_freed_memory()  # as tl_torch.train: reuse the activations' memory from batch to batch
    module, class_names, image_size = load_run(args.run_dir)
    paths, results, skipped = image_paths(args.images), [], []
    for path, name, prob in predict(module, paths, class_names, image_size, skipped=skipped):
        print(f"{path}\t{name}\t{prob:.4f}", flush=True)
        results.append((path, name, prob))
    if skipped:
        fail(f"{len(skipped)} of {len(paths)} files could not be read and were skipped (named "
             f"above); the other {len(results)} were predicted", SKIPPED_EXIT)
    return results


if __name__ == "__main__":
    run_main(main)
