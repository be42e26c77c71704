"""loss.png drawn with matplotlib (raw + EMA loss, evaluation markers) and TensorBoard events read back."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from fastdd.distill.artifacts import ema, save_curves, save_loss_plot

BLUE = np.array([31, 119, 180])           # tab:blue, the EMA line and the accuracy markers
LIGHT_BLUE = np.array([187, 214, 233])    # tab:blue at alpha 0.3 on white, the raw loss


def pixels_near(image: np.ndarray, colour: np.ndarray, tolerance: int = 12) -> np.ndarray:
    return (np.abs(image[..., :3].astype(int) - colour).max(axis=-1) <= tolerance)


def test_ema_hand_computed():
    np.testing.assert_allclose(ema([1.0, 3.0, math.nan, 5.0], alpha=0.5), [1.0, 2.0, 2.0, 3.5])
    values = np.arange(100, dtype=float)
    expected, average = [], None
    for value in values:  # default span n // 20 = 5 -> alpha 1/3
        average = value if average is None else value / 3 + average * 2 / 3
        expected.append(average)
    np.testing.assert_allclose(ema(values), expected)


def test_curves_png_has_loss_and_accuracy_panels(tmp_path):
    losses = list(10 * np.exp(-np.linspace(0, 6, 200)) * (1 + 0.3 * np.sin(np.arange(200))))
    evaluations = [{"iteration": 50, "ConvNet": {"mean": 0.4, "std": 0.05, "accuracies": [0.4]}},
                   {"iteration": 200, "ConvNet": {"mean": 0.8, "std": 0.01, "accuracies": [0.8]}}]
    series = save_curves(str(tmp_path / "loss.png"), {"loss": losses, "evaluations": evaluations})
    np.testing.assert_allclose(series["loss_ema"], ema(losses))
    assert series["log_y"] is True  # positive, spanning more than two decades
    assert series["accuracy"]["ConvNet"] == {"iterations": [50, 200], "mean": [40.0, 80.0], "std": [5.0, 1.0]}
    image = np.asarray(Image.open(tmp_path / "loss.png").convert("RGB"))
    assert image.shape == (600, 800, 3)
    top, bottom = image[:300], image[300:]
    assert pixels_near(top, BLUE).sum() > 300 and pixels_near(top, LIGHT_BLUE).sum() > 800
    assert pixels_near(bottom, BLUE).sum() > 100  # the accuracy line and its markers
    assert (image.sum(axis=-1) < 200).sum() > 500  # axis labels, ticks and titles in black


def test_loss_only_plot_and_linear_axis(tmp_path):
    series = save_loss_plot(str(tmp_path / "loss.png"), [3.0, 2.5, -1.0, 2.0])
    assert series["log_y"] is False  # a negative value: no log axis
    np.testing.assert_allclose(series["loss"], [3.0, 2.5, -1.0, 2.0])
    image = np.asarray(Image.open(tmp_path / "loss.png").convert("RGB"))
    assert image.shape == (400, 800, 3) and pixels_near(image, BLUE).sum() > 100
    assert save_curves(str(tmp_path / "flat.png"), {"loss": [1.0, 2.0, 5.0]})["log_y"] is False


def test_tensorboard_events_hold_the_runs_values(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fastdd.data import load_dataset
    from fastdd.distill import Distiller, build_config
    from fastdd.distill.logging import TensorBoardLogger

    config = build_config(overrides=["iterations=4", "eval_every=2", "eval_epochs=1", "eval_num_models=1",
                                     "batch_real=8", "ipc=1", "device=cpu", "progress=false"])
    engine = Distiller(config, load_dataset("digits"), load_dataset("digits", split="test"))
    logger = TensorBoardLogger(str(tmp_path / "tb"))
    engine.run(callback=logger)
    logger.close(engine)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    loss = events.Scalars("loss")
    assert [e.step for e in loss] == [1, 2, 3, 4]
    np.testing.assert_allclose([e.value for e in loss], engine.history["loss"], rtol=1e-6)
    accuracy = events.Scalars("accuracy/ConvNet")
    assert [e.step for e in accuracy] == [2, 4]
    np.testing.assert_allclose([e.value for e in accuracy],
                               [entry["ConvNet"]["mean"] for entry in engine.history["evaluations"]], rtol=1e-6)
    seconds = [e.value for e in events.Scalars("seconds_per_iteration")]
    assert len(seconds) == 3 and all(s > 0 for s in seconds)


def test_tensorboard_missing_package_names_the_key(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("no tensorboard")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    from fastdd.distill.logging import TensorBoardLogger
    with pytest.raises(ValueError, match="'log'='tensorboard' needs the tensorboard package"):
        TensorBoardLogger("unused")


def test_tensorboard_logs_each_evaluation_once(tmp_path):
    pytest.importorskip("tensorboard")
    from types import SimpleNamespace

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fastdd.distill.logging import TensorBoardLogger

    entry = {"iteration": 2, "ConvNet": {"mean": 0.25, "std": 0.5}}
    engine = SimpleNamespace(iteration=2, history={"evaluations": []})
    logger = TensorBoardLogger(str(tmp_path))
    logger.on_iteration(engine, {"loss": 1.5})
    engine.history["evaluations"].append(entry)
    logger.on_evaluation(entry)  # an engine hook and the history both report it
    engine.iteration = 3
    logger.on_iteration(engine, {"loss": 0.5})
    logger.close(engine)
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("accuracy/ConvNet")] == [(2, 0.25)]
    assert [(e.step, e.value) for e in events.Scalars("accuracy_std/ConvNet")] == [(2, 0.5)]
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(2, 1.5), (3, 0.5)]
