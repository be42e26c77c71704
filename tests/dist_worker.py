"""One rank of the distributed tests: `python dist_worker.py JOBS.json RESULT.pt` under RANK/WORLD_SIZE (gloo, CPU)."""
import contextlib
import io
import json
import os
import sys
import time

import torch

from fastdd.data import from_tensors, load_dataset
from fastdd.data.domains import rotated_mnist
from fastdd.distill import Distiller, build_config, distributed
from fastdd.distill.methods.sgs_data import domain_generalization_data


def dataset(key: str, config=None):
    """(train, test, evaluators) of a tiny data set ("run": the CLI's, from the config)."""
    if key == "run":
        from fastdd.distill.datasets import load_run_data
        return load_run_data(config)
    if key == "digits":
        return load_dataset("digits"), None, ()
    if key == "digits-eval":
        digits = load_dataset("digits")
        return digits, digits, ()
    if key == "domains":
        g = torch.Generator().manual_seed(0)
        n = 4 * 40
        images = from_tensors(torch.randint(0, 256, (n, 1, 12, 12), dtype=torch.uint8, generator=g),
                              torch.arange(n) % 4, num_classes=4, mean=(0.5,), std=(0.3,))
        train, _, evaluators = domain_generalization_data(rotated_mnist(images, angles=(0, 30, 60, 90)), 90)
        return train, None, evaluators
    raise KeyError(key)


def run_job(job: dict) -> dict:
    """One distillation (optionally resumed from a checkpoint file): final images and the logged losses."""
    config = build_config(overrides=job["overrides"])
    train, test, evaluators = dataset(job["data"], config)
    engine = Distiller(config, train, test, out_dir=job.get("out"), evaluators=list(evaluators))
    if job.get("resume"):
        state = torch.load(job["resume"], map_location="cpu", weights_only=False)
        state["config"]["iterations"] = config.iterations
        engine.load_state_dict(state)
    initial = engine.synthetic.images.detach().clone()
    stall = job.get("exit_after")  # a rank that dies after this iteration (fault tests)
    callback = (lambda e, logs: os._exit(3) if e.iteration == stall else None) if stall else None
    metrics = engine.run(callback=callback)
    return {"initial": initial, "images": engine.synthetic.images.detach().clone(), "loss": engine.read_losses(),
            "evaluations": metrics["evaluations"]}


def main(jobs_path: str, result_path: str) -> None:
    torch.set_num_threads(1)
    with open(jobs_path) as f:
        spec = json.load(f)
    timeout = spec.get("dist_timeout", 60)
    spec["jobs"] = [{**job, "overrides": job["overrides"] + [f"dist_timeout={timeout}"]} for job in spec["jobs"]]
    rank = int(os.environ.get("RANK", "0"))
    results = {}
    for job in spec["jobs"]:
        job = {**job, "overrides": job["overrides"] + job.get("rank_overrides", {}).get(str(rank), [])}
        start = time.perf_counter()
        if job.get("cli") and rank in job.get("cli_ranks", [rank]):
            err = io.StringIO()
            from fastdd.cli import main as cli_main
            with contextlib.redirect_stderr(err):
                code = cli_main(job["cli"] + job["overrides"])
            results[job["name"]] = {"code": code, "stderr": err.getvalue(), "seconds": time.perf_counter() - start}
            continue
        try:
            results[job["name"]] = run_job(job)
        except (ValueError, RuntimeError) as error:
            results[job["name"]] = {"error": type(error).__name__, "message": str(error)}
    torch.save(results, f"{result_path}.{rank}")
    distributed.shutdown(clean=not any("error" in r or r.get("code") for r in results.values()))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
