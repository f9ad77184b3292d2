"""Command line: the Makefile's verbs. ``python -m search.cli --help``.

Verbs: ``extract`` (build the feature cache), ``search`` (Optuna or KerasTuner on the cache),
``final`` (train, stitch, save ``cifar10.h5``), ``evaluate`` (the classic evaluation script),
``bench-cache`` (extraction vs raw predict throughput), ``bench-search``.
Bad input exits with status 2 and one line ``error: ...`` (no traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from search.errors import UserError
from search.io import write_json

log = logging.getLogger("search")
ROOT = Path(__file__).resolve().parent.parent


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None,
                   help="CIFAR-10 .npz (keys x_train, y_train, x_test, y_test); default $CIFAR10_NPZ, "
                        "else keras.datasets.cifar10.load_data() (downloads)")
    p.add_argument("--val-size", type=int, default=5000,
                   help="validation images carved from the 50k training images (default 5000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, sampler and training")
    p.add_argument("--limit", type=int, default=None,
                   help="use only the first N train and N/5 test images (quick runs, not results)")


def _add_cache_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", default="MobileNet",
                   help="Keras Application name (MobileNet, MobileNetV2, ResNet50, EfficientNetB0, "
                        "DenseNet121, ConvNeXtTiny); default MobileNet")
    p.add_argument("--weights", default="imagenet",
                   help="'imagenet' (default) or 'none' (random: smoke tests only, never 'pretrained')")
    p.add_argument("--cut", default=None, help="cut point: last1, last2, ... (default per backbone)")
    p.add_argument("--resolution", type=int, default=None,
                   help="input side the 32x32 images are upsampled to (default: the backbone's native size)")
    p.add_argument("--no-flip", dest="flip", action="store_false",
                   help="do not cache mirrored images (no flip augmentation / test-time averaging)")
    p.add_argument("--cache-dir", default="cache", help="folder of feature caches (default cache/)")
    p.add_argument("--no-build", dest="build", action="store_false",
                   help="fail instead of building a missing or stale cache")
    p.add_argument("--results", default="results", help="results folder (default results/)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m search.cli",
        description="Transfer-learning hyperparameter search for CIFAR-10 on Keras Applications: "
                    "the frozen backbone runs once into cache/, heads are searched on the cached "
                    "features, and the best one is fine-tuned with the backbone's last block(s).")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = sub.add_parser("extract", help="run the frozen part once over train+test into cache/")
    _add_data_args(p)
    _add_cache_args(p)
    p.add_argument("--chunk-size", type=int, default=2000, help="images per resumable chunk (default 2000)")

    p = sub.add_parser("search", help="search head + optimizer on the cached features")
    _add_data_args(p)
    _add_cache_args(p)
    p.add_argument("--engine", default="optuna", help="optuna (default) or kerastuner")
    p.add_argument("--trials", type=int, default=50, help="trials to run (per worker)")
    p.add_argument("--workers", type=int, default=1, help="worker processes sharing the study")
    p.add_argument("--storage", default=None,
                   help="SQLAlchemy URL of the Optuna storage (default sqlite:///results/study.db)")
    p.add_argument("--study-name", default=None, help="study/project name (default heads-<cache id>)")
    p.add_argument("--pruner", default="hyperband", help="hyperband (default), median or none")
    p.add_argument("--oracle", default="bayesian", help="KerasTuner oracle: bayesian (default) or hyperband")
    p.add_argument("--max-epochs", type=int, default=None, help="epoch cap per trial (default 30)")
    p.add_argument("--worker-index", type=int, default=0,
                   help="offsets the sampler seed of parallel workers (set by --workers)")
    p.add_argument("--heartbeat", type=int, default=30,
                   help="Optuna trial heartbeat in seconds: trials of a killed worker are marked FAIL "
                        "after 2x this (default 30)")
    p.add_argument("--no-flip-rows", dest="use_flips", action="store_false",
                   help="train trials on original images only (mirrors not added as rows)")

    p = sub.add_parser("final", help="train head + tail on the cache, save cifar10.h5 and results/final.json")
    _add_data_args(p)
    _add_cache_args(p)
    p.add_argument("--params", default="auto",
                   help="head parameters: 'auto' (best trial of the latest search if any, else the "
                        "default), 'default', 'study' (latest search; error if none) or a JSON dict")
    p.add_argument("--tail-epochs", type=int, default=6, help="epochs of tail fine-tuning (0: head only)")
    p.add_argument("--tail-lr", type=float, default=5e-4, help="peak AdamW learning rate of the tail")
    p.add_argument("--head-epochs", type=int, default=30, help="max epochs of the head on pooled features")
    p.add_argument("--bn-passes", type=int, default=2,
                   help="passes re-estimating the tail's BN statistics after training; the new statistics "
                        "are kept only if validation accuracy does not drop (default 2; 0: skip)")
    p.add_argument("--no-tta", dest="tta", action="store_false",
                   help="do not average the mirrored image's prediction in the saved model")
    p.add_argument("--output", default="cifar10.h5", help="where to save the model (default ./cifar10.h5)")

    p = sub.add_parser("evaluate", help="run the classic evaluation script on ./cifar10.h5")
    p.add_argument("--model", default="cifar10.h5", help="model to evaluate (default ./cifar10.h5)")
    p.add_argument("--data", default=None, help=".npz to serve as cifar10.load_data (default $CIFAR10_NPZ)")
    p.add_argument("--results", default="results", help="where evaluate.json goes (default results/)")

    p = sub.add_parser("report", help="HTML/PNG/summary/CSV report of a study -> results/report/")
    p.add_argument("--results", default="results", help="results folder (default results/)")
    p.add_argument("--out", default=None, help="output folder (default RESULTS/report)")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default: the latest search)")
    p.add_argument("--study-name", default=None, help="study name in --storage")
    p.add_argument("--kerastuner-dir", default=None, help="a KerasTuner project folder instead")

    p = sub.add_parser("paper", help="docs/paper.md + docs/paper.html from docs/paper_template.md and results/")
    p.add_argument("--results", default="results", help="results folder (default results/)")
    p.add_argument("--docs", default="docs", help="folder with paper_template.md (default docs/)")
    p.add_argument("--data", default=None, help="CIFAR-10 .npz for the figure (default $CIFAR10_NPZ)")

    p = sub.add_parser("bench-cache", help="extraction vs raw predict throughput -> results/bench_cache.json")
    _add_data_args(p)
    _add_cache_args(p)
    p.add_argument("--images", type=int, default=2000, help="images to time (default 2000)")

    p = sub.add_parser("bench-search", help="trial time vs one end-to-end epoch -> results/bench_search.json")
    _add_data_args(p)
    _add_cache_args(p)
    p.add_argument("--trials", type=int, default=20, help="trials to time (default 20)")
    p.add_argument("--max-epochs", type=int, default=None, help="epoch cap per trial (default 30)")
    p.add_argument("--epoch-images", type=int, default=1000,
                   help="images timed through the full backbone to estimate one end-to-end epoch")
    return parser


def _setup(args: argparse.Namespace):
    """Validate backbone, cut and resolution (before any data is read); load the splits."""
    from search import backbones, data

    spec = backbones.get_backbone(args.backbone)
    spec.cut_layer(args.cut)
    _check_resolution(args)
    splits = data.load_cifar10(args.data, val_size=args.val_size, seed=args.seed)
    import keras

    keras.utils.set_random_seed(args.seed)  # random-weight backbones (tests) build the same
    if getattr(args, "limit", None):
        splits = splits.subset(args.limit, max(10, args.limit // 5), min(args.val_size, args.limit // 5),
                               args.seed)
    return splits, spec


def _weights(args: argparse.Namespace) -> str | None:
    if str(args.weights).lower() in ("none", "random", ""):
        return None
    if args.weights != "imagenet":
        raise UserError(f"--weights must be 'imagenet' or 'none', got {args.weights!r}")
    return "imagenet"


def _check_resolution(args: argparse.Namespace) -> None:
    if args.resolution is not None and not 32 <= args.resolution <= 1024:
        raise UserError(f"--resolution must be in 32..1024, got {args.resolution}")


def _cache(args: argparse.Namespace, splits, spec, chunk_size: int = 2000):
    from search.cache import ensure_cache

    return ensure_cache(spec, splits, cut=args.cut, resolution=args.resolution, flip=args.flip,
                        weights=_weights(args), root=args.cache_dir, build=args.build,
                        chunk_size=chunk_size, progress=not args.quiet)


def cmd_extract(args: argparse.Namespace) -> int:
    splits, spec = _setup(args)
    cache = _cache(args, splits, spec, args.chunk_size)
    print(f"cache {'reused' if cache.stats['hit'] else 'built'}: {cache.path}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from search import engines, space
    from search.engines.objective import PooledData

    if args.engine not in engines.ENGINES:
        raise UserError(f"unknown engine {args.engine!r}; choose one of {list(engines.ENGINES)}")
    if args.engine == "optuna":
        from search.engines import optuna_engine

        optuna_engine.make_pruner(args.pruner)
        if args.storage:
            import sqlalchemy

            try:
                sqlalchemy.engine.make_url(args.storage)
            except Exception:
                raise UserError(f"malformed storage URL {args.storage!r}") from None
    if args.workers > 1:
        return _spawn_workers(args)
    splits, spec = _setup(args)
    cache = _cache(args, splits, spec)
    data = PooledData.from_cache(cache, splits, use_flips=args.use_flips)
    summary = engines.run_search(
        args.engine, data=data, cache_id=cache.path.name, n_trials=args.trials, storage=args.storage,
        study_name=args.study_name, pruner=args.pruner, oracle=args.oracle, seed=args.seed,
        results=args.results, progress=not args.quiet, max_epochs=args.max_epochs or space.MAX_EPOCHS,
        heartbeat=args.heartbeat, worker_index=args.worker_index)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _spawn_workers(args: argparse.Namespace) -> int:
    """Start ``--workers`` processes on one study (Optuna storage shared through the URL)."""
    if args.engine != "optuna":
        raise UserError("--workers > 1 needs --engine optuna (KerasTuner runs one process here)")
    argv = [a for a in sys.argv[1:]]
    if "--workers" in argv:
        i = argv.index("--workers")
        del argv[i:i + 2]
    argv = [a for a in argv if not a.startswith("--workers=")]
    if args.study_name is None or args.storage is None:
        raise UserError("--workers > 1 needs --storage and --study-name shared by every worker")
    from search.engines import optuna_engine

    # Create the schema and the study once: concurrent first-time creation races in the database.
    optuna_engine.open_study(args.storage, args.study_name, args.seed, args.pruner, heartbeat=args.heartbeat)
    procs = [subprocess.Popen([sys.executable, "-m", "search.cli", *argv, "--quiet", "--worker-index", str(w)],
                              cwd=os.getcwd())
             for w in range(args.workers)]
    codes = [p.wait() for p in procs]
    print(f"{args.workers} workers finished with exit codes {codes}")
    return max(codes)


def _head_params(args: argparse.Namespace) -> tuple[dict, str]:
    from search import engines, space

    if args.params == "default":
        return dict(space.DEFAULT_PARAMS), "default"
    if args.params in ("auto", "study"):
        try:
            return engines.best_params(args.results)
        except UserError:
            if args.params == "study":
                raise
            return dict(space.DEFAULT_PARAMS), "default (no search found)"
    try:
        params = json.loads(args.params)
    except json.JSONDecodeError:
        raise UserError("--params must be auto, default, study or a JSON object") from None
    return params, "command line"


def cmd_final(args: argparse.Namespace) -> int:
    from search.final import FinalConfig, build_final

    splits, spec = _setup(args)
    params, source = _head_params(args)
    log.info("head parameters from %s: %s", source, params)
    config = FinalConfig(
        backbone=spec.name, weights=_weights(args), cut=args.cut, resolution=args.resolution,
        flip=args.flip, data=args.data, val_size=args.val_size, seed=args.seed, head_params=params,
        params_source=source, head_epochs=args.head_epochs, tail_epochs=args.tail_epochs,
        tail_learning_rate=args.tail_lr, bn_passes=args.bn_passes, tta=args.tta, output=args.output,
        results=args.results, cache_root=args.cache_dir, build_cache=args.build,
        progress=not args.quiet)
    summary = build_final(config, splits)
    print(f"saved {summary['model_path']}: val accuracy {summary['val_accuracy']:.4f}, "
          f"test accuracy {summary['test_accuracy']:.4f}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    data = args.data or os.environ.get("CIFAR10_NPZ")
    model = Path(args.model)
    if not model.is_file():
        raise UserError(f"no model at {model}; run `make final` first")
    env = dict(os.environ)
    if data:
        env["CIFAR10_NPZ"] = str(Path(data).resolve())
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "tests" / "evalshim"),
                                                          env.get("PYTHONPATH")]))
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for name in ("0-transfer.py", "search"):
            os.symlink(ROOT / name, Path(tmp) / name)
        os.symlink(model.resolve(), Path(tmp) / "cifar10.h5")
        shutil.copy(ROOT / "tests" / "evaluate_classic.py", Path(tmp) / "evaluate_classic.py")
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "evaluate_classic.py"], cwd=tmp, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        output = []
        for line in proc.stdout:
            sys.stdout.write(line)
            output.append(line)
        code = proc.wait()
    found = re.findall(r"accuracy: ([0-9.]+) - loss: ([0-9.]+)", "".join(output))
    if code == 0 and found:
        write_json(Path(args.results) / "evaluate.json", {
            "accuracy": float(found[-1][0]), "loss": float(found[-1][1]), "model": str(model.resolve()),
            "script": "tests/evaluate_classic.py (unmodified)", "data": env.get("CIFAR10_NPZ", "keras.datasets"),
            "seconds": time.perf_counter() - start, "recorded": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return code


def cmd_report(args: argparse.Namespace) -> int:
    from search.report import write_report

    out = Path(args.out) if args.out else Path(args.results) / "report"
    summary = write_report(out, args.results, args.storage, args.study_name, args.kerastuner_dir)
    best = f"best val accuracy {summary['best_value']:.4f}" if "best_value" in summary else "no completed trial"
    print(f"wrote {out}/index.html ({summary['trials']} trials, {best})")
    return 0


def cmd_paper(args: argparse.Namespace) -> int:
    from search.paper import write_paper

    print(f"wrote {write_paper(args.results, args.docs, args.data)} and paper.html")
    return 0


def cmd_bench_cache(args: argparse.Namespace) -> int:
    from search import bench

    splits, spec = _setup(args)
    out = bench.bench_cache(spec, splits, args.cut, args.resolution, _weights(args), args.images,
                            Path(args.results))
    print(json.dumps(out, indent=2))
    return 0


def cmd_bench_search(args: argparse.Namespace) -> int:
    from search import bench

    splits, spec = _setup(args)
    cache = _cache(args, splits, spec)
    from search import space

    out = bench.bench_search(cache, splits, spec, args.trials, args.epoch_images, Path(args.results),
                             weights=_weights(args), max_epochs=args.max_epochs or space.MAX_EPOCHS)
    print(json.dumps(out, indent=2))
    return 0


COMMANDS = {"extract": cmd_extract, "search": cmd_search, "final": cmd_final, "evaluate": cmd_evaluate,
            "report": cmd_report, "paper": cmd_paper, "bench-cache": cmd_bench_cache, "bench-search": cmd_bench_search}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return COMMANDS[args.verb](args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
