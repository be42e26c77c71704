"""fastdd.distill.memory: budget parsing (units, errors), the auto budget, chunk plans by hand, activation bytes of
a tiny Conv+ReLU net counted by hand."""
import pytest
import torch

from fastdd.distill import memory
from fastdd.distill.memory import ChunkPlan, activation_bytes_per_row, parse_budget, plan_chunks, resolve_budget


@pytest.mark.parametrize("value,expected", [
    ("8GB", 8 * 10**9), ("512MiB", 512 * 2**20), ("1.5GB", 1_500_000_000), (" 64 mib ", 64 * 2**20),
    ("2TiB", 2 * 2**40), (2**30, 2**30), (1e9, 10**9), ("100000000", 10**8), ("auto", None), ("AUTO", None),
    (None, None)])
def test_parse_budget_units(value, expected):
    assert parse_budget(value) == expected


@pytest.mark.parametrize("value", ["8XB", "lots", "-1GB", "1e9", True, "10MB", 2**26 - 1, ""])
def test_parse_budget_errors_name_the_key(value):
    with pytest.raises(ValueError, match="config key 'memory_budget'"):
        parse_budget(value)


def test_auto_budget_is_a_fraction_of_free_memory(monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device: 10**10)
    assert resolve_budget("auto", torch.device("cpu")) == 5 * 10**9
    assert resolve_budget("3GB", torch.device("cpu")) == 3 * 10**9
    monkeypatch.setattr(memory, "available_bytes", lambda device: 1000)
    assert resolve_budget(None, torch.device("cpu")) == memory.MIN_BUDGET


def test_everything_fits_in_one_chunk():
    # free 1000; real pass min(3 rows, 500 // 50) = 3 -> 150; gradient rows 4 × 200 = 800 <= 850
    assert plan_chunks(1000, [2, 2, 2, 2], 100, [3, 3, 3, 3], 50) == ChunkPlan([[0, 1, 2, 3]], 3)


def test_consecutive_chunks_with_a_reserve():
    # free 900; real pass min(2, 450 // 100) = 2 -> 200; gradient budget 700: 300+100 | 400+100 | 500
    plan = plan_chunks(1000, [3, 1, 4, 1, 5], 100, [2] * 5, 100, reserved=100)
    assert plan == ChunkPlan([[0, 1], [2, 3], [4]], 2) and plan.num_chunks == 3


def test_real_pass_is_capped_by_half_the_budget():
    # 100 real rows of 20 bytes would take 2000: the pass takes (1000 // 2) // 20 = 25 rows
    assert plan_chunks(1000, [1], 10, [100], 20) == ChunkPlan([[0]], 25)


def test_classes_without_rows_stay_inside_chunks():
    # no real rows: a 1-row pass of 10 -> gradient budget 990: 0+500+0+0 | 500
    assert plan_chunks(1000, [0, 5, 0, 0, 5], 100, [0] * 5, 10) == ChunkPlan([[0, 1, 2, 3], [4]], 1)


def test_a_class_too_large_for_the_budget_is_refused():
    with pytest.raises(ValueError, match=r"config key 'memory_budget' .* too small: one class needs .*its 12 rows"):
        plan_chunks(1000, [2, 12], 100, [1, 1], 10)  # 1200 > 1000 − a 1-row real pass of 10


class ConvReLU(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 3, padding=1)
        self.relu = torch.nn.ReLU()

    def embed(self, x):
        return self.relu(self.conv(x))


def test_activation_bytes_of_a_conv_relu_net_by_hand():
    net = ConvReLU()
    for p in net.parameters():
        p.requires_grad_(False)
    sample = torch.zeros(1, 1, 4, 4)  # (as engine.row_bytes passes it: one row of its own)
    x_bytes, out_bytes, weight_bytes = 1 * 4 * 4 * 4, 2 * 4 * 4 * 4, 2 * 1 * 3 * 3 * 4
    # grad: the input, plus what autograd saves: conv its input (the input, counted once) and weight (a
    # parameter: per network, not per row), ReLU its output (bias: nothing)
    assert activation_bytes_per_row(net, sample, grad=True) == x_bytes + out_bytes
    assert weight_bytes == 72
    # no grad: the largest input + output pair of a leaf module (ReLU: 128 in + 128 out > conv: 64 + 128)
    assert activation_bytes_per_row(net, sample, grad=False) == out_bytes + out_bytes
    doubled = activation_bytes_per_row(net, sample, grad=True, forward=lambda n, x: n.embed(torch.cat([x, x], 3)))
    assert doubled == x_bytes + 2 * x_bytes + 2 * out_bytes  # a custom forward is what is measured


def test_engine_plans_gradient_rows_with_the_backward_overhead():
    from fastdd.data import from_tensors
    from fastdd.distill import Distiller, build_config
    g = torch.Generator().manual_seed(0)
    data = from_tensors(torch.randint(0, 256, (60, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(60) % 6)
    engine = Distiller(build_config({"device": "cpu", "progress": False, "ipc": 2, "model": "ConvNetW32",
                                     "memory_budget": "64MiB"}), data)
    net = engine.new_network()
    grad, real = engine.row_bytes(net, True), engine.row_bytes(net, False)
    rows, real_rows = [40, 40, 40, 40, 40, 40], [10] * 6
    expected = plan_chunks(engine.memory_budget, rows, int(memory.GRAD_ROW_OVERHEAD * grad), real_rows, real)
    assert memory.GRAD_ROW_OVERHEAD == 1.5
    assert engine.chunk_plan(net, rows, real_rows) == expected
    assert expected != plan_chunks(engine.memory_budget, rows, grad, real_rows, real)  # the overhead matters here
