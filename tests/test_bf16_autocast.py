"""bf16 autocast end to end for dm, sgs and robust (gm's is in test_idc_parity): one step under the engine's
autocast moves the fp32 images where fp32's step does, with the loss at bf16 precision. CPU bf16 autocast stands
in for CUDA's here (the engine turns autocast on for CUDA only); the CUDA variants run the real flag."""
import pytest
import torch

from fastdd.data import from_tensors
from fastdd.data.domains import rotated_mnist
from fastdd.distill import Distiller, build_config
from fastdd.distill.methods.sgs_data import domain_generalization_data

FAST = ["progress=false", "model=ConvNetW32", "eval_models=ConvNetW32", "eval_epochs=1", "eval_num_models=1",
        "ipc=3", "batch_real=24", "dsa_strategy=", "seed=3"]
METHODS = {"dm": [], "sgs": [], "robust": ["assignment=nearest-synthetic"], "robust-kmeans": []}


@pytest.fixture(scope="module")
def digits():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (360, 1, 16, 16), dtype=torch.uint8, generator=g)
    images[:, :, 4:12, 4:12] //= 4  # structure shared by the classes: the update is not noise
    return from_tensors(images, torch.arange(360) % 3, num_classes=3, mean=(0.3,), std=(0.3,))


def _data(name, digits):
    if name == "sgs":
        return domain_generalization_data(rotated_mnist(digits, angles=(0, 30, 60, 90)), 90)
    return digits, None, ()


def _one_step(name, digits, device, bf16: bool):
    method = "robust" if name.startswith("robust") else name
    overrides = [*FAST, f"method={method}", f"device={device}", *METHODS[name]]
    if device == "cuda":
        overrides.append(f"autocast_bf16={str(bf16).lower()}")
    train, test, evaluators = _data(name, digits)
    engine = Distiller(build_config(overrides=overrides), train, test, evaluators=evaluators)
    if bf16 and device == "cpu":
        engine._autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    engine.method.prepare(engine)
    before = engine.synthetic.images.detach().clone()
    loss = float(engine.run_iteration(0)["loss"])
    assert engine.synthetic.images.dtype == torch.float32  # master images stay fp32
    return loss, (engine.synthetic.images.detach() - before).flatten().double().cpu()


def _assert_aligned(name, digits, device):
    (loss32, up32), (loss16, up16) = (_one_step(name, digits, device, bf16) for bf16 in (False, True))
    cosine = float(up32 @ up16 / (up32.norm() * up16.norm()))
    assert loss16 != loss32  # autocast did act on the step
    assert cosine > 0.95, f"{name}: bf16 update cosine {cosine:.4f} against fp32"
    assert loss16 == pytest.approx(loss32, rel=0.05)


@pytest.mark.parametrize("name", list(METHODS))
def test_bf16_autocast_step_matches_fp32_on_cpu(name, digits):
    _assert_aligned(name, digits, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")
@pytest.mark.parametrize("name", list(METHODS))
def test_bf16_autocast_step_matches_fp32_on_cuda(name, digits):
    _assert_aligned(name, digits, "cuda")
