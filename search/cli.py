"""Command line: ``transfer-search VERB`` (or ``python -m search.cli VERB``), the Makefile's verbs.

Verbs: ``extract`` (build the feature cache), ``search`` (both phases, Optuna or KerasTuner, on
the cache), ``final`` (train, stitch, save ``cifar10.h5``), ``evaluate`` (the classic
evaluation script), ``report``, ``paper``, ``bench-cache``, ``bench-search``, ``bench-memory``.
This module only parses and dispatches: every check lives where the thing it checks is made, and
every default is read from where it is stated (``FinalConfig``, ``space.BUDGETS``). Bad input exits
with status 2 and one line ``error: ...``; any other failure with status 1 and one line naming
the exception (``--debug`` prints the traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from search import selection
from search.config import CHUNK_SIZE, GOALS, PRECISIONS, FinalConfig
from search.errors import UserError
from search.space import BUDGETS, HEAD_BATCH_SIZE

log = logging.getLogger("search")


PROG = "transfer-search"


FINAL = FinalConfig()  # the defaults of `final`, stated once in search.config


def _add_precision_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tail-precision", default=FINAL.tail_precision, choices=PRECISIONS,
                   help=f"compute precision of the tail's training (default {FINAL.tail_precision}): 'auto' times "
                        "tail steps in each, alternating, on the cached maps and takes mixed_bfloat16 if it is at "
                        "least 10%% faster; a saved model is float32 either way")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None,
                   help="your own images: a folder DIR/<class>/*.jpg|png|... (a test split is carved, 20%% per "
                        "class, fixed seed) or DIR/train/<class>/ + DIR/test/<class>/; or a CIFAR-10 .npz (keys "
                        "x_train, y_train, x_test, y_test). Default $CIFAR10_NPZ, else "
                        "keras.datasets.cifar10.load_data() (downloads)")
    p.add_argument("--image-size", type=int, default=None,
                   help="with a folder: side the images are stored at after decoding (once), 8..1024; default "
                        "their own size when all are one square size, else 128")
    p.add_argument("--val-size", type=int, default=None,
                   help="validation images carved from the training images (default 10%%: 5000 of CIFAR-10's 50k)")
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
                   help="input side the 32x32 images are upsampled to, 32..1024 (default: the backbone's default side, "
                        "MobileNet 176; else its native size)")
    p.add_argument("--mirror", default="maps", choices=("images", "maps", "none"),
                   help="mirroring for augmentation: 'maps' (default) mirrors the cached activation maps (the "
                        "frozen pass runs over the images once); 'images' also caches the mirrored images "
                        "(twice the extraction and disk; a different cache key); 'none' never mirrors. "
                        "make final chooses test-time mirror averaging on validation either way")
    p.add_argument("--cache-dir", default="cache", help="folder of feature caches (default cache/)")
    p.add_argument("--no-build", dest="build", action="store_false",
                   help="fail instead of building a missing or stale cache")
    p.add_argument("--results", default="results", help="results folder (default results/)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _cache_verb(sub: Any, name: str, **kwargs: Any) -> argparse.ArgumentParser:
    """A verb that reads the data and works on a feature cache: its parser with those options."""
    p = sub.add_parser(name, **kwargs)
    _add_data_args(p)
    _add_cache_args(p)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Transfer-learning hyperparameter search on Keras Applications, for CIFAR-10 or a folder "
                    "of images: "
                    "the frozen backbone runs once into cache/; phase 1 searches the head on the cached "
                    "pooled features, phase 2 how the backbone's last block(s) are fine-tuned on the cached "
                    "cut activations; `final` trains both phases' best parameters and saves the model.")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an unexpected failure")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = _cache_verb(sub, "extract", help="run the frozen part once over train+test into cache/")
    p.add_argument("--chunk-size", type=int, default=CHUNK_SIZE,
                   help=f"images per resumable chunk (default {CHUNK_SIZE})")

    p = _cache_verb(sub, "search", help="search both phases on the cache (head, then tail fine-tuning)",
                       description="Phase 1 (head): architecture and optimizer of the head on cached pooled "
                                   "features. Phase 2 (tail): learning rate, decay, warm-up, smoothing, shifts, "
                                   "BatchNormalization mode and the head's relative rate for fine-tuning the "
                                   "layers after the cut, starting from phase 1's best head. Each trial trains on "
                                   "a stratified subset of rows for a few epochs (multi-fidelity) and is pruned "
                                   "per epoch. Studies are named <phase>-<cache id>.")
    p.add_argument("--phase", default="both", choices=("head", "tail", "both"), help="which phase(s) (default both)")
    p.add_argument("--engine", default="optuna", help="optuna (default) or kerastuner")
    p.add_argument("--trials", type=int, default=None,
                   help=f"phase-1 trials per worker (default {BUDGETS['head'].trials}; KerasTuner Hyperband sets "
                        "its own)")
    p.add_argument("--tail-trials", type=int, default=None,
                   help=f"phase-2 trials per worker (default {BUDGETS['tail'].trials})")
    for n, phase, rows, epochs in ((1, "head", "--head-rows", "--max-epochs"),
                                   (2, "tail", "--tail-rows", "--tail-max-epochs")):
        budget = BUDGETS[phase]
        p.add_argument(rows, type=int, default=budget.rows,
                       help=f"phase-{n} budget: stratified training images per trial (default {budget.rows}; 0: all)")
        p.add_argument(epochs, type=int, default=budget.max_epochs,
                       help=f"phase-{n} budget: epochs per trial (default {budget.max_epochs})"
                            + ("; on fewer training images than --tail-rows, the final's epochs" if n == 2 else ""))
    p.add_argument("--search-depth", action="store_true",
                   help="phase 2 also searches how many of the tail's blocks to unfreeze (default: all of them, "
                        "fixed; the default trial budget ranks depths in reverse, results/bench_search.json)")
    p.add_argument("--search-rate", action="store_true",
                   help="phase 2 searches the tail rate even when its trials train less than the final "
                        "(default: only when they do; else held at its default, as a short budget ranks rates "
                        "in reverse, results/bench_search.json; such a search's best trial then ships only "
                        "with --params study)")
    p.add_argument("--head-batch-size", type=int, default=None,
                   help="phase-1 budget: rows per optimizer step of a trial (default "
                        f"{BUDGETS['head'].batch_size}; the final head trains in batches of {HEAD_BATCH_SIZE})")
    p.add_argument("--workers", type=int, default=1,
                   help="worker processes sharing each study (Optuna, needs --storage)")
    p.add_argument("--storage", default=None,
                   help="Optuna storage URL (default sqlite:///RESULTS/study.db; postgresql+psycopg2://... "
                        "for workers on several machines)")
    p.add_argument("--study-name", default=None, help="study/project name (default <phase>-<cache id>)")
    p.add_argument("--pruner", default=None,
                   help="Optuna pruner: asha (default: successive halving, a phase-1 trial judged after epochs 2 "
                        "and 4, a 2-epoch phase-2 trial after epoch 1), "
                        "hyperband (brackets that judge later too), median or none")
    p.add_argument("--oracle", default=None, help="KerasTuner oracle: bayesian (default) or hyperband")
    p.add_argument("--default-trial", action=argparse.BooleanOptionalAction, default=None,
                   help="run the documented defaults (search/space.py) as a new study's first trial, so the search "
                        "measures them at its own budget (Optuna: default yes; KerasTuner cannot)")
    p.add_argument("--worker-index", type=int, default=0,
                   help="offsets the sampler seed of parallel workers (set by --workers)")
    p.add_argument("--heartbeat", type=int, default=None,
                   help="Optuna trial heartbeat in seconds: trials of a killed worker are marked FAIL "
                        "after 2x this (default 30)")
    p.add_argument("--folds", type=int, default=None,
                   help=f"cross-validation folds of a trial of either phase (default: {selection.FOLDS} below "
                        f"{selection.SMALL_DATA_ROWS} training images, fewer if a class is too small; else 1, "
                        "the validation split)")
    _add_precision_arg(p)
    p.add_argument("--time-budget", type=float, default=None, metavar="MINUTES",
                   help="stop starting trials after this many minutes for the whole search (both phases; "
                        "phase 2 gets what phase 1 left); default: no limit")
    p.add_argument("--mirrored-rows", dest="use_flips", action="store_true",
                   help="phase-1 trials also train on the cached mirror images as extra rows (default: originals "
                        "only, half the cost; the final head always uses them)")

    p = _cache_verb(sub, "final", help="train head + tail on the cache, save cifar10.h5 and results/final.json")
    p.add_argument("--params", default="auto",
                   help="'auto' (each phase's best trial of the search on this cache key, else the default), "
                        "'default', 'study' (error if a phase has no search) or JSON {\"head\": {...}, "
                        "\"tail\": {...}}")
    p.add_argument("--tail-epochs", type=int, default=FINAL.tail_epochs,
                   help=f"epochs of tail fine-tuning (0: head only; default {FINAL.tail_epochs})")
    p.add_argument("--head-epochs", type=int, default=FINAL.head_epochs,
                   help=f"max epochs of the head on pooled features (default {FINAL.head_epochs})")
    _add_precision_arg(p)
    p.add_argument("--bn-passes", type=int, default=FINAL.bn_passes,
                   help="passes re-estimating the tail's BN statistics after training; the new statistics "
                        f"are kept only if validation accuracy does not drop (default {FINAL.bn_passes})")
    p.add_argument("--name", default=None,
                   help="name this run: its final.json and stage rows go to RESULTS/runs/NAME/ (the searches are "
                        "still read from RESULTS/), and the model to RESULTS/runs/NAME/model.h5 unless --output")
    p.add_argument("--reference-resolution", type=int, default=FINAL.reference_resolution,
                   help="input side at which the run times this machine for its normalized minutes (default: the "
                        "backbone's native side, whatever --resolution, so that runs of every side compare; a "
                        "smaller side only for quick runs, whose minutes then compare with no other run)")
    p.add_argument("--no-tta", dest="tta", action="store_false",
                   help="never average the predictions of mirrored or shifted views in the saved model")
    p.add_argument("--output", default=None, help=f"where to save the model (default ./{FINAL.output}, or the "
                                                   "run's folder with --name)")

    p = sub.add_parser("evaluate", help="run the classic evaluation script, unmodified, on ./cifar10.h5")
    p.add_argument("--model", default="cifar10.h5", help="model to evaluate (default ./cifar10.h5)")
    p.add_argument("--data", default=None, help=".npz to serve as cifar10.load_data (default $CIFAR10_NPZ)")
    p.add_argument("--results", default="results", help="where evaluate.json goes (default results/)")

    p = sub.add_parser("report", help="HTML/PNG/summary/CSV report of a study -> results/report/")
    p.add_argument("--results", default="results", help="results folder (default results/)")
    p.add_argument("--out", default=None, help="output folder (default RESULTS/report)")
    p.add_argument("--phase", default="head", choices=("head", "tail"), help="which phase's study (default head)")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default: the latest search's)")
    p.add_argument("--study-name", default=None, help="study name in --storage")
    p.add_argument("--kerastuner-dir", default=None, help="a KerasTuner project folder instead")

    p = sub.add_parser("paper", help="docs/paper.md + docs/paper.html from docs/paper_template.md and results/")
    p.add_argument("--results", default="results", help="results folder (default results/)")
    p.add_argument("--docs", default="docs", help="folder with paper_template.md (default docs/)")
    p.add_argument("--data", default=None, help="CIFAR-10 .npz for the figure (default $CIFAR10_NPZ)")

    p = sub.add_parser("compare", help="frontier, seeds and search effect of finished final runs -> results/",
                       description="Reads final runs (NAME of `final --name NAME`, or LABEL=PATH of a final.json) "
                                   "and writes frontier.json (+ .png), seeds.json (runs sharing the first run's "
                                   "recipe) and, with --default and --searched, search_pair.json. Trains and scores "
                                   "nothing.")
    p.add_argument("runs", nargs="+", metavar="NAME|LABEL=PATH",
                   help="a named run (RESULTS/runs/NAME/final.json), or a final run's JSON and its label")
    p.add_argument("--default", dest="default_run", default=None, help="label of the run with default parameters")
    p.add_argument("--searched", dest="searched_run", default=None, help="label of the run with searched parameters")
    p.add_argument("--results", default="results", help="where the JSON files go (default results/)")

    p = sub.add_parser("results-table", help="the README's results table from results/ (between its markers)")
    p.add_argument("--results", default="results", help="results folder (default results/)")
    p.add_argument("--readme", default="README.md", help="the file whose table is replaced (default README.md)")

    p = sub.add_parser("effect", help="search + final against final --params default, per dataset and seed "
                                      "-> results/search_effect.json",
                       description="For each dataset and seed: `search` then `final` (the shipping rule decides), "
                                   "and `final --params default`, in fresh processes on one shared cache; writes "
                                   "test accuracies with 95 % intervals, search wall time and trial counts.")
    p.add_argument("--datasets", default="lowdata,digits",
                   help="comma-separated among lowdata (6 CIFAR-10 classes x 300 images from ../shared's archive), "
                        "digits (scikit-learn's digits as PNG folders), cifar10 (hours); default lowdata,digits")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds (default 0,1)")
    p.add_argument("--results", default="results", help="results folder (default results/)")
    p.add_argument("--cache-dir", default="cache", help="folder of feature caches (default cache/)")
    p.add_argument("--shared", default="../shared", help="the shared folder with data/cifar10-jpeg.tar.xz")
    p.add_argument("--search-args", default="", help="extra arguments of every `search` (quoted), e.g. '--trials 20'")

    p = _cache_verb(sub, "bench-cache",
                       help="extraction vs raw predict, CPU seconds, allocators -> results/bench_cache.json")
    p.add_argument("--images", type=int, default=2000, help="images to time (default 2000)")

    p = _cache_verb(sub, "bench-search",
                       help="phase-1/phase-2 trial times, fidelity ranking -> results/bench_search.json")
    p.add_argument("--trials", type=int, default=20, help="phase-1 trials to time (default 20)")
    p.add_argument("--rank-configs", type=int, default=20,
                   help="configurations trained at the fast fidelity and in full for Kendall tau (default 20)")
    p.add_argument("--configs-seed", type=int, default=2,
                   help="seed of the random configurations ranked (default 2: not the 20 of seed 1 on which the "
                        "trial batch size was chosen)")
    p.add_argument("--full-epochs", type=int, default=30,
                   help="epoch cap of the full training the fast fidelity is ranked against (default 30, as the "
                        "final head; early stopping)")
    p.add_argument("--tail-trials", type=int, default=3, help="phase-2 trials to time (default 3; 0: skip phase 2)")
    p.add_argument("--baseline-trials", type=int, default=20,
                   help="phase-1 trials first run with plain Keras feeding (numpy arrays to every fit, no gc freeze) "
                        "as the baseline of the trial time (default 20; 0: skip)")
    p.add_argument("--epoch-images", type=int, default=1000,
                   help="images timed through the full backbone to estimate one end-to-end epoch")

    p = _cache_verb(sub, "bench-tail",
                       help="phase-2 fidelity: random tail configurations at trial budgets and at a reference, "
                            "Kendall tau -> results/bench_search.json (phase2_fidelity; with --search-depth "
                            "phase2_fidelity_search_depth)")
    p.add_argument("--budgets", default=None,
                   help="trial budgets ROWSxEPOCHS, comma-separated (default: the phase-2 default budget)")
    p.add_argument("--reference", default="20000x5", help="the longer training ranked against (default 20000x5)")
    p.add_argument("--configs", type=int, default=8, help="random tail configurations (default 8)")
    p.add_argument("--configs-seed", type=int, default=3, help="seed of the configurations (default 3)")
    p.add_argument("--fix", action="append", default=[], metavar="NAME=VALUE",
                   help="hold a phase-2 parameter at one value in every configuration (repeatable), e.g. "
                        "--fix tail_learning_rate=0.001: does the budget rank the rest of the space? "
                        "(written under phase2_fidelity_fixed_NAME)")
    p.add_argument("--fresh", action="store_true",
                   help="train every configuration again (default: a training results/bench_search.json already "
                        "holds for this cache, configuration and budget settings is reused)")
    p.add_argument("--search-depth", action="store_true",
                   help="configurations of every depth (default: all of the tail's blocks unfrozen, as the search)")
    p.add_argument("--time-trials", type=int, default=0, metavar="N",
                   help="instead of the fidelity: time N trials of the default phase-2 search, after "
                        "--baseline-trials validated the Keras way, and normalize the seconds of "
                        f"{GOALS.tail_trials} trials by this machine's in-run speed -> results/bench_search.json "
                        "(phase2_trials)")
    p.add_argument("--baseline-trials", type=int, default=4,
                   help="with --time-trials: the baseline's trials (default 4; 0: none)")
    _add_precision_arg(p)

    p = _cache_verb(sub, "bench-memory",
                       help="resident memory over a long phase-1 search -> results/bench_memory.json")
    p.add_argument("--trials", type=int, default=200, help="phase-1 trials at the default budget (default 200)")
    p.add_argument("--baseline-trials", type=int, default=30,
                   help="then this many trials without releasing TensorFlow's per-trial graphs, the baseline "
                        "(default 30; 0: skip)")
    return parser


def _setup(args: argparse.Namespace):
    """The backbone spec (cut and resolution checked before any data is read) and the splits."""
    from search import backbones, data

    spec = backbones.get_backbone(args.backbone)
    spec.resolve(args.cut, args.resolution)
    _weights(args)
    splits = data.load_data(args.data, val_size=args.val_size, seed=args.seed, image_size=args.image_size,
                            cache_root=getattr(args, "cache_dir", "cache"), progress=not getattr(args, "quiet", False))
    import keras

    keras.utils.set_random_seed(args.seed)  # random-weight backbones (tests) build the same
    if getattr(args, "limit", None):
        splits = splits.subset(args.limit, max(10, args.limit // 5), min(args.val_size or 10**9, args.limit // 5),
                               args.seed)
    return splits, spec


def _weights(args: argparse.Namespace) -> str | None:
    if str(args.weights).lower() in ("none", "random", ""):
        return None
    if args.weights != "imagenet":
        raise UserError(f"--weights must be 'imagenet' or 'none', got {args.weights!r}")
    return "imagenet"


def _cache(args: argparse.Namespace, splits, spec, chunk_size: int | None = None, model=None):
    from search.cache import ensure_cache

    return ensure_cache(spec, splits, cut=args.cut, resolution=args.resolution, flip=args.mirror == "images",
                        weights=_weights(args), root=args.cache_dir, build=args.build,
                        chunk_size=chunk_size or CHUNK_SIZE, progress=not args.quiet, model=model)


def cmd_extract(args: argparse.Namespace, argv: list[str]) -> int:
    splits, spec = _setup(args)
    cache = _cache(args, splits, spec, args.chunk_size)
    print(f"cache {'reused' if cache.stats['hit'] else 'built'}: {cache.path}")
    return 0


def cmd_search(args: argparse.Namespace, argv: list[str]) -> int:
    from search import engines

    phases = ("head", "tail") if args.phase == "both" else (args.phase,)
    if args.time_budget is not None and args.time_budget <= 0:
        raise UserError(f"--time-budget must be a positive number of minutes, got {args.time_budget}")
    if args.folds is not None and args.folds < 1:
        raise UserError(f"--folds must be at least 1, got {args.folds}")
    deadline = None if args.time_budget is None else time.monotonic() + 60 * args.time_budget
    engine = engines.make_engine(args.engine, storage=args.storage, pruner=args.pruner, oracle=args.oracle,
                                 heartbeat=args.heartbeat, seed=args.seed, worker_index=args.worker_index,
                                 default_trial=args.default_trial,
                                 progress=not args.quiet, results=args.results)
    if args.workers > 1:
        return _spawn_workers(args, argv, phases, engine)
    from search.engines.objective import make_objective

    splits, spec = _setup(args)
    _, resolution = spec.resolve(args.cut, args.resolution)
    model = spec.build(weights=_weights(args), size=resolution)
    cache = _cache(args, splits, spec, model=model)
    budgets = {"head": (args.head_rows or None, args.max_epochs, args.trials or BUDGETS["head"].trials),
               "tail": (args.tail_rows or None, args.tail_max_epochs, args.tail_trials or BUDGETS["tail"].trials)}
    for phase in phases:
        rows, max_epochs, trials = budgets[phase]
        if args.engine == "kerastuner" and args.oracle == "hyperband":
            trials = args.trials if phase == "head" else args.tail_trials  # Hyperband refuses an explicit count
        objective = make_objective(phase, cache, splits, rows, max_epochs, backbone=model, results=args.results,
                                   seed=args.seed, mirrored=args.use_flips, batch_size=args.head_batch_size,
                                   folds=args.folds, precision=args.tail_precision, search_depth=args.search_depth,
                                   search_rate=True if args.search_rate else None)
        log.info("phase %s: %s trials, budget %s", phase, trials, objective.budget)
        name = f"{args.study_name}-{phase}" if args.study_name and len(phases) > 1 else args.study_name
        timeout = None if deadline is None else max(1.0, deadline - time.monotonic())
        summary = engine.run(objective, trials, study_name=name, timeout=timeout)
        print(json.dumps({"phase": phase, **summary}, indent=2, default=str))
    return 0


def _spawn_workers(args: argparse.Namespace, argv: list[str], phases: tuple[str, ...], engine: Any) -> int:
    """Start ``--workers`` processes per phase on one study each (shared through the storage URL)."""
    if args.engine != "optuna":
        raise UserError("--workers > 1 needs --engine optuna (KerasTuner runs one process here)")
    if args.storage is None or args.study_name is None:
        raise UserError("--workers > 1 needs --storage and --study-name shared by every worker")
    from search.engines.optuna_engine import open_study

    own = ("--workers", "--phase", "--worker-index", "--study-name")
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in own:
            skip = True
        elif not a.startswith(tuple(f"{o}=" for o in own)):
            rest.append(a)
    codes: list[int] = []
    for phase in phases:
        name = f"{args.study_name}-{phase}" if len(phases) > 1 else args.study_name
        # created here: concurrent first-time creation races (and so would the defaults' trial)
        options = {}
        if phase == "tail":
            from search.backbones import get_backbone

            spec = get_backbone(args.backbone)
            options = {"max_unfreeze": len(spec.tail_blocks(spec.cut_layer(args.cut))) + 1,
                       "search_depth": args.search_depth}
        engine.enqueue_defaults(open_study(args.storage, name, heartbeat=args.heartbeat), phase, options)
        procs = [subprocess.Popen([sys.executable, "-m", "search.cli", *rest, "--phase", phase, "--study-name", name,
                                   "--quiet", "--worker-index", str(w)], cwd=os.getcwd())
                 for w in range(args.workers)]
        codes += [p.wait() for p in procs]
        print(f"phase {phase}: {args.workers} workers finished with exit codes {codes[-args.workers:]}")
        if any(codes):
            break
    return workers_status(codes)


def workers_status(codes: list[int]) -> int:
    """The exit status of a multi-worker search: 0 only if every worker exited 0; else the first
    failure's code, a worker killed by signal N (code -N, as ``Popen`` reports it) as 128 + N."""
    failed = [c for c in codes if c != 0]
    if not failed:
        return 0
    return 128 - failed[0] if failed[0] < 0 else failed[0]


