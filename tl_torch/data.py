"""Images for the port, as ``keras.utils.image_dataset_from_directory`` delivers them.

The file lists, labels and test split come from :mod:`tl_common.files`, so they are the Keras
reference's, checked and (with ``--skip-bad-images``) cleaned the same way. Each file is decoded
to RGB as ``tf.image.decode_image`` decodes it (:func:`tl_common.images.decode_rgb`: JPEG with
TensorFlow's fast IDCT, grayscale, palette and RGBA converted, a GIF's first frame) and resized
like ``tf.image.resize(..., "bilinear")``: half-pixel centres, no antialiasing, no crop (the
aspect ratio is not kept), float32 values in [0, 255].

Decoding and resizing are the slow part of an epoch on a CPU, and augmentation comes after them,
so when the resized images fit in a memory budget they are computed once, in parallel, and kept
(``ImageCache``); otherwise threads of the training process decode every epoch, a few batches
ahead (``ImageBatches``).
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import cv2
import lightning as L
import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, Sampler, SequentialSampler
from tqdm import tqdm

from tl_common.data import resolve_data_root
from tl_common.errors import UserError
from tl_common.files import BAD_IMAGES_FILE, SPLITS, DataSplits, FileList, find_images, load_splits
from tl_common.images import UnreadableImage, decode_rgb
from tl_common.settings import Settings

__all__ = ["ImageBatches", "ImageCache", "ImageFiles", "ImageFolderDataModule", "decode_rgb",
           "load_image", "load_images", "resize_bilinear"]

#: Memory the decoded-image cache may take on this machine, in bytes (float32, 3 x size x size
#: per image): all three splits, and every training process of the machine (each holds its own).
CACHE_BUDGET_BYTES = int(os.environ.get("TL_PARITY_CACHE_BYTES", 4 << 30))


def resize_into(pixels: np.ndarray | torch.Tensor, out: np.ndarray) -> None:
    """(H, W, C) pixels resized into ``out``, float32 (C, size, size), like
    ``tf.image.resize(method="bilinear")`` with its defaults: half-pixel centres, no antialiasing.

    OpenCV's float bilinear resize (``INTER_LINEAR``), which is that interpolation. It releases
    the GIL, and it is closer to the exact result than TensorFlow itself (its sample positions
    come from a double-precision scale, TensorFlow's and torch's from a float32 one), so the
    port's pixels stay within TensorFlow's own float32 error of the exact resize
    (tests/test_torch_data.py, check 6)."""
    hwc = np.asarray(pixels).astype(np.float32, copy=False)
    size = out.shape[-1]
    resized = cv2.resize(hwc, (size, size), interpolation=cv2.INTER_LINEAR)
    out[...] = resized.reshape(size, size, -1).transpose(2, 0, 1)


def resize_bilinear(pixels: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """(H, W, C) pixels -> float32 (C, size, size): :func:`resize_into` a new tensor."""
    out = np.empty((np.shape(pixels)[2], size, size), np.float32)
    resize_into(pixels, out)
    return torch.from_numpy(out)


def load_image(path: str, size: int) -> torch.Tensor:
    return resize_bilinear(decode_rgb(path), size)


class ImageReadError(UserError):
    """A file that was read and checked before training can no longer be read during it: it
    vanished (with its folder, perhaps), lost its permissions, or was replaced by a bad file.

    One line for the user. Raised in a decoding thread of :class:`ImageBatches`, it reaches the
    training loop as it is. Raised in the worker of a DataLoader over :class:`ImageFiles`, it
    comes back as ``ImageReadError(<the worker's traceback>)`` (torch's
    ``ExceptionWrapper.reraise``): the line is then the traceback's last one, which is this
    error's own message."""

    def __init__(self, message: str) -> None:
        last = message.strip().splitlines()[-1] if message.strip() else message
        super().__init__(last.split(f"{type(self).__name__}: ", 1)[-1])


def read_training_image(path: str, out: np.ndarray) -> None:
    """A file decoded and resized into ``out`` (float32, (3, size, size)) for the training loop: a
    failure is :class:`ImageReadError`."""
    try:
        resize_into(decode_rgb(path), out)
    except (OSError, UnreadableImage) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise ImageReadError(f"{path} cannot be read any more ({reason}): the data changed "
                             "after the check at the start of the run; restore it, then rerun "
                             "with --resume to continue from the last finished epoch") from None


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and ``taskset``
    narrow), rather than all of the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class ImageFiles(Dataset):
    """Decodes and resizes on every access: a Dataset for a DataLoader, and the files that
    :class:`ImageBatches` reads."""

    def __init__(self, files: FileList, image_size: int) -> None:
        self.paths, self.labels, self.image_size = files.paths, files.labels, image_size

    def __len__(self) -> int:
        return len(self.paths)

    def read_into(self, i: int, out: np.ndarray) -> None:
        read_training_image(self.paths[i], out)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        out = np.empty((3, self.image_size, self.image_size), np.float32)
        self.read_into(i, out)
        return torch.from_numpy(out), self.labels[i]


