"""The Keras reference's input pipeline: ``tf.data`` over the file lists of :mod:`tl_common.files`.

Images are read exactly as ``keras.utils.image_dataset_from_directory`` reads them (its
``_load_image_tf``: decode to RGB, bilinear resize with half-pixel centres and no antialiasing,
float32 in [0, 255]); the files, labels and test split come from :mod:`tl_common`, so the PyTorch
port sees the same images in the same order. Used by ``python -m tl_keras.train``.
"""

from __future__ import annotations

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

    ``shuffle``: a new order on every pass (training data), drawn from ``seed``.
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
