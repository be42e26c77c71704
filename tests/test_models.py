"""Tests for the model zoo: shapes, feature sizes, ConvBlock structure, norms and trainability."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastdd.models import MODELS, ConvBlock, ConvNet, get_model

TOO_SMALL_AT_32 = {"ConvNetD6"}
TOO_SMALL_AT_8 = {"ConvNetD4", "ConvNetD5", "ConvNetD6", "LeNet", "VGG11", "VGG11BN", "ResNet18", "ResNetAP10"}
SMALLEST_TRAINABLE_SIZE = {"ConvNetD5": 32, "ConvNetD6": 64, "VGG11": 32, "VGG11BN": 32}


def check_output_shapes(name, channels, size, num_classes=10):
    model = get_model(name, channels, num_classes, size)
    images = torch.randn(2, channels, size, size)
    with torch.no_grad():
        logits, features = model(images), model.embed(images)
    assert logits.shape == (2, num_classes)
    assert features.shape == (2, model.feature_dim)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("channels, size", [(3, 32), (1, 28)])
def test_output_shapes_at_standard_sizes(name, channels, size):
    if name in TOO_SMALL_AT_32:
        with pytest.raises(ValueError, match=name):
            get_model(name, channels, 10, size)
    else:
        check_output_shapes(name, channels, size)


@pytest.mark.parametrize("name", MODELS)
def test_output_shapes_on_8px_digits_or_clear_error(name):
    if name in TOO_SMALL_AT_8:
        with pytest.raises(ValueError, match=name):
            get_model(name, 1, 10, 8)
    else:
        check_output_shapes(name, 1, 8)


def test_deep_convnet_works_on_larger_images():
    check_output_shapes("ConvNetD6", 3, 64)


@pytest.mark.parametrize("channels, size", [(3, 32), (1, 28)])
def test_default_convnet_has_2048_features(channels, size):
    model = get_model("ConvNet", channels, 10, size)
    assert model.feature_dim == 2048
    assert model.embed(torch.randn(3, channels, size, size)).shape == (3, 2048)


def test_convnet_on_8px_digits_ends_at_1x1():
    model = get_model("ConvNet", 1, 10, 8)
    assert model.feature_shape == (128, 1, 1)


def test_first_conv_pads_1_channel_28px_to_32px_only():
    mnist_like = get_model("ConvNet", 1, 10, 28)
    assert [block.conv.padding for block in mnist_like.features] == [(3, 3), (1, 1), (1, 1)]
    assert get_model("ConvNet", 3, 10, 28).features[0].conv.padding == (1, 1)
    assert get_model("ConvNet", 1, 10, 32).features[0].conv.padding == (1, 1)


def test_convnet_is_built_from_conv_blocks_with_swappable_tail():
    model = get_model("ConvNet", 3, 10, 32, fused=False)  # the fused tail is covered in test_fused_convnet.py
    assert isinstance(model, ConvNet)
    assert all(isinstance(block, ConvBlock) for block in model.features)
    block = model.features[0]
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(block(images), block.pool(block.act(block.norm(block.conv(images)))))
    block.tail = lambda x: torch.zeros_like(x[:, :, ::2, ::2])
    assert torch.equal(block(images), torch.zeros(2, 128, 16, 16))


def test_instance_norm_is_groupnorm_with_one_channel_per_group():
    block = get_model("ConvNetIN", 3, 10, 32).features[0]
    assert isinstance(block.norm, nn.GroupNorm)
    assert block.norm.num_groups == block.norm.num_channels == 128 and block.norm.affine
    with torch.no_grad():
        block.norm.weight.uniform_(0.5, 1.5)
        block.norm.bias.uniform_(-0.5, 0.5)
    hidden = torch.randn(4, 128, 32, 32) * 3 + 1
    expected = F.instance_norm(hidden, weight=block.norm.weight, bias=block.norm.bias, eps=block.norm.eps)
    torch.testing.assert_close(block.norm(hidden), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name, norm_type, groups", [
    ("ConvNetBN", nn.BatchNorm2d, None), ("ConvNetGN", nn.GroupNorm, 4),
    ("ConvNetLN", nn.LayerNorm, None), ("ConvNetNN", nn.Identity, None)])
def test_norm_variants(name, norm_type, groups):
    block = get_model(name, 3, 10, 32).features[1]
    assert isinstance(block.norm, norm_type)
    if groups is not None:
        assert block.norm.num_groups == groups
    if norm_type is nn.LayerNorm:
        assert tuple(block.norm.normalized_shape) == (128, 16, 16)


@pytest.mark.parametrize("name, act_type, pool_type", [
    ("ConvNetAS", nn.Sigmoid, nn.AvgPool2d), ("ConvNetAL", nn.LeakyReLU, nn.AvgPool2d),
    ("ConvNetMP", nn.ReLU, nn.MaxPool2d), ("ConvNetNP", nn.ReLU, nn.Identity)])
def test_activation_and_pooling_variants(name, act_type, pool_type):
    block = get_model(name, 3, 10, 32).features[0]
    assert isinstance(block.act, act_type) and isinstance(block.pool, pool_type)


def test_get_model_overrides_and_image_size_forms():
    model = get_model("ConvNet", 3, 5, (16, 24), width=16, depth=2, norm="batchnorm")
    assert model.feature_shape == (16, 4, 6)
    assert model(torch.randn(2, 3, 16, 24)).shape == (2, 5)
    assert get_model("ConvNetW32", 3, 10, 32).feature_dim == get_model("ConvNet", 3, 10, 32, width=32).feature_dim


def test_get_model_rejects_unknown_names_and_overrides():
    with pytest.raises(ValueError, match="ConvNetD3.*ResNet18BN_AP"):
        get_model("NoSuchNet", 3, 10, 32)
    with pytest.raises(ValueError, match="colour"):
        get_model("ConvNet", 3, 10, 32, colour="red")
    with pytest.raises(ValueError, match="MLP"):
        get_model("MLP", 3, 10, 32, depth=4)
    with pytest.raises(ValueError, match="norm"):
        get_model("ConvNet", 3, 10, 32, norm="weirdnorm")


def test_models_tuple_spells_reference_names():
    expected = {"ConvNet", "ConvNetD1", "ConvNetD6", "ConvNetW256", "ConvNetAS", "ConvNetAR", "ConvNetAL",
                "ConvNetNN", "ConvNetBN", "ConvNetLN", "ConvNetIN", "ConvNetGN", "ConvNetNP", "ConvNetMP",
                "ConvNetAP", "MLP", "LeNet", "AlexNet", "AlexNetBN", "VGG11", "VGG11BN", "ResNet18",
                "ResNet18BN", "ResNet18BN_AP"}
    assert expected <= set(MODELS) and len(MODELS) == len(set(MODELS))


@pytest.mark.parametrize("name", MODELS)
def test_loss_falls_after_a_few_sgd_steps(name):
    size = SMALLEST_TRAINABLE_SIZE.get(name, 16)
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.randn(4, 3, size, size, generator=generator), torch.arange(4)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = get_model(name, 3, 4, size)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.003)
    losses = []
    for _ in range(4):
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
