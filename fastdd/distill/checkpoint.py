"""Run checkpoints: the engine's whole state (gathered from every rank of a class-parallel run), written atomically."""
import os

import torch

from fastdd.distill import artifacts

CHECKPOINT = "checkpoint.pt"


def engine_state(engine) -> dict:
    """Iteration, images, optimiser (momentum), generator, history (losses as floats), config and method state;
    class-parallel: every rank takes part in the gather and holds the whole state, so any world size resumes it."""
    engine.read_losses()
    engine.sync_synthetic()
    return {"iteration": engine.iteration, "images": engine.synthetic.images.detach().cpu(),
            "optimizer": engine.optimizer.state_dict(), "generator": engine.generator.get_state(),
            "history": engine.history, "config": engine.config.to_dict(), "method": engine.method.state_dict()}


def restore(engine, state: dict) -> None:
    """Load `state` into `engine` (every rank loads all of it: its class range then selects its work)."""
    with torch.no_grad():
        engine.synthetic.images.copy_(state["images"].to(engine.device))
    engine.optimizer.load_state_dict(state["optimizer"])
    engine.generator.set_state(state["generator"])
    engine.iteration = state["iteration"]
    engine.history = state["history"]
    losses = engine.history["loss"]  # saved ones are floats (already summed over ranks): not reduced again
    engine._losses_read = next((i for i, v in enumerate(losses) if torch.is_tensor(v)), len(losses))
    engine.method.load_state_dict(state["method"])


def save(engine) -> str | None:
    """The checkpoint file, written by the writing rank only (temp file + rename: the previous one stays intact
    until the new one is complete); None on the other ranks."""
    state = engine_state(engine)
    if not engine.writes:
        return None
    path = os.path.join(engine.out_dir, CHECKPOINT)
    artifacts.save_torch(state, path)
    return path
