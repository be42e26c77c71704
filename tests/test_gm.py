"""Gradient matching: batched per-class gradients vs a per-class loop, an IDC-style oracle, multi-formation."""
import math

import pytest
import torch
import torch.nn.functional as F

from gm_reference_loop import reference_iteration
from fastdd.data import from_tensors, load_dataset
from fastdd.distill import Distiller, build_config
from fastdd.distill.methods.class_grads import ClassGradients, matched_parameters
from fastdd.distill.methods.gm import GM, gradient_distance
from fastdd.distill.methods.multiformation import decode_zoom, mix_images
from fastdd.models import get_model

FAST = ["progress=false", "eval_epochs=2", "eval_num_models=1", "batch_real=8", "method=gm", "model=ConvNetW32",
        "eval_models=[ConvNetW32]", "device=cpu"]


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits"), load_dataset("digits", split="test")


def _float64(engine):
    """Run an engine in float64: images, optimiser, networks and real images."""
    engine.syn.images = engine.syn.images.detach().double().requires_grad_(True)
    engine.optimizer = torch.optim.SGD([engine.syn.images], lr=engine.lr, momentum=engine.config.momentum)
    new_network, real_images = engine.new_network, engine.real_images
    engine.new_network = lambda *a, **k: new_network(*a, **k).double()
    engine.real_images = lambda index: real_images(index).double()
    return engine


@pytest.mark.parametrize("model,distance,size", [("ConvNet", "idc", 8), ("ConvNetD2", "cos", 8), ("MLP", "cos", 8),
                                                 ("LeNet", "idc_l1", 16)])
