"""The `fastdd` command line: distill, evaluate, export, prepare, info."""
import argparse
import dataclasses
import datetime
import json
import os
import sys
import textwrap

import torch

from fastdd.data.download import DownloadError


def _distill(args) -> int:
    from fastdd.distill import Distiller, build_config, distributed
    from fastdd.distill.config import load_yaml
    from fastdd.distill.datasets import load_run_data
    from fastdd.distill.engine import CHECKPOINT

    if args.resume:
        state = torch.load(os.path.join(args.resume, CHECKPOINT), map_location="cpu", weights_only=False)
        config = build_config(state["config"], args.overrides)
        out = args.resume
    else:
        base = load_yaml(args.config) if args.config else {}
        flags = {k: v for k, v in dict(method=args.method, dataset=args.dataset, ipc=args.ipc,
                                       iterations=args.iterations, seed=args.seed, device=args.device,
                                       data_dir=args.data_dir, preset=args.preset).items() if v is not None}
        config = build_config({**base, **flags}, args.overrides)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = args.out or os.path.join("runs", f"{config.method}-{config.dataset}-ipc{config.ipc}-{stamp}")
    check_device(config.device)
    train, test, evaluators = load_run_data(config)
    try:
        code = _run_distiller(Distiller(config, train, test, out_dir=out, evaluators=evaluators),
                              state if args.resume else None, out)
    except BaseException:
        distributed.shutdown(clean=False)  # torchrun: the process group (none in a single process)
        raise
    distributed.shutdown(clean=True)
    return code


def _run_distiller(distiller, state, out: str) -> int:
    """Resume, run, report; under torchrun every rank runs, rank 0 alone prints and writes."""
    config, train = distiller.config, distiller.train
    if state is not None:
        distiller.load_state_dict(state)
    say = print if distiller.shard is None or distiller.shard.rank == 0 else (lambda *a, **k: None)
    if distiller.writes:
        os.makedirs(out, exist_ok=True)
    ranks = "" if distiller.shard is None else f", {distiller.shard.world_size} ranks"
    say(f"fastdd: {config.method} on {train.name} (IPC {config.ipc}, {config.iterations} iterations, "
          f"model {config.model}, preset {config.preset}, device {distiller.device}{ranks}) -> {out}", flush=True)
    logger = None
    if config.log == "tensorboard" and distiller.writes:
        from fastdd.distill.logging import TensorBoardLogger
        logger = TensorBoardLogger(os.path.join(out, "tb"))
    try:
        metrics = distiller.run(callback=logger)
    finally:
        if logger is not None:
            logger.close(distiller)
    if say is not print:
        return 0
    _print_evaluations(metrics.get("evaluations", [])[-1:])
    print(f"fastdd: {metrics['seconds_per_iteration']:.3f} s/iteration, peak memory "
          f"{metrics['peak_memory_mb']:.0f} MB")
    print(f"fastdd: artifacts in {os.path.abspath(out)} (synthetic.pt, metrics.json, grid.png, loss.png)")
    return 0


def check_device(name: str) -> None:
    """A ValueError (one clear CLI line) for a device this machine does not have."""
    if name == "auto":
        return
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"config key 'device' is {name!r} but CUDA is not available on this machine "
                             f"(torch {torch.__version__}); use --device cpu or --device auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"config key 'device' is {name!r} but this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")


def _print_evaluations(evaluations) -> None:
    for entry in evaluations:
        for model, result in entry.items():
            if isinstance(result, dict) and "mean" in result:
                print(f"  iteration {entry.get('iteration', '-')}: {model} accuracy "
                      f"{100 * result['mean']:.2f} ± {100 * result['std']:.2f} % over {len(result['accuracies'])} models")


def _load_synthetic(path: str) -> tuple[dict, str | None]:
    run_dir = path if os.path.isdir(path) else None
    file = os.path.join(path, "synthetic.pt") if run_dir else path
    if not os.path.exists(file):
        raise FileNotFoundError(f"no synthetic set at {file} (pass a run directory or a synthetic.pt file)")
    return torch.load(file, map_location="cpu", weights_only=False), run_dir


