"""Robust DD: per-class K-means subpopulations of the real data and a differentiable CVaR over their DM or GM losses.

Objective (methods.md, "Robust DD"): Σ_c (1 − β)·L_c + β·CVaR_α({L_{c,k}}_k), where
- L_c = DM's class loss ‖μ_real(c) − μ_syn(c)‖² on the class's POOLED real batch (exactly `dm`'s term, same
  network, rows and augmentation draw), so with β = 0 the step IS DM's step;
- L_{c,k} = ‖μ_real(c, k) − μ_syn(c)‖² over the batch rows of class c in subpopulation k, all of a class
  chunk's from ONE `mean_match` call (real segment c·K + k → synthetic segment c via `real_to_syn`);
- CVaR_α = the mean of the worst (largest) ⌈α·K⌉ losses, fractional part weighted as in Rockafellar–Uryasev
  (`fastdd.ops.cvar`); the gradient flows through it to the selected clusters.
- base = gm (kmeans assignment only): the hooks are GM's (fresh network per outer iteration, inner_loop steps,
  network training, pixel-space sequential class steps, decoding); in each matching step L_c is GM's class
  loss and L_{c,k} = distance(real weight gradient over the rows of class c in cluster k, class c's synthetic
  gradient), the real rows sorted by cell c·K + k into ClassGradients segments (empty cells skipped). Keys
  that are not robust's go to GM (GM's CutMix `beta` is shadowed by robust's `beta`).
Empty (class, cluster) cells of a batch (no sampled row) are EXCLUDED: a class's CVaR is taken over its K_c
present clusters only (CVaR_α of K_c values), never over a zero placeholder. `robust_objective` takes the [C]
and [C, K] loss tables and the present mask only, whatever base method computed them.
Memory: each class's term depends on that class's rows only (its CVaR is over its own clusters), so the
objective and its image gradient are taken class chunk by class chunk of the base's memory plan (DM's
dm_chunks, GM's match_chunks) and the chunks' gradients summed: exactly the one-pass result.

Subpopulations (`assignment`):
- `kmeans`: every training image of every class is embedded (`embedding`: a fresh random network of the run's
  family from the engine generator, or raw normalised pixels; images read EMBED_CHUNK at a time) and clustered per
  class by `batched_kmeans` (k-means++ from the engine generator), class chunk by class chunk so that only one
  chunk's features are held (`cluster_chunks`: within memory_budget; one chunk when all fit, and any chunking
  gives the same ids); the per-sample cluster ids live in the method state (so they are checkpointed and a
  resumed run keeps them) and are recomputed every `recluster_every` iterations (0: once).
  With β = 0 no clusters are needed: none are computed and no generator draws are spent, so the run is DM's
  run draw for draw (GM's run with base = gm).
- `nearest-synthetic` (the public code's assignment): a sampled real row's cluster is the nearest synthetic image
  of its class in the current iteration's embedding, so K = ipc (`k` is ignored); no state, no extra draws.
"""
import dataclasses
import math
from dataclasses import dataclass

import torch

from fastdd.cluster import batched_kmeans, kmeans_plusplus_draws
from fastdd.data.staging import to_device
from fastdd.distill.methods import robust_data
from fastdd.distill.methods.base import Method, MethodOutput, on_host
from fastdd.distill.methods.dm import DM, GradientAccumulator, dm_chunks, dm_class_losses, dm_step
from fastdd.distill.methods.gm import GM, fp32, gradient_distance
from fastdd.models import uses_batchnorm
from fastdd.ops import kmeans_assign, mean_match
from fastdd.ops.cvar import cvar_weights

ASSIGNMENTS = ("kmeans", "nearest-synthetic")
EMBEDDINGS = ("random-net", "pixels")
BASES = ("dm", "gm")
EMBED_CHUNK = 2048  # training images embedded per forward pass when clustering
CLUSTER_BYTES_PER_FEATURE = 16  # per feature of a clustered row: fp32 features, K-means's sorted copy, headroom