def _params(text: str) -> str | dict:
    if text in ("auto", "default", "study"):
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise UserError("--params must be auto, default, study or a JSON object") from None
    if not isinstance(value, dict):
        raise UserError("--params JSON must be an object {\"head\": {...}, \"tail\": {...}}")
    return value


def cmd_final(args: argparse.Namespace, argv: list[str]) -> int:
    run_dir = run_folder(args.results, args.name) if args.name is not None else None
    output = args.output or (str(run_dir / "model.h5") if run_dir else FINAL.output)
    config = FinalConfig(
        backbone=args.backbone, weights=_weights(args), cut=args.cut, resolution=args.resolution,
        reference_resolution=args.reference_resolution, mirror=args.mirror, data=args.data,
        image_size=args.image_size, val_size=args.val_size, seed=args.seed,
        params=_params(args.params),
        head_epochs=args.head_epochs, tail_epochs=args.tail_epochs, bn_passes=args.bn_passes, tta=args.tta,
        tail_precision=args.tail_precision, output=output, results=args.results,
        run_dir=str(run_dir) if run_dir else None, cache_root=args.cache_dir, build_cache=args.build,
        progress=not args.quiet)
    from search.final import build_final  # TensorFlow loads here, after the options were checked

    splits, _ = _setup(args)
    summary = build_final(config, splits)
    shipped = "; ".join(f"{phase}: {p['source']}" + (f" ({p['why']})" if p.get("why") else "")
                        for phase, p in summary["params_provenance"].items())
    print(f"parameters shipped: {shipped}")
    print(f"saved {summary['model_path']}: val accuracy {summary['val_accuracy']:.4f}, "
          f"test accuracy {summary['test_accuracy']:.4f}")
    return 0


