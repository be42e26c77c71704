"""Per-class weight gradients of the CE loss for several classes in one forward/backward pass, and their distances."""
import torch
import torch.nn.functional as F
from torch import nn

from fastdd.models import uses_batchnorm

BATCHABLE = (nn.Conv2d, nn.Linear)


def matched_parameters(net: nn.Module, distance: str) -> list[tuple[str, nn.Parameter]]:
    """The parameters a distance compares: cos (DC's) every ≥2-D one (1-D ones add 0 in distance_wb), IDC the
    ≥3-D ones (IDC's defaults bias=False, fc=False skip 1-D and 2-D parameters)."""
    min_dim = 2 if distance == "cos" else 3
    return [(name, p) for name, p in net.named_parameters() if p.dim() >= min_dim]


def real_pass(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A real-rows pass as gm runs it (first-order: CE whose backward gives weight gradients); a `forward`
    for measuring activation bytes per row (engine.row_bytes)."""
    x = x.to(next(net.parameters()).dtype)
    return F.cross_entropy(net(x), torch.zeros(x.shape[0], dtype=torch.long, device=x.device))


def syn_pass(net: nn.Module, x: torch.Tensor, distance: str) -> tuple:
    """A synthetic-rows pass as gm runs it: the matched weight gradients with create_graph (for measuring)."""
    params = [p for _, p in matched_parameters(net, distance)]
    return torch.autograd.grad(real_pass(net, x), params, create_graph=True)


class ClassGradients:
    """grads(x, y, counts) -> one list of weight gradients per class segment, where x holds the classes'
    rows one segment after another (counts[i] rows each) and segment i's loss is CE mean over its rows.

    Batched path: one forward for all rows, one backward to the outputs of the matched Conv2d/Linear
    layers (every row's output gradient equals its own class loss's, as no layer mixes rows), then each
    class's weight gradient from its rows' (input, output-gradient) pairs. Exact for nets without
    BatchNorm; BN nets (batch statistics couple the rows) and layers other than Conv2d/Linear take one
    pass per class, which is the reference's per-class forward."""

    def __init__(self, net: nn.Module, params: list[tuple[str, nn.Parameter]]):
        self.net = net
        self.params = [p for _, p in params]
        owners = {id(m.weight): m for m in net.modules()
                  if isinstance(m, BATCHABLE) and isinstance(getattr(m, "weight", None), torch.Tensor)}
        self.modules = [owners.get(id(p)) for p in self.params]
        self.batched = not uses_batchnorm(net) and all(m is not None and _plain(m) for m in self.modules)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, counts: list[int], create_graph: bool):
        if not self.batched or len(counts) == 1:
            return self.per_class(x, y, counts, create_graph)
        return self.batched_grads(x, y, counts, create_graph)

    def per_class(self, x, y, counts, create_graph):
        out, start = [], 0
        for n in counts:
            loss = F.cross_entropy(self.net(x[start:start + n]), y[start:start + n])
            out.append(list(torch.autograd.grad(loss, self.params, create_graph=create_graph)))
            start += n
        return out

    def batched_grads(self, x, y, counts, create_graph):
        seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def hook(module, inputs, output):
            seen[id(module)] = (inputs[0], output)
        handles = [m.register_forward_hook(hook) for m in set(self.modules)]
        try:
            logits = self.net(x)
        finally:
            for h in handles:
                h.remove()
        weight = torch.cat([torch.full((n,), 1.0 / n, dtype=logits.dtype, device=logits.device) for n in counts])
        loss = (F.cross_entropy(logits, y, reduction="none") * weight).sum()
        pairs = [seen[id(m)] for m in self.modules]
        deltas = torch.autograd.grad(loss, [out for _, out in pairs], create_graph=create_graph)
        grads = [[] for _ in counts]
        for module, (inp, _), delta in zip(self.modules, pairs, deltas):
            start = 0
            for i, n in enumerate(counts):
                a, d = inp[start:start + n], delta[start:start + n]
                grads[i].append(_weight_grad(module, a, d))
                start += n
        return grads


def _plain(module: nn.Module) -> bool:
    if isinstance(module, nn.Conv2d):
        return module.padding_mode == "zeros" and not isinstance(module.padding, str)
    return True


def _weight_grad(module: nn.Module, a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.Conv2d):
        a = a.to(d.dtype)  # under autocast the hooked input may be fp32 while the output gradient is bf16
        return torch.nn.grad.conv2d_weight(a, module.weight.shape, d, module.stride, module.padding,
                                           module.dilation, module.groups)
    return d.reshape(-1, d.shape[-1]).t() @ a.reshape(-1, a.shape[-1])


def gradient_distance(real: list, syn: list, distance: str) -> torch.Tensor:
    """Σ over parameters: DC distance_wb (rows = output channels; 1-D parameters add 0), IDC MSE or L1."""
    total = syn[0].new_zeros(())
    for r, s in zip(real, syn):
        if distance == "idc":
            total = total + (r - s).square().sum()
        elif distance == "idc_l1":
            total = total + (r - s).abs().sum()
        elif r.dim() >= 2:  # cos
            r2, s2 = r.reshape(r.shape[0], -1), s.reshape(s.shape[0], -1)
            cos = (r2 * s2).sum(-1) / (r2.norm(dim=-1) * s2.norm(dim=-1) + 1e-6)
            total = total + (1 - cos).sum()
    return total


def fp32(grads: list) -> list:
    """Distances in at least fp32 (bf16-autocast gradients are upcast; fp32/fp64 ones kept)."""
    return [g.float() if g.dtype in (torch.bfloat16, torch.float16) else g for g in grads]


def segments(seg: torch.Tensor, num_classes: int) -> tuple[list[int], list[int]]:
    counts = torch.bincount(seg.cpu(), minlength=num_classes).tolist()
    starts = [sum(counts[:c]) for c in range(num_classes)]
    return counts, starts
