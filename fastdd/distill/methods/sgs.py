"""SGS / DGDD: per-domain DM gradients from one batched backward, spectral surgery and a diversity branch.

Update = g_base + λ_sh·g_sh + λ_div·g_div (methods.md, SGS). g_base is the base method's gradient (for
base=dm: DM on the POOLED source rows of the step, L = Σ_c ‖μ_real(c) − μ_syn(c)‖²); with balanced
sampling ∇L_DM = (1/D)·Σ_d ∇L_d exactly, so spectral_surgery's shared + specific = g_DM. With
λ_sh = λ_div = 0 the step IS the base method's step (same loss, same backward). Otherwise the base
loss, the diversity loss and the D per-domain losses L_d = Σ_c ‖μ_real(c, d) − μ_syn(c)‖² become
cotangents w.r.t. the synthetic FEATURES ([K, N, F]; the per-domain ones in closed form from ONE
mean_match call with real_to_syn), pulled back to the images by ONE batched VJP over the one
synthetic forward.
"""
import functools
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from fastdd.data.domains import DomainClassSampler, domain_index, source_domains
from fastdd.data.staging import to_device
from fastdd.distill.methods import sgs_data  # noqa: F401  (registers rotated-mnist, colored-mnist, domain-folder)
from fastdd.distill.methods.base import Method, MethodOutput, on_host
from fastdd.distill.methods.dm import GradientAccumulator, dm_chunks, dm_step
from fastdd.ops import mean_match, spectral_surgery
from fastdd.models.registry import unfused_if_convnet

SAMPLINGS = ("balanced", "pooled")
BACKWARDS = ("auto", "vmap", "func", "loop")


@dataclass
class SGSArgs:
    lambda_sh: float = 1.0      # weight of the cross-domain shared gradient
    lambda_div: float = 100.0   # weight of the diversity gradient (benchmarks/results/sgs_lambda_div.json)
    tau: float = 0.5            # hard-mask threshold on the agreement a(k)
    gamma: Any = None           # None: hard mask 1[a >= tau]; a number > 0: soft mask a**gamma
    eps: float = 1e-12
    holdout_domain: Any = None  # its name; the train set must not contain it (the builders drop it)
    base: str = "dm"            # DM-based method whose gradient SGS augments
    base_args: dict = field(default_factory=dict)
    sampling: str = "balanced"  # balanced: batch_real // D rows per (class, domain); pooled: DM's sampler
    backward: str = "auto"      # vmap: autograd is_grads_batched; func: torch.func vjp+vmap; loop: K passes;
                                # auto: loop on the CPU (measured 0.24x vmap's step memory, no slower), vmap on CUDA


def domain_cotangents(real_features, real_cls, real_dom, syn_features, syn_seg, num_classes, num_domains):
    """Per-(class, domain) losses [C, D] and dL_d/d syn_features [D, N, F] in closed form:
    row i of class c gets −2·(μ_real(c, d) − μ_syn(c)) / n_syn(c)."""
    C, D = num_classes, num_domains
    seg = real_cls.to(real_features.device) * D + real_dom.to(real_features.device)
    real_to_syn = torch.arange(C * D, device=seg.device) // D
    loss, diff = mean_match(real_features, seg, syn_features.detach(), syn_seg, C * D, real_to_syn, return_diff=True)
    n_syn = class_counts(syn_seg, C, diff.dtype).clamp_min(1)
    cot = diff.view(C, D, -1)[syn_seg] * (-2.0 / n_syn[syn_seg])[:, None, None]
    return loss.view(C, D), cot.transpose(0, 1)


def class_counts(seg: torch.Tensor, num_classes: int, dtype=torch.float32) -> torch.Tensor:
    """[C] rows per class, without bincount's host read of the maximum."""
    return torch.zeros(num_classes, dtype=dtype, device=seg.device).index_add_(
        0, seg, torch.ones(seg.shape, dtype=dtype, device=seg.device))


