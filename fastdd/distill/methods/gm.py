"""Gradient matching (DC / IDC) as an engine plug-in: per-class weight gradients batched over classes."""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastdd.augment import augment_per_sample
from fastdd.distill.methods.base import Method
from fastdd.distill.methods.class_grads import ClassGradients, matched_parameters
from fastdd.distill.methods.multiformation import decode_for, mix_images

DISTANCES = ("dc", "idc", "idc_l1")


@dataclass
class GMArgs:
    distance: str = "idc"          # dc: Σ per-output-channel (1 − cos) (DC's distance_wb); idc: Σ (g_r − g_s)²
    factor: int = 2                # IDC multi-formation factor: each stored image decodes into factor² images
    inner_loop: int = 100          # image steps per outer iteration (network trained on real data between)
    net_epoch: int = 1             # network-training epochs between image steps
    n_data: int = 500              # real samples per network-training epoch (IDC's n_data)
    net_batch: int = 64            # network-training batch size
    net_lr: float = 0.01
    net_momentum: float = 0.9
    net_weight_decay: float = 5e-4
    batch_syn_max: int = 128       # decoded synthetic images per class per matching step (0: all)
    step_per_class: bool = True    # IDC: one image step per class, in class order; False: DC, one summed step
    class_chunk: int = 0           # classes per batched pass (0: all on CUDA, ~128 rows per pass on CPU)
    init_mix: bool = True          # IDC 'mix' init (factor² real images per stored image) when init=real

    def __post_init__(self):
        if self.distance not in DISTANCES:
            raise ValueError(f"gm: config key 'distance' must be one of {', '.join(DISTANCES)}; got {self.distance!r}")
        for key in ("factor", "inner_loop", "net_epoch", "n_data", "net_batch"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"gm: config key {key!r} must be a positive integer, got {value!r}")
        for key in ("batch_syn_max", "class_chunk"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"gm: config key {key!r} must be a non-negative integer, got {value!r}")
        if not self.net_lr > 0:
            raise ValueError(f"gm: config key 'net_lr' must be > 0, got {self.net_lr!r}")


def gradient_distance(real: list, syn: list, distance: str) -> torch.Tensor:
    """Σ over parameters: DC distance_wb (rows = output channels; 1-D parameters add 0), IDC MSE or L1."""
    total = syn[0].new_zeros(())
    for r, s in zip(real, syn):
        if distance == "idc":
            total = total + (r - s).square().sum()
        elif distance == "idc_l1":
            total = total + (r - s).abs().sum()
        elif r.dim() >= 2:
            r2, s2 = r.reshape(r.shape[0], -1), s.reshape(s.shape[0], -1)
            cos = (r2 * s2).sum(-1) / (r2.norm(dim=-1) * s2.norm(dim=-1) + 1e-6)
            total = total + (1 - cos).sum()
    return total


def _segments(seg: torch.Tensor, num_classes: int) -> tuple[list[int], list[int]]:
    counts = torch.bincount(seg.cpu(), minlength=num_classes).tolist()
    starts = [sum(counts[:c]) for c in range(num_classes)]
    return counts, starts


