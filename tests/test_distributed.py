"""Class-parallel distillation on torch.distributed (2 gloo ranks on the CPU) equals one process: dm, sgs, robust,
gm, dasm, evaluation spread over ranks; resume across world sizes; config mismatch and a dying rank stop cleanly."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

import dist_worker
from fastdd.distill import Distiller, build_config
from fastdd.distill.distributed import ClassShard, balanced_range
from fastdd.distill.memory import ChunkPlan

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
BASE = ["progress=false", "device=cpu", "checkpoint_every=0", "eval_every=0"]
DM = [*BASE, "method=dm", "model=ConvNetW32", "ipc=2", "batch_real=16", "iterations=4", "lr_img=10"]
GM = [*BASE, "method=gm", "model=ConvNetW32", "ipc=2", "batch_real=8", "iterations=2", "inner_loop=2", "n_data=16",
      "net_batch=8", "batch_syn_max=6"]
JOBS = {
    "dm": ("digits", DM),
    "sgs": ("domains", [*BASE, "method=sgs", "model=ConvNetW32", "ipc=3", "batch_real=12", "iterations=2"]),
    "robust": ("digits", [*DM[:-2], "method=robust", "iterations=2", "k=3", "recluster_every=1", "kmeans_iters=5"]),
    "gm": ("digits", GM),
    "dasm": ("digits", [*DM[:-2], "method=dasm", "base=dm", "segments=2", "ipc=4", "iterations=2", "score_epochs=2",
                        "p_max=0.5"]),
    "eval": ("digits-eval", [*DM[:-2], "iterations=1", "eval_models=[ConvNetW32]", "eval_num_models=3",
                             "eval_epochs=2"]),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp, name: str, jobs: list, world: int = 2, dist_timeout: float = 60, wait: float = 120):
    """Run dist_worker.py on `world` local ranks; -> ([result dict per rank or None], [return codes], seconds)."""
    spec = os.path.join(tmp, f"{name}.json")
    with open(spec, "w") as f:
        json.dump({"jobs": jobs, "dist_timeout": dist_timeout}, f)
    result = os.path.join(tmp, f"{name}.pt")
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(world),
           "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([HERE, REPO, os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "dist_worker.py"), spec, result],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stderr=subprocess.PIPE, text=True)
             for r in range(world)]
    codes, errors = [], []
    for p in procs:
        try:
            _, err = p.communicate(timeout=wait)
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
        codes.append(p.returncode)
        errors.append(err)
    seconds = time.perf_counter() - start
    outs = [torch.load(f"{result}.{r}", weights_only=False) if os.path.exists(f"{result}.{r}") else None
            for r in range(world)]
    return outs, codes, seconds, errors


def _job(name, **extra):
    data, overrides = JOBS[name]
    return {"name": name, "data": data, "overrides": list(overrides), **extra}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One 2-rank launch running every job; the one-process references and checkpoints taken here."""
    torch.set_num_threads(1)
    tmp = str(tmp_path_factory.mktemp("dist"))
    assert int(os.environ.get("WORLD_SIZE", "1")) == 1
    single = {name: dist_worker.run_job(_job(name)) for name in JOBS}
    half = os.path.join(tmp, "one-process")
    dist_worker.run_job({**_job("dm"), "out": half, "overrides": DM + ["iterations=2", "checkpoint_every=2"]})
    gm_half = os.path.join(tmp, "one-process-gm")
    dist_worker.run_job({**_job("gm"), "out": gm_half, "overrides": GM + ["iterations=1", "checkpoint_every=1"]})
    jobs = [_job(name) for name in JOBS]
    jobs += [{**_job("dm"), "name": "resume-1-to-2", "resume": os.path.join(half, "checkpoint.pt")},
             {**_job("gm"), "name": "gm-resume-1-to-2", "resume": os.path.join(gm_half, "checkpoint.pt")},
             {**_job("dm"), "name": "half", "out": os.path.join(tmp, "two-ranks"),
              "overrides": DM + ["iterations=2", "checkpoint_every=2"]},
             {**_job("dm"), "name": "mismatch", "rank_overrides": {"1": ["seed=1"]}},
             {**_job("dm"), "name": "batchnorm", "overrides": DM + ["model=ConvNetBN"]}]
    outs, codes, seconds, errors = launch(tmp, "all", jobs)
    assert codes == [0, 0], errors
    resumed = dist_worker.run_job({**_job("dm"), "resume": os.path.join(tmp, "two-ranks", "checkpoint.pt")})
    return {"single": single, "ranks": outs, "resumed-2-to-1": resumed, "seconds": seconds}


@pytest.mark.parametrize("method", ["dm", "sgs", "robust", "gm", "dasm"])
def test_two_ranks_equal_one_process(runs, method):
    single, (rank0, rank1) = runs["single"][method], runs["ranks"]
    # every rank ends with the whole, gathered set
    assert torch.equal(rank0[method]["images"], rank1[method]["images"])
    assert (single["images"] - single["initial"]).abs().max() > 1e-3  # the run moved the images
    if method in ("dm", "dasm"):
        assert torch.equal(rank0[method]["images"], single["images"])  # bit-equal (see the report)
    else:
        torch.testing.assert_close(rank0[method]["images"], single["images"], rtol=1e-5, atol=1e-6)
    # the logged loss is the sum of the ranks' class parts: the one-process loss
    torch.testing.assert_close(torch.tensor(rank0[method]["loss"]), torch.tensor(single["loss"]), rtol=1e-5, atol=1e-7)
    assert rank0[method]["loss"] == rank1[method]["loss"]