def diversity_loss(features: torch.Tensor, seg: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Mean over classes with >= 2 images of the mean pairwise cosine similarity of their embeddings."""
    per_class, valid = diversity_class_terms(features, seg, num_classes)
    return per_class.sum() / valid.sum().clamp_min(1)


def diversity_class_terms(features: torch.Tensor, seg: torch.Tensor, num_classes: int):
    """([C] mean pairwise cosine similarity per class (0 without pairs), [C] 1 where a class has >= 2 images)."""
    f = F.normalize(features if features.dtype == torch.float64 else features.float(), dim=1)
    gram = f @ f.T
    same = (seg[:, None] == seg[None, :]) & ~torch.eye(len(seg), dtype=torch.bool, device=seg.device)
    sums = torch.zeros(num_classes, dtype=f.dtype, device=f.device).index_add(0, seg, (gram * same).sum(1))
    n = class_counts(seg, num_classes, f.dtype)
    valid = (n >= 2).to(f.dtype)  # counted, not indexed: the number of valid classes stays on the device
    per_class = sums / (n * (n - 1)).clamp_min(1)  # classes with < 2 images have no pairs: sums = 0
    return per_class, valid


class SGS(Method):
    name = "sgs"
    Args = SGSArgs

    def __init__(self, args: dict | None = None):
        super().__init__(args)
        a = self.args
        for key in ("lambda_sh", "lambda_div"):
            value = getattr(a, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"sgs: {key} must be a number >= 0, got {value!r}")
        if a.sampling not in SAMPLINGS:
            raise ValueError(f"sgs: sampling must be one of {', '.join(SAMPLINGS)}; got {a.sampling!r}")
        if a.backward not in BACKWARDS:
            raise ValueError(f"sgs: backward must be one of {', '.join(BACKWARDS)}; got {a.backward!r}")
        from fastdd.reference.spectral_surgery import check_mask_args
        check_mask_args("sgs", a.tau, a.gamma, a.eps)
        from fastdd.distill.methods import build_method
        if a.base == "sgs":
            raise ValueError("sgs: base must be a DM-based method other than sgs")
        self.base = build_method(a.base, a.base_args or None)
        self.base_loss = getattr(self.base, "loss_from_batch", None)
        if self.base_loss is None:
            raise ValueError(f"sgs: base method {a.base!r} exposes no loss_from_batch(engine, batch); SGS wraps "
                             f"dm or a method that does")
        self.plain = a.lambda_sh == 0 and a.lambda_div == 0
        self.trace: list[dict] = []

    def lr_for(self, ipc: int) -> float:
        return self.base.lr_for(ipc)

    def prepare(self, engine) -> None:
        train = engine.train
        self.holdout = None
        if self.args.holdout_domain is not None:
            self.holdout = domain_index(train, self.args.holdout_domain)
            leaked = int((train.domains == self.holdout).sum())
            if leaked:
                raise ValueError(f"sgs: the train set holds {leaked} samples of the held-out domain "
                                 f"{self.args.holdout_domain!r}; pass the source part (leave_one_domain_out, or "
                                 f"the rotated-mnist / colored-mnist builders)")
        self.sources = source_domains(train)
        self.D = len(self.sources)
        self.position = torch.full((len(train.domain_names),), -1, dtype=torch.int64)
        self.position[torch.tensor(self.sources)] = torch.arange(self.D)
        self.sampler = DomainClassSampler(train.labels, train.domains, engine.num_classes, self.sources)
        self.n_per_group = max(1, engine.config.batch_real // self.D)
        self.base.prepare(engine)

    # ---- one step ------------------------------------------------------------------------
    def step_chunks(self, engine, batched: bool, single_chunk: bool = False):
        """Per class chunk: (batch, backward(cot [K, n, F]) -> [K, *rows' shape]); generator use as DM's."""
        a = self.args
        mode = a.backward if a.backward != "auto" else ("loop" if engine.device.type == "cpu" else "vmap")
        index = cls = None
        if a.sampling == "balanced":
            index, cls, _ = self.sampler.sample(self.n_per_group, generator=engine.generator)
            cls = to_device(cls, engine.device)
        # a batched backward (vmap, func) pulls back every cotangent at once: the plan counts them per row
        k = 1 + bool(a.lambda_div) + self.D * bool(a.lambda_sh) if batched and mode != "loop" else 1
        if not batched or mode != "func":
            def backward(batch, cot):
                if mode == "loop":
                    return torch.stack([torch.autograd.grad(batch.syn_features, batch.syn_input, c,
                                                            retain_graph=True)[0] for c in cot])
                return torch.autograd.grad(batch.syn_features, batch.syn_input, cot, is_grads_batched=True)[0]
            for batch in dm_chunks(engine, dm_step(engine, index, cls, single_chunk, k)):
                yield batch, functools.partial(backward, batch)
            return
        # torch.func cannot transform through the fused norm_act_pool autograd: build the unfused ConvNet
        # (same parameters and generator use, numerically equal within float tolerance).
        step = dm_step(engine, index, cls, single_chunk, k, **unfused_if_convnet(engine.config.model))
        vjps = []

        def embed_syn(x, seg):
            feats, vjp = torch.func.vjp(lambda s: engine.embed(step.net, engine.augment(s, seg, step.draw)), x.detach())
            vjps.append(vjp)
            return feats.detach().requires_grad_(True)
        for batch in dm_chunks(engine, step, embed_syn):
            vjp = vjps.pop()
            yield batch, lambda cot, vjp=vjp: torch.func.vmap(vjp)(cot)[0]

    def _forward(self, engine, batched: bool):
        """(batch, backward) of all classes as one chunk (benchmarks and tests compare against it)."""
        return next(self.step_chunks(engine, batched, single_chunk=True))

    def domain_of(self, engine, real_index):
        return to_device(self.position[engine.train.domains[on_host(real_index)]], engine.device)

    def compute(self, engine, iteration: int) -> MethodOutput:
        """Class chunk by class chunk (every term is class-separable: the base and per-domain losses are sums over
        classes, the diversity term a sum over classes over a count fixed by the synthetic layout, the spectral
        surgery per image): each chunk's update goes into its rows; logs are summed over chunks."""
        a, C, D = self.args, engine.num_classes, self.D
        acc = GradientAccumulator(engine)
        sums: dict = {}

        def add(key, value):
            sums[key] = value if key not in sums else sums[key] + value
        valid = (class_counts(engine.syn.seg, C) >= 2).float().sum().clamp_min(1)  # classes with pairs, on the device
        spectra = 0
        for batch, backward in self.step_chunks(engine, batched=not self.plain):
            k = batch.num_classes
            real_dom = self.domain_of(engine, batch.real_index)
            loss = self.base_loss(engine, batch)
            feats = batch.syn_features
            if self.plain:  # λ_sh = λ_div = 0: exactly the base method's step
                with torch.no_grad():
                    per_cd, _ = domain_cotangents(batch.real_features, batch.real_seg, real_dom, feats,
                                                  batch.syn_seg, k, D)
                acc.add(batch.syn_rows, torch.autograd.grad(loss, batch.syn_input)[0], loss)
                add("domain_losses", per_cd.sum(0))
                continue
            rows = [torch.autograd.grad(loss, feats, retain_graph=True)[0]]
            if a.lambda_div:
                div = diversity_class_terms(feats, batch.syn_seg, k)[0].sum() / valid
                rows.append(torch.autograd.grad(div, feats, retain_graph=True)[0])
                add("diversity", div.detach())
            per_cd, cot_dom = domain_cotangents(batch.real_features, batch.real_seg, real_dom, feats, batch.syn_seg,
                                                k, D)
            cot = torch.cat([torch.stack(rows), cot_dom.to(feats.dtype)]) if a.lambda_sh else torch.stack(rows)
            grads = backward(cot)  # ONE batched VJP: [1 (+1) (+D), n, ch, H, W]
            update = grads[0].clone()
            add("domain_losses", per_cd.sum(0).detach())  # logs stay tensors: no host read in the step
            if a.lambda_div:
                update += a.lambda_div * grads[1]
            if a.lambda_sh:
                shared, _, agreement = spectral_surgery(grads[-D:].detach(), a.tau, a.gamma, a.eps,
                                                        return_agreement=True)
                update += a.lambda_sh * shared
                add("agreement", agreement.sum().detach())
                spectra += agreement.numel()
                add("shared_sq", shared.square().sum().detach())
                add("mean_sq", grads[-D:].mean(0).square().sum().detach())
            acc.add(batch.syn_rows, update, loss)
        logs = {"domain_losses": sums["domain_losses"]}
        if self.plain:
            return acc.output(**logs)
        if a.lambda_div:
            logs["diversity"] = sums["diversity"]
        if a.lambda_sh:
            logs["agreement"] = sums["agreement"] / spectra
            logs["shared_norm_ratio"] = sums["shared_sq"].sqrt() / sums["mean_sq"].sqrt().clamp_min(1e-30)
        self.trace.append({k: v for k, v in logs.items() if k != "domain_losses"})
        return MethodOutput(grad=acc.grad, value=acc.loss, logs=logs)

    # ---- reporting and state ---------------------------------------------------------------
    def read_trace(self) -> list[dict]:
        """The trace with its tensors copied to the host (one read per call)."""
        keys = [(i, k) for i, t in enumerate(self.trace) for k, v in t.items() if torch.is_tensor(v)]
        if keys:
            values = torch.stack([self.trace[i][k].double().reshape(()) for i, k in keys]).tolist()
            for (i, k), value in zip(keys, values):
                self.trace[i][k] = value
        return self.trace

    def metrics(self, engine) -> dict:
        train = engine.train
        out = {"sgs": {**self.args.__dict__, "source_domains": [train.domain_names[d] for d in self.sources],
                       "holdout_domain": None if self.holdout is None else train.domain_names[self.holdout]}}
        for key in ("agreement", "shared_norm_ratio", "diversity"):
            values = [t[key] for t in self.read_trace() if key in t]
            if values:
                out["sgs"][f"{key}_mean"] = sum(values) / len(values)
        table = domain_table(engine.history["evaluations"][-1] if engine.history["evaluations"] else {})
        if table:
            out["domain_generalization"] = table
        return out

    def state_dict(self) -> dict:
        return {"trace": [dict(t) for t in self.read_trace()], "base": self.base.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.trace = list(state.get("trace", []))
        self.base.load_state_dict(state.get("base", {}))


def domain_table(evaluation: dict) -> dict:
    """{model: {ood: {mean, std}, id: {mean, std}, per_domain: {name: mean}}} from one evaluation entry."""
    table = {}
    for model, summary in evaluation.items():
        if not isinstance(summary, dict) or "ood_accuracy_mean" not in summary:
            continue
        table[model] = {
            "ood": {"mean": summary["ood_accuracy_mean"], "std": summary["ood_accuracy_std"]},
            "id": {"mean": summary["id_accuracy_mean"], "std": summary["id_accuracy_std"]},
            "per_domain": {k[len("accuracy_domain_"):-len("_mean")]: v for k, v in summary.items()
                           if k.startswith("accuracy_domain_") and k.endswith("_mean")}}
    return table
