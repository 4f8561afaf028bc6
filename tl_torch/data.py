"""Images for the port, as ``keras.utils.image_dataset_from_directory`` delivers them.

The file lists, labels and test split come from :mod:`tl_common.files`, so they are the Keras
reference's, checked and (with ``--skip-bad-images``) cleaned the same way. Each file is decoded
to RGB as ``tf.image.decode_image`` decodes it (:func:`tl_common.images.decode_rgb`: JPEG with
TensorFlow's fast IDCT, grayscale, palette and RGBA converted, a GIF's first frame) and resized
like ``tf.image.resize(..., "bilinear")``: half-pixel centres, no antialiasing, no crop (the
aspect ratio is not kept), float32 values in [0, 255].

Decoding and resizing are the slow part of an epoch on a CPU, and augmentation comes after them,
so when the resized images fit in a memory budget they are computed once, in parallel, and kept
(``ImageCache``); otherwise DataLoader workers decode every epoch.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from tl_common.data import resolve_data_root
from tl_common.errors import UserError
from tl_common.files import BAD_IMAGES_FILE, SPLITS, DataSplits, FileList, find_images, load_splits
from tl_common.images import UnreadableImage, decode_rgb
from tl_common.settings import Settings

__all__ = ["ImageCache", "ImageFiles", "ImageFolderDataModule", "decode_rgb", "load_image",
           "load_images", "resize_bilinear"]

#: Memory the decoded-image cache may take on this machine, in bytes (float32, 3 x size x size
#: per image): all three splits, and every training process of the machine (each holds its own).
CACHE_BUDGET_BYTES = int(os.environ.get("TL_PARITY_CACHE_BYTES", 4 << 30))


def resize_bilinear(pixels: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """(H, W, 3) pixels -> float32 (3, size, size), like ``tf.image.resize(method="bilinear")``
    with its defaults: half-pixel centres (``align_corners=False``), no antialiasing."""
    x = torch.as_tensor(np.ascontiguousarray(pixels)).permute(2, 0, 1).unsqueeze(0).float()
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=False).squeeze(0)


def load_image(path: str, size: int) -> torch.Tensor:
    return resize_bilinear(decode_rgb(path), size)


class ImageReadError(UserError):
    """A file that was read and checked before training can no longer be read during it: it
    vanished (with its folder, perhaps), lost its permissions, or was replaced by a bad file.

    One line for the user. Raised in a DataLoader worker, it comes back to the training process
    as ``ImageReadError(<the worker's traceback>)`` (torch's ``ExceptionWrapper.reraise``): the
    line is then the traceback's last one, which is this error's own message."""

    def __init__(self, message: str) -> None:
        last = message.strip().splitlines()[-1] if message.strip() else message
        super().__init__(last.split(f"{type(self).__name__}: ", 1)[-1])


def read_training_image(path: str, size: int) -> torch.Tensor:
    """:func:`load_image` for the training loop: a failure is :class:`ImageReadError`."""
    try:
        return load_image(path, size)
    except (OSError, UnreadableImage) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise ImageReadError(f"{path} cannot be read any more ({reason}): the data changed "
                             "after the check at the start of the run; restore it, then rerun "
                             "with --resume to continue from the last finished epoch") from None


class ImageFiles(Dataset):
    """Decodes and resizes on every access (for DataLoader workers)."""

    def __init__(self, files: FileList, image_size: int) -> None:
        self.paths, self.labels, self.image_size = files.paths, files.labels, image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return read_training_image(self.paths[i], self.image_size), self.labels[i]


class ImageCache(Dataset):
    """All images decoded and resized once, kept as one float32 tensor. ``decoded``: images
    already resized (by full path), taken from it instead of decoded again, and removed."""

    def __init__(self, files: FileList, image_size: int, desc: str = "decoding",
                 decoded: dict[str, torch.Tensor] | None = None) -> None:
        self.labels = torch.tensor(files.labels)
        self.images = torch.empty(len(files), 3, image_size, image_size)
        decoded = {} if decoded is None else decoded

        def load(path: str) -> torch.Tensor:
            image = decoded.pop(path, None)
            return read_training_image(path, image_size) if image is None else image

        # Pillow's decoder and torch's resize release the GIL: threads use every core.
        with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
            jobs = pool.map(load, files.paths)
            for i, image in enumerate(tqdm(jobs, total=len(files), desc=desc, leave=False,
                                           disable=len(files) < 200)):
                self.images[i] = image

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.labels[i]


class ShardSampler(DistributedSampler):
    """Each image exactly once over all processes, in order: process r takes r, r + n, r + 2n...

    Lightning's default for validation and test under DDP is a ``DistributedSampler``, which pads
    the shards to equal length by repeating images, so that metrics would count some twice and
    differ from one process's over the whole split (Keras' ``evaluate``). Shards here may differ
    by one image; the metrics (torchmetrics states, summed over processes) need no equal length.
    ``tl_torch.train`` turns Lightning's sampler replacement off (``use_distributed_sampler=False``:
    the data module makes every sampler itself); being a ``DistributedSampler``, this one is also
    left in place by a Trainer that keeps it on.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, len(self.dataset), self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, len(self.dataset), self.num_replicas))


