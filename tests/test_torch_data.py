"""The port's data module (``tl_torch/data.py``): when the decoded-image cache is used, the
threads that decode every epoch otherwise, and the resize.

The cache's budget is the memory of the machine: the three splits count together, and under DDP
every process holds a cache of its own. Run: ``python -m pytest tests/test_torch_data.py -q``.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler

import tl_torch.data as data_module
from tl_common.files import FileList
from tl_common.settings import Settings
from tl_torch.data import (
    ImageBatches,
    ImageCache,
    ImageFiles,
    ImageFolderDataModule,
    ImageReadError,
    cache_bytes,
    fits_in_cache,
)

SIZE = 32
#: Images per class: 4 to train, 5 to validate (1 of them set aside for the test split).
PER_CLASS = {"train": 4, "validation": 5}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    for split, count in PER_CLASS.items():
        for label, name in enumerate(("cats", "dogs")):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (40, 30), (200 * label, 10 * i, 90)).save(
                    root / split / name / f"{i}.png")
    return root


def datamodule(folder: Path, processes: int = 1) -> ImageFolderDataModule:
    dm = ImageFolderDataModule(Settings(data_dir=str(folder), image_size=SIZE), threads=0)
    if processes > 1:  # what the data module reads of a DDP trainer
        dm.trainer = SimpleNamespace(num_devices=processes)
    return dm


def test_the_budget_counts_all_splits_together(folder, monkeypatch):
    dm = datamodule(folder)
    dm.setup()
    sizes = [len(dm.splits[split]) for split in ("train", "validation", "test")]
    assert sizes == [8, 8, 2]
    everything = cache_bytes(sum(sizes), SIZE)
    assert everything == 18 * 3 * SIZE * SIZE * 4
    # Each split fits alone, the three together do not: nothing is cached.
    monkeypatch.setattr(data_module, "CACHE_BUDGET_BYTES", everything - 1)
    assert all(fits_in_cache(n, SIZE) for n in sizes)
    assert not datamodule(folder).uses_cache()
    assert all(isinstance(datamodule(folder).dataset(s), ImageFiles) for s in ("train", "test"))
    monkeypatch.setattr(data_module, "CACHE_BUDGET_BYTES", everything)
    dm = datamodule(folder)
    assert dm.uses_cache()
    assert all(isinstance(dm.dataset(s), ImageCache) for s in ("train", "validation", "test"))


def test_under_ddp_every_process_counts(folder, monkeypatch):
    everything = cache_bytes(18, SIZE)
    monkeypatch.setattr(data_module, "CACHE_BUDGET_BYTES", 2 * everything - 1)
    assert datamodule(folder, processes=1).uses_cache()
    assert not datamodule(folder, processes=2).uses_cache()
    monkeypatch.setattr(data_module, "CACHE_BUDGET_BYTES", 2 * everything)
    assert datamodule(folder, processes=2).uses_cache()


def test_an_explicit_choice_wins(folder, monkeypatch):
    monkeypatch.setattr(data_module, "CACHE_BUDGET_BYTES", 0)
    dm = ImageFolderDataModule(Settings(data_dir=str(folder), image_size=SIZE), cache=True)
    assert dm.uses_cache() and isinstance(dm.dataset("validation"), ImageCache)


@pytest.mark.parametrize("budget", ["fits", "too small"])
def test_each_file_is_decoded_once(folder, monkeypatch, budget):
    """The check of every file before training decodes it; with the cache on, those pixels are
    the cache's (resized once), not decoded a second time. Without the cache the check's pixels
    are not kept, and the per-epoch dataset decodes on access."""
    import tl_common.images

    decoded: list[str] = []
    real = tl_common.images.decode_rgb

    def counting(path):
        decoded.append(str(path))
        return real(path)

    monkeypatch.setattr(tl_common.images, "decode_rgb", counting)
    monkeypatch.setattr(data_module, "decode_rgb", counting)
    if budget == "too small":
        monkeypatch.setattr(data_module, "CACHE_BUDGET_BYTES", 0)
    dm = datamodule(folder)
    dm.setup()
    datasets = [dm.dataset(s) for s in ("train", "validation", "test")]
    files = sorted(p for s in ("train", "validation", "test") for p in dm.splits[s].paths)
    assert sorted(decoded) == files  # once each, by the check
    if budget == "fits":
        assert all(isinstance(d, ImageCache) for d in datasets) and not dm._decoded
        # The cache holds what decoding on access gives, image for image.
        for split, cache in zip(("train", "validation", "test"), datasets, strict=True):
            fresh = ImageFiles(dm.splits[split], SIZE)
            for i in range(len(cache)):
                assert torch.equal(cache[i][0], fresh[i][0])
                assert int(cache[i][1]) == fresh[i][1]
    else:
        assert all(isinstance(d, ImageFiles) for d in datasets) and not dm._decoded


@pytest.mark.parametrize(("shape", "size"), [
    ((197, 335, 3), 160),   # a demo image, the recipe's size
    ((375, 500, 3), 224),   # downscaling, another size
    ((7, 300, 3), 160),     # upscaling one axis, downscaling the other
    ((40, 48, 1), 96),      # one channel, upscaling
    ((1, 1, 3), 32),        # a single pixel
    ((160, 160, 3), 160),   # the same size: the pixels themselves
])
def test_resize_is_tensorflows_within_its_own_rounding(shape, size):
    """The port's resize against the exact one (TensorFlow's bilinear resize in float64), held to
    TensorFlow's own float32 error by the band of tl_common.bands, for uint8 and float input."""
    import numpy as np
    import tensorflow as tf

    from parity_tests import exact
    from tl_common import bands

    pixels = np.random.default_rng(sum(shape) + size).integers(0, 256, shape, dtype=np.uint8)
    truth = exact.resize_bilinear(pixels, size)
    keras = tf.image.resize(pixels, (size, size), method="bilinear").numpy()
    for given in (pixels, torch.from_numpy(pixels).float()):
        port = data_module.resize_bilinear(given, size)
        assert port.shape == (shape[2], size, size) and port.dtype == torch.float32
        band = bands.against_exact(truth, keras, port.permute(1, 2, 0).numpy())
        assert band.passed, f"{band.port_error:.3g} > {band.describe()}"


