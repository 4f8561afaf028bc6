"""Smoke tests of the benchmark harness (benchmarks/): its FLOP count, statistics, timing loop and
report, and one tiny end-to-end pass through both worker processes (two images, one repetition)."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import config as C
from benchmarks import report
from benchmarks.flops import base_convolutions, base_flops_per_image
from benchmarks.runner import make_batch, run_workers
from benchmarks.stats import bootstrap_interval, quantile, summarize
from benchmarks.worker import Bench
from tl_torch import internals
from tl_torch.runtime import bf16_support

#: The FLOP count at 160x160 stated in the report: 2 x 152,803,200 multiply-accumulates.
FLOPS_AT_160 = 305_606_400


@pytest.mark.parametrize("size", [160, 97])
def test_flops_equal_torch_flop_counter_on_the_port(size):
    from tl_torch.weights import build_base

    base = build_base("none", size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        base(torch.zeros(1, 3, size, size))
    assert len(base_convolutions(size)) == 52
    assert base_flops_per_image(size) == counter.get_total_flops()


def test_flops_at_recipe_size():
    assert base_flops_per_image(160) == FLOPS_AT_160


def test_summary_uses_linear_quantiles():
    s = summarize([4.0, 1.0, 3.0, 2.0])
    assert (s["median"], s["q1"], s["q3"], s["min"], s["max"], s["n"]) == (2.5, 1.75, 3.25, 1.0, 4.0, 4)
    assert quantile([5.0], 0.75) == 5.0
    with pytest.raises(ValueError, match="q must be in"):
        quantile([1.0], 1.5)



def test_bootstrap_interval_brackets_the_statistic_and_narrows_with_the_noise():
    def over(a, b):
        return a / b

    noisy = [[150.0, 160.0, 170.0, 140.0, 180.0], [100.0, 90.0, 110.0, 95.0, 105.0]]
    low, high = bootstrap_interval(noisy, over)
    assert low < 160.0 / 100.0 < high
    assert bootstrap_interval(noisy, over) == (low, high)   # seeded: the same when written again
    # The same medians with a tenth of the spread: a tighter interval, still around them.
    quiet = [[160.0 + (v - 160.0) / 10 for v in noisy[0]], [100.0 + (v - 100.0) / 10 for v in noisy[1]]]
    q_low, q_high = bootstrap_interval(quiet, over)
    assert low < q_low < 1.6 < q_high < high
    assert bootstrap_interval([[3.0] * 4, [2.0] * 4], over) == (1.5, 1.5)
    assert bootstrap_interval([[1.0], [1.0, 2.0]], over) is None
    with pytest.raises(ValueError, match="level must be in"):
        bootstrap_interval(noisy, over, level=1.0)


def test_a_target_inside_the_runs_noise_is_reported_undecided(tmp_path):
    def results_for(spread: float) -> dict:
        port = [160.0 + spread * d for d in (-2, -1, 0, 1, 2)]
        return {C.TORCH.name: [_fake_run(C.TORCH, {C.TRAIN_A: port})],
                C.KERAS_ONEDNN.name: [_fake_run(C.KERAS_ONEDNN, {C.TRAIN_A: [100.0] * 5})]}

    for spread, decided in ((1.0, True), (20.0, False)):
        results = results_for(spread)
        summary = {name: report.summarize_runs(runs) for name, runs in results.items()}
        rows = report.build_rows(summary, results, demos={})
        a = report.targets(rows, summary, results)["a"]
        assert a["ratio"] == pytest.approx(1.6) and a["met"] is True
        assert a["interval"][0] <= 1.6 <= a["interval"][1]
        assert a["decided"] is decided, a["interval"]
    assert report.targets(rows)["a"]["interval"] is None   # without the repetitions: none
    text = report.write(_report_doc(rows, summary, results), tmp_path)[1].read_text()
    assert "(a) 1.60 (target 1.5) — **met** (90% bootstrap interval" in text
    assert "the target lies inside, noise could turn the verdict" in text

def test_the_report_names_the_ports_graphs_and_the_shapes_without_one():
    run = _fake_run(C.TORCH, {C.INFER: [1.0, 2.0]})
    run["sections"][C.INFER]["info"] = {
        "graphs": ["19 stages, (32, 3, 160, 160), bfloat16"],
        "graph_fallbacks": ["19 stages, (5, 3, 32, 32), float32: RuntimeError: no kernel"]}
    doc = {"configs": {C.TORCH.name: {}}, "summary": {C.TORCH.name: report.summarize_runs([run])}}
    (line,) = [text for text in report.graph_lines(doc) if text]
    assert "(stages, input shape, dtype): 19 stages, (32, 3, 160, 160), bfloat16 (`torch` " \
           "infer)." in line
    assert "instead (no graph could be built here): 19 stages, (5, 3, 32, 32), float32: " \
           "RuntimeError: no kernel (`torch` infer)." in line
    plain = _fake_run(C.TORCH, {C.INFER: [1.0]})
    assert report.graph_lines({"configs": {C.TORCH.name: {}},
                               "summary": {C.TORCH.name: report.summarize_runs([plain])}}) == []


def test_bench_warms_up_then_times_repetitions():
    calls = []

    def work():
        calls.append(None)
        time.sleep(0.01)

    bench = Bench(work, 4, calls=2, warmup=3)
    assert bench.warm() >= 0.01
    assert len(calls) == 3
    r = bench.rep()
    assert len(calls) == 5
    assert 0 < r["sample"] <= 4 * 2 / 0.02  # 8 images in >= 20 ms
    assert r["wall_s"] >= 0.02 and r["peak_rss_mb"] > 0
    # A call slower than half the budget ends the warm-up after the second call.
    calls.clear()
    Bench(work, 4, warmup=5).warm(budget_s=0.005)
    assert len(calls) == 2


def _report_doc(rows: list, summary: dict, results: dict) -> dict:
    """A benchmark.json document around fake rows (a quick run on a made-up machine)."""
    return {"command": "test", "date": "now", "elapsed_s": 0.0, "threads": {},
            "machine": {"cpu_model": "x", "logical_cpus": 2, "simd": [], "memory_gib": 1,
                        "python": "3", "versions": {}, "load_average_at_start": None},
            "load_average_at_end": None, "sizes": C.QUICK.to_dict(), "rows": rows,
            "targets": report.targets(rows, summary, results), "summary": summary,
            "results": results, "configs": {}, "demos": {}}


def _fake_run(config: C.Config, samples: dict[str, list[float]]) -> dict:
    return {"config": config.to_dict(), "maxrss_mb": 1000.0, "sections": {
        name: {"unit": "images/s", "samples": v, "rep": list(range(len(v))),
               "wall_s": [1.0] * len(v), "cpu_s": [2.0] * len(v), "other_cores": [0.0] * len(v),
               "peak_rss_mb": 900.0, "peak_rise_mb": 10.0, "first_call_s": 1.0}
        for name, v in samples.items()}}


def test_report_compares_the_port_with_the_fastest_keras_configuration():
    results = {
        C.TORCH.name: [_fake_run(C.TORCH, {C.TRAIN_A: [150.0, 160.0, 170.0]})],
        C.KERAS_ONEDNN.name: [_fake_run(C.KERAS_ONEDNN, {C.TRAIN_A: [100.0, 110.0, 90.0]})],
        C.KERAS_EIGEN.name: [_fake_run(C.KERAS_EIGEN, {C.TRAIN_A: [40.0, 50.0, 60.0]})],
    }
    summary = {name: report.summarize_runs(runs) for name, runs in results.items()}
    rows = report.build_rows(summary, results, demos={})
    a = next(r for r in rows if r["row"] == "a")
    assert a["keras_config"] == C.KERAS_ONEDNN.name
    assert a["ratio"] == pytest.approx(160.0 / 100.0)
    assert a["ratio_best"] == pytest.approx(170.0 / 110.0)
    # Paired by repetition: 150/100, 160/110, 170/90.
    assert a["ratio_paired"] == pytest.approx(150.0 / 100.0)
    assert report.targets(rows)["a"]["met"] is True
    assert report.targets(rows)["b"]["met"] is None  # not measured
    assert summary[C.TORCH.name][C.TRAIN_A]["cores_used"] == 2.0


def test_keras_with_xla_is_a_baseline_and_the_torch_backend_an_alternative():
    results = {
        C.TORCH.name: [_fake_run(C.TORCH, {C.TRAIN_A: [150.0, 160.0, 170.0],
                                           C.BASE_FORWARD: [300.0] * 3, C.AUGMENT: [900.0] * 3})],
        C.KERAS_ONEDNN.name: [_fake_run(C.KERAS_ONEDNN, {C.TRAIN_A: [100.0, 110.0, 90.0]})],
        C.KERAS_XLA.name: [_fake_run(C.KERAS_XLA, {C.TRAIN_A: [120.0] * 3})],
        C.KERAS_TORCH_BACKEND.name: [_fake_run(C.KERAS_TORCH_BACKEND, {C.TRAIN_A: [40.0] * 3})],
    }
    summary = {name: report.summarize_runs(runs) for name, runs in results.items()}
    rows = {r["row"]: r for r in report.build_rows(summary, results, demos={})}
    assert rows["a"]["keras_config"] == C.KERAS_XLA.name
    assert rows["a"]["ratio"] == pytest.approx(160.0 / 120.0)
    assert rows["a-kt"]["ratio"] == pytest.approx(160.0 / 40.0)
    targets = report.targets(list(rows.values()), summary)
    assert targets["a"]["met"] is False
    # forward + augmentation alone: 1 / (1/300 + 1/900) = 225 images/s; the step 160.
    assert targets["a share of forward + augment"]["ratio"] == pytest.approx(160.0 / 225.0)
    assert targets["a share of forward + augment"]["met"] is False


def test_tf32_configurations_are_measured_apart_and_asked_for_only_with_a_gpu(monkeypatch):
    """--tf32 adds both frameworks with TF32 off and on; none of them is a Keras baseline (TF32
    changes the numbers), the primaries keep each framework's default; without a CUDA GPU the
    option is one line and exit status 2."""
    from benchmarks import __main__ as cli

    added = [c for c in C.plan(quick=True, bf16=False, tf32=True)
             if c not in C.plan(quick=True, bf16=False)]
    assert {(c.framework, c.tf32) for c in added} == {("torch", False), ("torch", True),
                                                      ("keras", False), ("keras", True)}
    assert all(c.tf32 is None for c in C.plan(quick=False, bf16=True, all_keras=True))
    results = {
        C.TORCH.name: [_fake_run(C.TORCH, {C.TRAIN_A: [150.0] * 3})],
        C.KERAS_ONEDNN.name: [_fake_run(C.KERAS_ONEDNN, {C.TRAIN_A: [100.0] * 3})],
        C.KERAS_TF32_OFF.name: [_fake_run(C.KERAS_TF32_OFF, {C.TRAIN_A: [90.0] * 3})],
        C.KERAS_TF32_ON.name: [_fake_run(C.KERAS_TF32_ON, {C.TRAIN_A: [500.0] * 3})],
    }
    summary = {name: report.summarize_runs(runs) for name, runs in results.items()}
    a = next(r for r in report.build_rows(summary, results, demos={}) if r["row"] == "a")
    assert a["keras_config"] == C.KERAS_ONEDNN.name

    monkeypatch.setattr(cli, "cuda_available", lambda: False)
    with pytest.raises(SystemExit) as exited:
        cli.parse_args(["--tf32"])
    assert exited.value.code == 2
    monkeypatch.setattr(cli, "cuda_available", lambda: True)
    assert cli.parse_args(["--tf32"]).tf32 is True


def _tiny_data_root(root: Path) -> Path:
    """train/ and validation/ with 3 JPEGs per class: enough for load_splits' test split."""
    rng = np.random.default_rng(0)
    for split in ("train", "validation"):
        for name in ("cats", "dogs"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(3):
                pixels = rng.integers(0, 256, (48 + 8 * i, 64, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{name}.{i}.jpg")
    return root


@pytest.mark.long
@pytest.mark.slow
def test_both_workers_end_to_end(tmp_path):
    data_root = _tiny_data_root(tmp_path / "data")
    work, logs = tmp_path / "work", tmp_path / "logs"
    work.mkdir()
    batch = work / "batch.npz"
    make_batch(batch, data_root, n=2)
    with np.load(batch) as b:
        assert b["images"].shape == (2, C.IMAGE_SIZE, C.IMAGE_SIZE, 3)
    # The budget only drops a configuration whose one repetition outlasts it (bf16 emulated):
    # wide enough that no repetition here does on loaded cores (Keras' took 1.15 s beside
    # another test worker), so that each measurement gets its 2 samples.
    sizes = C.Sizes(repeats=2, warmup=1, calls=1, matmul_n=64, budget_s=60.0)
    # The TF32 settings (--tf32) taken too: they act on NVIDIA GPUs only, read back there.
    configs = [dataclasses.replace(C.TORCH, sections=(C.INFER, C.AUGMENT), tf32=True),
               dataclasses.replace(C.KERAS_ONEDNN, sections=(C.INFER,), tf32=False),
               # XLA's and the torch backend's training steps are what the harness times too;
               # inference alone keeps this test's compilations short.
               dataclasses.replace(C.KERAS_XLA, sections=(C.INFER,)),
               dataclasses.replace(C.KERAS_TORCH_BACKEND, sections=(C.INFER,)),
               # The base forward under autocast: in bf16 where oneDNN has bf16 kernels.
               dataclasses.replace(C.TORCH_BF16, sections=(C.BASE_FORWARD,))]
    results = run_workers(configs, sizes=sizes, work=work, logs=logs, batch_file=batch,
                          data_root=data_root, profile_dir=None, wait_quiet_s=0,
                          say=lambda _: None)
    for cfg in configs:
        (run,) = results[cfg.name]
        assert run["returncode"] == 0, (logs / f"{cfg.name}.log").read_text()[-2000:]
        for section in cfg.sections:
            assert len(run["sections"][section]["samples"]) == 2
            assert min(run["sections"][section]["samples"]) > 0
        assert run["maxrss_mb"] > 100
    assert results[C.TORCH.name][0]["keep_freed_memory"] is True
    # Inference's frozen blocks: one graph, or the shape that could not have one, reported.
    graphs = results[C.TORCH.name][0]["sections"][C.INFER]["info"]
    assert len(graphs.get("graphs", [])) + len(graphs.get("graph_fallbacks", [])) == \
        (1 if internals.HAS_GRAPH_FUSION else 0)
    bf16_base = results[C.TORCH_BF16.name][0]["sections"][C.BASE_FORWARD]["info"]
    (entry,) = bf16_base.get("graphs", []) + bf16_base.get("graph_fallbacks", []) or [""]
    if internals.HAS_GRAPH_FUSION:
        assert ("bfloat16" in entry) is bf16_support().kernels, entry
    port, keras = results[C.TORCH.name][0], results[C.KERAS_ONEDNN.name][0]
    assert port["tf32"] == ({"matmul": True, "convolutions": True} if port["device"] != "cpu"
                            else None)
    assert keras["tf32"] is (False if keras["device"] != "cpu" else None)
    xla, alt = results[C.KERAS_XLA.name][0], results[C.KERAS_TORCH_BACKEND.name][0]
    assert xla["jit_compile"] is True and "tensorflow" in xla["versions"]
    assert xla["sections"][C.INFER]["info"]["jit_compile"] is True   # not refused by Keras
    assert alt["threads"]["KERAS_BACKEND"] == "torch" and "torch" in alt["versions"]
    summary = {name: report.summarize_runs(runs) for name, runs in results.items()}
    rows = report.build_rows(summary, results, demos={})
    doc = {"command": "test", "date": "now", "elapsed_s": 0.0, "rounds": 1, "threads": {},
           "machine": {"cpu_model": "x", "logical_cpus": 2, "simd": [], "memory_gib": 1,
                       "python": "3", "versions": {}, "load_average_at_start": None},
           "load_average_at_end": None, "sizes": sizes.to_dict(), "rows": rows,
           "targets": report.targets(rows), "summary": summary, "results": results,
           "configs": {c.name: c.to_dict() for c in configs}, "demos": {}}
    json_path, md_path = report.write(doc, tmp_path / "out")
    assert json.loads(json_path.read_text())["rows"][2]["row"] == "c"
    assert "| c | inference" in md_path.read_text()


def test_the_fp32_peak_is_the_faster_matmul_of_the_two_frameworks():
    """The base forward's share is judged against the machine's measured fp32 peak: the faster
    of the two frameworks' matmuls, not torch's alone (which can be the slower one)."""
    per_image = FLOPS_AT_160 / 1e9
    forward = [300.0, 310.0, 320.0]   # images/s: 91.7-97.8 GFLOP/s
    matmuls = {"torch": [130.0, 135.0, 140.0], "keras": [150.0, 155.0, 160.0]}

    def share(keras_matmul):
        results = {
            C.TORCH.name: [_fake_run(C.TORCH, {C.BASE_FORWARD: forward,
                                               C.MATMUL: matmuls["torch"]})],
            C.KERAS_ONEDNN.name: [_fake_run(C.KERAS_ONEDNN, {C.BASE_FORWARD: [100.0] * 3,
                                                             **keras_matmul})],
        }
        summary = {name: report.summarize_runs(runs) for name, runs in results.items()}
        rows = report.build_rows(summary, results, demos={})
        return rows, summary, results, report.targets(rows, summary, results)["g1 share of peak"]

    rows, summary, results, g1 = share({C.MATMUL: matmuls["keras"]})
    assert [(fw, peak) for fw, _, peak in report.fp32_peak(rows)] == [("keras", 155.0),
                                                                     ("torch", 135.0)]
    assert (g1["peak"], g1["peak_from"]) == (155.0, "keras")
    assert g1["ratio"] == pytest.approx(310.0 * per_image / 155.0)
    assert g1["met"] is False   # 61 % of 155; it would be 70 % of torch's 135
    low, high = g1["interval"]
    assert 300.0 * per_image / 160.0 <= low < g1["ratio"] < high <= 320.0 * per_image / 150.0
    text = report.markdown(_report_doc(rows, summary, results))
    assert (f"(155 GFLOP/s: the faster of the n×n matmuls, tf.linalg.matmul "
            f"{C.QUICK.matmul_n}²): Keras 20 %, torch 61 %.") in text
    # Without TensorFlow's matmul, torch's is the peak.
    *_, g1 = share({})
    assert (g1["peak"], g1["peak_from"]) == (135.0, "torch")
    assert g1["met"] is True


def test_bases_are_all_four_by_default_and_chosen_by_name(capsys):
    from benchmarks import __main__ as cli
    from tl_common.bases import BASES, DEFAULT_BASE

    assert cli.parse_args([]).bases == [DEFAULT_BASE, *(b for b in BASES if b != DEFAULT_BASE)]
    assert set(cli.parse_args([]).bases) == set(BASES) and len(BASES) == 4
    assert cli.parse_args(["--bases", "resnet50", "efficientnet_b0", "resnet50"]).bases == [
        "resnet50", "efficientnet_b0"]
    with pytest.raises(SystemExit) as exited:
        cli.parse_args(["--bases", "resnet18"])
    assert exited.value.code == 2
    assert "'resnet18'" in capsys.readouterr().err


@pytest.mark.parametrize("base", ["mobilenet_v3_large", "efficientnet_b0", "resnet50"])
def test_another_base_is_measured_on_its_primary_configurations(base):
    from tl_common.bases import BASES

    quick, full = C.base_plan(base, quick=True), C.base_plan(base, quick=False)
    every = C.base_plan(base, quick=True, all_keras=True)
    for plan in (quick, full, every):
        assert plan[0].name == C.TORCH.name and plan[0].primary and plan[0].framework == "torch"
        assert {c.base for c in plan} == {base}
        assert all(c.sections == (C.TRAIN_A, C.TRAIN_B, C.INFER) for c in plan)
        assert not any(c.bf16 or c.tf32 is not None for c in plan)
        assert C.KERAS_ONEDNN.name in {c.name for c in plan}
    assert {c.name for c in quick} < {c.name for c in full} < {c.name for c in every}
    assert C.KERAS_XLA.name in {c.name for c in every} - {c.name for c in full}
    assert C.fine_tune_at(base) == BASES[base].fine_tune_at
    sizes = C.base_sizes(C.FULL)
    assert sizes.repeats <= C.FULL.repeats and sizes.calls == 1
    assert sizes.budget_s <= C.FULL.budget_s
    with pytest.raises(ValueError, match="resnet18"):
        C.base_plan("resnet18", quick=True)


def test_each_base_gets_a_table_of_its_own_against_its_fastest_keras(tmp_path):
    """Rows (a), (b), (c) of a base from a fake round: the best Keras row by row, the ratio of the
    medians, paired ratios, the interval, and a verdict against 'no slower'."""
    base = "resnet50"
    plan = {c.name: c for c in C.base_plan(base, quick=True)}
    results = {
        C.TORCH.name: [_fake_run(plan[C.TORCH.name], {C.TRAIN_A: [60.0, 62.0, 64.0],
                                                      C.TRAIN_B: [20.0, 21.0, 22.0],
                                                      C.INFER: [40.0, 41.0, 42.0]})],
        C.KERAS_ONEDNN.name: [_fake_run(plan[C.KERAS_ONEDNN.name], {
            C.TRAIN_A: [50.0] * 3, C.TRAIN_B: [30.0, 30.0, 30.0], C.INFER: [20.0] * 3})],
        C.KERAS_EIGEN.name: [_fake_run(plan[C.KERAS_EIGEN.name], {
            C.TRAIN_A: [40.0] * 3, C.TRAIN_B: [25.0] * 3, C.INFER: [30.0, 31.0, 29.0]})],
    }
    summary = {name: report.summarize_runs(runs) for name, runs in results.items()}
    entry = report.base_report(base, summary, results)
    rows = {r["row"]: r for r in entry["rows"]}
    assert list(rows) == ["a", "b", "c"]
    assert (entry["fine_tune_at"], entry["target"]) == (113, 1.0)
    assert rows["a"]["keras_config"] == C.KERAS_ONEDNN.name
    assert rows["a"]["ratio"] == pytest.approx(62.0 / 50.0)
    assert rows["c"]["keras_config"] == C.KERAS_EIGEN.name
    assert rows["c"]["ratio"] == pytest.approx(41.0 / 30.0)
    assert rows["c"]["ratio_paired"] == pytest.approx(40.0 / 30.0)   # 40/30, 41/31, 42/29
    assert "fine_tune_at 113" in rows["b"]["measure"]
    verdicts = entry["targets"]
    assert (verdicts["a"]["met"], verdicts["b"]["met"], verdicts["c"]["met"]) == (True, False, True)
    assert verdicts["b"]["ratio"] == pytest.approx(21.0 / 30.0)
    low, high = verdicts["a"]["interval"]
    assert 60.0 / 50.0 <= low <= 62.0 / 50.0 <= high <= 64.0 / 50.0
    # The recipe's base keeps the project's target.
    assert report.base_report(C.DEFAULT_BASE, summary, results)["target"] == report.TARGET_RATIO

    doc = {**_report_doc([], {}, {}), "bases": {base: {**entry, "configs": list(results),
                                                       "summary": summary, "results": results,
                                                       "load_average": [[1.5], [1.25]],
                                                       "elapsed_s": 100.0}}}
    text = report.write(doc, tmp_path)[1].read_text()
    assert "### resnet50 (fine_tune_at 113)" in text
    assert "| a | phase-A training step" in text
    assert "**1.24** (1.24; 1.28) | ≥ 1: met (90% interval" in text
    assert "| b | phase-B training step (fine_tune_at 113; RMSprop)" in text
    assert "**0.70**" in text and "≥ 1: **not met**" in text
    assert "`keras-no-onednn` | **41.0**" in text
    assert "`torch` 62.0 / 21.0 / 41.0" in text
    assert "Load average (1 min) 1.50 at the round's start, 1.25 at its end; 100 s." in text
    assert "## mobilenet_v2: every measurement" not in text   # not measured: no main table


def test_bf16_is_judged_against_each_frameworks_own_float32(tmp_path):
    from benchmarks import bf16

    port = {C.TRAIN_A: [300.0, 310.0, 320.0], C.INFER: [400.0, 410.0, 420.0],
            C.BASE_FORWARD: [450.0, 460.0, 470.0]}
    port_bf16 = {C.TRAIN_A: [620.0, 630.0, 640.0],      # 2.07x, 2.03x, 2x by repetition
                 C.INFER: [500.0, 700.0, 900.0],        # 1.71x of the medians, wide
                 C.BASE_FORWARD: [900.0, 920.0, 940.0]}
    keras = {C.TRAIN_A: [100.0, 110.0, 120.0], C.INFER: [200.0] * 3}
    keras_bf16 = {C.TRAIN_A: [90.0, 99.0, 108.0], C.INFER: [180.0] * 3}
    results = {cfg.name: [_fake_run(cfg, samples)] for cfg, samples in (
        (C.TORCH, port), (C.TORCH_BF16, port_bf16), (C.KERAS_ONEDNN, keras),
        (C.KERAS_BF16, keras_bf16))}
    summary = {name: report.summarize_runs(runs) for name, runs in results.items()}
    rows = {r["row"]: r for r in bf16.gains(summary, results)}
    assert list(rows) == ["a", "b", "c", "g1"]
    a, c = rows["a"], rows["c"]
    assert a["port"]["ratio"] == pytest.approx(630.0 / 310.0)
    assert a["port"]["ratio_paired"] == pytest.approx(630.0 / 310.0)
    assert a["keras"]["ratio"] == pytest.approx(0.9)
    assert a["met"] is True and a["decided"] is True
    assert c["port"]["ratio"] == pytest.approx(700.0 / 410.0)
    low, high = c["port"]["interval"]
    assert c["met"] is False and low < bf16.TARGET_GAIN < high and c["decided"] is False
    assert rows["b"]["port"] is None and "met" not in rows["b"]    # (b) not measured here
    assert rows["g1"]["port"]["ratio"] == pytest.approx(2.0) and rows["g1"]["keras"] is None
    assert "met" not in rows["g1"]                                 # no target of its own
    # Had only the base forward gained (2x), the rest of each step in float32 (s per image):
    for r, step in ((a, 310.0), (c, 410.0)):
        rest = 1 / step - 1 / 460.0
        assert r["base_bound"] == pytest.approx((1 / step) / (rest + 1 / 920.0))
    doc = _report_doc([], summary, results)
    doc["bf16"] = bf16.gains(summary, results)
    text = report.write(doc, tmp_path)[1].read_text()
    assert "| a | phase-A training step | 310.0 | 630.0 | **2.03×** (2.03×), 1.94–2.13 |" in text
    assert "| b | phase-B training step | | | | | | |" in text
    assert ("(a) 2.03×: met, 1.51× if only its base forward gained; (c) 1.71×: not met (the "
            "target lies inside the interval), 1.80× if only its base forward gained.") in text
    # A run without bf16 has no such section.
    plain = {name: runs for name, runs in results.items() if "bf16" not in name}
    assert bf16.gains({n: report.summarize_runs(r) for n, r in plain.items()}, plain) == []