def cache_bytes(n_images: int, image_size: int) -> int:
    """Bytes of ``n_images`` decoded images in the cache (float32, 3 x size x size each)."""
    return n_images * 3 * image_size * image_size * 4


def fits_in_cache(n_images: int, image_size: int, *, processes: int = 1,
                  budget: int | None = None) -> bool:
    """Whether ``processes`` caches of ``n_images`` each stay within ``budget`` together
    (default :data:`CACHE_BUDGET_BYTES`)."""
    budget = CACHE_BUDGET_BYTES if budget is None else budget
    return processes * cache_bytes(n_images, image_size) <= budget


class ImageFolderDataModule(L.LightningDataModule):
    """The recipe's three splits from a cats_and_dogs_filtered-style folder.

    ``prepare_data`` finds (and if needed downloads or generates) the images once per machine;
    ``setup`` reads the file lists on every process, which are deterministic.
    """

    def __init__(self, settings: Settings, *, num_workers: int | None = None,
                 cache: bool | None = None) -> None:
        super().__init__()
        self.settings = settings
        self.num_workers = min(4, os.cpu_count() or 1) if num_workers is None else num_workers
        self.cache = cache
        self._cached: bool | None = None  # decided once for all splits: see uses_cache
        self._prepared = False
        self.splits: DataSplits | None = None
        self._datasets: dict[str, Dataset] = {}
        self._decoded: dict[str, torch.Tensor] = {}  # resized while the files were checked

    def prepare_data(self) -> None:
        """Find, download or generate the images: once per machine (Lightning calls it on each
        machine's first process; ``tl_torch.train`` before the others start)."""
        if not self._prepared:
            resolve_data_root(self.settings)
            self._prepared = True

    def setup(self, stage: str | None = None) -> None:
        if self.splits is None:
            s = self.settings
            root = resolve_data_root(s)
            bad_list = None if s.output_dir is None else Path(s.output_dir) / BAD_IMAGES_FILE
            # The check of every file decodes it: when the images will be cached, the check
            # keeps them, resized, so each file is decoded once.
            keep = None
            if self._may_cache(root):
                def keep(path: str, pixels: np.ndarray) -> None:
                    self._decoded[path] = resize_bilinear(pixels, s.image_size)
            self.splits = load_splits(root, s.test_fraction, s.seed,
                                      skip_bad_images=s.skip_bad_images, bad_list=bad_list,
                                      keep=keep)

    def _may_cache(self, root: Path) -> bool:
        """Whether the cache may be used, by the number of files listed (before any is found
        unreadable) and one process; :meth:`uses_cache` decides."""
        if self.cache is not None:
            return self.cache
        if not all((root / sub).is_dir() for sub in ("train", "validation")):
            return False  # load_splits names what is missing
        listed = sum(len(find_images(root / sub)) for sub in ("train", "validation"))
        return fits_in_cache(listed, self.settings.image_size)

    @property
    def class_names(self) -> tuple[str, ...]:
        self.setup()
        return self.splits.class_names

    def uses_cache(self) -> bool:
        """Whether the splits are decoded once and kept (``cache``, else :data:`CACHE_BUDGET_BYTES`):
        decided once, for the three splits together and for every process on this machine
        (under DDP each process holds the whole cache)."""
        if self._cached is None:
            self.setup()
            processes = self.trainer.num_devices if self.trainer is not None else 1
            total = sum(len(self.splits[split]) for split in SPLITS)
            self._cached = (fits_in_cache(total, self.settings.image_size, processes=processes)
                            if self.cache is None else self.cache)
        return self._cached

    def dataset(self, split: str) -> Dataset:
        self.setup()
        if split not in self._datasets:
            files = self.splits[split]
            size = self.settings.image_size
            if self.uses_cache():
                self._datasets[split] = ImageCache(files, size, desc=f"decoding {split}",
                                                   decoded=self._decoded)
            else:
                self._decoded.clear()
                self._datasets[split] = ImageFiles(files, size)
        return self._datasets[split]

    def _loader(self, split: str, *, shuffle: bool) -> DataLoader:
        dataset = self.dataset(split)
        workers = 0 if isinstance(dataset, ImageCache) else self.num_workers
        sampler = None
        trainer = self.trainer
        world_size, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
        if shuffle:
            # A fresh, seeded order per epoch (Lightning calls set_epoch), so a resumed run sees
            # the batches an uninterrupted one would; one shard per process under DDP.
            sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                         seed=self.settings.seed)
        elif world_size > 1:
            sampler = ShardSampler(dataset, num_replicas=world_size, rank=rank)
        return DataLoader(dataset, batch_size=self.settings.batch_size, sampler=sampler,
                          shuffle=False, num_workers=workers, persistent_workers=workers > 0,
                          pin_memory=torch.cuda.is_available(),
                          prefetch_factor=4 if workers > 0 else None)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


def load_images(paths: Sequence[str], image_size: int) -> torch.Tensor:
    """A batch (N, 3, size, size) from image files, for prediction."""
    return torch.stack([load_image(p, image_size) for p in paths])
