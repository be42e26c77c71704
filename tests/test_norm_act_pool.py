"""Tests for fastdd.ops.norm_act_pool: unfused-module agreement, autograd, opcheck, compile, Triton interpreter, bad input."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import TOLERANCES, requires_cuda, triton_or_skip
from fastdd.ops import norm_act_pool
from fastdd.ops.norm_act_pool import FusedNormActPool
from fastdd.reference import norm_act_pool as ref

SHAPES = [  # (N, C, H, W)
    (1, 1, 7, 7), (2, 3, 28, 28), (1, 128, 31, 31), (3, 3, 31, 28), (2, 5, 7, 32), (1, 4, 2, 3),
]
FORMATS = [torch.contiguous_format, torch.channels_last]
GRAD_TOL = {torch.float64: dict(atol=1e-9, rtol=1e-9), torch.float32: dict(atol=1e-4, rtol=1e-4),
            torch.bfloat16: dict(atol=5e-2, rtol=5e-2)}


def _inputs(N, C, H, W, dtype=torch.float32, fmt=torch.contiguous_format, device="cpu", seed=0, offset=0.5):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, C, H, W, generator=g, dtype=torch.float64) * 2 + offset)
    weight = torch.randn(C, generator=g, dtype=torch.float64)
    bias = torch.randn(C, generator=g, dtype=torch.float64) * 0.5
    x = x.to(device=device, dtype=dtype).contiguous(memory_format=fmt)
    return x, weight.to(device, dtype), bias.to(device, dtype)


def _unfused(x, weight, bias, eps=1e-5):
    """The ConvNet "instancenorm" tail as the reference code builds it, in float64."""
    y = F.group_norm(x.double(), x.shape[1], weight.double(), bias.double(), eps)
    return F.avg_pool2d(F.relu(y), 2, 2)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_forward_matches_unfused_and_reference(shape, fmt, dtype):
    x, w, b = _inputs(*shape, dtype=dtype, fmt=fmt)
    out = norm_act_pool(x, w, b)
    N, C, H, W = shape
    assert out.shape == (N, C, H // 2, W // 2) and out.dtype == dtype
    assert out.is_contiguous(memory_format=ref.memory_format(x))
    torch.testing.assert_close(out.double(), _unfused(x, w, b), **TOLERANCES[dtype])
    expected = ref.norm_act_pool(x, w, b, 1e-5, 2)[0]
    torch.testing.assert_close(out, expected, **TOLERANCES[dtype])
    assert out.stride() == expected.stride()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_backward_matches_unfused_autograd(shape, fmt, dtype):
    x, w, b = _inputs(*shape, dtype=dtype, fmt=fmt, seed=1)
    leaves = [t.detach().requires_grad_(True) for t in (x, w, b)]
    out = norm_act_pool(*leaves)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    got = torch.autograd.grad(out, leaves, g)
    assert got[0].is_contiguous(memory_format=ref.memory_format(x))
    exp_leaves = [t.detach().double().requires_grad_(True) for t in (x, w, b)]
    expected = torch.autograd.grad(_unfused(*exp_leaves), exp_leaves, g.double())
    scale = max(1.0, shape[2] * shape[3] / 64)  # dw/db sum over N*H*W terms
    for name, a, e in zip(("x", "weight", "bias"), got, expected):
        tol = dict(GRAD_TOL[dtype]) if name == "x" else {k: v * scale for k, v in GRAD_TOL[dtype].items()}
        torch.testing.assert_close(a.double(), e, **tol, msg=lambda m: f"grad {name}: {m}")


def test_large_mean_offset_keeps_fp32_statistics_accurate():
    x, w, b = _inputs(2, 4, 32, 32, offset=1000.0)
    torch.testing.assert_close(norm_act_pool(x, w, b).double(), _unfused(x, w, b), atol=2e-3, rtol=2e-3)


def test_constant_plane_uses_eps():
    x = torch.full((1, 2, 4, 4), 3.0)
    out = norm_act_pool(x, torch.ones(2), torch.tensor([0.5, -0.5]))
    # x * (rstd * w) + (b - mean * rstd * w), as eager GroupNorm computes it: ~1e-5 cancellation at rstd 316.
    torch.testing.assert_close(out, torch.tensor([0.5, 0.0])[None, :, None, None].expand(1, 2, 2, 2), atol=1e-4,
                               rtol=0)


def test_empty_batch():
    x, w, b = _inputs(0, 3, 8, 8)
    assert norm_act_pool(x, w, b).shape == (0, 3, 4, 4)


@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 2, 4, 4), (2, 4, 6, 3)])
def test_gradcheck_float64(shape, fmt):
    x, w, b = (t.requires_grad_(True) for t in _inputs(*shape, dtype=torch.float64, fmt=fmt))
    assert torch.autograd.gradcheck(norm_act_pool, (x, w, b), fast_mode=True)


@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "nhwc"])
def test_gradcheck_and_gradgradcheck_float64_full(fmt):
    x, w, b = (t.requires_grad_(True) for t in _inputs(1, 2, 4, 5, dtype=torch.float64, fmt=fmt))
    assert torch.autograd.gradcheck(norm_act_pool, (x, w, b))
    assert torch.autograd.gradgradcheck(norm_act_pool, (x, w, b))


def test_saves_nothing_without_grad_and_only_minimal_tensors_with_it():
    x, w, b = _inputs(2, 3, 8, 8)
    packed = []

    def pack(t):
        packed.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.no_grad():
            norm_act_pool(x, w.requires_grad_(True), b.requires_grad_(True))
        norm_act_pool(x, w.detach(), b.detach())
        assert packed == []
        x.requires_grad_(True)
        out = norm_act_pool(x, w, b)
    shapes = sorted(tuple(t.shape) for t in packed)
    assert shapes == sorted([(2, 3, 8, 8), (3,), (3,), (2, 3), (2, 3)])
    assert any(t.data_ptr() == x.data_ptr() for t in packed)  # x itself, not a copy
    assert out.grad_fn is not None


@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(fmt, requires_grad):
    x, w, b = _inputs(2, 3, 7, 6, fmt=fmt)
    for t in (x, w, b):
        t.requires_grad_(requires_grad)
    torch.library.opcheck(torch.ops.fastdd.norm_act_pool.default, (x, w, b, 1e-5, 2))
    _, mean, rstd = ref.norm_act_pool(x.detach(), w.detach(), b.detach(), 1e-5, 2)
    g = torch.randn(2, 3, 3, 3).contiguous(memory_format=fmt)
    torch.library.opcheck(torch.ops.fastdd.norm_act_pool_backward.default, (g, x, w, b, mean, rstd, 1e-5, 2))


def test_torch_compile_fullgraph():
    x, w, b = _inputs(2, 4, 9, 8)

    def f(t, weight, bias):
        return norm_act_pool(t * 2.0, weight, bias).square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    leaves = [t.requires_grad_(True) for t in (x, w, b)]
    got = torch.autograd.grad(compiled(*leaves), leaves)
    expected = torch.autograd.grad(f(*leaves), leaves)
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e)


def _conv_stacks(C_in=3, C=8, seed=0):
    torch.manual_seed(seed)
    unfused = nn.Sequential(nn.Conv2d(C_in, C, 3, padding=1), nn.GroupNorm(C, C, affine=True), nn.ReLU(),
                            nn.AvgPool2d(2, 2)).double()
    with torch.no_grad():  # non-trivial affine parameters
        unfused[1].weight.uniform_(0.5, 1.5)
        unfused[1].bias.uniform_(-0.5, 0.5)
    fused = nn.Sequential(nn.Conv2d(C_in, C, 3, padding=1), FusedNormActPool(C)).double()
    fused.load_state_dict(unfused.state_dict())
    return unfused, fused


@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "nhwc"])
def test_module_matches_conv_groupnorm_relu_avgpool(fmt):
    unfused, fused = _conv_stacks()
    x = torch.randn(4, 3, 11, 10, dtype=torch.float64).contiguous(memory_format=fmt)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    outs = [unfused(xs[0]), fused(xs[1])]
    torch.testing.assert_close(outs[1], outs[0])
    g = torch.randn_like(outs[0])
    params = [(m[0].weight, m[1].weight, m[1].bias) for m in (unfused, fused)]
    grads = [torch.autograd.grad(o, (xi, *p), g) for o, xi, p in zip(outs, xs, params)]
    for name, a, e in zip(("x", "conv weight", "norm weight", "norm bias"), grads[1], grads[0]):
        torch.testing.assert_close(a, e, msg=lambda m: f"grad {name}: {m}")
    unfused.load_state_dict(fused.state_dict())  # and back


def test_module_parameters_match_group_norm():
    fused, norm = FusedNormActPool(6), nn.GroupNorm(6, 6, affine=True)
    assert set(fused.state_dict()) == set(norm.state_dict()) == {"weight", "bias"}
    torch.testing.assert_close(fused.weight, norm.weight)
    torch.testing.assert_close(fused.bias, norm.bias)
    shared = FusedNormActPool.from_group_norm(norm)
    assert shared.weight is norm.weight and shared.eps == norm.eps
    with pytest.raises(ValueError, match="num_groups == num_channels"):
        FusedNormActPool.from_group_norm(nn.GroupNorm(2, 6))


def test_gradient_matching_double_backward():
    """DC/IDC differentiate conv-weight gradients (create_graph) w.r.t. the synthetic images."""
    unfused, fused = _conv_stacks(C=4)
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    results = []
    for model in (unfused, fused):
        xi = x.clone().requires_grad_(True)
        loss = model(xi).square().sum()
        (gw,) = torch.autograd.grad(loss, model[0].weight, create_graph=True)
        results.append(torch.autograd.grad(gw.square().sum(), xi)[0])
    torch.testing.assert_close(results[1], results[0])


@pytest.mark.parametrize("bad, match, exc", [
    (dict(pool=3), "pool must be 2", ValueError),
    (dict(x=torch.ones(2, 3, 8)), "x must be 4-D", ValueError),
    (dict(x=torch.ones(2, 3, 8, 8, dtype=torch.long)), "x must be a floating-point", TypeError),
    (dict(weight=torch.ones(4)), "weight has 4 entries but x has 3 channels", ValueError),
    (dict(bias=torch.ones(3, 1)), "bias must be 1-D", ValueError),
    (dict(eps=-1.0), "eps must be >= 0", ValueError),
    (dict(x=torch.ones(2, 3, 1, 8)), "x must be at least 2x2", ValueError),
    (dict(weight=torch.ones(3, device="meta")), "all tensors must be on one device", ValueError),
])
def test_bad_input_names_the_argument(bad, match, exc):
    args = dict(x=torch.ones(2, 3, 8, 8), weight=torch.ones(3), bias=torch.zeros(3), eps=1e-5, pool=2)
    args.update(bad)
    with pytest.raises(exc, match=match):
        norm_act_pool(**args)


def test_raw_op_checks_pool_too():
    with pytest.raises(ValueError, match="pool must be 2"):
        torch.ops.fastdd.norm_act_pool(torch.ones(1, 2, 4, 4), torch.ones(2), torch.zeros(2), 1e-5, 4)


@pytest.mark.interpreter
@pytest.mark.parametrize("shape", [(1, 1, 7, 7), (2, 3, 6, 9), (2, 17, 5, 4)])
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_triton_launchers_under_interpreter(shape, fmt, dtype):
    triton_or_skip()
    from fastdd.triton import norm_act_pool as tri
    x, w, b = _inputs(*shape, dtype=dtype, fmt=fmt)
    got, expected = tri.norm_act_pool(x, w, b, 1e-5, 2), ref.norm_act_pool(x, w, b, 1e-5, 2)
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e, **TOLERANCES[dtype])
    assert got[0].stride() == expected[0].stride()
    g = torch.randn(got[0].shape, dtype=dtype).contiguous(memory_format=fmt)
    got = tri.norm_act_pool_backward(g, x, w, b, *expected[1:], 1e-5, 2)
    expected = ref.norm_act_pool_backward(g, x, w, b, *expected[1:], 1e-5, 2)
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e, **GRAD_TOL[dtype])
    assert got[0].stride() == expected[0].stride()


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_reference(fmt, dtype):
    x, w, b = _inputs(64, 128, 31, 32, dtype=dtype, fmt=fmt, device="cuda")
    leaves = [t.requires_grad_(True) for t in (x, w, b)]
    out = norm_act_pool(*leaves)
    assert out.is_contiguous(memory_format=ref.memory_format(x))
    torch.testing.assert_close(out.double().cpu(), _unfused(*(t.detach().cpu() for t in leaves)), **TOLERANCES[dtype])
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, g)
    expected = ref.norm_act_pool_backward(g, x.detach(), w.detach(), b.detach(),
                                          *ref.norm_act_pool(x.detach(), w.detach(), b.detach(), 1e-5, 2)[1:], 1e-5, 2)
    for a, e in zip(got, expected):
        torch.testing.assert_close(a.float(), e.float(), atol=5e-2, rtol=5e-2)
