"""The distillation engine: owns the synthetic set, optimiser, RNG, loop, evaluation, checkpoints and logs."""
import contextlib
import os
import time

import torch

from fastdd.augment import SiameseAugment
from fastdd.data import ClassSampler, ImageDataset
from fastdd.data.staging import RealStager, module_to_device, to_device
from fastdd.distill import artifacts, checkpoint, distributed
from fastdd.distill.checkpoint import CHECKPOINT  # noqa: F401 (the CLI's name for it)
from fastdd.distill.config import DistillConfig
from fastdd.distill.memory import (GRAD_ROW_OVERHEAD, ChunkPlan, activation_bytes_per_row, plan_chunks,
                                   release_freed_memory, resolve_budget)
from fastdd.distill.methods import build_method
from fastdd.distill.methods.base import on_host
from fastdd.distill.synthetic import (SyntheticRows, SyntheticSet, clamp_to_pixels, lookahead_coefficients,
                                      pixel_step_scale, plain_sgd_group, sequential_class_update)
from fastdd.determinism import is_deterministic, set_deterministic
from fastdd.models import get_model, resolve_model_name, uses_batchnorm
from fastdd.sync import host_only

PROGRESS_EVERY = 25  # iterations between progress-bar loss reads (each one waits for the device)


def check_deterministic(config: DistillConfig, device: torch.device) -> None:
    """deterministic=true on CUDA cannot differentiate DSA's scale/rotate (grid_sample has no deterministic
    CUDA backward): refuse the combination up front instead of failing mid-run."""
    ops = set((config.dsa_strategy or "").split("_"))
    if config.deterministic and device.type == "cuda" and ops & {"scale", "rotate"}:
        raise ValueError("config key 'deterministic'=true on CUDA needs a dsa_strategy without scale and rotate "
                         f"(grid_sample's CUDA backward is not deterministic); got {config.dsa_strategy!r}")


# CPU real forwards: about this many pixels per micro-batch keep a 128-channel full-resolution activation near
# 8 MiB, under glibc's mmap threshold, so its buffer is reused instead of page-faulted in every pass
# (dm at MNIST shape: 1.65x the 256-row micro-batch; benchmarks/results/cpu_defaults.json).
CPU_MICRO_BATCH_PIXELS = 16 * 1024


