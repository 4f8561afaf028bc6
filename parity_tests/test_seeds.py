"""The seed study's judgement (check 17) on made-up studies: quick, and without training.

The real study (both trainers over 5 seeds on the hard demo) runs in ``test_parity.py`` under
``TL_PARITY_SEEDS=1``; here its rows are fed studies whose truth is known: two samples of one
outcome must pass, a shifted port must fail the row of the phase it is shifted in.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from parity_tests import seeds
from tl_common import demo

EPOCHS = (4, 3)
N_VALIDATION = 160


def fake_runs(rng: np.random.Generator, n: int, shift: dict[str, float] | None = None,
              files: str = "same") -> list[dict]:
    """n runs whose validation accuracy and loss follow one curve plus seed-to-seed noise;
    ``shift`` moves one phase's values (what a wrong learning rate in that phase does)."""
    shift = shift or {}
    runs = []
    for seed in range(n):
        history = []
        for epoch in range(1, sum(EPOCHS) + 1):
            phase = "feature_extraction" if epoch <= EPOCHS[0] else "fine_tuning"
            acc = 0.55 + 0.04 * epoch + rng.normal(0, 0.03) + shift.get(phase, 0.0)
            loss = 0.9 - 0.07 * epoch + rng.normal(0, 0.03) - shift.get(phase, 0.0)
            train = 0.8 - 0.07 * epoch + rng.normal(0, 0.02) - shift.get(phase, 0.0)
            history.append({"epoch": epoch, "phase": phase, "val_accuracy": float(acc),
                            "val_loss": float(loss), "loss": float(train)})
        digest = {"train": f"t{seed}", "validation": f"v{seed}", "test": f"{files}{seed}"}
        runs.append({"seed": seed, "seconds": 1.0, "validation_files": N_VALIDATION,
                     "files_sha256": digest, "history": history})
    return runs


def study(keras: list[dict], torch: list[dict]) -> dict:
    return {"flags": list(seeds.DATA_FLAGS), "torch_flags": [], "seeds": list(range(len(keras))),
            "runs": {"keras": keras, "torch": torch}}


def judged(rows):
    return {r.check: r.passed for r in rows if r.judged}


def test_two_samples_of_one_outcome_pass():
    """Right ports: 200 made-up studies of 5 + 5 seeds; each of the 9 judged epoch rows may fail
    a right port with probability ~0.1 % (t with 8 degrees of freedom beyond 5), so at most a
    few of the 1,800 may fail, and none in most studies."""
    rng = np.random.default_rng(0)
    failed = sum(not ok for _ in range(200)
                 for ok in judged(seeds.rows(study(fake_runs(rng, 5), fake_runs(rng, 5)))).values())
    assert failed <= 6


@pytest.mark.parametrize("phase", ["feature_extraction", "fine_tuning"])
def test_a_port_shifted_in_one_phase_fails_that_phase_and_the_switch(phase):
    rng = np.random.default_rng(1)
    rows = seeds.rows(study(fake_runs(rng, 5), fake_runs(rng, 5, shift={phase: -0.15})))
    failed = {check for check, ok in judged(rows).items() if not ok}
    end = EPOCHS[0] if phase == "feature_extraction" else sum(EPOCHS)
    name = phase.replace("_", " ")
    switch = f"change into fine tuning (ep {EPOCHS[0]}→{EPOCHS[0] + 1})"
    assert failed == ({f"{label}, end of {name} (ep {end})" for label in seeds.METRICS.values()}
                      | {f"{label}, {switch}" for label in seeds.METRICS.values()})


def test_a_head_start_in_feature_extraction_does_not_move_the_switch():
    """What feature extraction left behind (the head's initial draw) is in the values at the
    switch, not in their change: a port ahead by 0.05 in every epoch passes the change rows."""
    rng = np.random.default_rng(4)
    rows = seeds.rows(study(fake_runs(rng, 5), fake_runs(rng, 5, shift={
        "feature_extraction": 0.05, "fine_tuning": 0.05})))
    changes = {check: ok for check, ok in judged(rows).items() if "change into" in check}
    assert len(changes) == 3 and all(changes.values())


def test_different_files_at_one_seed_fail():
    rng = np.random.default_rng(2)
    rows = seeds.rows(study(fake_runs(rng, 3), fake_runs(rng, 3, files="other")))
    row = next(r for r in rows if r.check.startswith("files and labels"))
    assert not row.passed and "differ at seeds [0, 1, 2]" in row.note


def test_accuracy_band_is_never_narrower_than_counting_noise():
    """Seeds that happen to agree exactly leave the sampling noise of the validation set."""
    k = np.full(5, 0.85)
    diff, se = seeds.difference(k, k + 0.02, "val_accuracy", N_VALIDATION)
    p = 0.86
    assert diff == pytest.approx(0.02)
    assert se == pytest.approx(np.sqrt(2 * p * (1 - p) / N_VALIDATION / 5))
    assert seeds.difference(k, k, "val_loss", N_VALIDATION) == (0.0, 0.0)


def test_outputs_are_written(tmp_path):
    rng = np.random.default_rng(3)
    s = study(fake_runs(rng, 3), fake_runs(rng, 3))
    paths = seeds.write_outputs(s, seeds.rows(s), tmp_path)
    assert [p.name for p in paths] == ["seeds.json", "seeds.md", "seeds.png"]
    assert "| 7 | fine_tuning |" in paths[1].read_text()
    assert Image.open(io.BytesIO(paths[2].read_bytes())).size == (800, 1000)


def test_hard_demo_mixes_the_cues(tmp_path, monkeypatch):
    """Every cue of the hard set is the class's own in most images, not all; the easy drawing is
    what it was (all cues the class's own)."""
    rng = np.random.default_rng(7)
    for dog in (False, True):
        own = np.array([[v == dog for v in demo.mixed_cues(rng, dog=dog).values()]
                        for _ in range(2000)])
        assert np.all((own.mean(axis=0) > 0.82) & (own.mean(axis=0) < 0.88))
        assert 0.3 < 1 - own.all(axis=1).mean() < 0.7   # 1 - 0.85^5 = 0.56 of images mix
    a = demo.draw_animal(np.random.default_rng(5), dog=True)
    b = demo.draw_animal(np.random.default_rng(5), dog=True,
                         cues=dict.fromkeys(demo.CUES, True))
    assert np.array_equal(np.asarray(a), np.asarray(b))
    monkeypatch.setattr(demo, "HARD_IMAGES_PER_CLASS", {"train": 3, "validation": 2})
    demo.generate_demo_data(tmp_path, "hard")
    names = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.jpg"))
    assert len(names) == 10 and names[0] == "train/cats/cat.0000.jpg"