def _evaluate(args) -> int:
    from fastdd.distill import build_config
    from fastdd.distill.datasets import load_run_data
    from fastdd.evaluate import evaluate_synthetic

    saved, run_dir = _load_synthetic(args.run)
    overrides = {"data_dir": args.data_dir} if args.data_dir else {}
    config = build_config(saved["config"], overrides)
    check_device(config.device)
    _, test, evaluators = load_run_data(config)
    images, labels = saved["images"], saved["labels"]
    if "decoded_images" in saved:
        images, labels = saved["decoded_images"], saved["decoded_labels"]
    num_models = args.num_models if args.num_models is not None else config.eval_num_models
    epochs = args.epochs if args.epochs is not None else config.eval_epochs
    result = evaluate_synthetic(images, labels, test, models=tuple(args.models.split(",")),
                                num_models=num_models, epochs=epochs, seed=args.seed,
                                extra_metrics=evaluators or None)
    _print_evaluations([result])
    if run_dir:
        with open(os.path.join(run_dir, "evaluation.json"), "w") as f:
            json.dump(result, f, indent=1)
        print(f"fastdd: wrote {os.path.join(run_dir, 'evaluation.json')}")
    return 0


def _export(args) -> int:
    saved, run_dir = _load_synthetic(args.run)
    if args.format != "reference":
        raise ValueError(f"unknown export format {args.format!r}; valid: reference")
    images, labels = saved.get("decoded_images", saved["images"]), saved.get("decoded_labels", saved["labels"])
    out = args.out or os.path.join(run_dir or os.path.dirname(args.run), "reference.pt")
    torch.save({"data": [[images.float().cpu(), labels.long().cpu()]],
                "mean": saved["dataset"]["mean"], "std": saved["dataset"]["std"]}, out)
    print(f"fastdd: wrote {out} ({{'data': [[images {tuple(images.shape)}, labels]]}}, normalised with the "
          f"dataset mean/std)")
    return 0


def _prepare(args) -> int:
    from fastdd.data.prepare import prepare

    try:
        manifest = prepare(args.src, args.out, size=args.size, classes=args.classes, subset=args.subset,
                           workers=args.workers, strict=args.strict, val=args.val, val_labels=args.val_labels,
                           test_fraction=args.test_fraction, seed=args.seed, mode=args.mode, force=args.force,
                           progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"fastdd: error: interrupted; nothing was written to {args.out}", file=sys.stderr)
        return 130
    except OSError as error:  # disk full, permissions: FileNotFoundError is reported by main()
        if isinstance(error, FileNotFoundError):
            raise
        print(f"fastdd: error: {error}; nothing was written to {args.out}", file=sys.stderr)
        return 2
    if manifest["reused"]:
        return 0
    splits = manifest["splits"]
    print(f"fastdd: prepared {len(manifest['classes'])} classes at {manifest['size']} px into {args.out}: "
          f"{splits['train']['count']} train / {splits['test']['count']} test images ({manifest['test_split']}), "
          f"{len(manifest['skipped'])} skipped")
    for entry in manifest["skipped"][:10]:
        print(f"  skipped {entry['path']}: {entry['reason']}")
    if len(manifest["skipped"]) > 10:
        print(f"  ... and {len(manifest['skipped']) - 10} more (all listed in {args.out}/manifest.json)")
    return 0


def _info(args) -> int:
    from fastdd.info import main
    main()
    return 0


def method_keys(name: str) -> list[tuple[str, object]]:
    """(key, default) of a method's config keys; dasm lists its own keys, then its default base's."""
    from fastdd.distill.methods import METHODS
    cls = METHODS[name]
    args_cls = cls.Args or getattr(sys.modules[cls.__module__], f"{cls.__name__}Args", None)
    if args_cls is None:
        return []
    keys = [(f.name, _field_default(f)) for f in dataclasses.fields(args_cls)]
    base = dict(keys).get("base")
    if name == "dasm" and base in METHODS and base != name:
        keys += [(key, value) for key, value in method_keys(base) if key not in dict(keys)]
    return keys