class GM(Method):
    name = "gm"
    Args = GMArgs
    default_lr = 5e-3

    def lr_for(self, ipc: int) -> float:
        return 5e-3 * ipc / 10  # IDC: lr_img 5e-3 scaled by ipc/10

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
        images, labels = self.decode(engine, *engine.syn.detached())
        return {"decoded_images": images, "decoded_labels": labels, "factor": self.args.factor}

    def metrics(self, engine) -> dict:
        return {"gm": {"distance": self.args.distance, "factor": self.args.factor,
                       "inner_loop": self.args.inner_loop, "decoded_per_class": engine.syn.ipc * self.args.factor ** 2}}

    # ---- one outer iteration --------------------------------------------------------------
    def iteration(self, engine, iteration: int) -> dict:
        a = self.args
        net = engine.new_network()
        for p in net.parameters():
            p.requires_grad_(True)
        grads = ClassGradients(net, matched_parameters(net, a.distance))
        opt = torch.optim.SGD(net.parameters(), lr=a.net_lr, momentum=a.net_momentum, weight_decay=a.net_weight_decay)
        losses = []
        for inner in range(a.inner_loop):
            real_index, real_seg = engine.sample_real_index(engine.config.batch_real)
            draw = engine.draw_augmentation()
            select = self.draw_selection(engine)
            losses.append(self.match_step(engine, grads, real_index, real_seg, draw, select))
            if inner < a.inner_loop - 1:  # IDC also trains after the last step; that net is discarded
                self.train_network(engine, net, opt)
        return {"loss": sum(losses) / len(losses)}

    def draw_selection(self, engine):
        """Per class, which of its f²·ipc decoded images enter this step (None: all), from the engine RNG."""
        m = engine.syn.ipc * self.args.factor ** 2
        if not self.args.batch_syn_max or m <= self.args.batch_syn_max:
            return None
        keys = torch.rand(engine.num_classes, m, generator=engine.generator)
        return keys.argsort(dim=1)[:, :self.args.batch_syn_max]

    def match_step(self, engine, grads, real_index, real_seg, draw, select) -> float:
        """Per-class gradient matching on all classes, then the image steps; returns the mean class loss."""
        a, C = self.args, engine.num_classes
        real = engine.augment(engine.real_images(real_index), real_seg, draw)
        real_y = real_seg.to(real.device)
        r_counts, r_starts = _segments(real_seg, C)
        images = engine.syn.images.detach()
        s_counts, s_starts = _segments(engine.syn.seg, C)
        shift = self.lookahead(engine, s_counts) if a.step_per_class else None
        grad_images = torch.zeros_like(images)
        class_loss = [0.0] * C
        for chunk in self.chunks(engine, r_counts, s_counts):
            lo, hi = r_starts[chunk[0]], r_starts[chunk[-1]] + r_counts[chunk[-1]]
            g_real = grads(real[lo:hi], real_y[lo:hi], [r_counts[c] for c in chunk], create_graph=False)
            rows = slice(s_starts[chunk[0]], s_starts[chunk[-1]] + s_counts[chunk[-1]])
            x = images[rows] if shift is None else images[rows] - shift[rows]
            x = x.detach().requires_grad_(True)
            syn, syn_y, n_syn = self.syn_batch(engine, x, engine.syn.seg[rows], chunk, select, draw)
            g_syn = grads(syn, syn_y, n_syn, create_graph=True)
            per_class = [gradient_distance(gr, gs, a.distance) for gr, gs in zip(g_real, g_syn)]
            grad_images[rows] = torch.autograd.grad(torch.stack(per_class).sum(), x)[0]
            for c, value in zip(chunk, per_class):
                class_loss[c] = float(value.detach())
        if a.step_per_class:
            for c in range(C):
                if s_counts[c]:
                    step = torch.zeros_like(grad_images)
                    rows = slice(s_starts[c], s_starts[c] + s_counts[c])
                    step[rows] = grad_images[rows]
                    engine.image_step(grad=step)
        else:
            engine.image_step(grad=grad_images)
        return sum(class_loss) / C

    def syn_batch(self, engine, x, seg, chunk, select, draw):
        """Decode the chunk's stored images, keep each class's selected decoded images, augment (siamese)."""
        decoded, labels = self.decode(engine, x, seg)
        per_class = engine.syn.ipc * self.args.factor ** 2
        if select is not None:
            offsets = torch.arange(len(chunk)).repeat_interleave(select.shape[1]) * per_class
            keep = select[chunk].reshape(-1) + offsets
            decoded, labels = decoded[keep.to(decoded.device)], labels[keep.to(labels.device)]
        n = per_class if select is None else select.shape[1]
        return engine.augment(decoded, labels, draw), labels.to(decoded.device), [n] * len(chunk)

    def lookahead(self, engine, s_counts) -> torch.Tensor | None:
        """Exact batching of IDC's sequential per-class steps: class c's images are read after the c
        earlier class steps of this round, each of which moves them by momentum alone (their gradient
        is zero there), i.e. by lr·(m + m² + … + m^c)·buf. Returns that displacement per row."""
        opt = engine.optimizer
        group = opt.param_groups[0]
        if group.get("dampening", 0) or group.get("nesterov") or group.get("weight_decay", 0) or group.get("maximize"):
            raise ValueError("gm: step_per_class needs the engine's plain SGD (momentum, no dampening/nesterov/"
                             "weight decay)")
        leaf = getattr(engine, "syn_leaf", engine.syn.images)
        buf = opt.state.get(leaf, {}).get("momentum_buffer")
        m, lr = group["momentum"], group["lr"]
        if buf is None or m == 0:
            return None
        rows = getattr(engine, "syn_rows", None)
        buf = buf if rows is None else buf[rows]
        coef = torch.tensor([sum(m ** j for j in range(1, c + 1)) for c in range(len(s_counts))], dtype=buf.dtype)
        coef = coef.repeat_interleave(torch.tensor(s_counts)).to(buf.device)
        return lr * coef.view(-1, *[1] * (buf.dim() - 1)) * buf

    def chunks(self, engine, r_counts, s_counts) -> list[list[int]]:
        C = engine.num_classes
        size = self.args.class_chunk
        if not size:
            if engine.device.type == "cuda":
                size = C
            else:  # on CPU large batches lose to cache-sized ones (see benchmarks/bench_gm_iteration.py)
                rows = max(max(r_counts), max(s_counts) * self.args.factor ** 2, 1)
                size = max(1, 128 // rows)
        runs, run = [], []  # consecutive classes with real and synthetic rows (a class with none is skipped)
        for c in range(C):
            if r_counts[c] and s_counts[c] and len(run) < size and (not run or run[-1] == c - 1):
                run.append(c)
                continue
            if run:
                runs.append(run)
            run = [c] if r_counts[c] and s_counts[c] else []
        return runs + [run] if run else runs

    def train_network(self, engine, net, opt) -> None:
        """IDC's net update: net_epoch passes over shuffled real data, each stopping after n_data samples,
        per-sample DSA (IDC also applies CutMix here; fastdd does not)."""
        a = self.args
        pool = getattr(engine, "real_pool", None)
        total = len(pool) if pool is not None else len(engine.train)
        strategy = engine.config.dsa_strategy if engine.augmenter is not None else None
        for _ in range(a.net_epoch):
            order = torch.randperm(total, generator=engine.generator)
            seen = 0
            for start in range(0, total, a.net_batch):
                index = order[start:start + a.net_batch]
                index = pool[index] if pool is not None else index
                x = engine.real_images(index)
                if strategy:
                    x = augment_per_sample(x, engine.generator, strategy=strategy)
                y = torch.as_tensor(engine.train.labels)[index].to(x.device)
                loss = F.cross_entropy(net(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                seen += len(index)
                if seen >= a.n_data:
                    break

    def _mix_init(self, engine) -> None:
        f2 = self.args.factor ** 2
        index, seg = engine.sample_real_index(engine.syn.ipc * f2)
        with torch.no_grad():
            for c in range(engine.num_classes):
                mine = index[seg == c]
                if len(mine) == 0:
                    continue
                mine = mine[torch.arange(engine.syn.ipc * f2) % len(mine)]  # small classes repeat images
                rows = (engine.syn.seg == c).nonzero().flatten()
                engine.syn.images[rows] = mix_images(engine.real_images(mine), self.args.factor).to(
                    engine.syn.images.dtype)
