"""DM (distribution matching) as an engine plug-in: all classes in one pass, loss = Σ_c ‖μ_real − μ_syn‖²."""
from dataclasses import dataclass

import torch

from fastdd.ops import mean_match
from fastdd.distill.methods.base import Method, MethodOutput


@dataclass
class DMBatch:
    real_features: torch.Tensor   # [M, F], no grad
    real_seg: torch.Tensor        # [M] class id of each real row
    real_index: torch.Tensor      # [M] index into the training set
    syn_features: torch.Tensor    # [N, F], with grad to the synthetic images
    syn_seg: torch.Tensor         # [N]
    net: torch.nn.Module


def dm_batch(engine, real_index=None, real_seg=None) -> DMBatch:
    """Fresh frozen network, real images of every class, one siamese DSA draw per class, embeddings."""
    net = engine.new_network()
    if real_index is None:
        real_index, real_seg = engine.sample_real_index(engine.config.batch_real)
    draw = engine.draw_augmentation()
    real = engine.augment(engine.real_images(real_index), real_seg, draw)
    syn = engine.augment(engine.syn.images, engine.syn.seg, draw)
    real_features = engine.embed_real(net, real)
    syn_features = engine.embed(net, syn)
    return DMBatch(real_features, real_seg, real_index, syn_features, engine.syn.seg, net)


class DM(Method):
    name = "dm"
    default_lr = 1.0

    def lr_for(self, ipc: int) -> float:
        return 10.0 if ipc >= 100 else 1.0

    def compute(self, engine, iteration: int) -> MethodOutput:
        b = dm_batch(engine)
        per_class = mean_match(b.real_features, b.real_seg, b.syn_features, b.syn_seg, engine.num_classes)
        return MethodOutput(loss=per_class.sum())
