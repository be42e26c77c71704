"""DASM: K=1 is its base exactly, difficulty windows, frozen segments, resume across segments, CLI, bad input."""
import json

import pytest
import torch

from fastdd.cli import main as cli_main
from fastdd.data import load_dataset
from fastdd.distill import Distiller, build_config
from fastdd.distill.difficulty import difficulty_window, p_schedule
from fastdd.distill.methods.dasm import DASM

FAST = ["progress=false", "eval_epochs=2", "eval_num_models=1", "batch_real=8", "model=ConvNetW32",
        "eval_models=[ConvNetW32]", "checkpoint_every=0", "device=cpu"]
GM_FAST = ["inner_loop=2", "n_data=16", "net_batch=8"]


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits"), load_dataset("digits", split="test")


def _run(digits, *overrides, out=None, callback=None):
    engine = Distiller(build_config(overrides=[*FAST, *overrides]), digits[0], digits[1], out_dir=out)
    return engine, engine.run(callback=callback)


@pytest.mark.parametrize("base,extra", [("dm", []), ("gm", GM_FAST)])
def test_one_segment_is_exactly_the_base_method(digits, base, extra):
    plain, _ = _run(digits, f"method={base}", "ipc=3", "iterations=3", *extra)
    dasm, metrics = _run(digits, "method=dasm", f"base={base}", "segments=1", "ipc=3", "iterations=3", *extra)
    assert torch.equal(plain.syn.images, dasm.syn.images)
    assert plain.history["loss"] == dasm.history["loss"]
    assert torch.equal(plain.generator.get_state(), dasm.generator.get_state())
    assert metrics["dasm"]["per_segment"][0]["window"] is None
    assert metrics["dasm"]["per_segment"][0]["accuracy"]["ConvNetW32"]["mean"] == \
        metrics["evaluations"][-1]["ConvNetW32"]["mean"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")
def test_one_segment_is_the_base_method_on_cuda(digits):
    cuda = [o for o in FAST if o != "device=cpu"] + ["device=cuda"]
    runs = []
    for method in (["method=gm"], ["method=dasm", "base=gm", "segments=1"]):
        engine = Distiller(build_config(overrides=[*cuda, *method, "ipc=2", "iterations=2", *GM_FAST]), digits[0])
        engine.run()
        runs.append(engine)
    # same code path and draws; only cuDNN's nondeterministic reductions may differ
    torch.testing.assert_close(runs[0].synthetic.images, runs[1].synthetic.images, rtol=1e-4, atol=1e-5)
    assert torch.equal(runs[0].generator.get_state(), runs[1].generator.get_state())


def test_difficulty_window_drops_the_easiest_fraction_per_class():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 2])
    losses = torch.tensor([0.4, 0.1, 0.3, 0.2, 5.0, 1.0, 1.0, 0.5, 9.0, 0.7, 3.0])
    kept, info = difficulty_window(losses, labels, 3, 0.5)
    # class 0: drop floor(2) easiest (idx 1, 3); class 1: floor(3) easiest (7, 9, then the tie 5 before 6)
    assert kept.tolist() == [0, 2, 4, 6, 8, 10]
    assert info["dropped_per_class"] == [2, 3, 0] and info["kept_per_class"] == [2, 3, 1]
    assert info["loss_threshold"] == pytest.approx([0.3, 1.0, 3.0])
    kept, info = difficulty_window(losses, labels, 3, 0.0)
    assert kept.tolist() == list(range(11)) and info["dropped"] == 0
    kept, _ = difficulty_window(losses, labels, 3, 0.3)  # floor(1.2) = 1, floor(1.8) = 1, floor(0.3) = 0
    assert kept.tolist() == [0, 2, 3, 4, 5, 6, 8, 9, 10]


def test_p_schedule_linear_and_explicit():
    assert p_schedule(4, 0.8) == pytest.approx([0.0, 0.2, 0.4, 0.6])
    assert p_schedule(1, 0.8) == [0.0]
    assert p_schedule(3, p=[0, 0.5, 0.25]) == [0.0, 0.5, 0.25]


