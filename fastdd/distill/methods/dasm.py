"""DASM: the IPC budget distilled as K sequential segments, each matched against a harder difficulty window."""
import dataclasses
from dataclasses import dataclass

import torch

from fastdd.distill import difficulty
from fastdd.distill.methods.base import Method, parse_method_args


@dataclass
class DASMArgs:
    base: str = "gm"                # the matching method each segment runs (gm, dm, ...)
    segments: int | None = None     # K; default ipc // 10 (at least 1)
    segment_ipc: int | None = None  # images per class per segment (alternative to segments)
    p_max: float = 0.5              # linear schedule p_k = (k−1)/K · p_max
    p: list | None = None           # explicit [p_1, ..., p_K] (p_1 = 0), overrides p_max
    score_epochs: int = 100         # scorer: evaluation-protocol schedule, shortened
    score_model: str | None = None  # scorer architecture (default: config.model)
    segment_eval: bool = True       # evaluation protocol on segments 1..k at every boundary

    def __post_init__(self):
        for key in ("segments", "segment_ipc"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"dasm: config key {key!r} must be a positive integer, got {value!r}")
        if isinstance(self.score_epochs, bool) or not isinstance(self.score_epochs, int) or self.score_epochs < 1:
            raise ValueError(f"dasm: config key 'score_epochs' must be a positive integer, got {self.score_epochs!r}")
        if isinstance(self.p_max, bool) or not isinstance(self.p_max, (int, float)) or not 0 <= self.p_max < 1:
            raise ValueError(f"dasm: config key 'p_max' must lie in [0, 1), got {self.p_max!r}")