def run_folder(results: str | os.PathLike, name: str) -> Path:
    """``RESULTS/runs/NAME``: where a named final run writes; NAME is one plain folder name."""
    import re

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", name):
        raise UserError(f"--name must be letters, digits, '.', '_' or '-' (at most 100), got {name!r}")
    return Path(results) / "runs" / name


def cmd_evaluate(args: argparse.Namespace, argv: list[str]) -> int:
    from search.evaluate import run_classic

    run_classic(args.model, args.data, args.results)
    return 0


def cmd_report(args: argparse.Namespace, argv: list[str]) -> int:
    from search.report import write_report

    out = Path(args.out) if args.out else Path(args.results) / "report"
    summary = write_report(out, args.results, args.storage, args.study_name, args.kerastuner_dir, phase=args.phase)
    best = f"best val accuracy {summary['best_value']:.4f}" if "best_value" in summary else "no completed trial"
    print(f"wrote {out}/index.html ({summary['trials']} trials, {best})")
    return 0


def cmd_paper(args: argparse.Namespace, argv: list[str]) -> int:
    from search.paper import write_paper

    print(f"wrote {write_paper(args.results, args.docs, args.data)} and paper.html")
    return 0


def cmd_compare(args: argparse.Namespace, argv: list[str]) -> int:
    from search.compare import compare_runs

    runs = {}
    for item in args.runs:
        label, sep, path = item.partition("=")
        if not sep:  # a named run
            path = str(run_folder(args.results, item) / "final.json")
            if not Path(path).exists():
                raise UserError(f"no run named {item!r} ({path} missing); `final --name {item}` makes one")
        elif not label or not path:
            raise UserError(f"runs are NAME or LABEL=PATH, got {item!r}")
        runs[label] = path
    out = compare_runs(runs, args.results, args.default_run, args.searched_run)
    print(json.dumps({k: v for k, v in out.items() if k != "frontier"}, indent=2, default=str))
    return 0