def decoding_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("tl-decode")]


@pytest.mark.parametrize("threads", [0, 1, 3])
def test_batches_from_threads_are_a_dataloaders(folder, threads):
    """ImageBatches gives what torch's DataLoader gives over the same files and sampler: the same
    batches in the same order, a short last one, each epoch's own order (set_epoch)."""
    dm = datamodule(folder)
    dm.setup()
    dataset = ImageFiles(dm.splits.validation, SIZE)
    assert len(dataset) == 8
    orders = []
    for epoch in (0, 1):
        sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=3)
        ours = ImageBatches(dataset, 3, sampler, threads=threads, prefetch=1)
        ours.sampler.set_epoch(epoch)
        theirs = list(DataLoader(dataset, batch_size=3, sampler=sampler))
        batches = list(ours)
        assert len(ours) == len(batches) == len(theirs) == 3
        for (images, labels), (t_images, t_labels) in zip(batches, theirs, strict=True):
            assert images.dtype == torch.float32 and labels.dtype == torch.int64
            assert torch.equal(images, t_images) and torch.equal(labels, t_labels)
        assert [len(labels) for _, labels in batches] == [3, 3, 2]
        orders.append(torch.cat([images for images, _ in batches]))
    assert not torch.equal(orders[0], orders[1])
    assert not decoding_threads()


def test_the_cache_and_the_threads_give_the_same_epochs(folder):
    """With the cache on or off, the data module's training batches are the same, pixel for
    pixel, epoch after epoch."""
    loaders = []
    for cache in (True, False):
        dm = ImageFolderDataModule(Settings(data_dir=str(folder), image_size=SIZE, batch_size=3),
                                   cache=cache)
        loaders.append(dm.train_dataloader())
    cached, threaded = loaders
    assert isinstance(cached, DataLoader) and isinstance(threaded, ImageBatches)
    for epoch in (0, 1):
        for loader in loaders:
            loader.sampler.set_epoch(epoch)
        for (images, labels), (c_images, c_labels) in zip(threaded, cached, strict=True):
            assert torch.equal(images, c_images) and torch.equal(labels, c_labels)


@pytest.fixture
def eight_files(folder, tmp_path) -> FileList:
    """The folder's 8 training images, copied where a test may delete them."""
    dm = datamodule(folder)
    dm.setup()
    files = dm.splits.train
    copy = tmp_path / "train"
    shutil.copytree(files.root, copy)
    return FileList(copy, files.class_names, files.files)


def test_an_image_gone_mid_epoch_is_one_line_and_ends_the_threads(eight_files):
    gone = Path(eight_files.paths[5])
    gone.unlink()
    batches = iter(ImageBatches(ImageFiles(eight_files, SIZE), 2, threads=2, prefetch=2))
    next(batches)
    next(batches)
    with pytest.raises(ImageReadError) as info:
        next(batches)  # images 4 and 5
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{gone} cannot be read any more (No such file or directory)")
    assert not decoding_threads()


def test_an_epoch_left_early_ends_the_threads(eight_files):
    batches = iter(ImageBatches(ImageFiles(eight_files, SIZE), 2, threads=2, prefetch=2))
    next(batches)
    assert decoding_threads()
    batches.close()  # what Lightning's limit_train_batches or an error in a step leads to
    assert not decoding_threads()


class Seen(L.LightningModule):
    """A tiny model that records which images each stage and epoch saw (by their mean pixel)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 2)
        self.seen: dict[tuple[str, int], list[float]] = {}

    def _step(self, batch, stage: str) -> torch.Tensor:
        images, labels = batch
        self.seen.setdefault((stage, self.current_epoch), []).extend(
            images.mean((1, 2, 3)).tolist())
        return torch.nn.functional.cross_entropy(self.layer(images.mean((2, 3))), labels)

    def training_step(self, batch, batch_idx):
        return self._step(batch, "fit")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "validate")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def predict_step(self, batch, batch_idx):
        return batch[1]

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_runs_every_stage_on_the_threads(folder):
    """Fit, validate, test and predict through a Trainer with the images decoded every epoch:
    every image once per epoch, a fresh training order each epoch."""
    dm = ImageFolderDataModule(Settings(data_dir=str(folder), image_size=SIZE, batch_size=3),
                               cache=False)
    module = Seen()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    trainer.test(module, datamodule=dm, verbose=False)
    predicted = torch.cat(trainer.predict(module, dataloaders=dm.test_dataloader()))
    assert isinstance(dm.train_dataloader(), ImageBatches)
    means = {split: sorted(float(images.mean()) for images, _ in
                           (ImageFiles(dm.splits[split], SIZE)[i] for i in range(len(dm.splits[split]))))
             for split in ("train", "validation", "test")}
    fit0, fit1 = module.seen["fit", 0], module.seen["fit", 1]
    assert sorted(fit0) == sorted(fit1) == pytest.approx(means["train"])
    assert fit0 != fit1
    for epoch in (0, 1):
        assert sorted(module.seen["validate", epoch]) == pytest.approx(means["validation"])
    assert sorted(module.seen["test", 2]) == pytest.approx(means["test"])
    assert predicted.tolist() == dm.splits.test.labels
    assert not decoding_threads()