class DASM(Method):
    """K segments of ipc/K images per class, distilled in order by the base method on one engine.

    - Layout: class c's rows c·ipc .. c·ipc+ipc−1 hold segments 1..K in order (ipc/K rows each).
    - Iterations: segment k (1-based) runs engine iterations [(k−1)·T/K, k·T/K) (integer division).
    - Segment k sees only its rows (engine.set_active); earlier segments get no gradient and their
      momentum is zeroed when k starts, later ones have none yet, so both stay fixed.
    - Before segment k > 1: a scorer trained on segments 1..k−1 (decoded; evaluation-protocol
      schedule with score_epochs) gives every real training sample its CE loss; per class the
      floor(p_k·n_c) easiest are dropped. Segment k samples real data (matching batches and, for gm,
      the network training between image steps) from that window only.
    - lr_for(ipc) is the base's lr_for(ipc/K); K = 1 runs exactly the base method."""

    name = "dasm"

    def __init__(self, args: dict | None = None):
        from fastdd.distill.methods import METHODS, build_method
        args = dict(args or {})
        own = {f.name for f in dataclasses.fields(DASMArgs)}
        self.args = parse_method_args(self.name, DASMArgs, {k: v for k, v in args.items() if k in own})
        if self.args.base == self.name or self.args.base not in METHODS:
            valid = ", ".join(sorted(m for m in METHODS if m != self.name))
            raise ValueError(f"dasm: config key 'base' must be one of {valid}; got {self.args.base!r}")
        self.base = build_method(self.args.base, {k: v for k, v in args.items() if k not in own})
        self.current = -1
        self.pools: dict[int, torch.Tensor | None] = {}
        self.records: list[dict] = []

    # ---- plan --------------------------------------------------------------------------------
    def num_segments(self, ipc: int) -> int:
        a = self.args
        if a.segments is not None:
            k = a.segments
            if a.segment_ipc is not None and a.segment_ipc * k != ipc:
                raise ValueError(f"dasm: segments={k} × segment_ipc={a.segment_ipc} must equal ipc={ipc}")
            if k > ipc:
                raise ValueError(f"dasm: config key 'segments'={k} exceeds ipc={ipc} (each segment needs at "
                                 f"least one image per class)")
            if ipc % k:
                raise ValueError(f"dasm: ipc={ipc} is not divisible by config key 'segments'={k}")
            return k
        if a.segment_ipc is not None:
            if a.segment_ipc > ipc or ipc % a.segment_ipc:
                raise ValueError(f"dasm: ipc={ipc} is not a multiple of config key 'segment_ipc'={a.segment_ipc}")
            return ipc // a.segment_ipc
        k = max(1, ipc // 10)
        if ipc % k:
            raise ValueError(f"dasm: ipc={ipc} is not divisible by the default segments={k} (ipc // 10); "
                             f"set config key 'segments' or 'segment_ipc'")
        return k

    def plan(self, config) -> tuple[int, list[int], list[float]]:
        k = self.num_segments(config.ipc)
        if config.iterations < k:
            raise ValueError(f"dasm: config key 'iterations'={config.iterations} must be >= segments={k} "
                             f"(iterations are split evenly across segments)")
        bounds = [i * config.iterations // k for i in range(k + 1)]
        return k, bounds, difficulty.p_schedule(k, self.args.p_max, self.args.p)

    def lr_for(self, ipc: int) -> float:
        return self.base.lr_for(ipc // self.num_segments(ipc))  # each segment is an IPC-(ipc/K) distillation

    # ---- engine hooks ---------------------------------------------------------------------------
    def prepare(self, engine) -> None:
        self.plan(engine.config)
        self.base.prepare(engine)

    def begin_iteration(self, engine, iteration: int):
        """Enter the iteration's segment (at a boundary: freeze, score, pick the window), point the engine
        at its rows and real pool, then begin the base method's iteration."""
        k, bounds, _ = self.plan(engine.config)
        segment = max(i for i in range(k) if bounds[i] <= iteration)
        if segment != self.current:
            self._enter(engine, segment)
        self.activate(engine, segment)
        return segment, self.base.begin_iteration(engine, iteration)

    def activate(self, engine, segment: int) -> None:
        k = self.num_segments(engine.config.ipc)
        rows = self.rows(engine, [segment]) if k > 1 else None
        engine.set_active(rows, engine.config.ipc // k, self.pools.get(segment))

    def inner_steps(self, engine) -> int:
        return self.base.inner_steps(engine)

    def compute_inner(self, engine, iteration: int, state, inner: int):
        return self.base.compute_inner(engine, iteration, state[1], inner)

    def after_step(self, engine, iteration: int, state, inner: int) -> None:
        self.base.after_step(engine, iteration, state[1], inner)

    def end_iteration(self, engine, iteration: int, state) -> dict:
        return {**(self.base.end_iteration(engine, iteration, state[1]) or {}), "segment": state[0] + 1}

    def rows(self, engine, segments: list[int]) -> torch.Tensor:
        """Class-major rows of `segments`: class c, segment j owns rows c·ipc + j·s .. c·ipc + (j+1)·s − 1."""
        ipc = engine.config.ipc
        s = ipc // self.num_segments(ipc)
        local = torch.cat([torch.arange(j * s, (j + 1) * s) for j in segments])
        rows = (torch.arange(engine.num_classes).view(-1, 1) * ipc + local.view(1, -1)).reshape(-1)
        return rows.to(engine.synthetic.images.device)

    def _enter(self, engine, segment: int) -> None:
        """Freeze the finished segments (zero their momentum) and pick segment k's difficulty window."""
        k, bounds, p = self.plan(engine.config)
        record = {"segment": segment + 1, "iterations": [bounds[segment], bounds[segment + 1]],
                  "ipc": engine.config.ipc // k, "p": p[segment], "window": None}
        pool = None
        if segment > 0:
            engine.sync_synthetic()  # class-parallel: the earlier segments whole on every rank (scorer replicated)
            buf = engine.optimizer.state.get(engine.synthetic.images, {}).get("momentum_buffer")
            if buf is not None:
                buf.zero_()
            images, labels = self.decode(engine, *self._segment_set(engine, list(range(segment))))
            if self.args.segment_eval and engine.test is not None:
                self.records[-1]["accuracy"] = self._evaluate(engine, images, labels)
            cfg = engine.config
            scorer = difficulty.train_scorer(images, labels, engine.num_classes, self.args.score_model or cfg.model,
                                             self.args.score_epochs, cfg.seed + 100003 * segment, engine.device)
            record["scorer"] = {"trained_on_segments": segment, "epochs": self.args.score_epochs}
            if engine.test is not None:
                record["scorer"]["test_accuracy"] = difficulty.accuracy(scorer, engine.test, engine.device)
            losses = difficulty.score_samples(scorer, engine.train, engine.device)
            pool, record["window"] = difficulty.difficulty_window(losses, engine.train.labels, engine.num_classes,
                                                                  p[segment])
            if p[segment] == 0:
                pool = None  # the whole training set, sampled exactly as the base method samples it
            elif pool is not None:
                pool = pool.to(torch.as_tensor(engine.train.labels).device)
        self.current = segment
        self.pools[segment] = pool
        self.records = [r for r in self.records if r["segment"] <= segment] + [record]

    def _segment_set(self, engine, segments: list[int]):
        rows = self.rows(engine, segments)
        return engine.synthetic.images.detach()[rows].cpu(), engine.synthetic.labels[rows].cpu()

    def _evaluate(self, engine, images, labels) -> dict:
        from fastdd.evaluate import evaluate_synthetic
        cfg = engine.config
        evaluate = evaluate_synthetic if getattr(engine, "shard", None) is None else engine.shard.evaluate
        return evaluate(images, labels, engine.test, models=tuple(cfg.eval_models),
                                  num_models=cfg.eval_num_models, epochs=cfg.eval_epochs, seed=cfg.seed,
                                  device=engine.device, extra_metrics=engine.evaluators or None)

    # ---- outputs and state ------------------------------------------------------------------------
    def decode(self, engine, images, labels):
        decode = getattr(self.base, "decode", None)
        return decode(engine, images, labels) if decode else (images, labels)

    def synthetic_extra(self, engine) -> dict:
        extra = getattr(self.base, "synthetic_extra", None)
        k = self.num_segments(engine.config.ipc)
        segment = torch.arange(engine.config.ipc).repeat(engine.num_classes) // (engine.config.ipc // k)
        return {**(extra(engine) if extra else {}), "dasm_segment": segment}

    def metrics(self, engine) -> dict:
        base = getattr(self.base, "metrics", None)
        out = dict(base(engine)) if base else {}
        records = [dict(r) for r in self.records]
        evaluations = engine.history["evaluations"]
        if records and evaluations and evaluations[-1]["iteration"] == engine.iteration:
            records[-1]["accuracy"] = {k: v for k, v in evaluations[-1].items() if k != "iteration"}
        k, bounds, p = self.plan(engine.config)
        out["dasm"] = {"base": self.args.base, "segments": k, "segment_ipc": engine.config.ipc // k, "p": p,
                       "iteration_bounds": bounds, "per_segment": records}
        return out

    def state_dict(self) -> dict:
        return {"current": self.current, "pools": dict(self.pools), "records": self.records,
                "base": self.base.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.current, self.pools, self.records = state["current"], dict(state["pools"]), list(state["records"])
        self.base.load_state_dict(state.get("base", {}))
