"""Class-parallel distillation on torch.distributed: class shards, lazy loss reduction, row gathers, checks."""
import datetime
import hashlib
import json
import os

import torch
import torch.distributed as dist

from fastdd.distill.memory import ChunkPlan


class RankFailure(RuntimeError):
    """A collective failed: another rank died, or timed out (bounded by config key dist_timeout)."""


class PeerError(ValueError):
    """The run was stopped because of another rank's error (reported there; rank 0 reports mismatches)."""


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_rank_zero() -> bool:
    """True in a single process and on rank 0 (whether or not the process group exists yet)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def balanced_range(num_classes: int, rank: int, world_size: int) -> range:
    """Rank `rank`'s contiguous class range: sizes differ by at most one."""
    return range(rank * num_classes // world_size, (rank + 1) * num_classes // world_size)


class ClassShard:
    """This rank's place in the process group and its class range; every collective the engine needs."""

    def __init__(self, rank: int, world_size: int, num_classes: int, device: torch.device):
        if world_size > num_classes:
            raise ValueError(f"{world_size} ranks for {num_classes} classes: every rank needs a class "
                             f"(launch at most {num_classes} processes)")
        self.rank, self.world_size, self.device = rank, world_size, device
        self.num_classes = num_classes
        self.classes = balanced_range(num_classes, rank, world_size)
        # NCCL reduces CUDA tensors; gloo host tensors
        self.comm_device = device if dist.get_backend() == "nccl" else torch.device("cpu")

    def restrict(self, plan: ChunkPlan) -> ChunkPlan:
        """The plan's chunks cut to this rank's classes (classes outside contribute nothing here)."""
        lo, hi = self.classes.start, self.classes.stop
        chunks = [[c for c in chunk if lo <= c < hi] for chunk in plan.class_chunks]
        return ChunkPlan([c for c in chunks if c], plan.real_rows_per_pass)

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (float64), on the host."""
        out = values.detach().double().to(self.comm_device)
        _guard(dist.all_reduce, out)
        return out.cpu()

    def sync_rows(self, tensors, ipc: int) -> None:
        """In place: each class's rows (class-major, `ipc` per class) of every tensor copied from its owner."""
        for owner in range(self.world_size):
            span = balanced_range(self.num_classes, owner, self.world_size)
            for t in tensors:
                if t is None:
                    continue
                rows = t.detach()[span.start * ipc:span.stop * ipc]
                buffer = rows.to(self.comm_device).contiguous()
                _guard(dist.broadcast, buffer, src=owner)
                if buffer.data_ptr() != rows.data_ptr():
                    rows.copy_(buffer)

    def gather_objects(self, value) -> list:
        out = [None] * self.world_size
        _guard(dist.all_gather_object, out, value)
        return out

    def check_same(self, fingerprint: dict) -> None:
        """Stop every rank with one error (raised as ValueError on rank 0) when the ranks' fingerprints differ."""
        prints = self.gather_objects(fingerprint)
        differing = sorted({k for p in prints for k in set(p) | set(prints[0]) if p.get(k) != prints[0].get(k)})
        if not differing:
            return
        ranks = [r for r, p in enumerate(prints) if p != prints[0]]
        message = (f"ranks {ranks} disagree with rank 0 on {', '.join(differing)}: every rank must run the same "
                   f"config on the same data (same prepared shards)")
        raise ValueError(message) if self.rank == 0 else PeerError(message)

    def evaluate(self, images, labels, test, models, num_models: int, epochs: int, seed: int, device,
                 extra_metrics=None) -> dict:
        """evaluate_synthetic's result with model run i of each architecture trained on rank i % world_size
        (seed + i, as there); every rank gets the gathered result."""
        from fastdd.evaluate.protocol import summarise, train_and_evaluate
        from fastdd.models import resolve_model_name
        names = [resolve_model_name(m, tuple(images.shape[2:])) for m in models]
        mine = {(name, i): train_and_evaluate(images, labels, test, model=name, epochs=epochs, seed=seed + i,
                                              augment="dsa", device=device, extra_metrics=list(extra_metrics or ()))
                for name in names for i in range(num_models) if i % self.world_size == self.rank}
        runs = {}
        for part in self.gather_objects(mine):
            runs.update(part)
        return {name: summarise([runs[(name, i)] for i in range(num_models)]) for name in names}


def _guard(collective, *args, **kwargs):
    try:
        return collective(*args, **kwargs)
    except RuntimeError as error:
        raise RankFailure(f"a collective failed: another rank stopped or timed out ({str(error).splitlines()[0]}); "
                          f"the last checkpoint is intact") from error


def setup(config, num_classes: int) -> tuple[ClassShard | None, torch.device | None]:
    """With WORLD_SIZE > 1 in the environment (torchrun): the process group (NCCL for CUDA on
    cuda:LOCAL_RANK, gloo otherwise) with a bounded timeout, and this rank's shard; else (None, None)."""
    if world_size_from_env() <= 1:
        return None, None
    from fastdd.distill.engine import resolve_device
    device = resolve_device(config.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=float(getattr(config, "dist_timeout", 300)))
        try:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
        except RuntimeError as error:  # a rank that never joins: the rendezvous times out
            raise RankFailure(f"not every rank joined the process group within {timeout.total_seconds():.0f} s "
                              f"(config key dist_timeout): {str(error).splitlines()[0]}") from error
    return ClassShard(dist.get_rank(), dist.get_world_size(), num_classes, device), device


def shutdown(clean: bool = True) -> None:
    """Leave the process group. After a clean run every rank first meets at a barrier: a gloo rank that tears
    down while a peer still talks to it aborts the process (SIGABRT). After a failure there is no barrier (the
    peer may be gone; waiting would only add dist_timeout)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if clean:
            _guard(dist.barrier)
    finally:
        dist.destroy_process_group()


def fingerprint(config, train) -> dict:
    """What must agree across ranks: the config (minus rank-specific keys), the data's name, shape, label and
    sampled-pixel checksums."""
    settings = {k: v for k, v in config.to_dict().items() if k not in ("device", "progress")}
    labels = torch.as_tensor(train.labels).to(torch.int64).cpu().contiguous()
    stride = max(1, len(train) // 64)
    pixels = torch.as_tensor(train.images[::stride]).cpu().contiguous()
    return {**{f"config key {k!r}": json.dumps(v, sort_keys=True, default=str) for k, v in settings.items()},
            "dataset": train.name, "size": [len(train), train.num_classes, train.channels, *train.image_size],
            "labels": hashlib.sha256(labels.numpy().tobytes()).hexdigest(),
            "pixels": hashlib.sha256(pixels.numpy().tobytes()).hexdigest()}
