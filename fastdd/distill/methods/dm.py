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


def dm_class_losses(real_features, real_seg, syn_features, syn_seg, num_classes: int) -> torch.Tensor:
    """[C]: ‖μ_real(c) − μ_syn(c)‖² per class from ONE mean_match call (the single DM-loss helper of the package;
    DM's loss is its sum). real_seg may live on the CPU (samplers draw there)."""
    real_seg = real_seg.to(real_features.device)
    return mean_match(real_features, real_seg, syn_features, syn_seg, num_classes)


def dm_loss(batch: DMBatch, num_classes: int) -> torch.Tensor:
    """DM's loss Σ_c ‖μ_real(c) − μ_syn(c)‖² of one batch."""
    return dm_class_losses(batch.real_features, batch.real_seg, batch.syn_features, batch.syn_seg, num_classes).sum()


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
    return DMBatch(real_features, real_seg, real_index, syn_features, engine.syn.seg)


class DM(Method):
    name = "dm"

    def lr_for(self, ipc: int) -> float:
        return 10.0 if ipc >= 100 else 1.0

    def loss_from_batch(self, engine, batch: DMBatch) -> torch.Tensor:
        return dm_loss(batch, engine.num_classes)

    def compute(self, engine, iteration: int) -> MethodOutput:
        return MethodOutput(loss=self.loss_from_batch(engine, dm_batch(engine)))