def test_batched_class_gradients_equal_per_class_loop(model, distance, size):
    torch.manual_seed(0)
    net = get_model(model, 1, 4, (size, size)).double()
    grads = ClassGradients(net, matched_parameters(net, distance))
    assert grads.batched
    counts = [3, 5, 2, 4]
    y = torch.arange(4).repeat_interleave(torch.tensor(counts))
    real = torch.randn(sum(counts), 1, size, size, dtype=torch.float64)
    syn = torch.randn(sum(counts), 1, size, size, dtype=torch.float64, requires_grad=True)
    batched_real = grads.batched_grads(real, y, counts, create_graph=False)
    loop_real = grads.per_class(real, y, counts, create_graph=False)
    for b, l in zip(batched_real, loop_real):
        for gb, gl in zip(b, l):
            torch.testing.assert_close(gb, gl, rtol=1e-10, atol=1e-12)
    losses = []
    for fn in (grads.batched_grads, grads.per_class):
        g_syn = fn(syn, y, counts, create_graph=True)
        loss = sum(gradient_distance(r, s, distance) for r, s in zip(loop_real, g_syn))
        losses.append((loss, torch.autograd.grad(loss, syn)[0]))
    torch.testing.assert_close(losses[0][0], losses[1][0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(losses[0][1], losses[1][1], rtol=1e-9, atol=1e-12)
    assert losses[0][1].abs().sum() > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")
@pytest.mark.parametrize("model,distance", [("ConvNet", "idc"), ("ConvNetD2", "cos")])
def test_batched_class_gradients_equal_per_class_loop_on_cuda(model, distance):
    torch.manual_seed(0)
    net = get_model(model, 1, 4, (8, 8)).cuda()
    grads = ClassGradients(net, matched_parameters(net, distance))
    counts = [3, 5, 2, 4]
    y = torch.arange(4, device="cuda").repeat_interleave(torch.tensor(counts, device="cuda"))
    syn = torch.randn(sum(counts), 1, 8, 8, device="cuda", requires_grad=True)
    real = grads.per_class(torch.randn(sum(counts), 1, 8, 8, device="cuda"), y, counts, create_graph=False)
    out = []
    for fn in (grads.batched_grads, grads.per_class):
        loss = sum(gradient_distance(r, s, distance) for r, s in zip(real, fn(syn, y, counts, create_graph=True)))
        out.append((loss, torch.autograd.grad(loss, syn)[0]))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-4, atol=1e-5)  # TF32/cuDNN algorithm choice
    torch.testing.assert_close(out[0][1], out[1][1], rtol=1e-3, atol=1e-5)


def test_matched_parameters_follow_dc_and_idc():
    net = get_model("ConvNet", 1, 10, (8, 8))
    assert [p.dim() for _, p in matched_parameters(net, "idc")] == [4, 4, 4]
    assert [p.dim() for _, p in matched_parameters(net, "cos")] == [4, 4, 4, 2]
    assert not ClassGradients(get_model("ConvNetBN", 1, 10, (8, 8)), []).batched  # BN: per-class passes


def test_distances_on_hand_values():
    r = [torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([1.0, 1.0])]
    s = [torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([3.0, 1.0])]
    # cos: row 1 cos 1, row 2 cos 0 -> 0 + 1; 1-D parameters add 0
    assert float(gradient_distance(r, s, "cos")) == pytest.approx(1.0, abs=1e-5)
    assert float(gradient_distance(r, s, "idc")) == pytest.approx(1 + 4 + 4)
    assert float(gradient_distance(r, s, "idc_l1")) == pytest.approx(1 + 2 + 2)


@pytest.mark.parametrize("extra", [["distance=idc_l1", "class_chunk=2"],
                                   ["distance=cos", "step_per_class=false", "class_chunk=0"],
                                   ["distance=idc", "class_chunk=1", "factor=1"]])
def test_iteration_equals_idc_style_per_class_loop(digits, extra):
    """Two outer iterations (network training between image steps, momentum carried across the
    per-class steps) on the first 3 digit classes, in float64."""
    d = digits[0]
    keep = torch.as_tensor(d.labels) < 3
    three = from_tensors(d.images[keep], torch.as_tensor(d.labels)[keep], name="digits3", num_classes=3)
    overrides = [*FAST, "ipc=2", "inner_loop=2", "n_data=16", "net_batch=8", "batch_syn_max=6", "aug=dsa",
                 "mixup_net=vanilla", "pixel_space=false", *extra]
    ours, ref, init = (_float64(Distiller(build_config(overrides=overrides), three)) for _ in range(3))
    for engine in (ours, ref, init):
        engine.method.prepare(engine)
    torch.testing.assert_close(ours.syn.images, ref.syn.images, rtol=0, atol=0)
    for it in range(2):
        ours.method.iteration(ours, it)
        reference_iteration(ref, ref.method.args, lambda x, y: ours.method.decode(ref, x, y))
    assert (ours.syn.images - init.syn.images).abs().max() > 1e-3
    torch.testing.assert_close(ours.syn.images, ref.syn.images, rtol=1e-8, atol=1e-10)
    assert torch.equal(ours.generator.get_state(), ref.generator.get_state())


def _reference_decode_zoom(img, factor, pad):
    """IDC's decode_zoom (patch-major order) for square images."""
    h = img.shape[-1]
    remained = h % factor
    if remained > 0:
        img = F.pad(img, pad=(0, factor - remained, 0, factor - remained), value=pad)
    s_crop = math.ceil(h / factor)
    cropped = [img[:, :, i * s_crop:(i + 1) * s_crop, j * s_crop:(j + 1) * s_crop]
               for i in range(factor) for j in range(factor)]
    return F.interpolate(torch.cat(cropped), size=(h, h), mode="bilinear")


@pytest.mark.parametrize("factor,size", [(2, 8), (2, 7), (3, 8), (1, 8)])
def test_decode_zoom_shapes_values_and_gradients(factor, size):
    x = torch.randn(3, 2, size, size, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([4, 1, 7])
    out, out_labels = decode_zoom(x, labels, factor, pad_value=0.5)
    assert out.shape == (3 * factor ** 2, 2, size, size)
    assert out_labels.tolist() == [4] * factor ** 2 + [1] * factor ** 2 + [7] * factor ** 2
    if factor > 1:  # IDC's patch-major order is a permutation of fastdd's image-major one
        ref = _reference_decode_zoom(x, factor, 0.5)
        perm = torch.arange(3 * factor ** 2).view(3, factor ** 2).t().reshape(-1)
        torch.testing.assert_close(out[perm], ref)
    small = x[:1, :1].detach().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: decode_zoom(t, labels[:1], factor, 0.5)[0], (small,))


def test_mix_images_tiles_downsampled_reals():
    real = torch.arange(4 * 2 * 1 * 4 * 4, dtype=torch.float32).view(8, 1, 4, 4)
    mixed = mix_images(real, 2)
    assert mixed.shape == (2, 1, 4, 4)
    # top-left patch of stored image 0 is real[0] resized (nearest) to 2x2; bottom-right is real[6]'s
    torch.testing.assert_close(mixed[0, :, :2, :2], F.interpolate(real[0:1], size=(2, 2))[0])
    torch.testing.assert_close(mixed[0, :, 2:, 2:], F.interpolate(real[6:7], size=(2, 2))[0])


def test_lr_and_bad_keys_are_named(digits):
    assert GM().lr_for(50) == pytest.approx(0.025)
    with pytest.raises(ValueError, match="'distance' must be one of cos, idc, idc_l1"):
        GM({"distance": "mse"})
    with pytest.raises(ValueError, match="'distance'='dc' is now 'cos'"):
        GM({"distance": "dc"})
    with pytest.raises(ValueError, match="unknown IDC augmentation"):
        GM({"aug_type": "color_rotate"})
    with pytest.raises(ValueError, match="'factor' must be a positive integer"):
        GM({"factor": 0})
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['bogus'\] for method 'gm'"):
        GM({"bogus": 1})


def test_run_writes_decoded_set_and_trains(digits, tmp_path):
    cfg = build_config(overrides=[*FAST, "ipc=1", "iterations=2", "inner_loop=2", "n_data=16",
                                  "checkpoint_every=1"])
    engine = Distiller(cfg, digits[0], digits[1], out_dir=str(tmp_path))
    metrics = engine.run()
    saved = torch.load(tmp_path / "synthetic.pt", weights_only=False)
    assert saved["images"].shape == (10, 1, 8, 8)
    assert saved["decoded_images"].shape == (40, 1, 8, 8) and saved["factor"] == 2
    assert saved["decoded_labels"].tolist() == torch.arange(10).repeat_interleave(4).tolist()
    assert metrics["gm"]["decoded_per_class"] == 4 and len(metrics["evaluations"]) == 1
    assert all(math.isfinite(v) for v in engine.history["loss"])


def test_resume_mid_run_is_bit_identical(digits, tmp_path):
    """The closed-form class steps keep their momentum buffer in the optimiser state, so a checkpoint resumes
    exactly (pixel-space steps, clamp, IDC aug and CutMix included)."""
    args = [*FAST, "ipc=1", "iterations=3", "inner_loop=2", "n_data=16", "mix_p=1.0"]
    straight = Distiller(build_config(overrides=args), digits[0])
    straight.run()

    def crash(engine, logs):
        if engine.iteration == 2:
            raise KeyboardInterrupt
    first = Distiller(build_config(overrides=[*args, "checkpoint_every=1"]), digits[0], out_dir=str(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        first.run(callback=crash)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert state["iteration"] == 1 and "momentum_buffer" in state["optimizer"]["state"][0]
    resumed = Distiller(build_config(state["config"]), digits[0], out_dir=str(tmp_path))
    resumed.load_state_dict(state)
    resumed.run()
    assert torch.equal(straight.synthetic.images, resumed.synthetic.images)
