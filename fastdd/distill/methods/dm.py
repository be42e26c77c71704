"""DM (distribution matching) as an engine plug-in: loss = Σ_c ‖μ_real(c) − μ_syn(c)‖², computed class chunk by
class chunk under the engine's memory budget, the image gradient accumulated into ONE image step."""
from dataclasses import dataclass

import torch

from fastdd.data.staging import to_device
from fastdd.distill.memory import ChunkPlan
from fastdd.distill.methods.base import Method, MethodOutput, on_host
from fastdd.models import resolve_model_name
from fastdd.ops import mean_match
from fastdd.sync import host_only


@dataclass
class DMBatch:
    """One class chunk of a DM step; segment ids are chunk-local (class c of the chunk is classes[0] + c)."""
    real_features: torch.Tensor   # [M, F], no grad
    real_seg: torch.Tensor        # [M] chunk-local class id of each real row
    real_index: torch.Tensor      # [M] index into the training set
    syn_features: torch.Tensor    # [n, F], with grad to syn_input
    syn_seg: torch.Tensor         # [n] chunk-local class id
    classes: range | None = None  # the chunk's (global, consecutive) class ids
    syn_rows: slice | None = None  # the chunk's rows of engine.syn.images
    syn_input: torch.Tensor | None = None  # engine.syn.images[syn_rows]: its gradient is the chunk's

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass
class DMStep:
    """What every chunk of one DM step shares: network, real rows (grouped by class), DSA draw, chunk plan."""
    net: torch.nn.Module
    real_index: torch.Tensor      # [M] on the host, grouped by class ascending
    real_seg: torch.Tensor        # [M] class ids on the device
    real_starts: list[int]        # real rows of class c: real_starts[c] .. real_starts[c + 1]
    draw: object
    plan: ChunkPlan


def uses_batchnorm(net: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules())


def dm_step(engine, real_index=None, real_seg=None, single_chunk: bool = False, cotangents: int = 1,
            **network_overrides) -> DMStep:
    """Fresh frozen network, real indices of every class (one sampler call unless given), one siamese DSA draw
    for all classes (generator use in that order), and the class chunks whose synthetic rows fit the budget;
    `cotangents`: how many the synthetic features' backward pulls back at once (engine.chunk_plan)."""
    net = engine.new_network(**network_overrides)
    if real_index is None:
        real_index, real_seg = engine.sample_real_index(engine.config.batch_real)
    draw = engine.draw_augmentation()
    C, ipc = engine.num_classes, engine.syn.ipc
    with host_only():  # host-side indices and labels: no device involved
        real_index = on_host(real_index)
        labels = engine.train.labels[real_index]
        if real_index.numel() > 1 and not bool((labels[1:] >= labels[:-1]).all()):
            order = torch.argsort(labels, stable=True)
            real_index, labels = real_index[order], labels[order]
            real_seg = real_seg[to_device(order, real_seg.device)]
        counts = torch.bincount(labels, minlength=C).tolist()
    starts = [0]
    for n in counts:
        starts.append(starts[-1] + n)
    if single_chunk:
        plan = ChunkPlan([list(range(C))], max(starts[-1], 1))
    elif uses_batchnorm(net):
        plan = batchnorm_plan(engine, net, C * ipc, starts[-1], cotangents)
    else:
        plan = engine.chunk_plan(net, [ipc] * C, counts, cotangents=cotangents)
    return DMStep(net, real_index, real_seg, starts, draw, plan)


def batchnorm_plan(engine, net, syn_rows: int, real_rows: int, cotangents: int = 1) -> ChunkPlan:
    """BatchNorm's batch statistics couple every class (main_DM.py runs all classes in one forward): one chunk
    and one real pass, refused when that does not fit the budget."""
    need = syn_rows * engine.grad_row_bytes(net, cotangents=cotangents) + real_rows * engine.row_bytes(net, False)
    if need > engine.memory_budget:
        model = resolve_model_name(engine.config.model, engine.train.image_size)
        raise ValueError(f"config key 'memory_budget' ({engine.memory_budget / 2**20:.0f} MiB) is too small for "
                         f"model {model!r}: its BatchNorm statistics couple all classes, so DM runs them in one "
                         f"pass needing ≈{need / 2**20:.0f} MiB; raise memory_budget or use a model without "
                         f"BatchNorm (e.g. ConvNet), which runs in class chunks")
    return ChunkPlan([list(range(engine.num_classes))], max(real_rows, 1))


