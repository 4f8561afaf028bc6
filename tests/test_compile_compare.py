"""The torch.compile comparison's report (benchmarks/compile_compare.py) from a result document:
ratios to the port, failures named, the machine line."""

from __future__ import annotations

from benchmarks.compile_compare import markdown


def test_the_report_gives_ratios_to_the_port_and_names_failures():
    doc = {"machine": {"cpu_model": "AMD EPYC", "cpu_family": "25", "cpu_model_number": "17",
                       "simd": ["avx2", "avx512_bf16"], "usable_cpus": 2,
                       "load_average_at_start": 0.5},
           "torch": "2.14.1", "batch": 32, "repeats": 3, "peak_rss_mb": 1234.0,
           "results": {"train_a": {"port": {"images_per_s": 400.0, "first_call_s": 0.7},
                                   "compile": {"images_per_s": 200.0, "first_call_s": 60.0}},
                       "infer": {"port": {"images_per_s": 380.0, "first_call_s": 0.5},
                                 "compile": {"error": "InductorError: no lowering"}}},
           "shapes": {"compile": {32: {"first_call_s": 20.0}, 97: {"error": "RuntimeError: x"}}}}
    text = markdown(doc)
    assert "AMD EPYC (family 25, model 17; avx2, avx512_bf16)" in text
    assert "| train_a | compile | 200.0 | 0.50x | 60.0 |" in text
    assert "| infer | compile | fails: InductorError: no lowering | | |" in text
    assert "| compile | 20.0 | fails (RuntimeError: x) |" in text
