"""benchmark.json and benchmark.md from the workers' results.

Each cell shows the median and the spread (interquartile range, then the extremes) of the
per-repetition throughputs. The Keras column of the main table is, row by row, the fastest Keras
configuration by median (the honest baseline); the port's column is the configuration its trainer
runs (keep_freed_memory on). Ratios are torch ÷ Keras of the medians; beside them, the median of
the paired ratios (repetition i of the port over repetition i of Keras, taken moments apart, so
that a burst of other work on the machine falls on both) and the ratio of the best repetitions.
"""

from __future__ import annotations

import json
from operator import truediv
from pathlib import Path
from typing import Any

from benchmarks import config as C
from benchmarks.flops import base_flops_per_image
from benchmarks.stats import bootstrap_interval, ratio, summarize

#: The project's targets: the port at least this many times the best Keras' throughput in (a),
#: (b), (c); its base forward at least this share of the measured fp32 matmul peak; its phase-A
#: step at least this share of what the base forward and the augmentation alone reach; its
#: decode + resize per epoch (d1) at least as fast as tf.data.
TARGET_RATIO = 1.5
#: The other bases' target in (a), (b), (c): the port no slower than the best Keras.
BASE_TARGET_RATIO = 1.0
TARGET_ROWS = ("a", "b", "c")
#: The section each target row (a), (b), (c) compares, the same in both frameworks.
TARGET_SECTIONS = {"a": C.TRAIN_A, "b": C.TRAIN_B, "c": C.INFER}
#: The central share of bootstrap resamples each target's interval covers.
INTERVAL_LEVEL = 0.9
TARGET_PEAK_SHARE = 0.65
TARGET_STEP_SHARE = 0.85
TARGET_INPUT_RATIO = 1.0
#: A repetition counts as quiet when other work used fewer cores than this meanwhile.
QUIET_CORES = 0.3
KERAS_CONFIGS = (C.KERAS_ONEDNN, C.KERAS_EIGEN, C.KERAS_ONEDNN_KEEP, C.KERAS_EIGEN_KEEP,
                 C.KERAS_XLA)
STAT_KEYS = ("median", "q1", "q3", "min", "max")


# ---- summaries -------------------------------------------------------------------------------

def pooled(runs: list[dict[str, Any]], section: str, key: str = "samples") -> list[float]:
    """One section's values of ``key`` over every run of a configuration, in order."""
    return [v for run in runs for v in run.get("sections", {}).get(section, {}).get(key, [])]