def dm_chunks(engine, step: DMStep, embed_syn=None):
    """Yield one DMBatch per class chunk of step.plan: the chunk's real rows gathered, normalised and augmented
    in passes of plan.real_rows_per_pass rows and embedded without grad, then its synthetic rows embedded with
    grad by `embed_syn(x, seg)` (default: DSA with the step's draw, then the network)."""
    if embed_syn is None:
        def embed_syn(x, seg):
            return engine.embed(step.net, engine.augment(x, seg, step.draw))
    images, seg, ipc = engine.syn.images, engine.syn.seg, engine.syn.ipc  # once: a segment view re-gathers
    starts, per_pass = step.real_starts, step.plan.real_rows_per_pass
    bounds = [[(p, min(p + per_pass, starts[ch[-1] + 1])) for p in range(starts[ch[0]], starts[ch[-1] + 1], per_pass)]
              for ch in step.plan.class_chunks]
    passes = engine.real_passes(step.real_index, [b for chunk in bounds for b in chunk])
    for chunk, chunk_bounds in zip(step.plan.class_chunks, bounds):
        first, end = chunk[0], chunk[-1] + 1
        lo, hi = starts[first], starts[end]
        real = [engine.embed_real(step.net, engine.augment(next(passes), step.real_seg[a:b], step.draw))
                for a, b in chunk_bounds]
        rows = slice(first * ipc, end * ipc)
        x, syn_seg = images[rows], seg[rows]
        syn_features = embed_syn(x, syn_seg)
        real_features = real[0] if len(real) == 1 else (torch.cat(real) if real else
                                                        syn_features.detach().new_zeros(0, syn_features.shape[1]))
        real_seg = step.real_seg[lo:hi]
        if first:
            real_seg, syn_seg = real_seg - first, syn_seg - first
        yield DMBatch(real_features, real_seg, step.real_index[lo:hi], syn_features, syn_seg, range(first, end),
                      rows, x)


def dm_batch(engine, real_index=None, real_seg=None) -> DMBatch:
    """All classes as ONE chunk (features of every row at once; for callers that need the whole batch)."""
    return next(dm_chunks(engine, dm_step(engine, real_index, real_seg, single_chunk=True)))


class GradientAccumulator:
    """The image gradient (rows like engine.syn.images) filled chunk by chunk, and the summed loss tensor."""

    def __init__(self, engine):
        self.shape, self.grad, self.loss = engine.syn.shape, None, None

    def add(self, rows: slice, grad: torch.Tensor, loss: torch.Tensor) -> None:
        if self.grad is None:
            whole = rows.start == 0 and rows.stop == self.shape[0]
            self.grad = grad if whole else grad.new_zeros(self.shape)
        if self.grad is not grad:
            self.grad[rows] = grad
        self.loss = loss.detach() if self.loss is None else self.loss + loss.detach()

    def output(self, **logs) -> MethodOutput:
        return MethodOutput(loss=self.loss, grad=self.grad, backpropagated=True, logs=logs)


def dm_class_losses(real_features, real_seg, syn_features, syn_seg, num_classes: int) -> torch.Tensor:
    """[C]: ‖μ_real(c) − μ_syn(c)‖² per class from ONE mean_match call (the single DM-loss helper of the package;
    DM's loss is its sum). real_seg may live on the CPU (samplers draw there)."""
    real_seg = real_seg.to(real_features.device)
    return mean_match(real_features, real_seg, syn_features, syn_seg, num_classes)


def dm_loss(batch: DMBatch, num_classes: int) -> torch.Tensor:
    """DM's loss Σ_c ‖μ_real(c) − μ_syn(c)‖² of one batch."""
    return dm_class_losses(batch.real_features, batch.real_seg, batch.syn_features, batch.syn_seg, num_classes).sum()


class DM(Method):
    name = "dm"
    channels_last_cpu = True

    def lr_for(self, ipc: int) -> float:
        return 10.0 if ipc >= 100 else 1.0

    def loss_from_batch(self, engine, batch: DMBatch) -> torch.Tensor:
        return dm_loss(batch, batch.num_classes)

    def compute(self, engine, iteration: int) -> MethodOutput:
        """Per class chunk: the chunk's loss, backpropagated to its synthetic rows; one image step on the sum."""
        acc = GradientAccumulator(engine)
        for batch in dm_chunks(engine, dm_step(engine)):
            loss = self.loss_from_batch(engine, batch)
            acc.add(batch.syn_rows, torch.autograd.grad(loss, batch.syn_input)[0], loss)
        return acc.output()