def cmd_results_table(args: argparse.Namespace, argv: list[str]) -> int:
    from search.compare import update_readme

    print(f"{args.readme}: {'table updated' if update_readme(args.readme, args.results) else 'table up to date'}")
    return 0


def cmd_effect(args: argparse.Namespace, argv: list[str]) -> int:
    import shlex

    from search.effect import run_effect

    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--seeds takes comma-separated integers, got {args.seeds!r}") from None
    out = run_effect([d.strip() for d in args.datasets.split(",") if d.strip()], seeds, args.results,
                     args.cache_dir, Path(args.cache_dir) / "effect-data", args.shared, shlex.split(args.search_args))
    for d in out["datasets"]:
        print(f"{d['name']}: searched {d['mean_searched_test']:.4f} vs default {d['mean_default_test']:.4f} "
              f"(mean of seeds {seeds}; difference {d['mean_difference']:+.4f})")
    return 0


def cmd_bench_cache(args: argparse.Namespace, argv: list[str]) -> int:
    from search import bench

    splits, spec = _setup(args)
    out = bench.bench_cache(spec, splits, args.cut, args.resolution, _weights(args), args.images,
                            Path(args.results), argv)
    print(json.dumps(out, indent=2))
    return 0


def cmd_bench_search(args: argparse.Namespace, argv: list[str]) -> int:
    from search import bench

    splits, spec = _setup(args)
    _, resolution = spec.resolve(args.cut, args.resolution)
    model = spec.build(weights=_weights(args), size=resolution)
    cache = _cache(args, splits, spec, model=model)
    out = bench.bench_search(cache, splits, spec, model, args.trials, args.rank_configs, args.tail_trials,
                             args.epoch_images, Path(args.results), weights=_weights(args),
                             full_max_epochs=args.full_epochs, baseline_trials=args.baseline_trials,
                             configs_seed=args.configs_seed)
    print(json.dumps(out, indent=2))
    return 0