class ImageBatches:
    """Batches of :class:`ImageFiles`, decoded and resized by threads of this process, up to
    ``prefetch`` batches ahead of the one in use; what a DataLoader with worker processes would
    give (``(images, labels)``: float32 (N, 3, size, size) and int64 (N,)), in the order of
    ``sampler``, whose ``set_epoch`` Lightning calls each epoch; ``batch_sampler`` as a
    DataLoader's, which Lightning reads too. ``threads=0`` decodes each batch when it is asked
    for, in the calling thread.

    Why not torch's DataLoader: its workers are processes, and each batch they make is copied into
    shared memory and mapped again by the training process, a hand-over that costs about as much
    as decoding the JPEG (docs/performance.md). The decoder
    (libjpeg-turbo), the resize (OpenCV) and the copy into the batch all release the GIL, so
    threads use the cores without it. A failure in a thread (:class:`ImageReadError`) is raised
    here when its batch is reached; the batches still being decoded are then dropped.
    """

    def __init__(self, dataset: ImageFiles, batch_size: int, sampler: Sampler | None = None, *,
                 threads: int, prefetch: int = 4, pin_memory: bool = False) -> None:
        if threads < 0 or prefetch < 1:
            raise ValueError(f"threads must be >= 0 and prefetch >= 1, not {threads} and "
                             f"{prefetch}")
        self.dataset, self.batch_size = dataset, batch_size
        self.sampler = SequentialSampler(dataset) if sampler is None else sampler
        self.batch_sampler = BatchSampler(self.sampler, batch_size, drop_last=False)
        self.threads, self.prefetch, self.pin_memory = threads, prefetch, pin_memory

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def _batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.dataset.image_size
        images = torch.empty(len(indices), 3, size, size, pin_memory=self.pin_memory)
        labels = torch.tensor([self.dataset.labels[i] for i in indices], dtype=torch.int64)
        return images, labels

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.threads == 0:
            for indices in self.batch_sampler:
                images, labels = self._batch(indices)
                self._read(indices, images.numpy())
                yield images, labels
            return
        pending: deque[tuple[torch.Tensor, torch.Tensor, list[Future]]] = deque()
        pool = ThreadPoolExecutor(self.threads, thread_name_prefix="tl-decode")
        try:
            for indices in self.batch_sampler:
                images, labels = self._batch(indices)
                # One job per thread and batch, not per image: fewer hand-overs of the GIL.
                per_job = math.ceil(len(indices) / self.threads)
                out = images.numpy()
                jobs = [pool.submit(self._read, indices[j:j + per_job], out[j:j + per_job])
                        for j in range(0, len(indices), per_job)]
                pending.append((images, labels, jobs))
                if len(pending) > self.prefetch:
                    yield self._finished(pending.popleft())
            while pending:
                yield self._finished(pending.popleft())
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _read(self, indices: list[int], out: np.ndarray) -> None:
        for i, image in zip(indices, out, strict=True):
            self.dataset.read_into(i, image)

    @staticmethod
    def _finished(batch: tuple[torch.Tensor, torch.Tensor, list[Future]]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels, jobs = batch
        for job in jobs:
            job.result()  # the thread's error, if any
        return images, labels


class ImageCache(Dataset):
    """All images decoded and resized once, kept as one float32 tensor. ``decoded``: images
    already resized (by full path), taken from it instead of decoded again, and removed."""

    def __init__(self, files: FileList, image_size: int, desc: str = "decoding",
                 decoded: dict[str, torch.Tensor] | None = None) -> None:
        self.labels = torch.tensor(files.labels)
        self.images = torch.empty(len(files), 3, image_size, image_size)
        decoded = {} if decoded is None else decoded
        paths, out = files.paths, self.images.numpy()

        def load(chunk: range) -> int:
            for i in chunk:
                image = decoded.pop(paths[i], None)
                if image is None:
                    read_training_image(paths[i], out[i])
                else:  # through numpy: the cache may have been made under inference mode,
                    out[i] = image.numpy()  # which does not reach this thread
            return len(chunk)

        # Decoding, resizing and the copy release the GIL: threads use every core. Chunks of
        # images, not single ones, for fewer hand-overs of the GIL (see ImageBatches).
        chunks = [range(i, min(i + 16, len(files))) for i in range(0, len(files), 16)]
        with (ThreadPoolExecutor(max_workers=available_cores()) as pool,
              tqdm(total=len(files), desc=desc, leave=False, disable=len(files) < 200) as bar):
            for done in pool.map(load, chunks):
                bar.update(done)

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
    ``setup`` reads the file lists on every process, which are deterministic. ``threads``: how
    many threads decode the images that are not cached (0: in the training loop's own thread);
    by default the cores available, shared by the machine's training processes, at most 8.
    """

    def __init__(self, settings: Settings, *, threads: int | None = None,
                 cache: bool | None = None) -> None:
        super().__init__()
        self.settings = settings
        self.threads = threads
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

    def _loader(self, split: str, *, shuffle: bool) -> DataLoader | ImageBatches:
        dataset = self.dataset(split)
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
        pin_memory = torch.cuda.is_available()
        if isinstance(dataset, ImageCache):
            return DataLoader(dataset, batch_size=self.settings.batch_size, sampler=sampler,
                              pin_memory=pin_memory)
        threads = self.threads
        if threads is None:
            processes = trainer.num_devices if trainer is not None else 1
            threads = max(1, min(8, available_cores() // processes))
        return ImageBatches(dataset, self.settings.batch_size, sampler, threads=threads,
                            pin_memory=pin_memory)

    def train_dataloader(self) -> DataLoader | ImageBatches:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | ImageBatches:
        return self._loader("validation", shuffle=False)

    def test_dataloader(self) -> DataLoader | ImageBatches:
        return self._loader("test", shuffle=False)


def load_images(paths: Sequence[str], image_size: int) -> torch.Tensor:
    """A batch (N, 3, size, size) from image files, for prediction."""
    return torch.stack([load_image(p, image_size) for p in paths])