def _field_default(f):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def distill_epilog() -> str:
    from fastdd.distill.config import DistillConfig, FIELDS
    from fastdd.distill.datasets import dataset_names
    from fastdd.distill.methods import METHODS
    from fastdd.distill.presets import PRESETS
    defaults = DistillConfig()
    lines = [f"methods: {', '.join(sorted(METHODS))}",
             textwrap.fill(f"datasets: {', '.join(dataset_names())}", 100, subsequent_indent="    "),
             f"presets: {', '.join(PRESETS)} (reference: the paper's settings; see fastdd/distill/presets.py)", "",
             "config keys (key=value; defaults before the preset):",
             textwrap.fill(", ".join(f"{k}={getattr(defaults, k)!r}" for k in FIELDS if k != "method_args"),
                           100, initial_indent="  ", subsequent_indent="  "), "",
             "method keys (key=value, with defaults):"]
    for name in sorted(METHODS):
        keys = method_keys(name)
        text = ", ".join(f"{k}={v!r}" for k, v in keys) if keys else "(none)"
        if name == "dasm":
            text += " (after segment_eval: the default base's keys)"
        lines.append(textwrap.fill(f"{name}: {text}", 100, subsequent_indent="    "))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastdd", description="Fast dataset distillation.")
    sub = p.add_subparsers(dest="command")
    d = sub.add_parser("distill", help="distill a synthetic set (default: digits, IPC 10, DM)",
                       epilog=distill_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("--config", help="YAML file of config keys")
    d.add_argument("--method")
    d.add_argument("--dataset")
    d.add_argument("--data-dir", dest="data_dir", help="folder with dataset files you already have; for --dataset "
                                                        "prepared: a `fastdd prepare` OUT, imagefolder: an image "
                                                        "root, npz: an .npz file")
    d.add_argument("--ipc", type=int)
    d.add_argument("--iterations", type=int)
    d.add_argument("--seed", type=int)
    d.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    d.add_argument("--preset", help="default (quick settings) or reference (the paper's settings for the "
                                    "method and dataset); fills only keys you did not set")
    d.add_argument("--out", help="run directory (default runs/<method>-<dataset>-ipc<N>-<time>)")
    d.add_argument("--resume", help="run directory to continue from its checkpoint")
    d.add_argument("overrides", nargs="*", help="key=value config overrides (method keys too)")
    d.set_defaults(func=_distill)
    e = sub.add_parser("evaluate", help="evaluation protocol on a saved synthetic set")
    e.add_argument("run", help="run directory or synthetic.pt")
    e.add_argument("--models", default="auto", help="comma-separated model names (auto: the ConvNet depth for the resolution)")
    e.add_argument("--num-models", type=int, help="models per architecture (default: the run's eval_num_models)")
    e.add_argument("--epochs", type=int, help="training epochs (default: the run's eval_epochs)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--data-dir", dest="data_dir")
    e.set_defaults(func=_evaluate)
    x = sub.add_parser("export", help="export a synthetic set")
    x.add_argument("run", help="run directory or synthetic.pt")
    x.add_argument("--format", default="reference")
    x.add_argument("--out")
    x.set_defaults(func=_export)
    _add_prepare_parser(sub)
    sub.add_parser("info", help="build, kernel and device report").set_defaults(func=_info)
    return p


def _add_prepare_parser(sub) -> None:
    from fastdd.data.subsets import SUBSETS
    r = sub.add_parser("prepare", help="decode an image folder into memory-mapped uint8 shards (--dataset prepared)",
                       description="Reads SRC/<class>/<image> (ImageNet's train layout works as is), resizes the "
                                   "shorter side to --size with PIL bilinear and centre-crops (torchvision "
                                   "Resize + CenterCrop), and writes OUT/{train,test}_{images,labels}.npy and "
                                   "OUT/manifest.json. Rerunning with the same arguments does nothing.")
    r.add_argument("src", help="image folder: SRC/<class>/<image>")
    r.add_argument("out", help="output folder (written to OUT.tmp-<pid>, then renamed)")
    r.add_argument("--size", type=int, default=64, help="side length in pixels (default 64)")
    r.add_argument("--subset", help=f"built-in class subset: {', '.join(SUBSETS)}")
    r.add_argument("--classes", help="class folders to keep, in label order: a comma list or a file, one per line")
    r.add_argument("--workers", type=int, help="decoding processes (default: all CPU cores)")
    r.add_argument("--strict", action="store_true", help="fail on the first unreadable image instead of skipping it")
    r.add_argument("--val", help="validation folder for the test split (VAL/<class>/<image>, or flat files with "
                                 "--val-labels)")
    r.add_argument("--val-labels", dest="val_labels", help="CSV of `image id, label` rows for a flat --val folder "
                                                           "(ImageNet's LOC_val_solution.csv; found by itself "
                                                           "beside or above VAL)")
    r.add_argument("--test-fraction", dest="test_fraction", type=float,
                   help="without --val: stratified share of SRC held out as the test split (default 0.1)")
    r.add_argument("--seed", type=int, default=0, help="seed of the stratified split (default 0)")
    r.add_argument("--mode", default="RGB", choices=["RGB", "L"], help="colour mode (default RGB: grayscale "
                                                                        "images become 3 channels)")
    r.add_argument("--force", action="store_true", help="replace an OUT prepared with other arguments")
    r.add_argument("--no-progress", dest="no_progress", action="store_true", help="no progress bar")
    r.set_defaults(func=_prepare)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        args = parser.parse_args(["distill", *(argv or [])]) if argv else parser.parse_args(["distill"])
    from fastdd.distill.distributed import PeerError, RankFailure, is_rank_zero
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, TypeError, DownloadError, RankFailure) as err:
        if is_rank_zero() or not isinstance(err, (PeerError, RankFailure)):  # torchrun: one line, on rank 0
            print(f"fastdd: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
