"""Tests for fastdd.ops.segment_mean: reference agreement, autograd, opcheck, compile, Triton interpreter, bad input."""
import pytest
import torch

from conftest import TOLERANCES, requires_cuda, triton_or_skip
from fastdd.ops import segment_mean
from fastdd.reference import segment_mean as ref

SHAPES = [  # (N, D, num_segments)
    (1, 1, 1), (7, 1, 3), (33, 2047, 5), (300, 64, 10), (5000, 3, 7), (10, 16, 12),
]


def _inputs(N, D, S, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    seg = torch.randint(0, max(S - 2, 1), (N,), generator=g).to(device)  # leaves the top segments empty
    if N > 2:
        seg[-1] = S - 1  # a segment with exactly one row
    return x, seg


def _expected(x, seg, S):
    xs = x.double()
    out = torch.zeros(S, x.shape[1], dtype=torch.float64)
    for s in range(S):
        rows = xs[seg == s]
        if len(rows):
            out[s] = rows.mean(0)
    return out


@pytest.mark.parametrize("N,D,S", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_matches_hand_loop_and_reference(N, D, S, dtype):
    x, seg = _inputs(N, D, S, dtype)
    out = segment_mean(x, seg, S)
    assert out.dtype == dtype and out.shape == (S, D)
    torch.testing.assert_close(out.double(), _expected(x, seg, S), **TOLERANCES[dtype])
    torch.testing.assert_close(out, ref.segment_mean(x, seg, S), **TOLERANCES[dtype])


def test_hand_computed_case():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [10.0, 20.0]])
    out = segment_mean(x, torch.tensor([1, 1, 0]), 3)
    assert torch.equal(out, torch.tensor([[10.0, 20.0], [2.0, 3.0], [0.0, 0.0]]))


def test_empty_segment_zero_row_and_zero_gradient():
    x = torch.randn(6, 4, requires_grad=True)
    seg = torch.tensor([0, 0, 2, 2, 2, 0])
    out = segment_mean(x, seg, 4)
    assert torch.equal(out[1], torch.zeros(4)) and torch.equal(out[3], torch.zeros(4))
    out.sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([1 / 3] * 3 + [1 / 3] * 3)[:, None].expand(6, 4).contiguous())


@pytest.mark.parametrize("N,D,S", [(9, 5, 4), (1, 1, 1), (20, 3, 6)])
def test_gradcheck_float64(N, D, S):
    x, seg = _inputs(N, D, S, torch.float64)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: segment_mean(t, seg, S), (x,))
    assert torch.autograd.gradgradcheck(lambda t: segment_mean(t, seg, S), (x,))


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(requires_grad):
    x, seg = _inputs(40, 9, 6)
    x.requires_grad_(requires_grad)
    torch.library.opcheck(torch.ops.fastdd.segment_mean.default, (x, seg, 6))
    torch.library.opcheck(torch.ops.fastdd.segment_mean_backward.default, (torch.randn(6, 9), seg))


def test_torch_compile_fullgraph():
    x, seg = _inputs(50, 8, 5)

    def f(t):
        return segment_mean(t * 2.0, seg, 5).square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), f(x))


@pytest.mark.parametrize("bad, match, exc", [
    (dict(seg=torch.zeros(5)), "seg must be int64", TypeError),
    (dict(seg=torch.tensor([0, 1, 2, 3, 4])), r"seg ids must lie in \[0, 3\)", ValueError),
    (dict(seg=torch.tensor([0, 1, -1, 0, 0])), r"seg ids must lie", ValueError),
    (dict(seg=torch.zeros(4, dtype=torch.long)), "seg has 4 entries but x has 5", ValueError),
    (dict(x=torch.ones(5, 2, dtype=torch.long)), "x must be a floating-point", TypeError),
    (dict(x=torch.ones(5)), "x must be 2-D", ValueError),
    (dict(num_segments=-1), "num_segments must be a non-negative int", ValueError),
    (dict(x=torch.ones(5, 2, device="meta")), "all tensors must be on one device", ValueError),
])
def test_bad_input_names_the_argument(bad, match, exc):
    args = dict(x=torch.ones(5, 2), seg=torch.zeros(5, dtype=torch.long), num_segments=3)
    args.update(bad)
    with pytest.raises(exc, match=match):
        segment_mean(**args)


