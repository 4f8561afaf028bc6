"""Side-by-side performance harness: the PyTorch port against the Keras reference.

Run ``python -m benchmarks [--quick] [--bases NAME ...] [--output DIR] [--repeats N] [--bf16]
[--profile]``; see :mod:`benchmarks.__main__`. Each framework is measured in fresh subprocesses of its own
(:mod:`benchmarks.torch_worker`, :mod:`benchmarks.keras_worker`), started one after the other
by :mod:`benchmarks.runner`; :mod:`benchmarks.report` writes ``benchmark.json`` and
``benchmark.md``. Nothing here imports torch or TensorFlow at import time: the parent process
stays framework-free.
"""
