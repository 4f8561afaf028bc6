"""The parity suite: each check of the Keras reference against the port, recorded for the report.

Run with the rest of the tests (``python -m pytest tests parity_tests``) or alone with its report
files: ``python -m parity_tests``. The checks live in ``checks_*.py``; each returns rows and this
file asserts that every row passed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from parity_tests import (
    checks_data,
    checks_e2e,
    checks_init_from,
    checks_model,
    checks_module,
    checks_steps,
    checks_trainers,
    checks_training,
    seeds,
)


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("parity")


@pytest.mark.slow  # six Keras bases built
def test_1_architecture(parity) -> None:
    parity.check(checks_model.check_architecture())


def test_2_trainable_counts(parity) -> None:
    parity.check(checks_model.check_counts())


def test_3_preprocessing(parity) -> None:
    parity.check(checks_model.check_preprocessing())


@pytest.mark.slow  # Keras in float64, two weight sets, two sizes
def test_4_numerics(parity, workdir: Path) -> None:
    parity.check(checks_model.check_degenerate_weights_are_detected()
                 + checks_model.check_numerics(workdir))


@pytest.mark.slow  # training steps in both frameworks, folded and unfolded
def test_5_batchnorm(parity) -> None:
    parity.check(checks_training.check_batchnorm())


def test_6_input_pipeline(parity) -> None:
    parity.check(checks_data.check_pipeline() + checks_data.check_cached_pipeline())


def test_7_augmentation(parity) -> None:
    parity.check(checks_data.check_augmentation())


def test_8_optimizers(parity) -> None:
    parity.check(checks_training.check_optimizers())


@pytest.mark.slow  # 40 steps in three models, and a second Keras process
def test_9_training_steps(parity) -> None:
    parity.check(checks_steps.check_steps())


def test_10_head(parity) -> None:
    parity.check(checks_model.check_head())


@pytest.mark.long
@pytest.mark.slow
def test_11_end_to_end(parity, workdir: Path) -> None:
    parity.check(checks_e2e.check_end_to_end(workdir))


@pytest.mark.trainers
def test_14_trainers_recorded(parity, workdir: Path) -> None:
    parity.check(checks_trainers.check_recorded(workdir))


@pytest.mark.trainers
def test_15_prediction(parity) -> None:
    parity.check(checks_trainers.check_prediction())


def test_16_module(parity) -> None:
    parity.check(checks_module.check_module())


def test_18_bf16(parity) -> None:
    parity.check(checks_module.check_bf16())


@pytest.mark.slow  # a Keras model saved, converted, and stepped in float64
def test_19_converted_model_fine_tuned(parity, workdir: Path) -> None:
    parity.check(checks_init_from.check_init_from(workdir / "init-from"))


@pytest.mark.seeds
def test_17_seeds(parity, seed_study_dir: Path) -> None:
    study = seeds.run_study(seed_study_dir, range(seeds.DEFAULT_SEEDS), seeds.SUITE_FLAGS,
                            progress=False)
    parity.check(seeds.rows(study))