def test_raw_op_checks_ids_too():
    with pytest.raises(ValueError, match="seg ids must lie"):
        torch.ops.fastdd.segment_mean(torch.ones(3, 2), torch.tensor([0, 5, 1]), 3)


@pytest.mark.interpreter
@pytest.mark.parametrize("N,D,S", [(1, 1, 1), (37, 5, 4), (70, 33, 9)])
def test_triton_launchers_under_interpreter(N, D, S):
    triton_or_skip()
    from fastdd.triton import segment_mean as tri
    x, seg = _inputs(N, D, S)
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(1))
    x, seg = x[perm], seg[perm]  # unsorted ids exercise the flush path
    torch.testing.assert_close(tri.segment_mean(x, seg, S), ref.segment_mean(x, seg, S))
    grad = torch.randn(S, D)
    torch.testing.assert_close(tri.segment_mean_backward(grad, seg), ref.segment_mean_backward(grad, seg))


@pytest.mark.interpreter
def test_triton_launchers_keep_float64_precision():
    triton_or_skip()
    from fastdd.triton import segment_mean as tri
    g = torch.Generator().manual_seed(3)
    x = 1.0 + 1e-9 * torch.randn(64, 3, generator=g, dtype=torch.float64)  # fp32 accumulation would round 1e-9 away
    seg = torch.randint(0, 3, (64,), generator=g)
    expected = torch.stack([x[seg == s].mean(0) for s in range(3)])
    torch.testing.assert_close(tri.segment_mean(x, seg, 3), expected, atol=1e-14, rtol=0)
    grad = 1.0 + 1e-9 * torch.randn(3, 3, generator=g, dtype=torch.float64)
    counts = torch.stack([(seg == s).sum() for s in range(3)]).double()
    torch.testing.assert_close(tri.segment_mean_backward(grad, seg), (grad / counts[:, None])[seg], atol=1e-15, rtol=0)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.slow
def test_cuda_offsets_past_two_to_the_31_elements():
    D = 256
    N = 2 ** 31 // D + 64  # 2^31 + 16384 elements: the last rows start past the int32 range
    if torch.cuda.mem_get_info()[0] < 3 * N * D * 2:
        pytest.skip("needs about 13 GB of free GPU memory")
    x = torch.zeros(N, D, dtype=torch.float16, device="cuda")
    x[-64:] = torch.arange(64 * D, device="cuda").view(64, D).remainder(7).half()
    seg = torch.zeros(N, dtype=torch.long, device="cuda")
    seg[-64:] = 1
    out = segment_mean(x, seg, 2)
    torch.testing.assert_close(out[1].float(), x[-64:].float().mean(0), atol=1e-3, rtol=1e-3)
    assert torch.equal(out[0], torch.zeros(D, dtype=torch.float16, device="cuda"))
    del x
    grad = torch.ones(2, D, dtype=torch.float16, device="cuda")
    grad[1] = 64.0
    back = torch.ops.fastdd.segment_mean_backward(grad, seg)  # rows past 2^31 / D get grad[1] / 64 = 1
    assert torch.equal(back[-64:], torch.ones(64, D, dtype=torch.float16, device="cuda"))


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cuda_matches_reference(dtype):
    x, seg = _inputs(4096, 2047, 37, dtype, device="cuda")
    x.requires_grad_(True)
    out = segment_mean(x, seg, 37)
    torch.testing.assert_close(out.float().cpu(), ref.segment_mean(x.detach().cpu(), seg.cpu(), 37).float(),
                               **TOLERANCES[dtype])
    out.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad.float()).all()