def test_evaluation_spread_over_ranks_equals_one_process(runs):
    single, (rank0, rank1) = runs["single"]["eval"], runs["ranks"]
    (entry,), (ranked,) = single["evaluations"], rank0["eval"]["evaluations"]
    assert ranked == entry and rank1["eval"]["evaluations"] == rank0["eval"]["evaluations"]
    assert len(entry["ConvNetW32"]["accuracies"]) == 3


@pytest.mark.parametrize("leg", ["resume-1-to-2", "gm-resume-1-to-2", "resumed-2-to-1"])
def test_resume_across_world_sizes_equals_uninterrupted(runs, leg):
    method = "gm" if leg.startswith("gm") else "dm"
    uninterrupted = runs["single"][method]
    resumed = runs["resumed-2-to-1"] if leg == "resumed-2-to-1" else runs["ranks"][0][leg]
    assert torch.equal(resumed["images"], uninterrupted["images"])
    # the checkpoint's losses are whole (summed once), the resumed ones reduced again
    torch.testing.assert_close(torch.tensor(resumed["loss"]), torch.tensor(uninterrupted["loss"]), rtol=1e-6, atol=1e-8)


def test_config_mismatch_stops_every_rank_with_one_error(runs):
    rank0, rank1 = (r["mismatch"] for r in runs["ranks"])
    assert rank0["error"] == "ValueError" and "disagree with rank 0 on config key 'seed'" in rank0["message"]
    assert "ranks [1]" in rank0["message"]
    assert rank1["error"] == "PeerError"


def test_batchnorm_model_is_refused_on_every_rank(runs):
    for rank in runs["ranks"]:
        assert rank["batchnorm"]["error"] == "ValueError"
        assert "model 'ConvNetBN' uses BatchNorm" in rank["batchnorm"]["message"]


def test_dying_rank_fails_the_other_within_the_timeout_and_keeps_the_checkpoint(tmp_path):
    """Rank 0 runs `fastdd distill`; rank 1 the same run through the engine, dying after iteration 3 (after the
    checkpoint at 2): rank 0 stops with one error line, well within its timeout, the checkpoint intact."""
    out, rank1_out = str(tmp_path / "run"), str(tmp_path / "rank1")
    job = {"name": "fault", "data": "run", "overrides": [*DM, "iterations=6", "checkpoint_every=2"],
           "cli": ["distill", "--out", out], "cli_ranks": [0], "exit_after": 3, "out": rank1_out}
    outs, codes, seconds, errors = launch(str(tmp_path), "fault", [job], dist_timeout=20, wait=90)
    assert codes == [0, 3], errors
    assert outs[0]["fault"]["code"] == 2
    lines = [line for line in outs[0]["fault"]["stderr"].splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fastdd: error: a collective failed"), lines
    state = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)
    assert state["iteration"] == 2 and not [n for n in os.listdir(out) if n.startswith(".tmp-")]
    assert outs[0]["fault"]["seconds"] < 60
    assert not os.path.exists(rank1_out)  # only rank 0 writes


def test_rank_that_never_joins_stops_rank_zero_within_the_timeout(tmp_path):
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2", "RANK": "0",
           "LOCAL_RANK": "0", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "fastdd", "distill", "--out", str(tmp_path / "run"), *DM,
                           "dist_timeout=3"], env=env, capture_output=True, text=True, timeout=120)
    assert time.perf_counter() - start < 60
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fastdd: error: not every rank joined the process group within 3 s")


def test_class_ranges_are_balanced_contiguous_and_restrict_the_plan():
    assert [list(balanced_range(10, r, 3)) for r in range(3)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    shard = ClassShard.__new__(ClassShard)
    shard.classes = range(3, 6)
    plan = shard.restrict(ChunkPlan([[0, 1, 2, 3], [4], [5, 6, 7]], 9))
    assert plan.class_chunks == [[3], [4], [5]] and plan.real_rows_per_pass == 9


def test_single_process_has_no_shard_and_refuses_nothing():
    engine = Distiller(build_config(overrides=[*DM, "model=ConvNetBN"]), dist_worker.dataset("digits")[0])
    assert engine.shard is None and engine.writes is False
    engine.new_network()  # BatchNorm is fine in one process


def test_torchrun_cli_equals_one_process_and_only_rank_zero_prints(tmp_path):
    out = str(tmp_path / "run")
    # rank 0's bar reads the loss at iteration 25 (PROGRESS_EVERY), the checkpoint at 13 and 26: every rank must join
    overrides = [*DM, "iterations=26", "checkpoint_every=13", "eval_epochs=1", "eval_num_models=2"]
    cli_overrides = [*overrides, "progress=true"]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "fastdd", "distill", "--out", out, *cli_overrides]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("fastdd: dm on digits") == 1 and "2 ranks" in done.stdout
    assert done.stdout.count("fastdd: artifacts in") == 1
    saved = torch.load(os.path.join(out, "synthetic.pt"), weights_only=False)
    torch.set_num_threads(1)
    single = dist_worker.run_job({"name": "cli", "data": "run", "overrides": overrides})
    assert torch.equal(saved["images"], single["images"])
    with open(os.path.join(out, "metrics.json")) as f:
        assert json.load(f)["evaluations"] == json.loads(json.dumps(single["evaluations"]))
    assert torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)["iteration"] == 26