@dataclass
class RobustArgs:
    k: int = 4                      # subpopulations per class (kmeans; nearest-synthetic uses K = ipc)
    alpha: float = 0.5              # CVaR level in (0, 1]: mean of the worst ⌈α·K⌉ cluster losses
    beta: float = 0.5               # weight of the CVaR term in [0, 1]; 0 = DM
    recluster_every: int = 100      # R: re-cluster the training set every R iterations (0: once, at the start)
    assignment: str = "kmeans"      # kmeans | nearest-synthetic
    embedding: str = "random-net"   # kmeans features: random-net (fresh net of embedding_model) | pixels
    embedding_model: str | None = None  # random-net family; None: the run's model
    kmeans_iters: int = 100         # Lloyd iterations cap per clustering
    eval_k: int = robust_data.EVAL_K  # test clusters per class for worst-cluster accuracy (added if the data has none)
    base: str = "dm"                # matching method the risk wraps: dm | gm (other keys go to gm)

    def __post_init__(self):
        for key in ("k", "kmeans_iters", "eval_k"):
            _check_int(key, getattr(self, key), 1)
        _check_int("recluster_every", self.recluster_every, 0)
        if not _is_number(self.alpha) or not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"robust: config key 'alpha' must be a number in (0, 1], got {self.alpha!r}")
        if not _is_number(self.beta) or not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"robust: config key 'beta' must be a number in [0, 1], got {self.beta!r}")
        for key, valid in (("assignment", ASSIGNMENTS), ("embedding", EMBEDDINGS), ("base", BASES)):
            if getattr(self, key) not in valid:
                raise ValueError(f"robust: config key {key!r} must be one of {', '.join(valid)}; "
                                 f"got {getattr(self, key)!r}")
        if self.base == "gm" and self.assignment != "kmeans":
            raise ValueError("robust: config key 'assignment' must be 'kmeans' when base='gm' "
                             "(nearest-synthetic needs DM's feature embedding)")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_int(key: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        kind = "a positive integer" if low == 1 else "a non-negative integer"
        raise ValueError(f"robust: config key {key!r} must be {kind}, got {value!r}")


def cluster_losses(real, real_seg, cluster, syn, syn_seg, num_classes: int, k: int):
    """(L [C, K], present [C, K]): per-(class, cluster) DM losses from ONE mean_match call; present = has rows."""
    seg = real_seg * k + cluster
    real_to_syn = torch.arange(num_classes * k, device=seg.device) // k
    losses = mean_match(real, seg, syn, syn_seg, num_classes * k, real_to_syn).view(num_classes, k)
    present = seg.new_zeros(num_classes * k, dtype=torch.bool).index_fill_(0, seg, True).view(num_classes, k)
    return losses, present


def present_cvar(losses: torch.Tensor, present: torch.Tensor, alpha: float) -> torch.Tensor:
    """[C]: CVaR_α of each row's PRESENT entries only (a row with K_c present values is CVaR_α over K_c values,
    `fastdd.ops.cvar`'s weights for K_c; a row with none gives 0). One pass for all rows: the present losses
    sorted largest first, each row weighted by the weight row of its count, chosen on the device (no host read
    of the counts: a sync-free step)."""
    n = present.sum(1)
    ordered = losses.masked_fill(~present, float("-inf")).sort(dim=1, descending=True)
    kept = torch.arange(losses.shape[1], device=losses.device)[None, :] < n[:, None]  # the n_c present values
    weights = _cvar_weight_table(losses.shape[1], float(alpha), losses.dtype, losses.device)[n]
    return (losses.gather(1, ordered.indices) * weights).masked_fill(~kept, 0).sum(1)


_WEIGHT_TABLES: dict = {}


def _cvar_weight_table(K: int, alpha: float, dtype, device) -> torch.Tensor:
    """[K + 1, K]: row m holds cvar_weights(m, alpha) (largest loss first) padded with zeros; row 0 is zeros."""
    key = (K, alpha, dtype, str(device))
    if key not in _WEIGHT_TABLES:
        table = torch.zeros(K + 1, K, dtype=dtype, device=device)
        for m in range(1, K + 1):
            w = cvar_weights(m, alpha, dtype=dtype, device=device)
            table[m, :w.shape[0]] = w
        _WEIGHT_TABLES[key] = table
    return _WEIGHT_TABLES[key]


def robust_objective(class_losses: torch.Tensor, losses: torch.Tensor, present: torch.Tensor, alpha: float,
                     beta: float):
    """(loss, risk [C]): Σ_c (1 − β)·class_losses[c] + β·CVaR_α(present entries of losses[c]); β = 0 is exactly
    Σ_c class_losses[c]. Independent of how the [C] and [C, K] base losses were computed (DM or GM)."""
    risk = present_cvar(losses, present, alpha)
    base = class_losses.sum()
    if beta == 0:
        return base, risk
    return (1 - beta) * base + beta * risk.sum(), risk


class Robust(Method):
    name = "robust"
    Args = RobustArgs

    def __init__(self, args: dict | None = None):
        args = dict(args or {})
        own = {f.name for f in dataclasses.fields(RobustArgs)}
        gm_keys = {key: value for key, value in args.items() if key not in own} if args.get("base") == "gm" else {}
        super().__init__({key: value for key, value in args.items() if key not in gm_keys})
        self.base = GM(gm_keys) if self.args.base == "gm" else DM()
        self.cluster_ids: torch.Tensor | None = None  # int64 [len(train)] on CPU (kmeans assignment)
        self.clustered_at = -1
        self.reclusters = 0
        self.sums: dict[str, float] = {}
        self.count = 0

    def lr_for(self, ipc: int) -> float:
        return self.base.lr_for(ipc)

    def decode(self, engine, images, labels):
        decode = getattr(self.base, "decode", None)
        return decode(engine, images, labels) if decode else (images, labels)

    def synthetic_extra(self, engine) -> dict:
        extra = getattr(self.base, "synthetic_extra", None)
        return extra(engine) if extra else {}

    # ---- engine hooks ---------------------------------------------------------------------
    def prepare(self, engine) -> None:
        a = self.args
        if a.base == "gm":
            self.base.prepare(engine)
        if a.assignment == "kmeans":
            sizes = torch.bincount(engine.train.labels.long(), minlength=engine.num_classes)
            small = (sizes < a.k).nonzero().flatten()
            if small.numel():
                c = int(small[0])
                raise ValueError(f"robust: config key 'k' ({a.k}) exceeds the {int(sizes[c])} training images of "
                                 f"class {c}; every class needs at least k images")
        if engine.test is not None and not any(getattr(e, "kind", None) == "worst_cluster" for e in engine.evaluators):
            engine.evaluators.append(robust_data.worst_cluster_metric(a.eval_k))

    def num_clusters(self, engine) -> int:
        return engine.syn.ipc if self.args.assignment == "nearest-synthetic" else self.args.k

    def needs_clustering(self, iteration: int) -> bool:
        a = self.args
        if a.assignment != "kmeans" or a.beta == 0:
            return False
        if self.cluster_ids is None:
            return True
        return bool(a.recluster_every) and iteration % a.recluster_every == 0 and self.clustered_at != iteration

    def embedding_network(self, engine):
        """The clustering's feature extractor: a fresh network from the engine generator, or None (pixels)."""
        return engine.new_network(self.args.embedding_model) if self.args.embedding == "random-net" else None

    def embeddings(self, engine, net, rows: torch.Tensor) -> torch.Tensor:
        """[len(rows), F] features of training images `rows` (no augmentation): read EMBED_CHUNK at a time (on CUDA
        through the engine's pinned staging), written into one preallocated tensor."""
        n = len(rows)
        spans = [(lo, min(lo + EMBED_CHUNK, n)) for lo in range(0, n, EMBED_CHUNK)]
        feats = None
        for (lo, hi), x in zip(spans, engine.real_passes(rows, spans)):
            f = x.flatten(1).float() if net is None else engine.embed_real(net, x)
            if feats is None:
                feats = f.new_empty(n, f.shape[1])
            feats[lo:hi] = f
        return feats

    def train_embeddings(self, engine) -> torch.Tensor:
        """[N, F] features of every training image (one chunk; `cluster` reads them class chunk by class chunk)."""
        return self.embeddings(engine, self.embedding_network(engine), torch.arange(len(engine.train)))

    def cluster_chunks(self, engine, net, sizes: list[int]) -> list[tuple[int, int]]:
        """Consecutive class ranges [c0, c1) whose features, with K-means's working copy and distances
        (CLUSTER_BYTES_PER_FEATURE bytes per feature), fit the engine's memory_budget next to one embedding pass
        of EMBED_CHUNK images; one range when all fit. A BatchNorm network embeds with the statistics of its
        pass, so its features depend on which images share a pass: it clusters in one range, as one call did."""
        if net is not None and uses_batchnorm(net):
            return [(0, len(sizes))]
        shape = (engine.train.channels, *engine.train.image_size)
        pass_bytes = EMBED_CHUNK * math.prod(shape) * 4  # one pass's float images
        if net is None:
            width = math.prod(shape)
        else:  # its forward runs micro_batch rows at a time (embed_real)
            width = engine.embed_real(net, torch.zeros(1, *shape, device=engine.device)).shape[1]
            pass_bytes += engine.config.micro_batch * engine.row_bytes(net, False)
        rows_fit = max(1, (engine.memory_budget - pass_bytes) // (CLUSTER_BYTES_PER_FEATURE * width))
        chunks, c0, rows = [], 0, 0
        for c, n in enumerate(sizes):
            if c > c0 and rows + n > rows_fit:
                chunks.append((c0, c))
                c0, rows = c, 0
            rows += n
        return chunks + [(c0, len(sizes))]

    def cluster(self, engine, iteration: int) -> None:
        """Per-class K-means of the training images, class chunk by class chunk of `cluster_chunks` (one batched
        call per chunk, only the chunk's features held); the k-means++ draws of all classes are taken first, so
        any chunking gives the one-call result. Ids kept per training sample."""
        net = self.embedding_network(engine)
        labels, C, K = engine.train.labels.long(), engine.num_classes, self.args.k
        first, steps = kmeans_plusplus_draws(C, K, engine.generator)
        ids = torch.zeros(len(labels), dtype=torch.int64)
        for c0, c1 in self.cluster_chunks(engine, net, torch.bincount(labels, minlength=C).tolist()):
            rows = ((labels >= c0) & (labels < c1)).nonzero().squeeze(1)
            feats = self.embeddings(engine, net, rows)
            result = batched_kmeans(feats, (labels[rows] - c0).to(feats.device), c1 - c0, K,
                                    iters=self.args.kmeans_iters, draws=(first[c0:c1], steps[:, c0:c1]))
            ids[rows] = result.labels.cpu()
            del feats, result
        self.cluster_ids = ids
        self.clustered_at = iteration
        self.reclusters += 1

    # ---- the base method's outer iteration (GM: fresh network, inner steps, network training) -----------
    def begin_iteration(self, engine, iteration: int):
        if self.args.base == "gm" and self.needs_clustering(iteration):
            self.cluster(engine, iteration)
        return self.base.begin_iteration(engine, iteration)

    def inner_steps(self, engine) -> int:
        return self.base.inner_steps(engine)

    def compute_inner(self, engine, iteration: int, state, inner: int) -> MethodOutput:
        if self.args.base == "dm":
            return self.compute(engine, iteration)
        if self.cluster_ids is None:  # β = 0: GM's step, no clusters needed
            out = self.base.compute_inner(engine, iteration, state, inner)
            self._log(gm_loss=out.value)
            return out
        gm = self.base
        real_index, real_seg = engine.sample_real_index(engine.config.batch_real)  # GM's draws, in GM's order
        draw = gm.draw_match_augmentation(engine)
        select = gm.draw_selection(engine)
        grad, class_losses, losses, present = self.gm_match(engine, state.grads, real_index, real_seg, draw, select)
        objective, risk = robust_objective(class_losses, losses, present, self.args.alpha, self.args.beta)
        logs = {"gm_loss": class_losses.sum() / engine.num_classes, "cvar": risk.detach().sum(),
                "worst_cluster_loss": losses.masked_fill(~present, float("-inf")).max(),
                "empty_cells": (~present).sum()}
        self._log(**logs)
        return MethodOutput(grad=grad, value=objective / engine.num_classes,
                            sequential_by_class=gm.args.step_per_class, logs=logs)

    def after_step(self, engine, iteration: int, state, inner: int) -> None:
        self.base.after_step(engine, iteration, state, inner)

    def end_iteration(self, engine, iteration: int, state) -> dict:
        return self.base.end_iteration(engine, iteration, state)

    def gm_match(self, engine, grads, real_index, real_seg, draw, select):
        """GM's matching step with the robust objective: (∂ objective / ∂ images, L_c [C], L_{c,k} [C, K],
        present [C, K]); tables detached. The objective is a sum over classes (each class's CVaR is over its
        own clusters), so it is taken and differentiated per class chunk of gm.match_chunks: GM's real and
        synthetic gradients, plus the real gradients of the chunk's non-empty (class, cluster) cells, each
        compared with its class's synthetic one."""
        gm, a, C, K = self.base, self.args, engine.num_classes, self.args.k
        cell = real_seg.cpu() * K + self.cluster_ids[real_index.cpu()]
        cell_counts = torch.bincount(cell, minlength=C * K)
        present = cell_counts.view(C, K) > 0
        cell_counts = cell_counts.tolist()
        grad_images = torch.zeros_like(engine.syn.images.detach())
        class_losses, losses = torch.zeros(C, dtype=torch.float64), torch.zeros(C, K, dtype=torch.float64)

        def distance(r, s):
            return gradient_distance(fp32(r), fp32(s), gm.args.distance)
        for m in gm.match_chunks(engine, grads, real_index, real_seg, select, draw, grads_per_class=2 + K):
            chunk, (lo, hi) = m.chunk, m.span
            order = torch.argsort(cell[lo:hi], stable=True).to(m.real.device)  # the chunk's rows by cell
            cells = [c * K + k for c in chunk for k in range(K) if cell_counts[c * K + k]]
            with engine._autocast():
                g_cells = grads(m.real[order], m.real_y[order], [cell_counts[i] for i in cells], create_graph=False)
            per_class = torch.stack([distance(gr, gs) for gr, gs in zip(m.g_real, m.g_syn)])
            per_cell = torch.stack([distance(gr, m.g_syn[i // K - chunk[0]]) for i, gr in zip(cells, g_cells)])
            slots = torch.tensor([i - chunk[0] * K for i in cells], device=per_cell.device)
            table = per_cell.new_zeros(len(chunk) * K).index_put((slots,), per_cell).view(len(chunk), K)
            mask = present[chunk[0]:chunk[-1] + 1].to(table.device)
            objective, _ = robust_objective(per_class, table, mask, a.alpha, a.beta)
            grad_images[m.rows] = torch.autograd.grad(objective, m.x)[0].to(grad_images.dtype)
            class_losses[chunk[0]:chunk[-1] + 1] = per_class.detach().double().cpu()
            losses[chunk[0]:chunk[-1] + 1] = table.detach().double().cpu()
        return grad_images, class_losses, losses, present

    # ---- one step (base = dm) ---------------------------------------------------------------
    def compute(self, engine, iteration: int) -> MethodOutput:
        """The robust objective on DM's step (dm_step's draws and chunk plan), taken and differentiated class
        chunk by class chunk (dm_chunks): every class's term — its L_c and the CVaR over its own clusters —
        depends on that class's rows only, so the chunks' gradients sum to the one-pass gradient.
        β = 0 with kmeans is DM's own step."""
        a = self.args
        if self.needs_clustering(iteration):
            self.cluster(engine, iteration)
        if a.assignment == "kmeans" and self.cluster_ids is None:  # β = 0: DM, no clusters needed
            out = self.base.compute(engine, iteration)
            dm_loss = out.loss.detach()
            self._log(dm_loss=dm_loss)
            return dataclasses.replace(out, logs={**out.logs, "dm_loss": dm_loss})
        acc = GradientAccumulator(engine)
        sums, worst = [], []  # per chunk: [L_c sum, CVaR sum, empty cells]; worst present cell loss
        for b in dm_chunks(engine, dm_step(engine)):
            per_class = dm_class_losses(b.real_features, b.real_seg, b.syn_features, b.syn_seg, b.num_classes)
            losses, present = cluster_losses(b.real_features, b.real_seg, self.assign(engine, b), b.syn_features,
                                             b.syn_seg, b.num_classes, self.num_clusters(engine))
            objective, risk = robust_objective(per_class, losses, present, a.alpha, a.beta)
            acc.add(b.syn_rows, torch.autograd.grad(objective, b.syn_input)[0], objective)
            sums.append(torch.stack([per_class.detach().sum(), risk.detach().sum(), (~present).sum()]).double())
            worst.append(losses.detach().masked_fill(~present, float("-inf")).max())
        dm_loss, risk, empty = torch.stack(sums).sum(0).unbind()  # 0-d tensors: read lazily, no host sync
        logs = {"dm_loss": dm_loss, "cvar": risk, "worst_cluster_loss": torch.stack(worst).max(),
                "empty_cells": empty}
        self._log(**logs)
        return acc.output(**logs)

    def assign(self, engine, batch) -> torch.Tensor:
        """Cluster in [0, K) of every real row of a DM chunk."""
        if self.args.assignment == "kmeans":
            return to_device(self.cluster_ids[on_host(batch.real_index)], batch.real_seg.device)
        centroids = batch.syn_features.detach().to(batch.real_features.dtype)
        centroids = centroids.view(batch.num_classes, engine.syn.ipc, -1)
        return kmeans_assign(batch.real_features, centroids, batch.real_seg)[0]

    def _log(self, **values) -> None:
        """Running sums of the logged values; tensors stay on their device until `read_sums` (no sync per step)."""
        for key, value in values.items():
            value = value.detach().double() if torch.is_tensor(value) else float(value)
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.count += 1

    def read_sums(self) -> dict:
        """The running sums as floats (one host read per device holding some of them)."""
        by_device: dict = {}
        for key, value in self.sums.items():
            if torch.is_tensor(value):
                by_device.setdefault(value.device, []).append(key)
        for keys in by_device.values():
            self.sums.update(zip(keys, torch.stack([self.sums[key].reshape(()) for key in keys]).tolist()))
        return self.sums

    # ---- reporting and state ---------------------------------------------------------------
    def metrics(self, engine) -> dict:
        info = {**dataclasses.asdict(self.args), "clusters_per_class": self.num_clusters(engine),
                "reclusters": self.reclusters}
        if self.cluster_ids is not None:
            K = self.args.k
            cells = engine.train.labels.long() * K + self.cluster_ids
            info["cluster_sizes"] = torch.bincount(cells, minlength=engine.num_classes * K).view(-1, K).tolist()
        info.update({f"{key}_mean": value / max(self.count, 1) for key, value in self.read_sums().items()})
        out = {"robust": info, **(self.base.metrics(engine) if self.args.base == "gm" else {})}
        last = engine.history["evaluations"][-1] if engine.history["evaluations"] else {}
        table = {model: {key: s[key] for key in s if key == "mean" or key == "std" or key.startswith(
                 ("worst_", "mean_cluster", "accuracy_group_")) and key.endswith(("_mean", "_std"))}
                 for model, s in last.items() if isinstance(s, dict) and "worst_cluster_accuracy_mean" in s}
        if table:
            out["subpopulation_accuracy"] = table
        return out

    def state_dict(self) -> dict:
        return {"cluster_ids": self.cluster_ids, "clustered_at": self.clustered_at, "reclusters": self.reclusters,
                "sums": dict(self.read_sums()), "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.cluster_ids = state.get("cluster_ids")
        self.clustered_at = state.get("clustered_at", -1)
        self.reclusters = state.get("reclusters", 0)
        self.sums = dict(state.get("sums", {}))
        self.count = state.get("count", 0)
