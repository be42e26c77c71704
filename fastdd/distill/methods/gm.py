"""Gradient matching (IDC) as engine hooks: per-class weight gradients batched over classes, pixel-space steps."""
import functools
import math
from dataclasses import dataclass

import torch

from fastdd.augment import IDCAugment, augment_per_sample, cutmix_loss, draw_cutmix
from fastdd.augment.idc import parse_idc_strategy
from fastdd.distill.methods.base import Method, MethodOutput
from fastdd.distill.methods.class_grads import (  # noqa: F401 (fp32, gradient_distance: gm's public names)
    ClassGradients, fp32, gradient_distance, matched_parameters, real_pass, segments, syn_pass)
from fastdd.distill.methods.multiformation import decode_for, mix_images
from fastdd.models.registry import unfused_if_convnet

DISTANCES = ("cos", "idc", "idc_l1")
AUGS = ("idc", "dsa", "none")
MIXUPS = ("cut", "vanilla")


@dataclass
class GMArgs:
    distance: str = "idc"          # idc: Σ (g_r − g_s)² (IDC mse); idc_l1: Σ |g_r − g_s|; cos: DC's distance_wb
    factor: int = 2                # IDC multi-formation factor: each stored image decodes into factor² images
    inner_loop: int = 100          # image steps per outer iteration (network trained on real data between)
    net_epoch: int = 1             # network-training epochs between image steps
    n_data: int = 500              # real samples per network-training epoch (IDC's n_data)
    net_batch: int = 0             # network-training batch size (0: config batch_real, as IDC's shared loader)
    net_lr: float = 0.01
    net_momentum: float = 0.9
    net_weight_decay: float = 5e-4
    batch_syn_max: int = 128       # decoded synthetic images per class per matching step (0: all)
    step_per_class: bool = True    # IDC: one image step per class, in class order; False: one summed step
    class_chunk: int = 0           # cap on classes per batched pass (0: none on CUDA, ~128 rows on CPU);
                                   # memory_budget may split passes further
    init_mix: bool = True          # IDC 'mix' init (factor² real images per stored image) when init=real
    pixel_space: bool = True       # IDC: image steps in pixel units (lr_img as IDC's) and clamp to [0, 1]
    aug: str = "idc"               # matching aug: idc (IDC DiffAug, one draw per class), dsa (config
                                   # dsa_strategy, siamese), none; network training uses the same family
    aug_type: str = "color_crop_cutout"  # IDC's matching strategy (ops: flip, color, crop, cutout)
    mixup_net: str = "cut"         # network training: cut (IDC CutMix, cutout then dropped) or vanilla
    mix_p: float = 0.5             # CutMix probability per batch (IDC: 0.5 on cifar/svhn/mnist/fashion)
    beta: float = 1.0              # CutMix λ ~ Beta(beta, beta)

    def __post_init__(self):
        if self.distance == "dc":
            raise ValueError("gm: config key 'distance'='dc' is now 'cos' (DC's per-output-channel cosine "
                             "distance); gm runs IDC's algorithm, not DC's")
        if self.distance not in DISTANCES:
            raise ValueError(f"gm: config key 'distance' must be one of {', '.join(DISTANCES)}; got {self.distance!r}")
        for key, valid in (("aug", AUGS), ("mixup_net", MIXUPS)):
            value = getattr(self, key)
            if value not in valid:
                raise ValueError(f"gm: config key {key!r} must be one of {', '.join(valid)}; got {value!r}")
        parse_idc_strategy(self.aug_type)
        for key in ("factor", "inner_loop", "net_epoch", "n_data"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"gm: config key {key!r} must be a positive integer, got {value!r}")
        for key in ("batch_syn_max", "class_chunk", "net_batch"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"gm: config key {key!r} must be a non-negative integer, got {value!r}")
        if not self.net_lr > 0:
            raise ValueError(f"gm: config key 'net_lr' must be > 0, got {self.net_lr!r}")
        if not 0 <= self.mix_p <= 1:
            raise ValueError(f"gm: config key 'mix_p' must lie in [0, 1], got {self.mix_p!r}")
        if not self.beta > 0:
            raise ValueError(f"gm: config key 'beta' must be > 0, got {self.beta!r}")


@dataclass
class GMIteration:
    net: torch.nn.Module
    grads: ClassGradients
    optimizer: torch.optim.Optimizer