def summarize_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per section: its pooled samples summarised, cores used, peak memory, first-call time."""
    names = sorted({name for run in runs for name in run.get("sections", {})})
    out: dict[str, Any] = {}
    for name in names:
        entries = [run["sections"][name] for run in runs if name in run.get("sections", {})]
        errors = [e["error"] for e in entries if "error" in e]
        samples = pooled(runs, name)
        if not samples:
            out[name] = {"error": errors[0] if errors else "no samples"}
            continue
        walls, cpus = pooled(runs, name, "wall_s"), pooled(runs, name, "cpu_s")
        others = pooled(runs, name, "other_cores")
        quiet = [v for v, o in zip(samples, others, strict=False) if o < QUIET_CORES]
        out[name] = {
            **summarize(samples),
            "unit": entries[0].get("unit"),
            # CPU seconds of the process per wall second: the cores it actually got.
            "cores_used": summarize([c / w for c, w in zip(cpus, walls, strict=True)])["median"],
            # Busy cores of the machine outside this process meanwhile: other work.
            "other_cores": summarize(others)["median"] if others else None,
            # The repetitions during which the machine was otherwise idle.
            "quiet": summarize(quiet) if quiet else None,
            "peak_rss_mb": max(e.get("peak_rss_mb") or 0.0 for e in entries),
            "peak_rise_mb": max(e.get("peak_rise_mb") or 0.0 for e in entries),
            "first_call_s": [e.get("first_call_s") for e in entries],
        }
        for key in ("graphs", "graph_fallbacks"):   # the port's frozen-block graphs
            found = sorted({v for e in entries for v in (e.get("info") or {}).get(key, [])})
            if found:
                out[name][key] = found
        if errors:
            out[name]["errors"] = errors
    return out


def graph_lines(doc: dict[str, Any]) -> list[str]:
    """Where the port ran its frozen blocks as one oneDNN Graph, and the shapes it could not."""
    found: dict[str, dict[str, list[str]]] = {"graphs": {}, "graph_fallbacks": {}}
    for name in doc["configs"]:
        for sec, s in doc["summary"].get(name, {}).items():
            for key, by_what in found.items():
                for what in (s.get(key, []) if isinstance(s, dict) else []):
                    by_what.setdefault(what, []).append(f"`{name}` {sec}")
    if not any(found.values()):
        return []

    def listed(by_what: dict[str, list[str]]) -> str:
        return "; ".join(f"{what} ({', '.join(where)})" for what, where in by_what.items()) \
            or "none"

    return ["", "The port's frozen blocks as one oneDNN Graph (stages, input shape, dtype): "
            + listed(found["graphs"]) + ". Shapes that ran through the folded units instead (no "
            "graph could be built here): " + listed(found["graph_fallbacks"]) + "."]


def _single(value: float | None) -> dict[str, float] | None:
    return None if value is None else {**dict.fromkeys(STAT_KEYS, value), "n": 1}


def _scaled(s: dict | None, factor: float) -> dict | None:
    if not s or "median" not in s:
        return None
    return {**{k: s[k] * factor for k in STAT_KEYS}, "n": s["n"]}


def best_keras(summary: dict[str, Any], section: str) -> tuple[str | None, dict | None]:
    """The Keras baseline configuration (float32, TensorFlow's own TF32 default; not bf16, not
    the ``--tf32`` ones) with the highest median in ``section``."""
    best: tuple[str | None, dict | None] = (None, None)
    for cfg in KERAS_CONFIGS:
        s = summary.get(cfg.name, {}).get(section)
        if s and "median" in s and (best[1] is None or s["median"] > best[1]["median"]):
            best = (cfg.name, s)
    return best


def _process_rss(results: dict[str, list[dict[str, Any]]], cfg: C.Config) -> float | None:
    values = [r["maxrss_mb"] for r in results.get(cfg.name, []) if r.get("maxrss_mb")]
    return max(values) if values else None


def paired_ratios(results: dict[str, list[dict[str, Any]]], torch_section: str,
                  keras_config: str | None, keras_section: str,
                  port: str = C.TORCH.name) -> tuple[float | None, dict]:
    """Median over repetitions i of port_i / keras_i (same measurement round, moments apart);
    and the same over the pairs in which neither saw other work (median and count). ``port``:
    the numerator's configuration, the port's own unless asked."""
    def by_rep(config: str | None, section: str) -> dict[int, tuple[float, float]]:
        runs = results.get(config or "", [])
        s = runs[0].get("sections", {}).get(section, {}) if runs else {}
        others = s.get("other_cores") or [0.0] * len(s.get("samples", []))
        return {i: (v, o) for i, v, o in zip(s.get("rep", []), s.get("samples", []), others,
                                             strict=False)}

    t, k = by_rep(port, torch_section), by_rep(keras_config, keras_section)
    pairs = [(t[i][0] / k[i][0], max(t[i][1], k[i][1])) for i in t if i in k and k[i][0]]
    quiet = [r for r, other in pairs if other < QUIET_CORES]
    return (summarize([r for r, _ in pairs])["median"] if pairs else None,
            {"median": summarize(quiet)["median"] if quiet else None, "n": len(quiet)})


def make_row(results: dict[str, list[dict[str, Any]]], row: str, measure: str, t: dict | None,
             k: dict | None, *, keras_config: str | None, unit: str = "images/s",
             higher_is_better: bool = True, digits: int = 1,
             pair: tuple[str, str] | None = None) -> dict[str, Any]:
    """One row of a table: the port's and Keras' cells, their ratios (of the medians, paired by
    repetition over ``pair``'s sections, over quiet pairs, of the best repetitions)."""
    ok = bool(t and k and "median" in t and "median" in k)
    paired, quiet = (paired_ratios(results, pair[0], keras_config, pair[1]) if ok and pair
                     else (None, {"median": None, "n": 0}))
    return {
        "row": row, "measure": measure, "unit": unit, "keras": k, "torch": t,
        "keras_config": keras_config, "higher_is_better": higher_is_better, "digits": digits,
        "ratio": ratio(t["median"], k["median"]) if ok else None,
        "ratio_paired": paired, "ratio_quiet": quiet,
        "ratio_best": (ratio(t["max"], k["max"]) if higher_is_better
                       else ratio(t["min"], k["min"])) if ok else None,
    }


def core_rows(summary: dict[str, Any], results: dict[str, list[dict[str, Any]]],
              base: str = C.DEFAULT_BASE) -> list[dict[str, Any]]:
    """Rows (a), (b), (c) of one base: the port against the fastest Keras configuration."""
    torch = summary.get(C.TORCH.name, {})
    inference = ("port folded as in phase-A validation" if base == C.DEFAULT_BASE
                 else "port as in validation")
    rows = []
    for row, section, measure in (
            ("a", C.TRAIN_A, "phase-A training step (base frozen; augment, forward, loss, "
                             "backward, Adam)"),
            ("b", C.TRAIN_B, f"phase-B training step (fine_tune_at {C.fine_tune_at(base)}; "
                             "RMSprop)"),
            ("c", C.INFER, f"inference, whole model in eval ({inference})")):
        name, k = best_keras(summary, section)
        rows.append(make_row(results, row, measure, torch.get(section), k, keras_config=name,
                             pair=(section, section)))
    return rows


def build_rows(summary: dict[str, Any], results: dict[str, list[dict[str, Any]]],
               demos: dict[str, Any]) -> list[dict[str, Any]]:
    """The recipe's base's main table as data, one dict per row."""
    torch = summary.get(C.TORCH.name, {})
    keras = summary.get(C.KERAS_ONEDNN.name, {})
    rows: list[dict[str, Any]] = core_rows(summary, results)

    def add(row: str, measure: str, t: dict | None, k: dict | None, **kw: Any) -> None:
        rows.append(make_row(results, row, measure, t, k, **kw))

    primary = C.KERAS_ONEDNN.name
    name, k = best_keras(summary, C.INFER)
    add("c'", "inference, port folded as in phase-B validation (below layer 100)",
        torch.get(C.INFER_B), k, keras_config=name, pair=(C.INFER_B, C.INFER))
    add("c''", "inference, port unfolded (TransferModule(fast=False))",
        torch.get(C.INFER_UNFOLDED), k, keras_config=name, pair=(C.INFER_UNFOLDED, C.INFER))
    for row, measure, t_section, k_section in (
            ("d1", "input: decode + resize, every epoch (Keras tf.data; port decoding threads)",
             "pipeline_decode", "pipeline_decode"),
            ("d2", "input: decode + resize + augment, every epoch", "pipeline_decode_augment",
             "pipeline_decode_augment"),
            ("d3", "input: port's cache, built once (decode + resize on threads) vs Keras d1",
             "pipeline_cache_build", "pipeline_decode"),
            ("d4", "input: port's cached epoch + augment vs Keras d2", "pipeline_cached_augment",
             "pipeline_decode_augment"),
            ("d5", "augmentation alone (a batch in memory)", C.AUGMENT, C.AUGMENT)):
        add(row, measure, torch.get(t_section), keras.get(k_section), keras_config=primary,
            pair=(t_section, k_section))
    # Per measurement the peak is not separable: a worker holds the models of all its measurements
    # at once (benchmark.json keeps each measurement's peak all the same). The demo runs' peaks
    # (row f') are those of one training process each.
    add("e", "peak RSS of the worker process (it holds the models of all its measurements)",
        _single(_process_rss(results, C.TORCH)), _single(_process_rss(results, C.KERAS_ONEDNN)),
        keras_config=primary, unit="MB", higher_is_better=False, digits=0)
    dk, dt = demos.get("keras"), demos.get("torch")
    if dk or dt:
        def demo(d: dict | None, key: str) -> dict | None:
            return _single(d.get(key)) if d and "error" not in d else None

        add("f", "demo end to end: `python -m tl_<framework>.train --demo`", demo(dt, "wall_s"),
            demo(dk, "wall_s"), keras_config="tl_keras default", unit="s", higher_is_better=False)
        add("f'", "demo: peak RSS", demo(dt, "maxrss_mb"), demo(dk, "maxrss_mb"),
            keras_config="tl_keras default", unit="MB", higher_is_better=False, digits=0)
    per_image = base_flops_per_image(C.IMAGE_SIZE)
    name, k = best_keras(summary, C.BASE_FORWARD)
    add("g1", f"base forward achieved GFLOP/s ({per_image / 1e9:.4f} GFLOP per 160² image, "
              "2·MACs of the 52 convolutions)",
        _scaled(torch.get(C.BASE_FORWARD), per_image / 1e9), _scaled(k, per_image / 1e9),
        keras_config=name, unit="GFLOP/s", pair=(C.BASE_FORWARD, C.BASE_FORWARD))
    t_mm, k_mm = torch.get(C.MATMUL), keras.get(C.MATMUL)
    add("g2", "fp32 peak: n×n matmul (torch.matmul; tf.linalg.matmul)", t_mm, k_mm,
        keras_config=primary, unit="GFLOP/s", pair=(C.MATMUL, C.MATMUL))
    # The alternative to a port: the reference's own code on Keras 3's torch backend.
    alt = summary.get(C.KERAS_TORCH_BACKEND.name, {})
    if alt:
        name = C.KERAS_TORCH_BACKEND.name
        for row, section, measure in (("a-kt", C.TRAIN_A, "phase-A step vs the reference on "
                                                         "Keras' torch backend"),
                                      ("b-kt", C.TRAIN_B, "phase-B step, the same"),
                                      ("c-kt", C.INFER, "inference, the same")):
            add(row, measure, torch.get(section), alt.get(section), keras_config=name,
                pair=None)
    return rows


def fp32_peak(rows: list[dict[str, Any]]) -> list[tuple[str, str, float]]:
    """The fp32 matmul measurements of row g2 as ``(framework, configuration, median)``, the
    fastest first: the machine's measured fp32 peak is the fastest of them, whichever framework
    it comes from (on the AMD EPYC, torch's MKL matmul measured 133-171 GFLOP/s over the full
    runs, TensorFlow's 155-169 in the same runs: 0.99-1.16x torch's)."""
    g2 = next((row for row in rows if row["row"] == "g2"), None)
    if g2 is None:
        return []
    found = [(fw, config, g2[fw]["median"]) for fw, config in
             (("torch", C.TORCH.name), ("keras", g2.get("keras_config")))
             if config and (g2.get(fw) or {}).get("median")]
    return sorted(found, key=lambda m: -m[2])


def step_share(summary: dict[str, Any]) -> float | None:
    """The port's phase-A step throughput over what its base forward and augmentation reach
    together (one batch of each, back to back: 1 / (1/forward + 1/augment))."""
    torch = summary.get(C.TORCH.name, {})
    a, f, g = (torch.get(s, {}).get("median") for s in (C.TRAIN_A, C.BASE_FORWARD, C.AUGMENT))
    if not (a and f and g):
        return None
    return a / (1.0 / (1.0 / f + 1.0 / g))


def target_ratio(base: str) -> float:
    """The port's target in (a), (b), (c), times the best Keras: the recipe's base's, or
    :data:`BASE_TARGET_RATIO` for the others."""
    return TARGET_RATIO if base == C.DEFAULT_BASE else BASE_TARGET_RATIO


def targets(rows: list[dict[str, Any]], summary: dict[str, Any] | None = None,
            results: dict[str, list[dict[str, Any]]] | None = None, *,
            ratio_target: float = TARGET_RATIO) -> dict[str, Any]:
    """Whether the port reaches ``ratio_target`` x Keras in (a), (b), (c): by the ratio of medians,
    and by the paired ratio over quiet repetitions where there are some; then the base forward's
    share of the fp32 peak, the phase-A step's share of forward + augmentation, and d1. With
    ``results``, each verdict's statistic also gets its INTERVAL_LEVEL bootstrap interval over
    the repetitions (``interval``; None where a measurement has fewer than 2), and ``decided``:
    False where the target lies inside it, so that this run's noise could turn the verdict."""
    def samples(config: str | None, section: str) -> list[float]:
        return pooled((results or {}).get(config or "", []), section)

    def judged(statistic: float | None, target: float, groups: list[list[float]],
               combine, **extra: Any) -> dict[str, Any]:
        interval = (bootstrap_interval(groups, combine, level=INTERVAL_LEVEL)
                    if results is not None and statistic is not None else None)
        return {"ratio": statistic, "target": target,
                "met": None if statistic is None else statistic >= target, **extra,
                "interval": interval,
                "decided": None if interval is None else not interval[0] < target < interval[1]}

    out: dict[str, Any] = {}
    for row in rows:
        if row["row"] in TARGET_ROWS:
            r = row["ratio"]
            q = (row.get("ratio_quiet") or {}).get("median")
            section = TARGET_SECTIONS[row["row"]]
            out[row["row"]] = judged(
                r, ratio_target,
                [samples(C.TORCH.name, section), samples(row["keras_config"], section)], truediv,
                ratio_quiet=q, quiet_pairs=(row.get("ratio_quiet") or {}).get("n", 0),
                met_quiet=None if q is None else q >= ratio_target)
    by_row = {row["row"]: row for row in rows}
    g1, peaks = by_row.get("g1"), fp32_peak(rows)
    if g1 and peaks and (g1.get("torch") or {}).get("median"):
        per_image = base_flops_per_image(C.IMAGE_SIZE) / 1e9   # g1: images/s x GFLOP per image
        # The interval redraws every matmul measurement: which is the fastest may change.
        out["g1 share of peak"] = judged(
            g1["torch"]["median"] / peaks[0][2], TARGET_PEAK_SHARE,
            [samples(C.TORCH.name, C.BASE_FORWARD),
             *(samples(config, C.MATMUL) for _, config, _ in peaks)],
            lambda forward, *matmuls: forward * per_image / max(matmuls),
            peak=peaks[0][2], peak_from=peaks[0][0])
    share = step_share(summary or {})
    if share is not None:
        out["a share of forward + augment"] = judged(
            share, TARGET_STEP_SHARE,
            [samples(C.TORCH.name, s) for s in (C.TRAIN_A, C.BASE_FORWARD, C.AUGMENT)],
            lambda a, f, g: a * (1.0 / f + 1.0 / g))
    d1 = by_row.get("d1")
    if d1 and d1["ratio"] is not None:
        out["d1"] = judged(d1["ratio"], TARGET_INPUT_RATIO,
                           [samples(C.TORCH.name, "pipeline_decode"),
                            samples(d1["keras_config"], "pipeline_decode")], truediv)
    return out


def base_report(base: str, summary: dict[str, Any],
                results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """One base's entry of ``benchmark.json``'s ``bases``: its fine-tuning point, rows (a), (b),
    (c) and their verdicts against :func:`target_ratio`."""
    rows = core_rows(summary, results, base)
    return {"fine_tune_at": C.fine_tune_at(base), "target": target_ratio(base), "rows": rows,
            "targets": targets(rows, summary, results, ratio_target=target_ratio(base))}


# ---- Markdown --------------------------------------------------------------------------------

def _num(x: float | None, digits: int = 1) -> str:
    if x is None:
        return "n/a"
    return f"{x:,.0f}" if abs(x) >= 1000 or digits == 0 else f"{x:.{digits}f}"


def cell(s: dict | None, digits: int = 1) -> str:
    """``median [q1–q3] (min–max)``; a single value alone."""
    if not s:
        return "n/a"
    if "median" not in s:
        return f"failed ({str(s.get('error', '?'))[:50]})"
    if s["n"] == 1:
        return _num(s["median"], digits)
    return (f"**{_num(s['median'], digits)}** [{_num(s['q1'], digits)}–{_num(s['q3'], digits)}] "
            f"({_num(s['min'], digits)}–{_num(s['max'], digits)})")


def _ratio(r: float | None) -> str:
    return "n/a" if r is None else f"{r:.2f}"


def _load(values: list[float] | None) -> str:
    return "n/a" if not values else f"{values[0]:.2f}"


def markdown(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    lines = [
        "# Benchmark: tl_torch (port) vs tl_keras (reference)",
        "",
        f"`{doc['command']}` — {doc['date']}, {doc['elapsed_s']:.0f} s.",
        "",
        f"**Machine:** {m['cpu_model']}, {m['logical_cpus']} logical CPUs "
        f"({', '.join(m['simd'])}), {m['memory_gib']} GiB; Python {m['python']}; "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v) + ".",
        f"**Load average** (1 min) at start {_load(m['load_average_at_start'])}, at end "
        f"{_load(doc['load_average_at_end'])}"
        f" — on a machine shared with other work, 'cores used' below shows what each process got.",
        f"**Threads:** {doc['threads']}.",
        f"**Method:** batch {C.BATCH_SIZE}, {C.IMAGE_SIZE}×{C.IMAGE_SIZE}, random weights; each "
        "configuration in a fresh process of its own, all kept alive, their repetitions taken in "
        f"turn (order rotating); per measurement {doc['sizes']['warmup']} warm-up call(s) (the "
        f"first traces Keras' graphs), then up to {doc['sizes']['repeats']} repetitions of "
        f"{doc['sizes']['calls']} batch(es) (input pipeline: of one epoch over the demo's "
        f"{doc.get('train_images', '?')} training JPEGs; at least {C.MIN_REPEATS}, fewer than "
        f"{doc['sizes']['repeats']} past a {doc['sizes']['budget_s']:.0f} s budget). Cells: "
        "**median** [interquartile range] (min–max) over repetitions. Keras: `train_on_batch` / "
        "`predict_on_batch` on a compiled model; port: `TransferModule.shared_step` + backward + its "
        "optimizer; `module(x)` under inference_mode.",
    ]
    if doc["rows"]:
        lines += _main_tables(doc)
    lines += bf16_lines(doc.get("bf16", []))
    lines += base_tables(doc)
    return "\n".join(lines) + "\n"


def bf16_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The section on bf16 (:func:`benchmarks.bf16.gains`' rows): one table, then the port's
    verdicts."""
    if not rows:
        return []

    def cells(g: dict[str, Any] | None) -> str:
        if g is None:
            return " | | |"
        interval = (f", {g['interval'][0]:.2f}–{g['interval'][1]:.2f}" if g["interval"] else "")
        paired = f" ({g['ratio_paired']:.2f}×)" if g["ratio_paired"] is not None else ""
        return (f" {g['float32']:.1f} | {g['bf16']:.1f} | **{g['ratio']:.2f}×**{paired}"
                f"{interval} |")

    lines = ["", "## bf16 against float32 (each framework against its own; changes the numbers)",
             "", "Images/s, medians over repetitions.", "",
             "| row | measure | port float32 | port bf16 | port bf16 ÷ float32 (paired), "
             f"{INTERVAL_LEVEL:.0%} interval | Keras float32 | Keras bf16 | Keras bf16 ÷ "
             "float32 (paired), interval |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['row']} | {r['measure']} |" + cells(r["port"]) + cells(r["keras"]))
    verdicts = []
    for r in rows:
        if "met" in r:
            verdict = "met" if r["met"] else "not met"
            noise = "" if r["decided"] is not False else " (the target lies inside the interval)"
            bound = ("" if r["base_bound"] is None else
                     f", {r['base_bound']:.2f}× if only its base forward gained")
            verdicts.append(f"({r['row']}) {r['port']['ratio']:.2f}×: {verdict}{noise}{bound}")
    if verdicts:
        target = next(r["target"] for r in rows if "met" in r)
        lines += ["", f"Target: the port's bf16 ≥ {target:g}× its float32 in (a) and (c) on a "
                      "CPU with native bf16: " + "; ".join(verdicts) + ". The last figure of "
                      "each: the step with its base forward's float32 time replaced by the "
                      "base's bf16 time, the rest as in float32 (seconds per image)."]
    return lines


def _main_tables(doc: dict[str, Any]) -> list[str]:
    """The recipe's base: every row, the targets, every configuration, demos, the profile."""
    lines = [
        "",
        f"## {C.DEFAULT_BASE}: every measurement",
        "",
        "| row | measure | unit | Keras | torch (port) | torch ÷ Keras: median (paired; best) "
        "| paired, quiet repetitions only (pairs) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in doc["rows"]:
        unit = row["unit"] + ("" if row["higher_is_better"] else ", lower is better")
        kc = row["keras_config"]
        keras_note = f" `{kc}`" if kc and kc != C.KERAS_ONEDNN.name else ""
        extra = ("" if row["ratio_best"] is None or row["torch"]["n"] == 1 else
                 f" ({_ratio(row['ratio_paired'])}; {_ratio(row['ratio_best'])})")
        q = row.get("ratio_quiet") or {}
        quiet = f"{_ratio(q['median'])} ({q['n']})" if q.get("n") else ""
        lines.append(f"| {row['row']} | {row['measure']} | {unit} | "
                     f"{cell(row['keras'], row['digits'])}{keras_note} | "
                     f"{cell(row['torch'], row['digits'])} | **{_ratio(row['ratio'])}**{extra} | "
                     f"{quiet} |")
    g1 = next((r for r in doc["rows"] if r["row"] == "g1"), None)
    peaks = fp32_peak(doc["rows"])
    if g1 and peaks:
        peak = peaks[0][2]
        matmul = {"torch": "torch.matmul", "keras": "tf.linalg.matmul"}
        shares = [f"{fw} {100 * s['median'] / peak:.0f} %" for fw, s in
                  (("Keras", g1["keras"]), ("torch", g1["torch"])) if s and "median" in s]
        lines += ["", f"Base forward as a share of the measured fp32 peak ({peak:.0f} GFLOP/s: "
                      f"the faster of the n×n matmuls, {matmul[peaks[0][0]]} "
                      f"{doc['sizes']['matmul_n']}²): " + ", ".join(shares) + "."]
    other = []
    for row in doc["rows"]:
        if row["row"] in TARGET_ROWS:
            for fw, s in (("Keras", row["keras"]), ("torch", row["torch"])):
                if s and s.get("other_cores") is not None:
                    other.append(f"({row['row']}) {fw} {s['other_cores']:.2f}")
    if other:
        lines += ["", "Other work on the machine during the measurement (busy cores outside the "
                      "measured process, median): " + ", ".join(other) + ". The port's OpenMP "
                      "threads slow down sharply when other work takes cores (compare "
                      "`torch-omp-passive` below); ratios mean most where both are near 0."]
    lines += ["", f"## Targets: port ≥ {TARGET_RATIO}× the best Keras in (a), (b), (c); base "
                  f"forward ≥ {TARGET_PEAK_SHARE:.0%} of the fp32 peak; phase-A step ≥ "
                  f"{TARGET_STEP_SHARE:.0%} of forward + augmentation; d1 ≥ "
                  f"{TARGET_INPUT_RATIO:g}× tf.data", ""]
    for row, t in doc["targets"].items():
        verdict = "n/a" if t["met"] is None else ("**met**" if t["met"] else "**not met**")
        line = f"- ({row}) {_ratio(t['ratio'])} (target {t['target']:g}) — {verdict}"
        if t.get("interval"):
            low, high = t["interval"]
            line += (f" ({INTERVAL_LEVEL:.0%} bootstrap interval {_ratio(low)}–{_ratio(high)}"
                     + ("" if t["decided"] else ": the target lies inside, noise could turn "
                                                "the verdict") + ")")
        if t.get("ratio_quiet") is not None:
            quiet = "met" if t["met_quiet"] else "not met"
            line += (f"; over the {t['quiet_pairs']} quiet pair(s) of repetitions "
                     f"{_ratio(t['ratio_quiet'])}× — {quiet}")
        lines.append(line)
    lines += ["", "## Every configuration", "",
              "| configuration | what | (a) | (b) | (c) | base forward | cores used / other "
              "work in (a) | process peak RSS MB | set-up s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, cfg in doc["configs"].items():
        s = doc["summary"].get(name, {})
        runs = doc["results"].get(name, [])
        rss = max((r.get("maxrss_mb") or 0 for r in runs), default=0)
        setup = ", ".join(f"{r['setup_s']:.0f}" for r in runs if r.get("setup_s") is not None)
        cores = s.get(C.TRAIN_A, {}).get("cores_used")
        other = s.get(C.TRAIN_A, {}).get("other_cores")
        failed = "; ".join(r["error"] for r in runs if "error" in r)
        lines.append(f"| `{name}` | {cfg['label']}{' — ' + failed if failed else ''} | "
                     + " | ".join(cell(s.get(sec)) for sec in
                                  (C.TRAIN_A, C.TRAIN_B, C.INFER, C.BASE_FORWARD))
                     + f" | {_num(cores, 2)} / {_num(other, 2)} | {_num(rss, 0)} | {setup} |")
    first = []
    for name in doc["configs"]:
        s = doc["summary"].get(name, {})
        calls = [f"{sec} {max(v for v in s[sec]['first_call_s'] if v is not None):.1f} s"
                 for sec in (C.TRAIN_A, C.TRAIN_B, C.INFER)
                 if sec in s and any(v is not None for v in s[sec].get("first_call_s", []))]
        if calls:
            first.append(f"`{name}`: " + ", ".join(calls))
    lines += ["", "First call of each measurement (graph tracing, lazy set-up; not in the "
                  "throughputs): " + "; ".join(first) + "."]
    lines += graph_lines(doc)
    if doc.get("demos"):
        lines += ["", "## Demo runs (f)", "", "| framework | wall s | feature extraction s | "
                  "fine-tuning s | test accuracy | peak RSS MB | machine busy cores (its own "
                  "included) |", "|---|---|---|---|---|---|---|"]
        for fw, d in doc["demos"].items():
            t = d.get("timings") or {}
            acc = (d.get("test") or {}).get("accuracy")
            lines.append(f"| {fw} | {_num(d.get('wall_s'))} | {_num(t.get('feature_extraction_s'))} "
                         f"| {_num(t.get('fine_tuning_s'))} | {_num(acc, 3)} | "
                         f"{_num(d.get('maxrss_mb'), 0)} | {_num(d.get('machine_busy_cores'), 2)} |"
                         + (f" {d['error']}" if "error" in d else ""))
    profile = next((r.get("profile") for r in doc["results"].get(C.TORCH.name, [])
                    if r.get("profile")), None)
    if profile and "error" in profile:
        lines += ["", f"Profile failed: {profile['error']}"]
    elif profile:
        lines += ["", "## Where the port's training step spends its time (torch.profiler, self CPU)"]
        for name, p in profile.items():
            lines += ["", f"`{name}`: {p['ms_per_step']:.0f} ms/step under the profiler", "",
                      "| op | ms/step | share | calls/step |", "|---|---|---|---|"]
            lines += [f"| `{op['op']}` | {op['self_ms_per_step']:.1f} | {100 * op['share']:.1f} % | "
                      f"{op['calls_per_step']:.0f} |" for op in p["top_ops"][:12]]
    return lines


def _verdict(t: dict[str, Any] | None) -> str:
    """``≥ 1: met (90% interval 1.10–1.30)``, with a word where the interval holds the target."""
    if not t:
        return "n/a"
    met = "n/a" if t["met"] is None else ("met" if t["met"] else "**not met**")
    text = f"≥ {t['target']:g}: {met}"
    if t.get("interval"):
        low, high = t["interval"]
        text += (f" ({INTERVAL_LEVEL:.0%} interval {_ratio(low)}–{_ratio(high)}"
                 + ("" if t["decided"] else ", holds the target") + ")")
    return text


def base_tables(doc: dict[str, Any]) -> list[str]:
    """One table per base: (a), (b), (c), the best Keras, the port, their ratio and verdict; then
    every configuration's medians and the round's load."""
    bases = doc.get("bases") or {}
    if not bases:
        return []
    lines = ["", "## Every base: (a), (b), (c) against the best Keras", "",
             f"Each base other than {C.DEFAULT_BASE} in a round of its own (its workers alive "
             "together, repetitions in turn), on its primary configurations. Phase B starts at "
             "the base's default fine-tuning point (tl_common.bases). Target: the port at least "
             f"{TARGET_RATIO:g}× the best Keras for {C.DEFAULT_BASE} (the project's), no slower "
             f"(≥ {BASE_TARGET_RATIO:g}×) for the others; intervals: {INTERVAL_LEVEL:.0%} "
             "bootstrap over the repetitions."]
    for base, entry in bases.items():
        summary = entry.get("summary", doc.get("summary", {}))
        lines += ["", f"### {base} (fine_tune_at {entry['fine_tune_at']})", "",
                  "| row | measure | best Keras | port | port ÷ Keras: median (paired; best) | "
                  "target |", "|---|---|---|---|---|---|"]
        for row in entry["rows"]:
            kc = f" `{row['keras_config']}`" if row["keras_config"] else ""
            extra = ("" if row["ratio_best"] is None or row["torch"]["n"] == 1 else
                     f" ({_ratio(row['ratio_paired'])}; {_ratio(row['ratio_best'])})")
            lines.append(f"| {row['row']} | {row['measure']} | {cell(row['keras'])}{kc} | "
                         f"{cell(row['torch'])} | **{_ratio(row['ratio'])}**{extra} | "
                         f"{_verdict(entry['targets'].get(row['row']))} |")
        configs = [f"`{name}` " + " / ".join(_num((summary.get(name, {}).get(sec) or {})
                                                   .get("median")) for sec in C.BASE_SECTIONS)
                   for name in entry.get("configs", [])]
        if configs:
            lines += ["", "Medians (a) / (b) / (c), images/s: " + "; ".join(configs) + "."]
        if entry.get("load_average"):
            start, end = entry["load_average"]
            lines += [f"Load average (1 min) {_load(start)} at the round's start, {_load(end)} at "
                      f"its end; {entry.get('elapsed_s', 0):.0f} s."]
    return lines


def write(doc: dict[str, Any], folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    json_path, md_path = folder / "benchmark.json", folder / "benchmark.md"
    json_path.write_text(json.dumps(doc, indent=1, default=str))
    md_path.write_text(markdown(doc))
    return json_path, md_path
