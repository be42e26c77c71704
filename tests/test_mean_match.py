"""Tests for fastdd.ops.mean_match: per-class oracle, reference, autograd, opcheck, compile, Triton, bad input."""
import pytest
import torch

from conftest import TOLERANCES, requires_cuda, triton_or_skip
from fastdd.ops import mean_match
from fastdd.reference import mean_match as ref

CASES = [  # (Nr, Ns, D, num_segments, clusters per syn segment: real_to_syn = arange // k, or None)
    (1, 1, 1, 1, None), (7, 5, 1, 3, None), (33, 12, 2047, 5, None), (300, 40, 64, 10, None),
    (5000, 30, 3, 7, None), (64, 9, 16, 12, 4), (120, 20, 5, 6, 1), (90, 7, 33, 9, 3),
]


def _inputs(Nr, Ns, D, S, k=None, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    real = torch.randn(Nr, D, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    syn = torch.randn(Ns, D, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    real_seg = torch.randint(0, max(S - 1, 1), (Nr,), generator=g)  # unsorted; the top real segment empty
    if Nr > 2:
        real_seg[-1] = S - 1  # a real segment of one row
    n_syn = S if k is None else -(-S // k)
    syn_seg = torch.randint(0, n_syn, (Ns,), generator=g)
    real_to_syn = None if k is None else (torch.arange(S) // k).to(device)
    return real, real_seg.to(device), syn, syn_seg.to(device), S, real_to_syn


def _oracle(real, real_seg, syn, syn_seg, S, real_to_syn=None):
    """One segment at a time, as DM's per-class loop writes it; empty sides give 0."""
    out = torch.zeros(S, dtype=torch.float64)
    for c in range(S):
        t = c if real_to_syn is None else int(real_to_syn[c])
        r, s = real.double()[real_seg == c], syn.double()[syn_seg == t]
        if len(r) and len(s):
            out[c] = (r.mean(0) - s.mean(0)).pow(2).sum()
    return out


@pytest.mark.parametrize("Nr,Ns,D,S,k", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_matches_per_class_loop_and_reference(Nr, Ns, D, S, k, dtype):
    args = _inputs(Nr, Ns, D, S, k, dtype)
    loss = mean_match(*args)
    assert loss.dtype == dtype and loss.shape == (S,)
    expected = _oracle(*args)
    tol = dict(atol=TOLERANCES[dtype]["atol"], rtol=TOLERANCES[dtype]["rtol"])
    if dtype == torch.bfloat16:  # inputs are bf16 but means are fp32; only the output rounding differs
        tol = dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(loss.double(), expected, **tol)
    torch.testing.assert_close(loss, ref.mean_match(*args)[0], **TOLERANCES[dtype])


@pytest.mark.parametrize("Nr,Ns,D,S,k", CASES)
@pytest.mark.parametrize("real_grad", [False, True])
def test_gradients_match_autograd_of_the_oracle(Nr, Ns, D, S, k, real_grad):
    real, real_seg, syn, syn_seg, _, real_to_syn = _inputs(Nr, Ns, D, S, k, torch.float64)
    w = torch.rand(S, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    grads = []
    for fn in (mean_match, _oracle):
        r = real.clone().requires_grad_(real_grad)
        s = syn.clone().requires_grad_(True)
        (fn(r, real_seg, s, syn_seg, S, real_to_syn) * w).sum().backward()
        grads.append((r.grad, s.grad))
    torch.testing.assert_close(grads[0][1], grads[1][1], **TOLERANCES[torch.float64])
    if real_grad:
        torch.testing.assert_close(grads[0][0], grads[1][0], **TOLERANCES[torch.float64])


@pytest.mark.parametrize("Nr,Ns,D,S,k", [(20000, 300, 8, 12, 3), (2000, 1500, 130, 900, None)])
def test_parallel_paths_match_reference(Nr, Ns, D, S, k):
    # Large enough for several threads: row-chunked accumulators, then column blocks (many segments).
    real, real_seg, syn, syn_seg, _, real_to_syn = _inputs(Nr, Ns, D, S, k)
    real.requires_grad_(True)
    syn.requires_grad_(True)
    w = torch.randn(S, generator=torch.Generator().manual_seed(2))
    loss = mean_match(real, real_seg, syn, syn_seg, S, real_to_syn)
    want, diff = ref.mean_match(real.detach(), real_seg, syn.detach(), syn_seg, S, real_to_syn)
    torch.testing.assert_close(loss, want, **TOLERANCES[torch.float32])
    g_real, g_syn = torch.autograd.grad((loss * w).sum(), (real, syn))
    r_real, r_syn = ref.mean_match_backward(w, diff, None, real_seg, syn_seg, real_to_syn, True, True, torch.float32)
    torch.testing.assert_close(g_real, r_real, **TOLERANCES[torch.float32])
    torch.testing.assert_close(g_syn, r_syn, **TOLERANCES[torch.float32])


def test_hand_computed_case():
    real = torch.tensor([[1.0, 2.0], [3.0, 4.0], [10.0, 20.0]])
    syn = torch.tensor([[0.0, 0.0], [2.0, 2.0]], requires_grad=True)
    loss = mean_match(real, torch.tensor([1, 1, 0]), syn, torch.tensor([0, 1]), 2)
    assert torch.equal(loss.detach(), torch.tensor([500.0, 1.0]))  # (10²+20²), (0²+1²)
    loss.sum().backward()
    assert torch.equal(syn.grad, torch.tensor([[-20.0, -40.0], [0.0, -2.0]]))  # 2(μ_syn − μ_real)/n_syn


def test_many_to_one_sums_syn_gradient():
    real = torch.tensor([[1.0], [3.0], [5.0]])
    syn = torch.tensor([[0.0], [2.0]], requires_grad=True)
    loss = mean_match(real, torch.tensor([0, 1, 1]), syn, torch.tensor([0, 0]), 2, torch.tensor([0, 0]))
    assert torch.equal(loss.detach(), torch.tensor([0.0, 9.0]))
    loss.sum().backward()  # μ_syn = 1: segment 0 contributes 0, segment 1 contributes 2(1 − 4)/2 per row
    assert torch.equal(syn.grad, torch.tensor([[-3.0], [-3.0]]))


def test_empty_segments_give_zero_loss_and_zero_gradient():
    real = torch.randn(6, 4, requires_grad=True)
    syn = torch.randn(3, 4, requires_grad=True)
    real_seg, syn_seg = torch.tensor([0, 0, 1, 1, 3, 3]), torch.tensor([0, 2, 3])
    loss = mean_match(real, real_seg, syn, syn_seg, 4)  # seg 1: no syn rows; seg 2: no real rows
    assert loss[1] == 0 and loss[2] == 0 and loss[0] > 0 and loss[3] > 0
    loss.sum().backward()
    assert torch.equal(real.grad[2:4], torch.zeros(2, 4)) and torch.equal(syn.grad[1], torch.zeros(4))
    assert real.grad[:2].abs().sum() > 0 and syn.grad[0].abs().sum() > 0
    none = mean_match(real[:0], real_seg[:0], syn, syn_seg, 4)
    assert torch.equal(none, torch.zeros(4))
    assert mean_match(real, real_seg, syn, syn_seg, 4)[:0].shape == (0,)
    assert mean_match(torch.ones(2, 0), torch.tensor([0, 1]), torch.ones(1, 0), torch.tensor([0]), 2).shape == (2,)


@pytest.mark.parametrize("k", [None, 2])
def test_gradcheck_and_gradgradcheck_float64(k):
    real, real_seg, syn, syn_seg, S, real_to_syn = _inputs(13, 7, 3, 5, k, torch.float64)
    real.requires_grad_(True)
    syn.requires_grad_(True)

    def f(r, s):
        return mean_match(r, real_seg, s, syn_seg, S, real_to_syn)
    assert torch.autograd.gradcheck(f, (real, syn))
    assert torch.autograd.gradgradcheck(f, (real, syn))
    assert torch.autograd.gradcheck(lambda s: f(real.detach(), s), (syn,))


def test_real_gradient_skipped_when_not_required():
    real, real_seg, syn, syn_seg, S, _ = _inputs(40, 8, 6, 4)
    grad = torch.randn(S)
    diff = torch.ops.fastdd.mean_match(real, real_seg, syn, syn_seg, S, None)[1]
    g_real, g_syn = torch.ops.fastdd.mean_match_backward(grad, diff, None, real_seg, syn_seg, None, False, True,
                                                         torch.float32)
    assert g_real.shape == (0, 6) and g_syn.shape == (8, 6)


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("k", [None, 3])
def test_opcheck(requires_grad, k):
    real, real_seg, syn, syn_seg, S, real_to_syn = _inputs(40, 11, 9, 6, k)
    real.requires_grad_(requires_grad)
    syn.requires_grad_(requires_grad)
    torch.library.opcheck(torch.ops.fastdd.mean_match.default, (real, real_seg, syn, syn_seg, S, real_to_syn))
    diff = torch.randn(S, 9, requires_grad=requires_grad)
    grad = torch.randn(S, requires_grad=requires_grad)
    bwd = torch.ops.fastdd.mean_match_backward.default
    torch.library.opcheck(bwd, (grad, diff, None, real_seg, syn_seg, real_to_syn, True, True, torch.float32))
    torch.library.opcheck(bwd, (None, diff, torch.randn(S, 9), real_seg, syn_seg, real_to_syn, False, True,
                                torch.float32))


def test_torch_compile_fullgraph():
    real, real_seg, syn, syn_seg, S, real_to_syn = _inputs(50, 10, 8, 6, 2)
    syn.requires_grad_(True)

    def f(s):
        return mean_match(real, real_seg, s * 2.0, syn_seg, S, real_to_syn).sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(syn), f(syn))
    torch.testing.assert_close(torch.autograd.grad(compiled(syn), syn)[0], torch.autograd.grad(f(syn), syn)[0])


def test_batched_cotangents_for_per_domain_gradients():
    real, real_seg, syn, syn_seg, S, _ = _inputs(30, 6, 4, 3)
    syn.requires_grad_(True)
    loss = mean_match(real, real_seg, syn, syn_seg, S)
    batched = torch.autograd.grad(loss, syn, torch.eye(S), retain_graph=True,
                                  is_grads_batched=True)[0]
    looped = torch.stack([torch.autograd.grad(loss[c], syn, retain_graph=True)[0] for c in range(S)])
    torch.testing.assert_close(batched, looped)


def _good():
    return dict(real=torch.ones(5, 2), real_seg=torch.zeros(5, dtype=torch.long), syn=torch.ones(3, 2),
                syn_seg=torch.zeros(3, dtype=torch.long), num_segments=3, real_to_syn=None)


@pytest.mark.parametrize("bad, match, exc", [
    (dict(real_seg=torch.tensor([0, 1, 2, 3, 4])), r"real_seg ids must lie in \[0, 3\)", ValueError),
    (dict(syn_seg=torch.tensor([0, -1, 0])), r"syn_seg ids must lie in \[0, 3\)", ValueError),
    (dict(real_to_syn=torch.tensor([0, 1, 3])), r"real_to_syn ids must lie in \[0, 3\)", ValueError),
    (dict(real_to_syn=torch.tensor([0, 1])), "real_to_syn has 2 entries but num_segments is 3", ValueError),
    (dict(real_to_syn=torch.tensor([0.0, 1.0, 2.0])), "real_to_syn must be int64", TypeError),
    (dict(real_seg=torch.zeros(5)), "real_seg must be int64", TypeError),
    (dict(syn_seg=torch.zeros(4, dtype=torch.long)), "syn_seg has 4 entries but syn has 3", ValueError),
    (dict(syn=torch.ones(3, 4)), "syn has 4 features per row but real has 2", ValueError),
    (dict(real=torch.ones(5, 2, dtype=torch.long)), "real must be a floating-point", TypeError),
    (dict(syn=torch.ones(3, 2, dtype=torch.int32)), "syn must be a floating-point", TypeError),
    (dict(syn=torch.ones(3, 2, dtype=torch.float64)), "syn must have real's dtype", TypeError),
    (dict(real=torch.ones(5)), "real must be 2-D", ValueError),
    (dict(num_segments=-1), "num_segments must be a non-negative int", ValueError),
    (dict(syn=torch.ones(3, 2, device="meta")), "all tensors must be on one device", ValueError),
])
def test_bad_input_names_the_argument(bad, match, exc):
    args = _good()
    args.update(bad)
    with pytest.raises(exc, match=match):
        mean_match(**args)


def test_raw_ops_check_ids_too():
    a = _good()
    with pytest.raises(ValueError, match="syn_seg ids must lie"):
        torch.ops.fastdd.mean_match(a["real"], a["real_seg"], a["syn"], torch.tensor([0, 7, 1]), 3, None)
    with pytest.raises(ValueError, match="real_seg ids must lie"):
        torch.ops.fastdd.mean_match_backward(torch.ones(3), torch.ones(3, 2), None, torch.tensor([0, 3]),
                                             torch.tensor([0]), None, True, True, torch.float32)


@pytest.mark.interpreter
@pytest.mark.parametrize("Nr,Ns,D,S,k", [(1, 1, 1, 1, None), (37, 11, 5, 4, None), (70, 20, 33, 9, 3),
                                         (0, 5, 3, 2, None)])
def test_triton_launchers_under_interpreter(Nr, Ns, D, S, k):
    triton_or_skip()
    from fastdd.triton import mean_match as tri
    real, real_seg, syn, syn_seg, _, real_to_syn = _inputs(Nr, Ns, D, S, k)
    loss, diff = tri.mean_match(real, real_seg, syn, syn_seg, S, real_to_syn)
    ref_loss, ref_diff = ref.mean_match(real, real_seg, syn, syn_seg, S, real_to_syn)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(diff, ref_diff)
    grad, grad_diff = torch.randn(S), torch.randn(S, D)
    for g, gd in [(grad, None), (None, grad_diff), (grad, grad_diff)]:
        got = tri.mean_match_backward(g, diff, gd, real_seg, syn_seg, real_to_syn, True, True, torch.float32)
        want = ref.mean_match_backward(g, diff, gd, real_seg, syn_seg, real_to_syn, True, True, torch.float32)
        torch.testing.assert_close(got[0], want[0])
        torch.testing.assert_close(got[1], want[1])
    with pytest.raises(ValueError, match="real_to_syn ids must lie"):
        tri.mean_match(real, real_seg, syn, syn_seg, S, torch.full((S,), S))


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [None, 8])
def test_cuda_matches_reference(dtype, k):
    real, real_seg, syn, syn_seg, S, real_to_syn = _inputs(4096, 500, 2047, 80, k, dtype, device="cuda")
    real.requires_grad_(True)
    syn.requires_grad_(True)
    w = torch.rand(S, device="cuda")
    loss = mean_match(real, real_seg, syn, syn_seg, S, real_to_syn)
    g_real, g_syn = torch.autograd.grad((loss.float() * w).sum(), (real, syn))
    cpu = [t.detach().cpu().double().requires_grad_(True) for t in (real, syn)]
    ids = [t.cpu() if t is not None else None for t in (real_seg, syn_seg, real_to_syn)]
    want = ref.mean_match(cpu[0], ids[0], cpu[1], ids[1], S, ids[2])[0]
    w_real, w_syn = torch.autograd.grad((want * w.cpu().double()).sum(), cpu)
    tol = TOLERANCES[dtype] if dtype == torch.bfloat16 else dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(loss.double().cpu(), want.detach(), **tol)
    torch.testing.assert_close(g_real.double().cpu(), w_real, **tol)
    torch.testing.assert_close(g_syn.double().cpu(), w_syn, **tol)
