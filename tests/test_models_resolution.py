"""Tests for IDC's ResNetAP-10 and the resolution-dependent "auto" model (references' depth per image size)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastdd.models import AUTO_DEPTH_BY_RESOLUTION, MODELS, ConvNet, ResNetAP10, get_model, resolve_model_name

DEVICE = torch.device("cpu")


def idc_resnetap10_parameter_count(channels, num_classes, stem_kernel, base=64):
    """Hand count from IDC's layer list (models/resnet_ap.py, ImageNet branch, depth 10 = one BasicBlock per
    stage): no conv biases, every norm (GroupNorm(c, c) or BatchNorm2d(c)) has weight + bias."""
    def conv(c_in, c_out, kernel):
        return c_in * c_out * kernel * kernel

    def norm(c):
        return 2 * c

    total = conv(channels, base, stem_kernel) + norm(base)  # layer0 (IntroBlock): conv, norm
    c_in = base
    for planes in (base, 2 * base, 4 * base, 8 * base):  # layer1..4
        total += conv(c_in, planes, 3) + norm(planes) + conv(planes, planes, 3) + norm(planes)
        if c_in != planes:  # downsample = 1x1 conv, AvgPool2d(2), norm
            total += conv(c_in, planes, 1) + norm(planes)
        c_in = planes
    return total + c_in * num_classes + num_classes  # fc


def idc_reference_features(model, images, stem_kernel, stem_pool):
    """IDC's ResNetAP forward written out with functional ops over the model's parameters (instance norm)."""
    def norm(x, module):
        return F.group_norm(x, module.num_groups, module.weight, module.bias, module.eps)

    out = F.relu(norm(F.conv2d(images, model.stem_conv.weight, padding=stem_kernel // 2), model.stem_norm))
    if stem_pool > 1:
        out = F.avg_pool2d(out, stem_pool)
    for stage, block in enumerate((model.layer1, model.layer2, model.layer3, model.layer4)):
        hidden = F.relu(norm(F.conv2d(out, block.conv1.weight, padding=1), block.norm1))
        if stage > 0:
            hidden = F.avg_pool2d(hidden, 2)
        hidden = norm(F.conv2d(hidden, block.conv2.weight, padding=1), block.norm2)
        if stage == 0:
            residual = out
        else:
            shortcut_conv, _, shortcut_norm = block.shortcut
            residual = norm(F.avg_pool2d(F.conv2d(out, shortcut_conv.weight), 2), shortcut_norm)
        out = F.relu(hidden + residual)
    return F.avg_pool2d(out, out.shape[-1]).flatten(1)  # IDC pools the whole (square) final map


def randomize_norms(model, generator):
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.GroupNorm, nn.BatchNorm2d)):
                shape, dtype = module.weight.shape, module.weight.dtype
                module.weight.copy_(torch.rand(shape, generator=generator, dtype=dtype) + 0.5)
                module.bias.copy_(torch.rand(shape, generator=generator, dtype=dtype) - 0.5)


@pytest.mark.parametrize("size, final_side", [(32, 4), (64, 8), (128, 8), (224, 7)])
def test_resnetap10_shapes(size, final_side):
    # small stem up to 64 px (no pooling), mid up to 128 px (/2), large above (/4); then three 2x downsamplings
    model = get_model("ResNetAP10", 3, 10, size).to(DEVICE)
    images = torch.randn(2, 3, size, size, device=DEVICE)
    with torch.no_grad():
        logits, features = model(images), model.embed(images)
    assert model.feature_shape == (512, final_side, final_side)
    assert logits.shape == (2, 10) and features.shape == (2, 512) and model.feature_dim == 512


def test_resnetap10_non_square_images_take_the_stem_of_their_longer_side():
    model = get_model("ResNetAP10", 3, 10, (64, 128))  # longer side 128 -> "mid" stem (/2), then /8
    assert model.feature_shape == (512, 4, 8)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 128)).shape == (2, 10)


@pytest.mark.parametrize("name, size, stem_kernel, expected", [
    ("ResNetAP10", 64, 3, 4_903_242), ("ResNetAP10", 128, 3, 4_903_242),
    ("ResNetAP10", 224, 7, 4_910_922), ("ResNetAP10BN", 224, 7, 4_910_922)])
def test_resnetap10_parameter_count_matches_idc_layer_list(name, size, stem_kernel, expected):
    assert idc_resnetap10_parameter_count(3, 10, stem_kernel) == expected
    model = get_model(name, 3, 10, size)
    assert sum(parameter.numel() for parameter in model.parameters()) == expected
    assert model.stem_conv.kernel_size == (stem_kernel, stem_kernel)
    assert all(module.bias is None for module in model.modules() if isinstance(module, nn.Conv2d))


def test_resnetap10_half_width_is_idc_cifar_resnetap10():
    # IDC's CIFAR branch at depth 10: n = (10 - 2) // 6 = 1 block per stage, widths 32/64/128/256, fc 256 -> classes
    model = get_model("ResNetAP10", 3, 10, 32, width=0.5)
    assert [model.layer1.conv1.out_channels, model.layer2.conv1.out_channels, model.layer3.conv1.out_channels,
            model.layer4.conv1.out_channels] == [32, 64, 128, 256]
    assert model.feature_dim == 256
    assert sum(p.numel() for p in model.parameters()) == idc_resnetap10_parameter_count(3, 10, 3, base=32)


@pytest.mark.parametrize("size, stem_kernel, stem_pool", [(64, 3, 1), (128, 3, 2), (224, 7, 4)])
def test_resnetap10_forward_equals_idc_layer_list(size, stem_kernel, stem_pool):
    generator = torch.Generator().manual_seed(size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(size)
        model = get_model("ResNetAP10", 3, 5, size).double().to(DEVICE)
    randomize_norms(model, generator)
    images = torch.randn(2, 3, size, size, generator=generator, dtype=torch.float64).to(DEVICE)
    with torch.no_grad():
        expected = idc_reference_features(model, images, stem_kernel, stem_pool)
        torch.testing.assert_close(model.embed(images), expected, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(model(images), model.classifier(expected), rtol=1e-10, atol=1e-10)


def test_resnetap10_embed_then_classifier_is_forward():
    model = get_model("ResNetAP10BN", 3, 7, 64).eval()
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.classifier(model.embed(images)), model(images), rtol=0, atol=0)


def identity_block(block):
    """Make a stride-2 AP block compute avgpool paths with identity convs and identity BN (eval, eps 0)."""
    with torch.no_grad():
        for conv in (block.conv1, block.conv2, block.shortcut[0]):
            conv.weight.zero_()
            center = conv.kernel_size[0] // 2
            for channel in range(min(conv.in_channels, conv.out_channels)):
                conv.weight[channel, channel, center, center] = 1.0
        for norm in (block.norm1, block.norm2, block.shortcut[2]):
            norm.eps = 0.0
    return block.eval()


def test_ap_downsampling_known_answers():
    block = identity_block(get_model("ResNetAP10BN", 3, 10, 32).layer2)  # 64 -> 128 channels, stride 2
    # ramp 0..15 on channel 0: both paths give the 2x2 block means [[2.5, 4.5], [10.5, 12.5]], summed -> x2
    ramp = torch.zeros(1, 64, 4, 4)
    ramp[0, 0] = torch.arange(16.0).reshape(4, 4)
    with torch.no_grad():
        out = block(ramp)
    assert out.shape == (1, 128, 2, 2)
    torch.testing.assert_close(out[0, 0], torch.tensor([[5.0, 9.0], [21.0, 25.0]]), rtol=0, atol=1e-6)
    assert torch.count_nonzero(out[0, 1:]) == 0
    # signed 2x2 input: main path pools after the ReLU (mean of [1, 0, 3, 0] = 1), shortcut pools the raw
    # values (mean of [1, -1, 3, -3] = 0), so the block outputs relu(1 + 0) = 1
    signed = torch.zeros(1, 64, 2, 2)
    signed[0, 0] = torch.tensor([[1.0, -1.0], [3.0, -3.0]])
    with torch.no_grad():
        assert block(signed)[0, 0].item() == pytest.approx(1.0, abs=1e-6)
    # a constant input through the instance-norm shortcut leaves only the norm's bias
    shortcut = get_model("ResNetAP10", 3, 10, 32).layer2.shortcut
    with torch.no_grad():
        shortcut[2].bias.copy_(torch.linspace(-1, 1, 128))
        expected = torch.linspace(-1, 1, 128).view(1, 128, 1, 1).expand(1, 128, 3, 3)
        torch.testing.assert_close(shortcut(torch.full((1, 64, 6, 6), 3.0)), expected, rtol=0, atol=2e-4)


def test_resnetap10_uses_idc_he_fan_out_init():
    torch.manual_seed(0)
    model = get_model("ResNetAP10", 3, 10, 32)
    big = model.layer4.conv2.weight  # 512 x 512 x 3 x 3
    assert big.std().item() == pytest.approx(math.sqrt(2.0 / (9 * 512)), rel=0.01)
    assert abs(big.mean().item()) < 1e-4
    shortcut = model.layer2.shortcut[0].weight  # 128 x 64 x 1 x 1
    assert shortcut.std().item() == pytest.approx(math.sqrt(2.0 / 128), rel=0.04)


def test_resnetap10_rejects_degenerate_sizes():
    with pytest.raises(ValueError, match="ResNetAP10: instance norm on the 1x1"):
        get_model("ResNetAP10", 3, 10, 8)
    assert get_model("ResNetAP10BN", 3, 10, 8).feature_shape == (512, 1, 1)
    with pytest.raises(ValueError, match="ResNetAP10BN cannot take 4x4"):
        get_model("ResNetAP10BN", 3, 10, 4)
    with pytest.raises(ValueError, match="width"):
        ResNetAP10(3, 10, (32, 32), width=0.001)


@pytest.mark.parametrize("size, expected", [
    (8, "ConvNet"), (28, "ConvNet"), (32, "ConvNet"), (63, "ConvNet"), (64, "ConvNetD4"), (96, "ConvNetD4"),
    (127, "ConvNetD4"), (128, "ConvNetD5"), (255, "ConvNetD5"), (256, "ConvNetD6"), (512, "ConvNetD6"),
    ((64, 128), "ConvNetD4"), ((128, 64), "ConvNetD4"), ([128, 128], "ConvNetD5")])
def test_auto_resolves_to_reference_depth(size, expected):
    assert resolve_model_name("auto", size) == expected


def test_auto_table_is_the_reference_table():
    assert AUTO_DEPTH_BY_RESOLUTION == ((32, "ConvNet"), (64, "ConvNetD4"), (128, "ConvNetD5"), (256, "ConvNetD6"))


def test_resolve_model_name_keeps_concrete_names_and_rejects_unknown():
    assert "auto" in MODELS
    assert resolve_model_name("ResNetAP10", 224) == "ResNetAP10"
    assert resolve_model_name("ConvNetD2", 128) == "ConvNetD2"
    with pytest.raises(ValueError, match="valid names: auto, ConvNet.*ResNetAP10"):
        resolve_model_name("convnet", 32)
    with pytest.raises(ValueError, match="image_size"):
        resolve_model_name("auto", 0)
    with pytest.raises(ValueError, match="image_size"):
        resolve_model_name("auto", "big")


@pytest.mark.parametrize("size, depth", [(32, 3), (64, 4), (128, 5), (256, 6)])
def test_auto_model_keeps_the_references_2048_features(size, depth):
    # ConvNet at 32, ConvNetD4 at 64 (Tiny ImageNet), D5 at 128, D6 at 256: 128 channels x 4 x 4 = 2048
    model = get_model("auto", 3, 10, size).to(DEVICE)
    assert isinstance(model, ConvNet) and len(model.features) == depth
    assert model.feature_shape == (128, 4, 4) and model.feature_dim == 2048
    with torch.no_grad():
        assert model.embed(torch.randn(1, 3, size, size, device=DEVICE)).shape == (1, 2048)


@pytest.mark.parametrize("name, size", [("ConvNetD4", 64), ("ConvNetD5", 128)])
def test_deeper_convnets_give_2048_features_at_their_resolution(name, size):
    model = get_model(name, 3, 200, size).to(DEVICE)
    assert model.feature_dim == 2048
    with torch.no_grad():
        assert model.embed(torch.randn(2, 3, size, size, device=DEVICE)).shape == (2, 2048)
