"""benchmarks/bench_distributed.py: its --smoke run (1 and 2 gloo ranks) and its byte counting and scaling maths."""
import json
import os
import subprocess
import sys

import pytest
import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)
import bench_distributed  # noqa: E402

SMOKE_CLASSES, SMOKE_IPC, SMOKE_SIDE = 4, 2, 8


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_distributed") / "distributed.json"
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    res = subprocess.run([sys.executable, os.path.join(BENCH, "bench_distributed.py"), "--smoke", "--out", str(out)],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(out.read_text())


def _row(report, method, ranks, threads):
    (row,) = [r for r in report["rows"] if (r["method"], r["ranks"], r["threads_per_rank"]) == (method, ranks, threads)]
    return row


@pytest.mark.slow
def test_smoke_rows_for_every_layout_and_method(smoke_report):
    rows = smoke_report["rows"]
    assert sorted((r["method"], r["ranks"], r["threads_per_rank"]) for r in rows) == sorted(
        (m, ranks, threads) for m in ("dm", "gm") for ranks, threads in ((1, 1), (1, 2), (2, 1)))
    assert not [r["error"] for r in rows if "error" in r]
    for r in rows:
        assert r["timed_iterations"] == 1 and r["min_s"] == r["median_s"] == r["max_s"] > 0
        assert r["classes_per_rank"] == ([SMOKE_CLASSES] if r["ranks"] == 1 else [2, 2])
    assert smoke_report["twenty_iteration_rule"].startswith("not met: 1 timed iterations")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dm", "gm"])
def test_smoke_two_ranks_count_the_bytes_the_run_sends(smoke_report, method):
    """No collective inside an iteration (losses are reduced lazily); the loss read all-reduces one float64 per
    pending iteration; the final gather broadcasts images and momentum (float32) once each, every class once."""
    row = _row(smoke_report, method, 2, 1)
    phases = row["collectives_by_phase_rank0"]
    assert row["comm_bytes_in_iterations"] == 0 and "iterations" not in phases
    assert phases["loss read"] == {"all_reduce": {"calls": 1, "bytes": 8}}
    images_bytes = SMOKE_CLASSES * SMOKE_IPC * 3 * SMOKE_SIDE * SMOKE_SIDE * 4
    assert phases["final gather"] == {"broadcast": {"calls": 2 * 2, "bytes": 2 * images_bytes}}
    assert row["comm_bytes_per_run"]["final gather"] == 2 * images_bytes
    assert row["comm_bytes_per_iteration"] == 8.0
    # the fingerprint check: all_gather_object's size exchange and pickled payloads
    assert phases["setup"]["all_gather"]["calls"] == 2
    one_rank = _row(smoke_report, method, 1, 1)
    assert one_rank["collectives_by_phase_rank0"] == {} and one_rank["comm_bytes_per_iteration"] == 0


@pytest.mark.slow
def test_smoke_scaling_is_computed_from_the_rows(smoke_report):
    for method in ("dm", "gm"):
        (entry,) = [s for s in smoke_report["scaling"] if s["method"] == method]
        two, one, threaded = (_row(smoke_report, method, *layout)["median_s"] for layout in ((2, 1), (1, 1), (1, 2)))
        assert entry["efficiency"] == pytest.approx(one / (2 * two))
        assert entry["speedup_vs_1_rank_2_threads"] == pytest.approx(threaded / two)


def test_payload_bytes_per_collective_hand_computed():
    import torch.distributed as dist
    x = torch.zeros(3, 5)  # 60 bytes
    assert bench_distributed.payload_bytes("all_reduce", dist.all_reduce, (x,), {}) == 60
    assert bench_distributed.payload_bytes("broadcast", dist.broadcast, (), {"tensor": x.double(), "src": 1}) == 120
    gathered = [torch.zeros(4, dtype=torch.int64), torch.zeros(4, dtype=torch.int64)]
    assert bench_distributed.payload_bytes("all_gather", dist.all_gather, (gathered, gathered[0]), {}) == 64
    assert bench_distributed.payload_bytes("reduce_scatter_tensor", dist.reduce_scatter_tensor,
                                           (torch.zeros(2), torch.zeros(6)), {}) == 24
    assert bench_distributed.payload_bytes("barrier", dist.barrier, (), {}) == 0


def test_scaling_against_one_rank_one_thread_and_two_threads():
    base = {"device": "cpu", "case": "c", "method": "dm"}
    rows = [{**base, "ranks": 1, "threads_per_rank": 1, "median_s": 10.0},
            {**base, "ranks": 1, "threads_per_rank": 2, "median_s": 6.0},
            {**base, "ranks": 2, "threads_per_rank": 1, "median_s": 8.0},
            {**base, "method": "gm", "ranks": 2, "threads_per_rank": 1, "error": "ValueError: x"}]
    assert bench_distributed.scaling(rows) == [{**base, "ranks": 2, "efficiency": 0.625,
                                                "speedup_vs_1_rank_2_threads": 0.75}]


def test_row_takes_each_iterations_slowest_rank_and_rank0_bytes():
    def rank(seconds, loss_bytes):
        return {"seconds": seconds, "loop_wall_s": sum(seconds) + 0.5, "model": "ConvNet", "classes": 2, "counts": {},
                "bytes": {"setup": 100, "iterations": 30, "loss read": loss_bytes, "final gather": 4096}}
    result = {"ranks": [rank([1.0, 3.0, 0.5], 24), rank([2.0, 1.0, 4.0], 0)]}
    row = bench_distributed.row_from(result, {"ranks": 2, "threads": 1}, "c", "dm", "cpu", [1, 1, 1], [2, 2, 2])
    assert (row["median_s"], row["min_s"], row["max_s"]) == (3.0, 2.0, 4.0)
    assert row["loop_wall_s_per_iteration"] == pytest.approx(7.5 / 3)
    assert row["comm_bytes_per_iteration"] == (30 + 24) / 3
    assert row["comm_bytes_per_run"] == {"setup": 100, "final gather": 4096}


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="--methods"):
        bench_distributed.main(["--methods", "dm,bogus"])
    with pytest.raises(ValueError, match="--iterations"):
        bench_distributed.main(["--iterations", "0"])
    with pytest.raises(ValueError, match="--warmup"):
        bench_distributed.main(["--warmup", "-1"])
    with pytest.raises(ValueError, match="--cases"):
        bench_distributed.main(["--cases", "cifar100,mnist"])
