"""benchmarks/gpu_check.py: its --smoke run on the CPU, and its fp64 comparison catching a wrong op."""
import json
import os
import subprocess
import sys

import pytest
import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)
import gpu_check  # noqa: E402

LOW_PRECISION = ("float32", "bfloat16", "float16")
CUSTOM_OPS = {"fastdd::segment_mean", "fastdd::segment_mean_backward", "fastdd::mean_match",
              "fastdd::mean_match_backward", "fastdd::norm_act_pool", "fastdd::norm_act_pool_backward",
              "fastdd::agreement_mask", "fastdd::kmeans_assign"}


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    res = subprocess.run([sys.executable, os.path.join(BENCH, "gpu_check.py"), "--smoke", "--out", str(out)],
                         capture_output=True, text=True, timeout=900, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_smoke_sections_all_ran(smoke_report):
    sections = smoke_report["sections"]
    assert [name for name, _, _ in gpu_check.SECTIONS] == list(sections)
    failed = {name: s.get("error") for name, s in sections.items() if s["status"] != "ok"}
    assert not failed


@pytest.mark.slow
def test_smoke_correctness_rows_carry_measured_errors_below_tolerance(smoke_report):
    rows = smoke_report["correctness"]
    assert {(r["op"], r["dtype"]) for r in rows} == {(op, dtype) for op in gpu_check.OPS
                                                     for dtype in ("float64", *LOW_PRECISION)}
    for r in rows:
        assert r["status"] == "pass", r
        errors = [v for k, v in r.items() if k.endswith("_err")]
        assert r["max_err"] == max(errors) <= r["tolerance"], r
        if r["dtype"] in LOW_PRECISION and r["op"] != "kmeans_assign":
            # a measured rounding error, not a placeholder: rounding to the dtype leaves a trace
            assert r["max_err"] > 1e-9, r
    tolerance = {r["dtype"]: r["tolerance"] for r in rows}
    assert tolerance == {"float64": 1e-9, "float32": 1e-4, "bfloat16": 2e-2, "float16": 4e-3}


@pytest.mark.slow
def test_smoke_opcheck_compile_iterations_and_perf_rows(smoke_report):
    assert {r["custom_op"] for r in smoke_report["opcheck"]} == CUSTOM_OPS
    assert all(r["status"] == "pass" for r in smoke_report["opcheck"]), smoke_report["opcheck"]
    assert {r["op"]: r["status"] for r in smoke_report["compile"]} == {op: "pass" for op in gpu_check.OPS}
    assert {r["method"]: r["update_err"] for r in smoke_report["iterations"]} == {"dm": 0.0, "sgs": 0.0,
                                                                                  "robust": 0.0}
    assert {r["method"] for r in smoke_report["host_syncs"]} == {"dm", "sgs", "robust"}
    perf = smoke_report["perf_ops"]
    assert {(r["op"], r["provider"]) for r in perf} == {(op, p) for op in gpu_check.FUSED_KERNELS
                                                        for p in ("fastdd", "eager reference")}
    assert all(r["gbps"] > 0 and r["median_s"] > 0 for r in perf)
    assert {r["provider"] for r in smoke_report["perf_dm"]} == {"fastdd", "reference loop"}


def test_normwise_error_hand_computed():
    reference = torch.tensor([2.0, -4.0, 1.0])
    assert gpu_check.max_normwise_err(torch.tensor([2.0, -5.0, 1.5]), reference) == pytest.approx(0.25)
    assert gpu_check.max_normwise_err([reference, reference], [reference, reference * 2]) == pytest.approx(0.5)
    assert gpu_check.max_normwise_err(torch.tensor([float("nan"), 0, 0]), reference) == float("inf")


@pytest.mark.parametrize("op", ["segment_mean", "norm_act_pool", "cvar"])
def test_fp64_comparison_catches_a_slightly_wrong_op(monkeypatch, op):
    import fastdd.ops
    assert gpu_check.compare_with_fp64(op, "tiny", torch.float32, "cpu")
    right = getattr(fastdd.ops, op)
    monkeypatch.setattr(fastdd.ops, op, lambda *a, **k: right(*a, **k) * (1 + 1e-3))
    errors = gpu_check.compare_with_fp64(op, "tiny", torch.float32, "cpu")
    assert max(v for k, v in errors.items() if k.endswith("_err")) == pytest.approx(1e-3, rel=0.05)


def test_kmeans_comparison_flags_a_wrong_label(monkeypatch):
    import fastdd.ops
    right = fastdd.ops.kmeans_assign
    good = gpu_check.compare_with_fp64("kmeans_assign", "tiny", torch.float32, "cpu")
    assert good["optimality_err"] < 1e-12 and good["label_mismatches"] == 0

    def off_by_one(x, centroids, seg=None):
        labels, _ = right(x, centroids, seg)
        labels = (labels + 1) % centroids.shape[-2]
        chosen = centroids[seg, labels] if seg is not None else centroids[labels]
        return labels, (x - chosen).square().sum(1)
    monkeypatch.setattr(fastdd.ops, "kmeans_assign", off_by_one)
    bad = gpu_check.compare_with_fp64("kmeans_assign", "tiny", torch.float32, "cpu")
    assert bad["optimality_err"] > 0.01 and bad["label_mismatches"] == 40


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="--budget-s"):
        gpu_check.main(["--smoke", "--budget-s", "0"])
    with pytest.raises(ValueError, match="--sections: unknown section"):
        gpu_check.main(["--smoke", "--sections", "correctness,bogus"])


def test_a_failing_section_is_recorded_and_the_next_one_runs(tmp_path):
    out = tmp_path / "check.json"
    check = gpu_check.Check("cpu", True, 100.0, str(out))
    check.section("boom", lambda c: 1 / 0)
    check.section("fine", lambda c: c.report["memory"].update(marker=1))
    saved = json.loads(out.read_text())
    assert saved["sections"]["boom"]["status"] == "error"
    assert saved["sections"]["boom"]["error"].startswith("ZeroDivisionError")
    assert saved["sections"]["fine"]["status"] == "ok" and saved["memory"] == {"marker": 1}


def test_spent_budget_skips_perf_sections_only(tmp_path):
    out = tmp_path / "check.json"
    report = gpu_check.main(["--smoke", "--budget-s", "1e-9", "--sections", "correctness,perf_dm", "--out", str(out)])
    assert report["sections"]["perf_dm"]["status"] == "skipped: time budget spent" and report["perf_dm"] == []
    assert report["sections"]["correctness"]["status"] == "ok" and len(report["correctness"]) == 24
    assert json.loads(out.read_text())["sections"] == report["sections"]