def resolve_layout(config, device: torch.device, image_size, method) -> tuple[bool, int]:
    """channels_last and micro_batch with "auto" made concrete for `device`, the images' size and the method."""
    channels_last = config.channels_last
    if channels_last == "auto":
        channels_last = device.type == "cpu" and bool(getattr(method, "channels_last_cpu", False))
    micro_batch = config.micro_batch
    if micro_batch == "auto":
        pixels = int(image_size[0]) * int(image_size[1])
        micro_batch = max(2, CPU_MICRO_BATCH_PIXELS // pixels) if device.type == "cpu" else 256
    return channels_last, micro_batch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Distiller:
    """Runs `config.method` on `train`; `test` is used for evaluation points."""

    def __init__(self, config: DistillConfig, train: ImageDataset, test: ImageDataset | None = None,
                 out_dir: str | None = None, method=None, evaluators=()):
        # "auto" names become the references' ConvNet depth for the resolution (recorded in the saved config)
        config.model = resolve_model_name(config.model, train.image_size)
        config.eval_models = [resolve_model_name(m, train.image_size) for m in config.eval_models]
        self.config = config
        check_deterministic(config, resolve_device(config.device))
        if config.deterministic or is_deterministic():  # (a user's own torch settings are left alone)
            set_deterministic(config.deterministic)  # before CUDA work: cuBLAS reads its workspace setting once
        self.train, self.test = train, test
        self.out_dir = out_dir
        self.num_classes = train.num_classes
        # under torchrun (WORLD_SIZE > 1): this rank's class shard (None: one process owns every class)
        self.shard, device = distributed.setup(config, train.num_classes)
        self.device = device or resolve_device(config.device)
        if self.shard is not None:
            self.shard.check_same(distributed.fingerprint(config, train))
        self.method = method if method is not None else build_method(config.method, config.method_args)
        config.channels_last, config.micro_batch = resolve_layout(config, self.device, train.image_size,
                                                                  self.method)
        self.evaluators = list(evaluators)  # extra_metrics callables for the evaluation protocol
        self.generator = torch.Generator().manual_seed(config.seed)
        self.sampler = ClassSampler(train.labels, train.num_classes)
        self.stager = RealStager(train, self.device) if self.device.type == "cuda" else None  # pinned staging
        self.augmenter = SiameseAugment(config.dsa_strategy) if config.dsa_strategy else None
        self.synthetic = SyntheticSet.initialise(train, config.ipc, config.init, self.generator, self.device)
        self.active_rows: torch.Tensor | None = None  # a segment of the synthetic set (None: all rows)
        self._active_view = None
        self.real_pool: torch.Tensor | None = None    # training indices real data is drawn from (None: all)
        self.pixel_space = bool(getattr(self.method, "pixel_space", False))
        self.lr = config.lr_img if config.lr_img is not None else self.method.lr_for(config.ipc)
        self.optimizer = torch.optim.SGD([self.synthetic.images], lr=self.lr, momentum=config.momentum)
        self.iteration = 0
        self.history: dict = {"loss": [], "evaluations": [], "seconds": 0.0}  # loss: floats, or 0-dim tensors
        self._losses_read = 0  # history["loss"][:_losses_read] are floats (see read_losses)
        self._prepared = False
        self._callback = None
        self.memory_budget = resolve_budget(config.memory_budget, self.device)  # bytes for activations
        self._row_bytes: dict = {}  # (model, grad, forward) -> activation bytes per input row
        if self.writes:
            artifacts.remove_stale_temps(out_dir)

    @property
    def writes(self) -> bool:
        """Whether this process writes the run's files (rank 0 of a class-parallel run)."""
        return bool(self.out_dir) and (self.shard is None or self.shard.rank == 0)

    def sync_synthetic(self) -> None:
        """Class-parallel runs: every rank's copy of the synthetic set (images and their momentum) made whole
        from each class's owner, i.e. equal to the one-process state (other ranks' rows go stale in between)."""
        if self.shard is not None:
            buf = self.optimizer.state.get(self.synthetic.images, {}).get("momentum_buffer")
            self.shard.sync_rows([self.synthetic.images, buf], self.synthetic.ipc)

    @property
    def syn(self):
        """The synthetic rows methods work on: the whole set, or the active segment's rows."""
        return self.synthetic if self._active_view is None else self._active_view

    def set_active(self, rows: torch.Tensor | None, ipc: int | None = None, pool: torch.Tensor | None = None):
        """Restrict methods to synthetic `rows` (`ipc` per class) and real sampling to `pool` (None: all)."""
        self.active_rows = rows
        self._active_view = None if rows is None else SyntheticRows(self.synthetic, rows, ipc)
        self.real_pool = pool

    # ---- pieces methods compose -------------------------------------------------------------
    def new_network(self, model: str | None = None, num_classes: int | None = None, **overrides) -> torch.nn.Module:
        """A freshly initialised network, seeded from the engine's generator (global RNG untouched)."""
        with host_only():  # a CPU-generator draw: no device involved
            seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = get_model(model or self.config.model, self.train.channels, num_classes or self.num_classes,
                            self.train.image_size, **overrides)
        # Built on the CPU: a CUDA build would draw its weights from the CUDA generator (other values than the
        # CPU build of the same seed); moved with one pinned non_blocking copy per dtype.
        if self.shard is not None and uses_batchnorm(net):
            raise ValueError(f"model {model or self.config.model!r} uses BatchNorm, whose batch statistics couple "
                             f"classes held by different ranks: class-parallel runs need a model without "
                             f"BatchNorm (e.g. ConvNet), or one process")
        net = module_to_device(net, self.device)
        if self.config.channels_last:
            net = net.to(memory_format=torch.channels_last)
        net.train()
        for p in net.parameters():
            p.requires_grad_(False)
        return net

    def sample_real_index(self, n_per_class: int, pool: torch.Tensor | None = None):
        """Up to n random real indices of every class in one call -> (index [M], class seg [M]), drawn from
        `pool` (and the engine's real_pool when one is set)."""
        if self.real_pool is not None:
            pool = self.real_pool if pool is None else pool[torch.isin(pool, self.real_pool)]
        if pool is None:
            idx, seg = self.sampler.sample(n_per_class, generator=self.generator)
        else:
            idx, seg = ClassSampler(self.train.labels[pool], self.num_classes).sample(n_per_class,
                                                                                      generator=self.generator)
            idx = pool[idx]
        return idx, to_device(seg, self.device)

    def real_images(self, index: torch.Tensor) -> torch.Tensor:
        x = self.train.normalize(self.train.images[on_host(index)], device=self.device)
        return x.contiguous(memory_format=torch.channels_last) if self.config.channels_last else x

    def real_passes(self, index: torch.Tensor, bounds: list[tuple[int, int]]):
        """Normalised real rows index[lo:hi] for each (lo, hi) of `bounds`, in order: real_images per pass, or on
        CUDA through pinned staging (the next pass's copy overlapping the caller's compute), with equal values."""
        if self.stager is None:
            index = on_host(index)
            for lo, hi in bounds:
                yield self.real_images(index[lo:hi])
            return
        for x in self.stager.passes(index, bounds):
            yield x.contiguous(memory_format=torch.channels_last) if self.config.channels_last else x

    def row_bytes(self, net, grad: bool, forward=None, key=None) -> int:
        """Activation bytes one input row costs `net` (measured once per model/grad/forward `key`)."""
        key = (type(net).__name__, getattr(net, "name", None), grad, key)
        if key not in self._row_bytes:
            sample = torch.zeros(1, self.train.channels, *self.train.image_size, device=self.device)
            self._row_bytes[key] = activation_bytes_per_row(net, sample, grad, forward)
        return self._row_bytes[key]

    def grad_row_bytes(self, net, forward=None, key=None, cotangents: int = 1) -> int:
        """What one gradient-carrying row costs at peak: its saved tensors ×GRAD_ROW_OVERHEAD (the backward's
        activation gradients, the augmentation's copies), plus one largest layer per extra cotangent."""
        grad_bytes = int(GRAD_ROW_OVERHEAD * self.row_bytes(net, True, forward, key))
        if cotangents > 1:
            grad_bytes += (cotangents - 1) * self.row_bytes(net, False, forward, key)
        return grad_bytes

    def chunk_plan(self, net, rows_per_class: list[int], real_rows_per_class: list[int], grad_real: bool = False,
                   forward=None, key=None, reserved: int = 0, cotangents: int = 1) -> ChunkPlan:
        """Consecutive class chunks whose gradient-carrying rows fit `memory_budget` (one chunk when all fit),
        and how many real rows one forward may take; rows_per_class counts the inputs that carry gradients.
        cotangents > 1: a batched backward pulls that many back at once, each extra one costing a row the
        gradient of the largest layer (its input + output, as a no-grad pass holds)."""
        grad_bytes = self.grad_row_bytes(net, forward, key, cotangents)
        real_bytes = self.row_bytes(net, grad_real, forward, key)
        plan = plan_chunks(self.memory_budget, rows_per_class, grad_bytes, real_rows_per_class, real_bytes, reserved)
        return plan if self.shard is None else self.shard.restrict(plan)  # this rank's classes only

    def draw_augmentation(self):
        if self.augmenter is None:
            return None
        return self.augmenter.draw(self.num_classes, self.train.image_size, generator=self.generator,
                                   device=self.device)

    def augment(self, x: torch.Tensor, group: torch.Tensor, draw) -> torch.Tensor:
        if draw is None:
            return x
        return self.augmenter.apply(x, group.to(x.device), draw)

    def _autocast(self):
        if self.config.autocast_bf16 and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def embed(self, net, x: torch.Tensor) -> torch.Tensor:
        if self.config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            return net.embed(x).float()

    def embed_real(self, net, x: torch.Tensor) -> torch.Tensor:
        """Real embeddings under no_grad in micro-batches (one pass for BN nets: batch statistics)."""
        step = x.shape[0] if uses_batchnorm(net) else self.config.micro_batch
        with torch.no_grad():
            return torch.cat([self.embed(net, x[i:i + step]) for i in range(0, x.shape[0], step)])

    def image_step(self, loss: torch.Tensor | None = None, grad: torch.Tensor | None = None):
        """One optimiser step on the synthetic images from `loss` (backpropagated) and/or `grad` (shaped like
        `syn.images`, i.e. the active rows); in pixel space the gradient is scaled by 1/std² per channel.
        Returns the detached loss tensor (no host read), or nan without a loss."""
        images = self.synthetic.images
        self.optimizer.zero_grad(set_to_none=True)
        if loss is not None:
            loss.backward()
        if grad is not None:
            grad = self._full(grad.detach().to(images.dtype))
            images.grad = grad if images.grad is None else images.grad + grad
        if self.pixel_space and images.grad is not None:
            images.grad = images.grad * self._pixel_scale(images)
        self.optimizer.step()
        return loss.detach() if loss is not None else float("nan")

    def sequential_class_step(self, grad: torch.Tensor) -> None:
        """IDC's per-class image steps (class 0, 1, …, C−1 in turn, each an SGD-momentum step on its own
        rows of `grad`), applied in closed form as one update; `grad` rows are those of `syn.images`, each
        evaluated at `class_step_images()`."""
        images = self.synthetic.images
        lr, momentum = plain_sgd_group(self.optimizer)
        grad = self._full(grad.detach().to(images.dtype))
        if self.pixel_space:
            grad = grad * self._pixel_scale(images)
        state = self.optimizer.state[images]
        buf = sequential_class_update(images, state.get("momentum_buffer"), grad, self.synthetic.labels,
                                      self.num_classes, lr, momentum)
        if buf is not None:
            state["momentum_buffer"] = buf

    def class_step_images(self) -> torch.Tensor:
        """`syn.images` (detached) as class c's step sees them: after the momentum-only moves of the c
        earlier class steps of a sequential round."""
        images = self.syn.images.detach()
        lr, momentum = plain_sgd_group(self.optimizer)
        buf = self.optimizer.state.get(self.synthetic.images, {}).get("momentum_buffer")
        if buf is None or momentum == 0:
            return images
        if self.active_rows is not None:
            buf = buf[self.active_rows]
        coef = torch.tensor(lookahead_coefficients(self.num_classes, momentum), dtype=buf.dtype)
        coef = coef[self.syn.seg.to(coef.device)].to(buf.device).view(-1, *[1] * (buf.dim() - 1))
        return images - lr * coef * buf

    def clamp_to_pixel_range(self) -> None:
        """Clamp the stored images to the normalised values of pixels 0 and 1, per channel."""
        clamp_to_pixels(self.synthetic.images, self.train.mean, self.train.std)

    def _pixel_scale(self, like: torch.Tensor) -> torch.Tensor:
        return pixel_step_scale(self.train.std, like)

    def _full(self, grad: torch.Tensor) -> torch.Tensor:
        if self.active_rows is None:
            return grad
        full = torch.zeros_like(self.synthetic.images, dtype=grad.dtype)
        full[self.active_rows] = grad
        return full

    def run_iteration(self, iteration: int, method=None) -> dict:
        """One outer iteration of `method` (default: the engine's): begin_iteration, then inner_steps times
        compute_inner → image step(s) → after_step, then end_iteration. Pixel-space methods have their
        images clamped to the valid pixel range before (as IDC, at the top of every outer iteration) and
        after it (so a finished DASM segment and the saved set are clamped too)."""
        method = method or self.method
        if self.pixel_space:
            self.clamp_to_pixel_range()
        state = method.begin_iteration(self, iteration)
        values, logs = [], {}
        for inner in range(method.inner_steps(self)):
            out = method.compute_inner(self, iteration, state, inner)
            if out.sequential_by_class:
                self.sequential_class_step(out.grad)
                value = float("nan")
            elif out.backpropagated:
                self.image_step(grad=out.grad)
                value = out.loss
            else:
                value = self.image_step(out.loss, out.grad)
            values.append(out.value if out.value is not None else value)
            logs.update(out.logs)
            method.after_step(self, iteration, state, inner)
        logs.update(method.end_iteration(self, iteration, state) or {})
        if self.pixel_space:
            self.clamp_to_pixel_range()
        if self.device.type == "cpu":
            release_freed_memory()  # the next step's (or the evaluation's) peak starts from what is held
        return {"loss": values[0] if len(values) == 1 else sum(values) / len(values), **logs}

    # ---- the loop -------------------------------------------------------------------------
    def run(self, callback=None) -> dict:
        cfg = self.config
        self._callback = callback
        if not self._prepared:
            self.method.prepare(self)
            self._prepared = True
        bar = _progress(cfg, self.iteration) if distributed.is_rank_zero() else None
        start = time.perf_counter()
        try:
            while self.iteration < cfg.iterations:
                logs = self.run_iteration(self.iteration)
                self.iteration += 1
                loss = logs.get("loss", float("nan"))
                self.history["loss"].append(loss.detach() if torch.is_tensor(loss) else float(loss))
                if bar is not None:
                    bar.update(1)
                if (bar is not None or self.shard is not None) and (  # every rank reads: a collective
                        self.iteration % PROGRESS_EVERY == 0 or self.iteration == cfg.iterations):
                    loss_now = self.read_losses()[-1]
                    if bar is not None:
                        bar.set_postfix(loss=f"{loss_now:.4g}")
                if callback is not None:
                    callback(self, logs)
                if cfg.eval_every and self.iteration % cfg.eval_every == 0 and self.iteration < cfg.iterations:
                    self.evaluate_now()
                # class-parallel: every rank takes part in the gather, whether or not it writes
                if (self.out_dir or self.shard) and cfg.checkpoint_every and self.iteration % cfg.checkpoint_every == 0:
                    self.history["seconds"] += time.perf_counter() - start
                    start = time.perf_counter()
                    self.save_checkpoint()
        finally:
            if bar is not None:
                bar.close()
        self.history["seconds"] += time.perf_counter() - start
        return self.finish()

    def evaluate_now(self) -> dict:
        from fastdd.evaluate import evaluate_synthetic
        if self.test is None:
            return {}
        cfg = self.config
        self.sync_synthetic()
        images, labels = self.final_set()
        evaluate = evaluate_synthetic if self.shard is None else self.shard.evaluate  # models spread over ranks
        result = evaluate(images, labels, self.test, models=tuple(cfg.eval_models), num_models=cfg.eval_num_models,
                          epochs=cfg.eval_epochs, seed=cfg.seed, device=self.device,
                          extra_metrics=self.evaluators or None)
        entry = {"iteration": self.iteration, **result}
        self.history["evaluations"].append(entry)
        hook = getattr(self._callback, "on_evaluation", None)
        if hook:
            hook(entry)
        if self.writes:
            artifacts.save_grid(os.path.join(self.out_dir, f"grid_{self.iteration:06d}.png"), images, labels,
                                self.train.mean, self.train.std)
        return entry

    def final_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The images a model trains on (methods with a decoder, e.g. multi-formation, override this)."""
        decode = getattr(self.method, "decode", None)
        images, labels = self.synthetic.detached()
        return decode(self, images, labels) if decode else (images, labels)

    def read_losses(self) -> list:
        """history["loss"] as floats: the tensors logged since the last read are copied to the host in one go
        (class-parallel: summed over ranks, each rank's loss being its classes' part, in one collective)."""
        losses = self.history["loss"]
        pending = losses[self._losses_read:]
        if pending and (self.shard is not None or any(torch.is_tensor(v) for v in pending)):
            values = torch.stack([torch.as_tensor(v, dtype=torch.float64).to(self.device).reshape(())
                                  for v in pending])
            losses[self._losses_read:] = (values if self.shard is None else self.shard.sum(values)).tolist()
        self._losses_read = len(losses)
        return losses

    def finish(self) -> dict:
        if not self.history["evaluations"] or self.history["evaluations"][-1]["iteration"] != self.iteration:
            self.evaluate_now()
        metrics = self.metrics()
        self.sync_synthetic()
        if self.writes:
            images, labels = self.synthetic.detached()
            artifacts.save_synthetic(os.path.join(self.out_dir, "synthetic.pt"), images, labels, self.train,
                                     self.config.to_dict(), extra=self.method_extra())
            artifacts.save_json(metrics, os.path.join(self.out_dir, "metrics.json"))
            artifacts.save_curves(os.path.join(self.out_dir, "loss.png"), self.history)
            grid = os.path.join(self.out_dir, "grid.png")
            artifacts.save_grid(grid, *self.final_set(), self.train.mean, self.train.std)
        return metrics

    def method_extra(self) -> dict:
        extra = getattr(self.method, "synthetic_extra", None)
        return extra(self) if extra else {}

    def metrics(self) -> dict:
        its = max(self.iteration, 1)
        out = {"method": self.config.method, "dataset": self.train.name, "ipc": self.config.ipc,
               "iterations": self.iteration, "seconds_per_iteration": self.history["seconds"] / its,
               "peak_memory_mb": artifacts.peak_memory_mb(self.device), "device": str(self.device),
               "final_loss": self.read_losses()[-1] if self.history["loss"] else None,
               "evaluations": self.history["evaluations"], "config": self.config.to_dict()}
        method_metrics = getattr(self.method, "metrics", None)
        if method_metrics:
            out.update(method_metrics(self))
        return out

    # ---- checkpoints (fastdd.distill.checkpoint) --------------------------------------------
    def state_dict(self) -> dict:
        return checkpoint.engine_state(self)

    def load_state_dict(self, state: dict) -> None:
        checkpoint.restore(self, state)

    def save_checkpoint(self) -> str | None:
        return checkpoint.save(self)


def _progress(cfg: DistillConfig, initial: int):
    if not cfg.progress:
        return None
    from tqdm import tqdm
    return tqdm(total=cfg.iterations, initial=initial, desc=f"{cfg.method} ipc={cfg.ipc}", unit="it",
                dynamic_ncols=True)