@dataclass
class MatchChunk:
    chunk: list[int]              # consecutive class ids
    rows: slice                   # their rows of syn.images
    x: torch.Tensor               # those rows' images, a grad leaf
    g_real: list                  # per class: real weight gradients (no graph)
    g_syn: list                   # per class: synthetic weight gradients (graph to x)
    real: torch.Tensor            # the chunk's real rows, normalised and augmented
    real_y: torch.Tensor          # their classes
    span: tuple[int, int]         # their span (lo, hi) in the step's class-major real batch


SYN_GRAPH_FACTOR = 2  # a create_graph pass's decoded row: its saved graph, and the second-order backward again


class GM(Method):
    """IDC on the engine's hooks. Per outer iteration a fresh network (begin_iteration); per inner step
    (inner_loop of them) a real batch per class, one IDC aug draw per class shared by real and synthetic,
    every class's matching gradient in batched passes, handed to the engine as IDC's C sequential class
    steps (sequential_by_class); then the network trains on real data (after_step). pixel_space makes
    the engine step in pixel units and clamp to [0, 1], as IDC's pixel-space store does."""

    name = "gm"
    Args = GMArgs

    def __init__(self, args: dict | None = None):
        super().__init__(args)
        a = self.args
        self.match_aug = IDCAugment(a.aug_type) if a.aug == "idc" else None
        net_ops = [op for op in parse_idc_strategy(a.aug_type) if not (op == "cutout" and a.mixup_net == "cut")]
        self.net_aug = IDCAugment("_".join(net_ops)) if a.aug == "idc" else None

    @property
    def pixel_space(self) -> bool:
        return self.args.pixel_space

    def lr_for(self, ipc: int) -> float:
        return 5e-3 * ipc / 10  # IDC: lr_img 5e-3 scaled by ipc/10 (pixel units when pixel_space)

    # ---- engine hooks ---------------------------------------------------------------------
    def prepare(self, engine) -> None:
        a = self.args
        if a.factor > 1 and a.init_mix and engine.config.init == "real" and engine.iteration == 0:
            self._mix_init(engine)

    def decode(self, engine, images, labels):
        return decode_for(engine, images, labels, self.args.factor)

    def synthetic_extra(self, engine) -> dict:
        if self.args.factor == 1:
            return {}
        images, labels = self.decode(engine, *engine.synthetic.detached())
        return {"decoded_images": images, "decoded_labels": labels, "factor": self.args.factor}

    def metrics(self, engine) -> dict:
        return {"gm": {"distance": self.args.distance, "factor": self.args.factor, "aug": self.args.aug,
                       "inner_loop": self.args.inner_loop,
                       "decoded_per_class": engine.synthetic.ipc * self.args.factor ** 2}}

    # ---- one outer iteration: a fresh network, inner_loop × (match + image steps, network training) ----
    def begin_iteration(self, engine, iteration: int) -> GMIteration:
        a = self.args
        # ConvNets as nn modules: the fused norm_act_pool's second derivative recomputes its forward through the
        # reference on every double backward, which the nn modules' native formulas do not
        net = engine.new_network(**unfused_if_convnet(engine.config.model))
        for p in net.parameters():
            p.requires_grad_(True)
        opt = torch.optim.SGD(net.parameters(), lr=a.net_lr, momentum=a.net_momentum, weight_decay=a.net_weight_decay)
        return GMIteration(net, ClassGradients(net, matched_parameters(net, a.distance)), opt)

    def inner_steps(self, engine) -> int:
        return self.args.inner_loop

    def compute_inner(self, engine, iteration: int, state: GMIteration, inner: int) -> MethodOutput:
        real_index, real_seg = engine.sample_real_index(engine.config.batch_real)
        draw = self.draw_match_augmentation(engine)
        select = self.draw_selection(engine)
        grad, value = self.match_grad(engine, state.grads, real_index, real_seg, draw, select)
        return MethodOutput(grad=grad, value=value, sequential_by_class=self.args.step_per_class)

    def after_step(self, engine, iteration: int, state: GMIteration, inner: int) -> None:
        if inner < self.args.inner_loop - 1:  # IDC also trains after the last step; that net is discarded
            self.train_network(engine, state.net, state.optimizer)

    def draw_match_augmentation(self, engine):
        if self.args.aug == "idc":
            return self.match_aug.draw(engine.num_classes, engine.train.image_size, engine.generator, engine.device)
        return engine.draw_augmentation() if self.args.aug == "dsa" else None

    def augment(self, engine, x, group, draw):
        if self.args.aug == "idc":
            return self.match_aug.apply(x, group, draw)
        return engine.augment(x, group, draw)

    def draw_selection(self, engine):
        """Per class, which of its f²·ipc decoded images enter this step (None: all), from the engine RNG."""
        m = engine.syn.ipc * self.args.factor ** 2
        if not self.args.batch_syn_max or m <= self.args.batch_syn_max:
            return None
        keys = torch.rand(engine.num_classes, m, generator=engine.generator)
        return keys.argsort(dim=1)[:, :self.args.batch_syn_max]

    def match_grad(self, engine, grads, real_index, real_seg, draw, select) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-class matching losses on all classes -> (∂ Σ_c loss_c / ∂ images, mean class loss), one class
        chunk at a time (losses are per class, so the chunked sum is the one-pass sum). With step_per_class,
        class c's rows are read where its sequential step finds them."""
        C = engine.num_classes
        grad_images = torch.zeros_like(engine.syn.images.detach())
        total = torch.zeros((), dtype=torch.float64, device=grad_images.device)  # read lazily: no sync per step
        for m in self.match_chunks(engine, grads, real_index, real_seg, select, draw):
            per_class = torch.stack([gradient_distance(fp32(gr), fp32(gs), self.args.distance)
                                     for gr, gs in zip(m.g_real, m.g_syn)])
            grad_images[m.rows] = torch.autograd.grad(per_class.sum(), m.x)[0].to(grad_images.dtype)
            total = total + per_class.detach().double().sum()
        return grad_images, total / C

    def match_chunks(self, engine, grads, real_index, real_seg, select, draw, grads_per_class: int = 2):
        """Per class chunk (see `chunks`) a MatchChunk: the chunk's real rows gathered, normalised and augmented
        (the aug draw is per class, so per-chunk application gives the one-pass values), their class
        gradients, and the synthetic rows as a grad leaf with their class gradients (graph to x).
        Real rows are class-major (sample_real_index), so a chunk's rows are one span. `grads_per_class`:
        matched-weight-sized gradients a chunk holds per class (gm: real and synthetic; robust adds its cells)."""
        C = engine.num_classes
        r_counts, r_starts = segments(real_seg, C)
        images = engine.class_step_images() if self.args.step_per_class else engine.syn.images.detach()
        s_counts, s_starts = segments(engine.syn.seg, C)
        chunks = self.chunks(engine, grads, r_counts, s_counts, select, grads_per_class)
        spans = [(r_starts[chunk[0]], r_starts[chunk[-1]] + r_counts[chunk[-1]]) for chunk in chunks]
        reals = engine.real_passes(real_index, spans)
        for chunk, (lo, hi) in zip(chunks, spans):
            seg = real_seg[lo:hi]
            real = self.augment(engine, next(reals).to(images.dtype), seg, draw)
            real_y = seg.to(real.device)
            with engine._autocast():
                g_real = grads(real, real_y, [r_counts[c] for c in chunk], create_graph=False)
            rows = slice(s_starts[chunk[0]], s_starts[chunk[-1]] + s_counts[chunk[-1]])
            x = images[rows].detach().requires_grad_(True)
            syn, syn_y, n_syn = self.syn_batch(engine, x, engine.syn.seg[rows], chunk, select, draw)
            with engine._autocast():
                g_syn = grads(syn, syn_y, n_syn, create_graph=True)
            yield MatchChunk(chunk, rows, x, g_real, g_syn, real, real_y, (lo, hi))

    def syn_batch(self, engine, x, seg, chunk, select, draw):
        """Decode the chunk's stored images, keep each class's selected decoded images, augment (siamese)."""
        decoded, labels = self.decode(engine, x, seg)
        per_class = engine.syn.ipc * self.args.factor ** 2
        if select is not None:
            offsets = torch.arange(len(chunk)).repeat_interleave(select.shape[1]) * per_class
            keep = select[chunk].reshape(-1) + offsets
            decoded, labels = decoded[keep.to(decoded.device)], labels[keep.to(labels.device)]
        n = per_class if select is None else select.shape[1]
        return self.augment(engine, decoded, labels, draw), labels.to(decoded.device), [n] * len(chunk)

    def chunks(self, engine, grads, r_counts, s_counts, select=None, grads_per_class: int = 2) -> list[list[int]]:
        """Consecutive classes with real and synthetic rows (a class with none is skipped), split where the
        memory plan splits (`plan`), and capped at class_chunk classes (0: none on CUDA; on CPU ~128 rows,
        as large batches lose to cache-sized ones there, see benchmarks/bench_gm_iteration.py)."""
        C = engine.num_classes
        size = self.args.class_chunk
        if not size:
            if engine.device.type == "cuda":
                size = C
            else:
                rows = max(max(r_counts), max(s_counts) * self.args.factor ** 2, 1)
                size = max(1, 128 // rows)
        runs = []
        for part in self.plan(engine, grads, r_counts, s_counts, select, grads_per_class).class_chunks:
            run = []
            for c in part:
                if r_counts[c] and s_counts[c] and len(run) < size:
                    run.append(c)
                    continue
                if run:
                    runs.append(run)
                run = [c] if r_counts[c] and s_counts[c] else []
            if run:
                runs.append(run)
        return runs

    def plan(self, engine, grads, r_counts, s_counts, select=None, grads_per_class: int = 2):
        """engine.chunk_plan over every class's memory, in units of one decoded synthetic row of the
        create_graph pass: its decoded rows (×SYN_GRAPH_FACTOR: the second-order backward through the held
        graph allocates about as much again), its real rows (a first-order pass) at their measured cost, and
        the grads_per_class weight gradients it keeps until the chunk's distance is taken."""
        net, f2, distance = grads.net, self.args.factor ** 2, self.args.distance
        syn_forward = functools.partial(syn_pass, distance=distance)
        key = ("gm-syn", distance)
        syn_bytes = engine.row_bytes(net, True, syn_forward, key)
        real_bytes = engine.row_bytes(net, True, real_pass, "gm-real")
        weights = grads_per_class * sum(p.numel() * p.element_size() for p in grads.params)
        decoded = [0 if not n else (select.shape[1] if select is not None else n * f2) for n in s_counts]
        rows = [SYN_GRAPH_FACTOR * d + math.ceil((r * real_bytes + (weights if r and d else 0)) / syn_bytes)
                for d, r in zip(decoded, r_counts)]
        return engine.chunk_plan(net, rows, [0] * len(rows), grad_real=True, forward=syn_forward, key=key)

    def train_network(self, engine, net, opt) -> None:
        """IDC's net update: net_epoch passes over shuffled real data (the engine's real pool), each stopping
        after n_data samples; per-sample augmentation (IDC's, cutout dropped under CutMix; or DSA), then
        CutMix with probability mix_p when mixup_net=cut."""
        a = self.args
        pool = engine.real_pool
        total = len(pool) if pool is not None else len(engine.train)
        batch = a.net_batch or engine.config.batch_real
        labels = torch.as_tensor(engine.train.labels)
        for _ in range(a.net_epoch):
            order = torch.randperm(total, generator=engine.generator)
            seen = 0
            for start in range(0, total, batch):
                index = order[start:start + batch]
                index = pool[index] if pool is not None else index
                x = engine.real_images(index)
                with torch.no_grad():
                    if a.aug == "idc":
                        draw = self.net_aug.draw(len(index), engine.train.image_size, engine.generator, x.device)
                        x = self.net_aug.apply(x, torch.arange(len(index), device=x.device), draw)
                    elif a.aug == "dsa" and engine.augmenter is not None:
                        x = augment_per_sample(x, engine.generator, strategy=engine.config.dsa_strategy)
                mix = None
                if a.mixup_net == "cut":
                    mix = draw_cutmix(len(index), engine.train.image_size, a.beta, a.mix_p, engine.generator)
                with engine._autocast():
                    loss = cutmix_loss(net, x, labels[index].to(x.device), mix)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                seen += len(index)
                if seen >= a.n_data:
                    break

    def _mix_init(self, engine) -> None:
        f2 = self.args.factor ** 2
        index, seg = engine.sample_real_index(engine.synthetic.ipc * f2)
        with torch.no_grad():
            for c in range(engine.num_classes):
                mine = index[seg == c]
                if len(mine) == 0:
                    continue
                mine = mine[torch.arange(engine.synthetic.ipc * f2) % len(mine)]  # small classes repeat images
                rows = (engine.synthetic.seg == c).nonzero().flatten()
                engine.synthetic.images[rows] = mix_images(engine.real_images(mine), self.args.factor).to(
                    engine.synthetic.images.dtype)
