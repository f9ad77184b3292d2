"""Benchmarks that write JSON under ``results/`` (speed goals live here, not in tests).

Entry points: :func:`bench_cache` (``make bench-cache``), :func:`bench_search`
(``make bench-search``) and :func:`bench_memory` (``make bench-memory``). Every ratio is
measured against its baseline in the same run; the machine is shared, so absolute seconds are
indicative only.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from search import ALLOCATOR_ENV, backbones, batches, finetune, heads, space
from search.cache import Cache, build_extractor, ensure_cache
from search.config import GOALS, fidelity_key
from search.data import Splits, one_hot
from search.io import write_json


def _cpu() -> tuple[float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


def _rss_bytes() -> int:
    """Resident set size of this process (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def allocator_probe(backbone: str, cut: str | None, resolution: int | None, weights: str | None, images: int,
                    tail_steps: int) -> dict:
    """In this process (allocator as set at start-up): frozen-pass images/s with user/system CPU
    seconds, and seconds per tail training step (batch 128, float32 and mixed_bfloat16), on random
    pixels (speed only)."""

    spec = backbones.get_backbone(backbone)
    cut_layer, resolution = spec.resolve(cut, resolution)
    model = spec.build(weights=weights, size=resolution)
    extractor = build_extractor(model, spec, cut_layer, resolution)
    x = np.random.default_rng(0).integers(0, 256, (images, 32, 32, 3), dtype=np.uint8)
    extractor.predict(x[:100], batch_size=100, verbose=0)  # trace once
    t0 = time.perf_counter()
    extractor.predict(x, batch_size=100, verbose=0)  # first full call: the allocator's pool grows
    first = time.perf_counter() - t0
    (u0, s0), t0 = _cpu(), time.perf_counter()
    cut_maps, _ = extractor.predict(x, batch_size=100, verbose=0)
    wall, (u1, s1) = time.perf_counter() - t0, _cpu()
    parts = finetune.TailParts.from_backbone(model, cut_layer)
    head = heads.build_head(space.DEFAULTS["head"], tuple(model.outputs[0].shape[1:]))
    xb = np.resize(cut_maps.astype(np.float16), (128, *cut_maps.shape[1:]))
    yb = one_hot(np.arange(128) % 10)
    steps = {}
    for precision in ("float32", "mixed_bfloat16"):
        trainer = finetune.build_tail_trainer(parts, head, head.get_weights(), {}, tail_steps, 1, precision)
        trainer.train_on_batch(xb, yb)  # trace once
        (u2, s2), t2 = _cpu(), time.perf_counter()
        for _ in range(tail_steps):
            trainer.train_on_batch(xb, yb)
        steps[precision] = ((time.perf_counter() - t2) / tail_steps, *np.subtract(_cpu(), (u2, s2)))
    finetune.set_precision(parts.tail, head, "float32")
    return {"allocator": "BFC" if os.environ.get(ALLOCATOR_ENV, "").lower() == "true" else "glibc malloc",
            ALLOCATOR_ENV: os.environ.get(ALLOCATOR_ENV), "images_per_second": images / wall,
            "first_call_images_per_second": images / first,
            "frozen_pass_user_cpu_seconds": u1 - u0, "frozen_pass_system_cpu_seconds": s1 - s0,
            "tail_step_seconds": steps["float32"][0], "tail_steps": tail_steps,
            "tail_user_cpu_seconds": steps["float32"][1], "tail_system_cpu_seconds": steps["float32"][2],
            "tail_step_seconds_mixed_bfloat16": steps["mixed_bfloat16"][0],
            "tail_step": "batch 128, the default head; float32 and mixed_bfloat16 (finetune.measure_precision)"}


def _probe_subprocess(allocator: str, args: dict) -> dict:
    env = {**os.environ, ALLOCATOR_ENV: allocator}
    out = subprocess.run([sys.executable, "-m", "search.bench", json.dumps(args)], env=env, capture_output=True,
                         text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"allocator probe failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def import_seconds() -> dict:
    """Seconds to import ``tensorflow`` and then ``0-transfer`` on top of it, in a fresh process
    (the course's script imports both; importing ``0-transfer`` must stay light)."""
    root = Path(__file__).resolve().parent.parent
    code = ("import time, sys; t = time.perf_counter(); import tensorflow; t_tf = time.perf_counter() - t;"
            f"sys.path.insert(0, {str(root)!r}); t = time.perf_counter(); __import__('0-transfer');"
            "print(t_tf, time.perf_counter() - t)")
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run([sys.executable, "-c", code], cwd=tmp, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"import probe failed: {out.stderr.strip().splitlines()[-1:]}")
    t_tf, t_module = (float(v) for v in out.stdout.strip().splitlines()[-1].split())
    return {"tensorflow_seconds": t_tf, "0-transfer_beyond_tensorflow_seconds": t_module}


def bench_cache(spec: backbones.BackboneSpec, splits: Splits, cut: str | None, resolution: int | None,
                weights: str | None, images: int, results: Path, argv: list[str] | None = None,
                tail_steps: int = 10, compare_allocators: bool = True) -> dict:
    """Extraction throughput (chunked, resumable, written to disk, BN folded as the cache runs it)
    vs raw ``predict`` of the same frozen part as Keras builds it, on the same images (its second
    full call: the first also pays for the allocator's pool growing, recorded apart), with user
    and system CPU seconds; then the frozen pass and a tail training step (float32 and
    mixed_bfloat16) with TensorFlow's BFC allocator and with glibc's, each in a fresh process.
    Goal: extraction / raw predict >= 0.9 (the raw pass is the machine's speed: wall times are
    normalized with it)."""
    cut_layer, resolution = spec.resolve(cut, resolution)
    model = spec.build(weights=weights, size=resolution)
    sub = splits.subset(images, max(10, images // 10), max(1, images // 50))
    plain = build_extractor(model, spec, cut_layer, resolution, fold=False)  # the machine's speed
    plain.predict(sub.x_train[:100], batch_size=100, verbose=0)  # warm-up: trace once
    t = time.perf_counter()
    plain.predict(sub.x_train, batch_size=100, verbose=0)  # first full call: the allocator's pool grows
    raw_first = len(sub.x_train) / (time.perf_counter() - t)
    (u0, s0), t = _cpu(), time.perf_counter()
    plain.predict(sub.x_train, batch_size=100, verbose=0)
    raw_wall, (u1, s1) = time.perf_counter() - t, _cpu()
    extractor = build_extractor(model, spec, cut_layer, resolution)  # what the cache runs: BN folded
    extractor.predict(sub.x_train[:100], batch_size=100, verbose=0)  # trace once, as the raw pass
    (u1, s1) = _cpu()
    with tempfile.TemporaryDirectory() as tmp:
        cache = ensure_cache(spec, sub, cut=cut, resolution=resolution, flip=False, weights=weights,
                             root=tmp, progress=False, model=model, extractor=extractor)
        (u2, s2) = _cpu()
        n = len(sub.x_train) + len(sub.x_test)
        extraction = n / cache.stats["seconds"]
        in_loop_predict = n / cache.manifest["extraction"]["predict_seconds"]
    raw = len(sub.x_train) / raw_wall
    probe_args = {"backbone": spec.name, "cut": cut, "resolution": resolution, "weights": weights,
                  "images": min(images, 600), "tail_steps": tail_steps}
    allocators = {name: _probe_subprocess(value, probe_args) for name, value in (("bfc", "true"), ("glibc", "false"))
                  if compare_allocators}
    reference = backbones.reference_speed(model, cut_layer, resolution)  # what `final` measures in its run
    # the same batch timed each way in one process, the two alternating, so both see the same machine
    by_method: dict[str, list] = {m: [] for m in backbones.REFERENCE_METHODS}
    for _ in range(3):
        for m in backbones.REFERENCE_METHODS:
            by_method[m].append(backbones.reference_speed(model, cut_layer, resolution, repeats=5, method=m))
    by_method = {m: _pooled(rows) for m, rows in by_method.items()}
    out = {"backbone": spec.name, "cut_layer": cut_layer, "resolution": resolution, "weights": str(weights),
           "images": images, "allocator": os.environ.get(ALLOCATOR_ENV), "reference_speed": reference,
           "reference_speed_by_method": by_method,
           "raw_predict": "Keras predict of the frozen part as the application builds it (BN not folded), "
                          "in calls of 100 images: what extraction is compared with (goal_ratio)",
           "extraction_folds_batch_norm": True,
           "raw_predict_images_per_second": raw, "raw_predict_first_call_images_per_second": raw_first,
           "raw_predict_user_cpu_seconds": u1 - u0,
           "raw_predict_system_cpu_seconds": s1 - s0,
           "extraction_images_per_second": extraction, "extraction_user_cpu_seconds": u2 - u1,
           "extraction_system_cpu_seconds": s2 - s1, "ratio": extraction / raw,
           "in_loop_predict_images_per_second": in_loop_predict,
           "share_of_extraction_time_in_predict": extraction / in_loop_predict,
           "allocator_comparison": allocators, "import": import_seconds(),
           "frozen_pass_speedup_bfc_over_glibc": allocators["bfc"]["images_per_second"]
           / allocators["glibc"]["images_per_second"] if allocators else None,
           "tail_step_speedup_bfc_over_glibc": allocators["glibc"]["tail_step_seconds"]
           / allocators["bfc"]["tail_step_seconds"] if allocators else None,
           "tail_step_speedup_bf16_over_float32": allocators["bfc"]["tail_step_seconds"]
           / allocators["bfc"]["tail_step_seconds_mixed_bfloat16"] if allocators else None,
           "goal_ratio": GOALS.extraction_over_raw_predict,
           "command": "python -m search.cli " + " ".join(argv or ["bench-cache"]),
           "recorded": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_json(results / "bench_cache.json", out)
    return out


def _pooled(rows: list[dict]) -> dict:
    """Repeats of :func:`backbones.reference_speed` taken in rounds, pooled: every speed, their
    median and relative spread ``(max - min) / median``."""
    speeds = [v for r in rows for v in r["speeds"]]
    median = float(np.median(speeds))
    return {**rows[0], "speeds": speeds, "repeats": len(speeds), "rounds": len(rows), "images_per_second": median,
            "min": min(speeds), "max": max(speeds), "relative_spread": (max(speeds) - min(speeds)) / median}


def kendall_tau(a: list[float], b: list[float], groups: list[Any] | None = None) -> float:
    """Kendall's tau-b of two equally long score lists (ties counted as neither). With ``groups``
    (one label per item), only the pairs within a group count: a stratified tau, how well ``a``
    ranks items that share a label (0.0 when no group holds two)."""
    n, concordant, discordant, ties_a, ties_b = len(a), 0, 0, 0, 0
    for i in range(n):
        for j in range(i + 1, n):
            if groups is not None and groups[i] != groups[j]:
                continue
            da, db = np.sign(a[i] - a[j]), np.sign(b[i] - b[j])
            if da == 0 and db == 0:
                continue
            if da == 0:
                ties_a += 1
            elif db == 0:
                ties_b += 1
            elif da == db:
                concordant += 1
            else:
                discordant += 1
    denom = np.sqrt((concordant + discordant + ties_a) * (concordant + discordant + ties_b))
    return float((concordant - discordant) / denom) if denom else 0.0


def _train_at_each(params: dict, objectives: dict[str, Any], seed: int) -> dict:
    """One fidelity row: ``params`` trained by each objective (its whole budget), with its score
    (``NAME``), seconds (``NAME_seconds``) and validation accuracy per epoch (``NAME_history``)."""
    import keras

    row: dict[str, Any] = {"params": params}
    for name, obj in objectives.items():
        start = time.perf_counter()
        history = keras.callbacks.History()
        row[name] = obj.fit(obj.build(params, seed=seed), obj.max_epochs, [history])
        row[f"{name}_seconds"] = time.perf_counter() - start
        row[f"{name}_history"] = [float(v) for v in history.history["val_accuracy"]]
    return row


def rung_taus(ranking: list[dict], steps: tuple[int, ...], key: str = "fast") -> list[dict]:
    """Kendall tau against full training of the score a trial reports at each pruner rung.

    ``ranking`` rows hold ``{key}_history`` (validation accuracy per epoch at the trial budget),
    ``{key}`` (its best) and ``full``. ``steps`` are the rungs' epoch indices (from 0,
    ``optuna_engine.rung_epochs``): at ``s`` a trial's score is its accuracy after epoch
    ``s + 1``, or its best one if early stopping ended it before; the last entry is the whole
    budget (the trial's value, its best epoch).
    """
    out = []
    for step in steps:
        scores = [h[step] if len(h) > step else max(h) for h in (r[f"{key}_history"] for r in ranking)]
        out.append({"step": step, "epochs": step + 1,
                    "kendall_tau": kendall_tau(scores, [r["full"] for r in ranking])})
    out.append({"step": None, "epochs": "budget",
                "kendall_tau": kendall_tau([r[key] for r in ranking], [r["full"] for r in ranking])})
    return out


TRIAL_STATES = ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")  # the last two must be 0 after a search


def _states(study: Any) -> dict[str, int]:
    """How many of ``study``'s trials are in each state of :data:`TRIAL_STATES`."""
    return {s: sum(t.state.name == s for t in study.trials) for s in TRIAL_STATES}


def _study_seconds(study: Any) -> np.ndarray:
    return np.array([t.user_attrs["seconds"] for t in study.trials if "seconds" in t.user_attrs])


def _search_study(objective: Any, trials: int, pruner: str | None = None, sampler_trials: int | None = None
                  ) -> tuple[Any, list[int]]:
    """``trials`` trials of either phase through the Optuna engine's trial runner (in-memory
    study, the default sampler sized for ``sampler_trials`` trials (default ``trials``: the same
    sizing draws the same configurations), the default pruner unless ``pruner``); resident
    bytes after every trial."""
    import optuna

    from search.engines.optuna_engine import DEFAULT_PRUNER, OptunaEngine, make_pruner, make_sampler

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    engine = OptunaEngine(storage="sqlite:///:memory:", progress=False)
    study = optuna.create_study(direction="maximize", sampler=make_sampler(0, sampler_trials or trials),
                                pruner=make_pruner(pruner or DEFAULT_PRUNER, objective.max_epochs))
    rss: list[int] = []
    study.optimize(engine.objective_fn(objective), n_trials=trials, catch=(Exception,), gc_after_trial=True,
                   callbacks=[lambda study, trial: rss.append(_rss_bytes())])
    return study, rss


def _search_times(objective: Any, trials: int, pruner: str | None = None, sampler_trials: int | None = None
                  ) -> tuple[dict, list[int]]:
    """:func:`_search_study`, timed: its :func:`_trial_times` (wall time included) and resident bytes."""
    start = time.perf_counter()
    study, rss = _search_study(objective, trials, pruner, sampler_trials)
    return _trial_times(study, time.perf_counter() - start), rss


def _trial_times(study: Any, wall: float) -> dict:
    """Median and p90 of the trials' own seconds (and every one), wall seconds per trial (with
    what runs between trials: sampler, pruner, garbage collection), trial states and the best value."""
    seconds = _study_seconds(study)
    return {"trials": len(study.trials), "trial_seconds": seconds.tolist(),
            "trial_seconds_median": float(np.median(seconds)),
            "trial_seconds_p90": float(np.percentile(seconds, 90)), "wall_seconds_per_trial": wall / len(study.trials),
            "states": _states(study),
            "best_value": study.best_value if any(t.state.name == "COMPLETE" for t in study.trials) else None}


def _growth(rss: list[int], start: int = 10) -> dict:
    """Resident memory after trial ``start`` and after the last, their difference in percent, MB/trial."""
    if len(rss) <= start:
        return {}
    a, b = rss[start - 1], rss[-1]
    return {f"rss_mb_after_trial_{start}": round(a / 2**20, 1), f"rss_mb_after_trial_{len(rss)}": round(b / 2**20, 1),
            "growth_pct": round(100 * (b - a) / a, 2), "mb_per_trial": round((b - a) / 2**20 / (len(rss) - start), 2),
            "rss_mb_max": round(max(rss[start - 1:]) / 2**20, 1)}


def bench_memory(cache: Cache, splits: Splits, trials: int, baseline_trials: int, results: Path) -> dict:
    """A ``trials``-trial phase-1 search at the default budget on the real cache, resident memory
    after every trial (goal: after the last within 5 % of after trial 10), every trial finished;
    then, as the baseline in the same process, ``baseline_trials`` more trials with the release of
    TensorFlow's per-trial graphs turned off (:func:`search.tfgraph.release_custom_gradients`)."""
    from search.engines.objective import HeadObjective
    from search.errors import UserError

    if trials <= 10 or baseline_trials < 0:
        raise UserError(f"--trials must be more than 10 (growth is measured from trial 10), got {trials}; "
                        f"--baseline-trials at least 0, got {baseline_trials}")
    budget = space.BUDGETS["head"]
    data = batches.PooledData.from_cache(cache, splits)
    runs = {}
    for name, n, release in (("released", trials, True), ("baseline_not_released", baseline_trials, False)):
        if not n:
            continue
        objective = HeadObjective(data, cache.path.name, rows=budget.rows, max_epochs=budget.max_epochs,
                                  mirrored=budget.mirrored, release_graphs=release)
        study, rss = _search_study(objective, n)
        runs[name] = {"trials": len(study.trials),
                      "states": _states(study),
                      **_growth(rss), "rss_mb_after_trial": [round(r / 2**20, 1) for r in rss]}
    out = {"cache": cache.path.name, "budget": {"rows": budget.rows, "max_epochs": budget.max_epochs},
           "goal_growth_pct": GOALS.memory_growth_pct, **runs,
           "meets_goal": (runs["released"]["growth_pct"] <= GOALS.memory_growth_pct
                          and runs["released"]["states"]["RUNNING"] == 0),
           "recorded": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_json(results / "bench_memory.json", out)
    return out


def bench_search(cache: Cache, splits: Splits, spec: backbones.BackboneSpec, model: Any, trials: int,
                 rank_configs: int, tail_trials: int, epoch_images: int, results: Path,
                 weights: str | None = "imagenet", full_max_epochs: int = 30, baseline_trials: int = 0,
                 compare_pruners: tuple[str, ...] = ("hyperband",), configs_seed: int = 2,
                 compare_batch_sizes: tuple[int, ...] = (space.HEAD_BATCH_SIZE,)) -> dict:
    """Phase-1 trial seconds (median, p90) at the default budget, after ``baseline_trials`` trials of
    the same search fed as plain Keras code feeds it (the baseline, same process), and then under
    each of ``compare_pruners``; Kendall tau between that budget's score (and the score at each
    pruner rung: :func:`rung_taus`) and full training (all rows and mirrors, as the final head: up
    to ``full_max_epochs`` epochs in batches of ``space.HEAD_BATCH_SIZE``, early stopping)
    for ``rank_configs`` random configurations drawn with seed ``configs_seed``, and the same tau
    for the trial budget at each of ``compare_batch_sizes``; phase-2 trial seconds at its default budget;
    one end-to-end epoch with the backbone in the loop (timed on ``epoch_images`` images, scaled
    to the training split); resident memory after every phase-1 trial."""
    import keras
    import optuna

    from search import train
    from search.engines.objective import HeadObjective, make_objective
    from search.engines.optuna_engine import DEFAULT_PRUNER, OptunaEngine, make_pruner, make_sampler, rung_epochs

    budget = space.BUDGETS["head"]
    engine = OptunaEngine(storage="sqlite:///:memory:", progress=False)
    data = batches.PooledData.from_cache(cache, splits)
    baseline = None
    if baseline_trials:  # first: a head objective freezes the garbage collector for the whole process
        plain = HeadObjective(data, cache.path.name, rows=budget.rows, max_epochs=budget.max_epochs,
                              mirrored=budget.mirrored, batch_size=space.head_trial_batch_size(), plain_keras=True)
        baseline = {"what": "the same search with plain Keras feeding (numpy arrays to every fit) and no gc freeze",
                    **_search_times(plain, baseline_trials)[0]}
    head_obj = HeadObjective(data, cache.path.name, rows=budget.rows, max_epochs=budget.max_epochs,
                             mirrored=budget.mirrored, batch_size=space.head_trial_batch_size())
    head_times, rss = _search_times(head_obj, trials)
    # the same search under another pruner, for comparison
    other_pruners = {name: _search_times(head_obj, trials, name)[0] for name in compare_pruners}

    # fidelity: the same random configurations at the trial budget and trained in full
    full_obj = HeadObjective(data, cache.path.name, rows=None, max_epochs=full_max_epochs, mirrored=True)
    others = {f"batch_{b}": HeadObjective(data, cache.path.name, rows=budget.rows, max_epochs=budget.max_epochs,
                                          mirrored=budget.mirrored, batch_size=b)
              for b in compare_batch_sizes if b != head_obj.batch_size}
    sampler = optuna.samplers.RandomSampler(seed=configs_seed)
    ranking = []
    for i in range(rank_configs):
        trial = optuna.create_study(sampler=sampler).ask()
        params = space.suggest("head", trial)
        ranking.append(_train_at_each(params, {"fast": head_obj, "full": full_obj, **others}, seed=i))
    tau = kendall_tau([r["fast"] for r in ranking], [r["full"] for r in ranking])
    other_budgets = {name: {"budget": obj.budget,
                            "kendall_tau": kendall_tau([r[name] for r in ranking], [r["full"] for r in ranking]),
                            "rungs": rung_taus(ranking, rung_epochs(budget.max_epochs), key=name),
                            "seconds_median": float(np.median([r[f"{name}_seconds"] for r in ranking]))}
                     for name, obj in others.items()}

    tail_budget = space.BUDGETS["tail"]
    tail_obj, tail_study, tail_seconds = None, None, np.array([])
    if tail_trials:
        tail_obj = make_objective("tail", cache, splits, tail_budget.rows, tail_budget.max_epochs, backbone=model,
                                  results=str(results))
        tail_study = optuna.create_study(direction="maximize", sampler=make_sampler(0, tail_trials),
                                         pruner=make_pruner(DEFAULT_PRUNER, tail_budget.max_epochs))
        tail_study.optimize(engine.objective_fn(tail_obj), n_trials=tail_trials, catch=(Exception,))
        tail_seconds = _study_seconds(tail_study)

    keras.backend.clear_session()
    key = cache.key
    from search.final import stitch

    e2e_backbone = spec.build(weights=weights, size=key["resolution"])
    head = train.build_head_model({}, e2e_backbone.outputs[0].shape[-1], cache.num_classes)
    from search import heads

    e2e = heads.compile_for(stitch(spec, e2e_backbone, head, key["cut_layer"], key["resolution"]),
                            space.DEFAULT_HEAD)
    n = min(epoch_images, len(splits.train_idx))
    x = splits.x_train[splits.train_idx[:n]].astype(np.float32)
    y = one_hot(splits.y_train[splits.train_idx[:n]], cache.num_classes)
    e2e.fit(x[:64], y[:64], batch_size=64, epochs=1, verbose=0)  # warm-up: trace once
    t = time.perf_counter()
    e2e.fit(x, y, batch_size=128, epochs=1, verbose=0)
    epoch = (time.perf_counter() - t) * len(splits.train_idx) / n
    median = head_times["trial_seconds_median"]
    out = {
        "cache": cache.path.name,
        "phase1": {"budget": head_obj.budget, "pruner": DEFAULT_PRUNER, **head_times,
                   "other_pruners": other_pruners,
                   "goal_median_trial_seconds": GOALS.median_trial_seconds,
                   "stretch_goal_median_trial_seconds": GOALS.stretch_median_trial_seconds,
                   "baseline": baseline,
                   "speedup_median": baseline["trial_seconds_median"] / median if baseline else None,
                   "speedup_wall": (baseline["wall_seconds_per_trial"] / head_times["wall_seconds_per_trial"]
                                    if baseline else None)},
        "fidelity": {"configs": len(ranking), "configs_seed": configs_seed, "fast_budget": head_obj.budget,
                     "full_budget": full_obj.budget, "kendall_tau": tau, "goal_kendall_tau": GOALS.kendall_tau,
                     "other_budgets": other_budgets,
                     "rungs": rung_taus(ranking, rung_epochs(budget.max_epochs)),
                     "fast_seconds_median": float(np.median([r["fast_seconds"] for r in ranking])),
                     "full_seconds_median": float(np.median([r["full_seconds"] for r in ranking])),
                     "rows": ranking},
        "phase2": {"trials": len(tail_seconds), "budget": tail_obj.budget if tail_obj else None,
                   "trial_seconds_median": float(np.median(tail_seconds)) if len(tail_seconds) else None,
                   "trial_seconds": tail_seconds.tolist(),
                   "rungs_epochs": [1, tail_budget.max_epochs] if tail_budget.max_epochs > 1 else [1],
                   "states": _states(tail_study) if tail_study else None},
        "end_to_end_epoch_seconds": epoch, "end_to_end_epoch_timed_images": n,
        "train_images": len(splits.train_idx), "ratio_epoch_to_median_phase1_trial": epoch / median,
        "rss_mb_after_trial": [round(r / 2**20, 1) for r in rss],
        "memory": _growth(rss),
        "recorded": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    previous = results / "bench_search.json"
    if previous.exists():  # bench-tail's measurement is its own run's: kept
        from search.io import read_json

        kept = read_json(previous)
        out.update({key: kept[key] for key in (fidelity_key(False), fidelity_key(True)) if key in kept})
    write_json(results / "bench_search.json", out)
    return out


def parse_budget(text: str) -> tuple[int, int]:
    """``ROWSxEPOCHS`` (``2000x3``) as ``(rows, epochs)``; one clear error otherwise."""
    from search.errors import UserError

    try:
        rows, epochs = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"a budget is ROWSxEPOCHS, e.g. 2000x3; got {text!r}") from None
    if rows < 1 or epochs < 1:
        raise UserError(f"a budget needs at least 1 row and 1 epoch, got {text!r}")
    return rows, epochs


def tail_fidelity(objective: Any, budgets: list[tuple[int, int]], reference: tuple[int, int], configs: int,
                  configs_seed: int = 3, on_row: Any = None, previous: dict | None = None,
                  fixed: dict[str, Any] | None = None) -> dict:
    """Phase 2's fidelity: ``configs`` random tail configurations (Optuna's ``RandomSampler``,
    seed ``configs_seed``) trained at each trial budget of ``budgets`` and at ``reference``
    (``(rows, epochs)`` each), all from the same head (``objective``'s, a
    :class:`~search.engines.objective.TailObjective`; its precision and PreciseBN); Kendall's tau of
    each budget's score, and of its score at each pruner rung (:func:`rung_taus`), against the
    reference's; and the tau within depth (only pairs that unfreeze as many blocks: how well the
    budget ranks the rates of one depth). ``on_row(partial)`` is called after every configuration
    with the result so far.

    ``previous``: an earlier result of this function (on the same cache). A configuration it
    trained with the same parameters at a budget of the same settings (the budget's whole record:
    rows, epochs, batch, precision, PreciseBN rows, head) is taken from it, not trained again, and
    named in the row's ``reused``; so a new trial budget is ranked against a reference measured
    before.

    ``fixed``: parameters held at one value in every configuration (Optuna's
    ``PartialFixedSampler`` over the random one), to ask whether the budget ranks the rest of the
    space when, say, the tail rate is not in it."""
    import dataclasses

    import optuna

    from search.engines.optuna_engine import rung_epochs

    names = [f"{r}x{e}" for r, e in budgets]
    objectives = {name: dataclasses.replace(objective, rows=r, max_epochs=e)
                  for name, (r, e) in zip(names, budgets, strict=True)}
    objectives["full"] = dataclasses.replace(objective, rows=reference[0], max_epochs=reference[1])
    sampler = optuna.samplers.RandomSampler(seed=configs_seed)
    if fixed:
        sampler = optuna.samplers.PartialFixedSampler(fixed, sampler)
    ranking: list[dict] = []

    def summary() -> dict:
        full = [r["full"] for r in ranking]
        depth = [r["params"]["unfreeze_blocks"] for r in ranking]
        return {"configs": len(ranking), "configs_seed": configs_seed, "goal_kendall_tau": GOALS.tail_kendall_tau,
                "search_depth": bool(objective.space_options.get("search_depth")), "fixed": dict(fixed or {}),
                "reference": objectives["full"].budget,
                "budgets": {name: {"budget": objectives[name].budget,
                                   "kendall_tau": kendall_tau([r[name] for r in ranking], full) if ranking else None,
                                   "kendall_tau_within_depth": kendall_tau([r[name] for r in ranking], full, depth)
                                   if ranking else None,
                                   "rungs": rung_taus(ranking, rung_epochs(objectives[name].max_epochs), key=name)
                                   if ranking else [],
                                   "seconds_median": float(np.median([r[f"{name}_seconds"] for r in ranking]))
                                   if ranking else None}
                            for name in names},
                "full_seconds_median": float(np.median([r["full_seconds"] for r in ranking])) if ranking else None,
                "rows": ranking}

    earlier = _earlier_budgets(previous, configs_seed)
    for i in range(configs):
        trial = optuna.create_study(sampler=sampler).ask()
        params = space.suggest("tail", trial, **objective.space_options)
        old = previous["rows"][i] if earlier and i < len(previous["rows"]) else None
        same = [name for name, obj in objectives.items() if old is not None and old["params"] == params
                and name in old and earlier.get(name) == _training(obj.budget)]
        row = _train_at_each(params, {n: o for n, o in objectives.items() if n not in same}, seed=i)
        row.update({key: old[key] for name in same for key in (name, f"{name}_seconds", f"{name}_history")})
        ranking.append({**row, "reused": same} if same else row)
        if on_row is not None:
            on_row(summary())
    return summary()


def tail_trial_times(objective: Any, trials: int, baseline_trials: int, reference: Callable[[], dict]) -> dict:
    """Phase-2 trial seconds at ``objective``'s budget (a
    :class:`~search.engines.objective.TailObjective`): first ``baseline_trials`` trials of the
    search validated the Keras way (``keras_validation``: a test function traced per trial, then a
    predict over the validation rows for the hits), then ``trials`` trials as the search runs
    them (``finetune.MapsValidation``), both in one process with the same sampler sizing, so
    their first ``baseline_trials`` configurations are the same ones; ``reference()`` (this
    machine's speed, ``backbones.reference_speed``) is measured before and after, and the wall
    seconds of :attr:`GOALS.tail_trials` trials at the search's wall seconds per trial (its
    mean, sampler and pruner included: pruned trials are shorter, so a median would stand for
    one kind of trial only) are normalized with it as a final's minutes are
    (``final.normalized_time``)."""
    import dataclasses

    from search.engines.optuna_engine import DEFAULT_PRUNER
    from search.final import normalized_time

    start = reference()
    baseline = None
    if baseline_trials:
        plain = dataclasses.replace(objective, keras_validation=True)
        baseline = _search_times(plain, baseline_trials, sampler_trials=trials)[0]
    times = _search_times(objective, trials)[0]
    end = reference()
    median = times["trial_seconds_median"]
    out = {"budget": objective.budget, "pruner": DEFAULT_PRUNER, **times, "baseline": baseline,
           "goal_trials": GOALS.tail_trials, "goal_normalized_minutes": GOALS.tail_trials_normalized_minutes,
           "goal_trials_normalized": normalized_time(GOALS.tail_trials * times["wall_seconds_per_trial"], start, end)}
    if baseline:
        n = len(baseline["trial_seconds"])
        same = float(np.median(times["trial_seconds"][:n]))
        out.update(speedup_same_configurations=float(np.median(baseline["trial_seconds"])) / same,
                   speedup_median=baseline["trial_seconds_median"] / median)
    return out


def _earlier_budgets(previous: dict | None, configs_seed: int) -> dict[str, dict]:
    """The budgets (name -> settings, ``"full"`` the reference) of an earlier
    :func:`tail_fidelity` result drawn with ``configs_seed``; none otherwise."""
    if not previous or previous.get("configs_seed") != configs_seed or not previous.get("rows"):
        return {}
    return {"full": _training(previous["reference"]),
            **{name: _training(b["budget"]) for name, b in previous.get("budgets", {}).items()}}


def _training(budget: dict) -> dict:
    """A trial budget's training settings: less ``search_rate``, which says what a search samples,
    not how a configuration drawn here trains."""
    return {k: v for k, v in budget.items() if k != "search_rate"}


def bench_tail_trials(cache: Cache, splits: Splits, spec: backbones.BackboneSpec, model: Any, results: Path,
                      trials: int, baseline_trials: int, precision: str = "auto") -> dict:
    """:func:`tail_trial_times` at the default phase-2 budget on ``cache`` (the head of this
    cache key's phase-1 search, else the default head), the reference timed at the backbone's
    native side as ``make final`` times it; written to ``results/bench_search.json`` under
    ``phase2_trials``, the rest of that file kept."""
    from search.engines.objective import make_objective
    from search.io import read_json

    budget = space.BUDGETS["tail"]
    objective = make_objective("tail", cache, splits, budget.rows, budget.max_epochs, backbone=model,
                               results=str(results), precision=precision)
    cut_layer, side = cache.key["cut_layer"], spec.native_size
    reference_model = backbones.at_resolution(spec, model, side)
    out = {**tail_trial_times(objective, trials, baseline_trials,
                              lambda: backbones.reference_speed(reference_model, cut_layer, side)),
           "cache": cache.path.name, "recorded": time.strftime("%Y-%m-%dT%H:%M:%S")}
    path = results / "bench_search.json"
    write_json(path, {**(read_json(path) if path.exists() else {}), "phase2_trials": out})
    return out


def bench_tail(cache: Cache, splits: Splits, model: Any, results: Path, budgets: list[tuple[int, int]],
               reference: tuple[int, int], configs: int, configs_seed: int = 3, precision: str = "auto",
               reuse: bool = True, search_depth: bool = False, fixed: dict[str, Any] | None = None) -> dict:
    """:func:`tail_fidelity` on ``cache`` (the head of this cache key's phase-1 search, else the
    default head; tail trials in ``precision``), written to ``results/bench_search.json`` under
    :func:`fidelity_key` after every configuration (``complete`` false until the last), the rest of
    that file kept. ``reuse``: the trainings that file already holds for this cache with the same
    settings are taken from it (:func:`tail_fidelity`'s ``previous``). ``search_depth``: the
    configurations sample the depth, as ``search --search-depth`` does (default: all blocks).
    ``fixed``: parameters held at one value (:func:`tail_fidelity`), written under their own key."""
    from search.engines.objective import make_objective
    from search.io import read_json

    objective = make_objective("tail", cache, splits, budgets[0][0], budgets[0][1], backbone=model,
                               results=str(results), precision=precision, search_depth=search_depth,
                               search_rate=True)  # the whole space; --fix holds parts of it
    path, key = results / "bench_search.json", fidelity_key(search_depth, tuple(fixed or {}))
    previous = (read_json(path) if path.exists() else {}).get(key) if reuse else None
    if previous and previous.get("cache") != cache.path.name:
        previous = None

    def write(partial: dict, complete: bool = False) -> None:
        out = read_json(path) if path.exists() else {}
        out[key] = {**partial, "cache": cache.path.name, "complete": complete,
                                  "recorded": time.strftime("%Y-%m-%dT%H:%M:%S")}
        write_json(path, out)

    result = tail_fidelity(objective, budgets, reference, configs, configs_seed, on_row=write, previous=previous,
                           fixed=fixed)
    write(result, complete=True)
    return result


if __name__ == "__main__":  # the allocator probe, run in a fresh process by bench_cache
    print(json.dumps(allocator_probe(**json.loads(sys.argv[1]))))