def cmd_bench_tail(args: argparse.Namespace, argv: list[str]) -> int:
    from search import bench, space

    default = space.BUDGETS["tail"]
    budgets = [bench.parse_budget(b) for b in args.budgets.split(",")] if args.budgets else \
        [(default.rows, default.max_epochs)]
    reference = bench.parse_budget(args.reference)
    if args.configs < 2:
        raise UserError(f"--configs must be at least 2 to rank, got {args.configs}")
    if args.time_trials < 0 or args.baseline_trials < 0:
        raise UserError("--time-trials and --baseline-trials count trials: 0 or more")
    if args.fix and args.time_trials:
        raise UserError("--fix holds parameters of the fidelity benchmark; --time-trials times the default search")
    fixed = space.parse_fixed("tail", args.fix, search_depth=args.search_depth)
    splits, spec = _setup(args)
    _, resolution = spec.resolve(args.cut, args.resolution)
    model = spec.build(weights=_weights(args), size=resolution)
    cache = _cache(args, splits, spec, model=model)
    if args.time_trials:
        timed = bench.bench_tail_trials(cache, splits, spec, model, Path(args.results), args.time_trials,
                                        args.baseline_trials, precision=args.tail_precision)
        print(json.dumps({k: timed[k] for k in ("trial_seconds_median", "speedup_median", "goal_trials_normalized")
                          if k in timed}, indent=2, default=str))
        return 0
    out = bench.bench_tail(cache, splits, model, Path(args.results), budgets, reference, args.configs,
                           args.configs_seed, precision=args.tail_precision, reuse=not args.fresh,
                           search_depth=args.search_depth, fixed=fixed)
    print(json.dumps({name: b["kendall_tau"] for name, b in out["budgets"].items()}, indent=2))
    return 0


def cmd_bench_memory(args: argparse.Namespace, argv: list[str]) -> int:
    from search import bench

    splits, spec = _setup(args)
    cache = _cache(args, splits, spec)
    out = bench.bench_memory(cache, splits, args.trials, args.baseline_trials, Path(args.results))
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "rss_mb_after_trial"} if isinstance(v, dict) else v
                      for k, v in out.items()}, indent=2))
    return 0


COMMANDS = {"extract": cmd_extract, "search": cmd_search, "final": cmd_final, "evaluate": cmd_evaluate,
            "report": cmd_report, "paper": cmd_paper, "compare": cmd_compare, "effect": cmd_effect,
            "results-table": cmd_results_table,
            "bench-cache": cmd_bench_cache,
            "bench-search": cmd_bench_search, "bench-tail": cmd_bench_tail, "bench-memory": cmd_bench_memory}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return COMMANDS[args.verb](args, argv)
    except UserError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # anything unforeseen: one line, the traceback on request
        if args.debug:
            raise
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        print(f"error: {args.verb} failed: {type(exc).__name__}: {first} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1


def main_exit() -> None:
    """The console script ``transfer-search``."""
    sys.exit(main())


if __name__ == "__main__":
    main_exit()
