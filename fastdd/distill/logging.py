"""Run logging: TensorBoard scalar events (loss, evaluation accuracy, seconds per iteration) for long runs."""
import time

import torch


class TensorBoardLogger:
    """Engine callback writing scalars under `log_dir`: pass it as `Distiller.run(callback=logger)` and call
    `close(engine)` afterwards. Evaluations are logged as the engine's history gains them (and at close)."""

    def __init__(self, log_dir: str):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise ValueError("config key 'log'='tensorboard' needs the tensorboard package "
                             "(pip install 'fastdd[tensorboard]')") from error
        self.writer = SummaryWriter(log_dir)
        self.log_dir = log_dir
        self._last_time = None
        self._evaluations_logged = None  # history entries already seen (None until the first iteration)
        self._logged_iterations: set = set()  # an engine that also calls on_evaluation logs each entry once

    def __call__(self, engine, logs: dict) -> None:
        self.on_iteration(engine, logs)

    def on_iteration(self, engine, logs: dict) -> None:
        now = time.perf_counter()
        step = engine.iteration
        self.writer.add_scalar("loss", float(logs.get("loss", float("nan"))), step)
        for key, value in logs.items():
            scalar = (isinstance(value, (int, float)) and not isinstance(value, bool)) or (
                isinstance(value, torch.Tensor) and value.dim() == 0)
            if key != "loss" and scalar:
                self.writer.add_scalar(f"method/{key}", float(value), step)
        if self._last_time is not None:
            self.writer.add_scalar("seconds_per_iteration", now - self._last_time, step)
        self._last_time = now
        self._log_new_evaluations(engine)

    def on_evaluation(self, entry: dict) -> None:
        """One evaluation entry {"iteration", model: {"mean", "std", ...}} -> accuracy/<model> scalars."""
        step = entry.get("iteration", 0)
        if step in self._logged_iterations:
            return
        self._logged_iterations.add(step)
        for model, result in entry.items():
            if isinstance(result, dict) and "mean" in result:
                self.writer.add_scalar(f"accuracy/{model}", float(result["mean"]), step)
                self.writer.add_scalar(f"accuracy_std/{model}", float(result["std"]), step)

    def _log_new_evaluations(self, engine) -> None:
        evaluations = engine.history.get("evaluations", [])
        if self._evaluations_logged is None:  # a resumed run's earlier evaluations were logged before
            self._evaluations_logged = len(evaluations)
        for entry in evaluations[self._evaluations_logged:]:
            self.on_evaluation(entry)
        self._evaluations_logged = len(evaluations)

    def close(self, engine=None) -> None:
        if engine is not None and self._evaluations_logged is not None:
            self._log_new_evaluations(engine)
        self.writer.flush()
        self.writer.close()
