"""ConvNet's fused block tail (norm_act_pool) equals the unfused GroupNorm -> ReLU -> AvgPool modules."""
import os
import subprocess
import sys

import pytest
import torch

from fastdd.models import get_model


@pytest.mark.parametrize("channels,size,name", [(1, 28, "ConvNet"), (3, 32, "ConvNet"), (1, 8, "ConvNet"),
                                                (3, 31, "ConvNetD2"), (3, 32, "ConvNetW32")])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_equals_unfused_forward_and_gradients(channels, size, name, channels_last):
    torch.manual_seed(0)
    # float64: fp32 conv backends differ from each other by ~1e-3 here, which would hide the tail's error.
    fused = get_model(name, channels, 10, size).double()
    unfused = get_model(name, channels, 10, size, fused=False).double()
    unfused.load_state_dict(fused.state_dict())
    assert all(b.fused for b in fused.features) and not any(b.fused for b in unfused.features)
    x = torch.randn(5, channels, size, size, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        fused, unfused = fused.to(memory_format=torch.channels_last), unfused.to(memory_format=torch.channels_last)
    xf, xu = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    yf, yu = fused(xf), unfused(xu)
    torch.testing.assert_close(yf, yu, rtol=1e-9, atol=1e-10)
    yf.square().sum().backward()
    yu.square().sum().backward()
    torch.testing.assert_close(xf.grad, xu.grad, rtol=1e-8, atol=1e-10)
    for (n, pf), pu in zip(fused.named_parameters(), unfused.parameters()):
        torch.testing.assert_close(pf.grad, pu.grad, rtol=1e-8, atol=1e-9, msg=n)


def test_fused_only_where_it_applies():
    assert not any(b.fused for b in get_model("ConvNetBN", 3, 10, 32).features)
    assert not any(b.fused for b in get_model("ConvNetMP", 3, 10, 32).features)
    with pytest.raises(ValueError, match="fused=True needs norm='instancenorm'"):
        get_model("ConvNetBN", 3, 10, 32, fused=True)


def test_model_zoo_usable_without_the_extension():
    code = ("import torch; from fastdd.models import get_model; m = get_model('ConvNet', 1, 10, 28); "
            "print(m(torch.randn(2, 1, 28, 28)).shape, m.features[0].fused)")
    env = {**os.environ, "FASTDD_DISABLE_EXT": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "torch.Size([2, 10]) True"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("channels,size,channels_last", [(1, 28, False), (3, 32, True)])
def test_cuda_fused_equals_unfused(channels, size, channels_last):
    torch.manual_seed(0)
    fused = get_model("ConvNet", channels, 10, size).cuda()
    unfused = get_model("ConvNet", channels, 10, size, fused=False).cuda()
    unfused.load_state_dict(fused.state_dict())
    x = torch.randn(64, channels, size, size, device="cuda")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        fused, unfused = fused.to(memory_format=torch.channels_last), unfused.to(memory_format=torch.channels_last)
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # fp32 convolutions on both sides: only the tail differs
    try:
        xf, xu = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        yf, yu = fused(xf), unfused(xu)
        yf.square().sum().backward()
        yu.square().sum().backward()
    finally:
        torch.backends.cudnn.allow_tf32 = saved
    torch.testing.assert_close(yf, yu, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(xf.grad, xu.grad, rtol=1e-3, atol=1e-5)
