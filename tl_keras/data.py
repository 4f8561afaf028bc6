"""The Keras reference's input pipeline: ``tf.data`` over the file lists of :mod:`tl_common.files`.

Images are read exactly as ``keras.utils.image_dataset_from_directory`` reads them (its
``_load_image_tf``: decode to RGB, bilinear resize with half-pixel centres and no antialiasing,
float32 in [0, 255]); the files, labels and test split come from :mod:`tl_common`, so the PyTorch
port sees the same images in the same order. Used by ``python -m tl_keras.train``.

Training data is :class:`TrainingData`: every epoch's order is drawn from ``(seed, epoch)`` alone,
so that a run resumed at epoch ``e`` sees the batches an uninterrupted run sees there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import reduce

import numpy as np
import tensorflow as tf

from tl_common.files import FileList


def load_image(path: tf.Tensor, image_size: int) -> tf.Tensor:
    """One image file as a ``(image_size, image_size, 3)`` float32 tensor in [0, 255]."""
    image = tf.io.read_file(path)
    # expand_animations=False: a GIF gives its first frame, as a 3-D image like any other.
    image = tf.image.decode_image(image, channels=3, expand_animations=False)
    # tf.image.resize's defaults are the recipe's: half-pixel centres, antialias=False.
    image = tf.image.resize(image, (image_size, image_size), method="bilinear")
    image.set_shape((image_size, image_size, 3))
    return image


def make_dataset(files: FileList, image_size: int, batch_size: int, *, shuffle: bool, seed: int,
                 limit_batches: int | None = None) -> tf.data.Dataset:
    """Batches of ``(images (N, s, s, 3) float32, labels (N,) int32)`` in the file list's order.

    ``shuffle``: a new order on every pass, drawn from ``seed`` and from how many passes this
    process has made (tf.data's state): a resumed run would draw other orders. The trainer
    shuffles with :class:`TrainingData` instead.
    ``limit_batches``: keep only the first batches of each pass (quick runs).
    """
    labels = tf.constant(files.labels, dtype=tf.int32)  # label_mode="int"
    dataset = tf.data.Dataset.from_tensor_slices((files.paths, labels))
    if shuffle:
        # Shuffling paths before decoding keeps the buffer cheap: the whole list fits in it.
        dataset = dataset.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.map(lambda path, label: (load_image(path, image_size), label),
                          num_parallel_calls=tf.data.AUTOTUNE)
    dataset = dataset.batch(batch_size)
    if limit_batches is not None:
        dataset = dataset.take(limit_batches)
    return dataset.prefetch(tf.data.AUTOTUNE)


def epoch_order(size: int, seed: int, epoch: int) -> np.ndarray:
    """The order of ``size`` training files in epoch ``epoch`` (from 0): a permutation drawn
    from ``(seed, epoch)`` alone, never from how many epochs this process has run."""
    return np.random.default_rng([seed, epoch]).permutation(size)


@dataclass(frozen=True)
class TrainingData:
    """The training batches of a range of epochs, each epoch in the order of :func:`epoch_order`.

    ``tf.data``'s ``shuffle(reshuffle_each_iteration=True)`` draws each pass's order from
    state that starts afresh in every process, so a run resumed at epoch ``e`` would see
    another order than an uninterrupted one; a dataset reseeded from a callback would race
    with Keras, which opens the next epoch's iterator (and prefetches) before
    ``on_epoch_begin``. Here the orders are fixed before ``fit``: the dataset is the epochs'
    batches one after another, batches never straddle two epochs, and ``fit`` takes
    :attr:`steps_per_epoch` batches per epoch.
    """

    files: FileList
    image_size: int
    batch_size: int
    seed: int
    limit_batches: int | None = None  # the first batches of each epoch only (quick runs)

    @property
    def steps_per_epoch(self) -> int:
        batches = math.ceil(len(self.files) / self.batch_size)  # the last one may be smaller
        return batches if self.limit_batches is None else min(batches, self.limit_batches)

    def one_epoch(self, epoch: int) -> tf.data.Dataset:
        """Epoch ``epoch``'s batches of ``(images (N, s, s, 3) float32, labels (N,) int32)``."""
        # Cut before decoding: --limit-batches reads only the images it trains on.
        order = epoch_order(len(self.files), self.seed, epoch)
        order = order[:self.steps_per_epoch * self.batch_size]
        paths = np.asarray(self.files.paths)[order]
        labels = np.asarray(self.files.labels, dtype=np.int32)[order]  # label_mode="int"
        dataset = tf.data.Dataset.from_tensor_slices((paths, labels))
        dataset = dataset.map(lambda path, label: (load_image(path, self.image_size), label),
                              num_parallel_calls=tf.data.AUTOTUNE)
        return dataset.batch(self.batch_size)

    def epochs(self, epochs: range) -> tf.data.Dataset:
        """The batches of ``epochs`` (from 0), in turn: ``len(epochs) * steps_per_epoch``."""
        if not epochs:
            raise ValueError(f"epochs={epochs}: expected at least one epoch")
        dataset = reduce(tf.data.Dataset.concatenate, (self.one_epoch(e) for e in epochs))
        return dataset.prefetch(tf.data.AUTOTUNE)
