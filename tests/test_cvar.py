"""Tests for fastdd.ops.cvar: exact Rockafellar-Uryasev CVaR vs brute force, gradients, compile, bad alpha."""
import math

import pytest
import torch

from fastdd.ops import cvar
from fastdd.ops.cvar import cvar_weights
from fastdd.reference.cvar import cvar_bruteforce

ALPHAS = [1e-3, 0.05, 0.1, 0.2, 0.25, 0.3, 1 / 3, 0.5, 0.55, 0.8, 0.9, 0.999, 1.0]


@pytest.mark.parametrize("K", [1, 2, 3, 7, 10, 33])
@pytest.mark.parametrize("alpha", ALPHAS)
def test_matches_bruteforce_min_over_t(K, alpha):
    losses = torch.randn(4, 3, K, dtype=torch.float64, generator=torch.Generator().manual_seed(K))
    out = cvar(losses, alpha)
    assert out.shape == (4, 3) and out.dtype == torch.float64
    torch.testing.assert_close(out, cvar_bruteforce(losses, alpha), atol=1e-12, rtol=1e-12)


def test_hand_computed_fractional_weight():
    losses = torch.tensor([1.0, 5.0, 3.0, 2.0, 4.0])
    # alpha K = 1.5: the largest (5) with weight 1/1.5, the next (4) with weight 0.5/1.5
    assert math.isclose(float(cvar(losses, 0.3)), (5 + 0.5 * 4) / 1.5, rel_tol=1e-6)
    assert math.isclose(float(cvar(losses, 0.4)), (5 + 4) / 2, rel_tol=1e-6)
    assert cvar_weights(10, 0.3).shape == (3,)  # 0.3 * 10 is treated as exactly 3


def test_limits_mean_and_max_and_monotone():
    losses = torch.randn(6, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(cvar(losses, 1.0), losses.mean(-1))
    torch.testing.assert_close(cvar(losses, 1e-6), losses.max(-1).values)
    torch.testing.assert_close(cvar(losses, 1 / 9), losses.max(-1).values)
    values = torch.stack([cvar(losses, a) for a in (0.1, 0.3, 0.5, 0.7, 1.0)])
    assert (values[:-1] >= values[1:] - 1e-12).all()  # CVaR decreases as the tail widens


@pytest.mark.parametrize("K, alpha", [(1, 0.5), (5, 0.3), (8, 0.25), (7, 1.0), (10, 0.05), (12, 0.55)])
def test_weights_sum_to_one(K, alpha):
    w = cvar_weights(K, alpha, dtype=torch.float64)
    assert w.shape[0] == min(K, math.ceil(round(alpha * K, 9)))
    torch.testing.assert_close(w.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert (w > 0).all()


def test_gradient_reaches_selected_losses_with_their_weights():
    losses = torch.tensor([1.0, 5.0, 3.0, 2.0, 4.0], dtype=torch.float64, requires_grad=True)
    cvar(losses, 0.3).backward()
    torch.testing.assert_close(losses.grad, torch.tensor([0, 1 / 1.5, 0, 0, 0.5 / 1.5], dtype=torch.float64))


@pytest.mark.parametrize("alpha", [0.05, 0.3, 0.5, 0.77, 1.0])
def test_gradcheck_float64(alpha):
    losses = torch.randn(3, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: cvar(t, alpha), (losses,))
    assert torch.autograd.gradgradcheck(lambda t: cvar(t, alpha), (losses,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision(dtype):
    losses = torch.rand(5, 16, generator=torch.Generator().manual_seed(2))
    out = cvar(losses.to(dtype), 0.3)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), cvar_bruteforce(losses.double(), 0.3), atol=2e-2, rtol=2e-2)


def test_torch_compile_fullgraph():
    losses = torch.rand(4, 10)

    def f(t):
        return cvar(t * 2.0, 0.35).sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(losses), f(losses))


@pytest.mark.parametrize("alpha", [0.0, -0.1, 1.0001, 2, float("nan"), float("inf"), "0.5", None, True])
def test_bad_alpha_names_alpha(alpha):
    with pytest.raises(ValueError, match="alpha must be a real number in \\(0, 1\\]"):
        cvar(torch.rand(5), alpha)


def test_tensor_alpha_accepted():
    losses = torch.rand(7)
    torch.testing.assert_close(cvar(losses, torch.tensor(0.4)), cvar(losses, 0.4))


@pytest.mark.parametrize("losses, exc, match", [
    (torch.ones(3, dtype=torch.long), TypeError, "losses must be a floating-point"),
    (torch.ones(3, 0), ValueError, "at least one value in the last dim"),
    (torch.tensor(1.0), ValueError, "at least one value in the last dim"),
    ([1.0, 2.0], TypeError, "losses must be a Tensor"),
])
def test_bad_losses(losses, exc, match):
    with pytest.raises(exc, match=match):
        cvar(losses, 0.5)
