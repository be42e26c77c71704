"""Every op's forward and backward makes zero host syncs (fastdd.sync counter): CPU glue, Triton launchers, CUDA."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import requires_cuda, triton_or_skip
from fastdd.ops import cvar, kmeans_assign, mean_match, norm_act_pool, segment_mean, spectral_surgery
from fastdd.ops._checks import check_ids_in_range
from fastdd.sync import count_host_syncs


def _leaf(*shape, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_(True)


def _ids(n, upper, device, seed=1):
    return torch.randint(0, upper, (n,), generator=torch.Generator().manual_seed(seed)).to(device)


OPS = ["segment_mean", "mean_match", "mean_match real_to_syn", "kmeans_assign", "kmeans_assign seg", "cvar",
       "spectral_surgery hard", "spectral_surgery soft", "norm_act_pool"]


def _op_call(name, device):
    """A thunk running one public op forward and, where differentiable, backward, on inputs made beforehand
    (building them copies host data to the device, which must stay outside the counted region)."""
    seg, syn_seg, real_to_syn = _ids(40, 4, device), _ids(12, 4, device, seed=3), _ids(4, 4, device, seed=5)
    x, syn = _leaf(40, 6, device=device), _leaf(12, 6, device=device, seed=2)
    calls = {
        "segment_mean": lambda: segment_mean(x, seg, 4).square().sum().backward(),
        "mean_match": lambda: mean_match(x, seg, syn, syn_seg, 4).sum().backward(),
        "mean_match real_to_syn": lambda: mean_match(x, seg, syn, syn_seg, 4, real_to_syn).sum().backward(),
        "kmeans_assign": lambda: kmeans_assign(x, c2, None)[1].sum().backward(),
        "kmeans_assign seg": lambda: kmeans_assign(x, c3, seg)[1].sum().backward(),
        "cvar": lambda: cvar(losses, 0.35).sum().backward(),
        "spectral_surgery hard": lambda: spectral_surgery(grads, 0.5),
        "spectral_surgery soft": lambda: spectral_surgery(grads, 0.5, 2.0),
        "norm_act_pool": lambda: norm_act_pool(img, w, b).sum().backward(),
    }
    c2, c3 = _leaf(5, 6, device=device, seed=4), _leaf(4, 3, 6, device=device, seed=4)
    losses, grads = _leaf(3, 10, device=device), _leaf(3, 2, 1, 8, 8, device=device).detach()
    img, w, b = _leaf(2, 3, 6, 6, device=device), _leaf(3, device=device, seed=6), _leaf(3, device=device, seed=7)
    return calls[name]


@pytest.mark.parametrize("name", OPS)
def test_public_ops_make_no_host_sync_on_cpu(name):
    call = _op_call(name, torch.device("cpu"))
    call()  # warm-up: first calls may compile or cache
    with count_host_syncs(cuda=False) as syncs:
        call()
    syncs.assert_none(name)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("name", OPS)
def test_public_ops_make_no_host_sync_on_cuda(name):
    call = _op_call(name, torch.device("cuda"))
    call()  # warm-up: Triton compiles (and its cache reads) happen on the first call
    torch.cuda.synchronize()
    with count_host_syncs(cuda=True) as syncs:
        call()
    syncs.assert_none(name)


@pytest.mark.interpreter
def test_triton_launchers_make_no_host_sync():
    triton_or_skip()
    from fastdd.triton import kmeans_assign as tri_km, mean_match as tri_mm, norm_act_pool as tri_nap
    from fastdd.triton import segment_mean as tri_sm, spectral_surgery as tri_ss
    x, seg, mapping = _leaf(40, 6, device="cpu").detach(), _ids(40, 4, "cpu"), torch.tensor([0, 0, 1, 3])
    syn, syn_seg = x[:12], _ids(12, 4, "cpu", seed=3)
    img = _leaf(2, 3, 6, 6, device="cpu").detach()
    w, b = torch.ones(3), torch.zeros(3)
    for dtype in (torch.float32, torch.float64):  # float64 goes through the references
        xd, synd = x.to(dtype), syn.to(dtype)
        with count_host_syncs(cuda=False) as syncs:
            tri_sm.segment_mean(xd, seg, 4)
            tri_sm.segment_mean_backward(xd[:4], seg)
            loss, diff = tri_mm.mean_match(xd, seg, synd, syn_seg, 4, mapping)
            tri_mm.mean_match_backward(loss, diff, diff, seg, syn_seg, mapping, True, True, dtype)
            tri_km.kmeans_assign(xd, xd[:12].reshape(4, 3, 6), seg)
            tri_km.kmeans_assign(xd, xd[:5])
            out, mean, rstd = tri_nap.norm_act_pool(img.to(dtype), w.to(dtype), b.to(dtype), 1e-5, 2)
            tri_nap.norm_act_pool_backward(out, img.to(dtype), w.to(dtype), b.to(dtype), mean, rstd, 1e-5, 2)
            tri_ss.agreement_mask(torch.randn(3, 4, 5, 2, dtype=dtype), 0.5, None, 1e-12, True)
        syncs.assert_none(str(dtype))


def test_counter_counts_each_host_read_and_restores_tensor():
    t, ids = torch.tensor([1.0, 2.0]), torch.tensor([0, 3, 3])
    original_item = torch.Tensor.item
    with count_host_syncs(cuda=False) as syncs:
        t.sum().item()
        if t.sum() > 0:  # Tensor.__bool__
            pass
        int(ids[0])
        ids.tolist()
        torch.nonzero(ids)
        torch.bincount(ids)
        ids.unique()  # Tensor.unique calls torch.unique: one event, not two
        torch.repeat_interleave(ids, ids, output_size=6)  # output_size given: no sync on CUDA, not counted
        (t * 2).sum()  # pure device work
    names = [e.split(" at ")[0] for e in syncs.events]
    assert names == ["Tensor.item", "Tensor.__bool__", "Tensor.__int__", "Tensor.tolist", "torch.nonzero",
                     "torch.bincount", "Tensor.unique"]
    assert all(__file__ in e for e in syncs.events)
    assert torch.Tensor.item is original_item and "item" not in torch.Tensor.__dict__
    with pytest.raises(AssertionError, match="7 host sync"):
        syncs.assert_none()


def test_id_range_check_is_sync_free_and_names_the_argument():
    ids = torch.tensor([0, 2, 1])
    with count_host_syncs(cuda=False) as syncs:
        check_ids_in_range("op", "seg", ids, 3)
    assert syncs.count == 0
    with pytest.raises(ValueError, match=r"op: seg ids must lie in \[0, 2\), found values in \[0, 2\]"):
        check_ids_in_range("op", "seg", ids, 2)
    with pytest.raises(ValueError, match=r"found values in \[-1, 1\]"):
        check_ids_in_range("op", "seg", torch.tensor([1, -1]), 2)


@requires_cuda
@pytest.mark.cuda
def test_cuda_bad_ids_raise_value_error_under_fastdd_debug(monkeypatch):
    monkeypatch.setenv("FASTDD_DEBUG", "1")
    x = torch.ones(3, 2, device="cuda")
    with pytest.raises(ValueError, match=r"segment_mean: seg ids must lie in \[0, 2\), found values in \[0, 5\]"):
        segment_mean(x, torch.tensor([0, 5, 1], device="cuda"), 2)
    with pytest.raises(ValueError, match="syn_seg ids must lie"):
        mean_match(x, torch.tensor([0, 1, 1], device="cuda"), x, torch.tensor([0, -1, 0], device="cuda"), 2)


@requires_cuda
@pytest.mark.cuda
def test_cuda_bad_ids_trip_a_device_side_assert_without_debug():
    # A device-side assert poisons the CUDA context, so it runs in its own process.
    code = ("import torch, fastdd.ops as o; x = torch.ones(3, 2, device='cuda'); "
            "o.segment_mean(x, torch.tensor([0, 5, 1], device='cuda'), 2); torch.cuda.synchronize()")
    env = {k: v for k, v in os.environ.items() if k != "FASTDD_DEBUG"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert "device-side assert" in res.stderr or "segment_mean: seg ids must lie" in res.stderr, res.stderr[-2000:]