def test_segments_are_frozen_and_matched_against_their_window(digits):
    seen = []
    snapshots = {}

    def spy(engine, logs):
        snapshots[engine.iteration] = engine.synthetic.images.detach().clone()
        seen.append(logs["segment"])
    engine, metrics = _run(digits, "method=dasm", "base=gm", "segments=2", "ipc=4", "iterations=4",
                           "score_epochs=2", "p_max=0.8", "segment_eval=false", *GM_FAST, callback=spy)
    assert seen == [1, 1, 2, 2]
    first = engine.method.rows(engine, [0])
    second = engine.method.rows(engine, [1])
    assert first.tolist()[:4] == [0, 1, 4, 5] and second.tolist()[:4] == [2, 3, 6, 7]
    fresh = Distiller(build_config(overrides=[*FAST, "method=dasm", "base=gm", "segments=2", "ipc=4",
                                              "iterations=4", *GM_FAST]), digits[0])
    fresh.method.prepare(fresh)  # IDC 'mix' initialisation of all segments
    init = fresh.syn.images.detach()
    torch.testing.assert_close(snapshots[2][second], init[second], rtol=0, atol=0)  # not yet active
    torch.testing.assert_close(snapshots[4][first], snapshots[2][first], rtol=0, atol=0)  # frozen
    assert not torch.equal(snapshots[4][second], snapshots[2][second])
    window = metrics["dasm"]["per_segment"][1]["window"]
    assert metrics["dasm"]["p"] == pytest.approx([0.0, 0.4])
    counts = torch.bincount(torch.as_tensor(digits[0].labels), minlength=10).tolist()
    assert window["dropped_per_class"] == [int(0.4 * n) for n in counts]
    pool = engine.method.pools[1]
    assert len(pool) == window["kept"]
    engine.method.activate(engine, 1)
    index, _ = engine.sample_real_index(8)
    assert torch.isin(index, pool).all()
    assert "test_accuracy" in metrics["dasm"]["per_segment"][1]["scorer"]


def test_resume_inside_a_later_segment_is_bit_identical(digits, tmp_path):
    args = ["method=dasm", "base=dm", "segments=2", "ipc=2", "iterations=6", "score_epochs=2", "p_max=0.5"]
    straight, _ = _run(digits, *args)

    def crash(engine, logs):
        if engine.iteration == 5:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        _run(digits, *args, "checkpoint_every=1", out=str(tmp_path), callback=crash)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert state["iteration"] == 4 and state["method"]["current"] == 1
    resumed = Distiller(build_config(state["config"]), digits[0], digits[1], out_dir=str(tmp_path))
    resumed.load_state_dict(state)
    resumed.run()
    assert torch.equal(straight.syn.images, resumed.syn.images)


def test_cli_end_to_end_writes_segment_records(tmp_path, capsys):
    out = tmp_path / "run"
    code = cli_main(["distill", "--method", "dasm", "--ipc", "2", "--iterations", "2", "--out", str(out),
                     "base=gm", "segments=2", "score_epochs=2", *FAST, *GM_FAST])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    records = metrics["dasm"]["per_segment"]
    assert [r["segment"] for r in records] == [1, 2] and metrics["dasm"]["segment_ipc"] == 1
    assert records[1]["window"]["kept"] + records[1]["window"]["dropped"] == len(load_dataset("digits").labels)
    assert all("accuracy" in r for r in records)
    saved = torch.load(out / "synthetic.pt", weights_only=False)
    assert saved["decoded_images"].shape[0] == 4 * 20 and saved["dasm_segment"].tolist()[:4] == [0, 1, 0, 1]


@pytest.mark.parametrize("overrides,message", [
    (["ipc=2", "segments=3"], "'segments'=3 exceeds ipc=2"),
    (["ipc=4", "segments=3"], "ipc=4 is not divisible by config key 'segments'=3"),
    (["ipc=4", "segment_ipc=3"], "ipc=4 is not a multiple of config key 'segment_ipc'=3"),
    (["ipc=25"], "not divisible by the default segments=2"),
    (["ipc=4", "segments=2", "p_max=1.0"], r"'p_max' must lie in \[0, 1\)"),
    (["ipc=4", "segments=2", "p=[0, 1.5]"], r"p\[1\]=1.5 must lie in \[0, 1\)"),
    (["ipc=4", "segments=2", "p=[0.2, 0.5]"], "must start with 0"),
    (["ipc=4", "segments=2", "p=[0]"], "list of 2 fractions"),
    (["ipc=4", "segments=4", "iterations=3"], "'iterations'=3 must be >= segments=4"),
    (["base=dasm"], "'base' must be one of"),
    (["bogus=1"], r"unknown config key\(s\) \['bogus'\] for method 'gm'"),
])
def test_bad_input_names_the_key(digits, overrides, message):
    with pytest.raises(ValueError, match=message):
        engine = Distiller(build_config(overrides=[*FAST, "method=dasm", "iterations=4", *overrides]), digits[0])
        engine.method.prepare(engine)


def test_base_keys_pass_through():
    method = DASM({"base": "gm", "factor": 1, "segments": 2, "distance": "cos"})
    assert method.base.args.factor == 1 and method.base.args.distance == "cos"
    assert method.lr_for(20) == pytest.approx(method.base.lr_for(10))


def test_network_training_draws_only_from_the_real_pool(digits):
    engine = Distiller(build_config(overrides=[*FAST, "method=gm", "ipc=1", "iterations=1", *GM_FAST]), digits[0])
    pool = torch.arange(0, len(digits[0].labels), 7)
    engine.set_active(None, pool=pool)
    seen, real_images = [], engine.real_images
    engine.real_images = lambda index: seen.append(index) or real_images(index)
    state = engine.method.begin_iteration(engine, 0)
    engine.method.train_network(engine, state.net, state.optimizer)
    drawn = torch.cat(seen)
    assert len(drawn) >= 16 and torch.isin(drawn, pool).all()
