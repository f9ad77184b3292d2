"""Benchmarks that write JSON under ``results/`` (speed goals live here, not in tests)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from search import backbones, heads, space
from search.cache import Cache, build_extractor, ensure_cache
from search.data import Splits, one_hot
from search.io import write_json


def bench_cache(spec: backbones.BackboneSpec, splits: Splits, cut: str | None, resolution: int | None,
                weights: str | None, images: int, results: Path) -> dict:
    """Extraction throughput (chunked, resumable, written to disk) vs raw ``predict`` of the
    same frozen part on the same images, in one run. Goal: ratio >= 0.9."""
    resolution = resolution or spec.native_size
    cut_layer = spec.cut_layer(cut)
    model = spec.build(weights=weights, size=resolution)
    sub = splits.subset(images, max(10, images // 10), max(1, images // 50))
    extractor = build_extractor(model, spec, cut_layer, resolution)
    extractor.predict(sub.x_train[:100], batch_size=100, verbose=0)  # warm-up: trace once
    t = time.perf_counter()
    extractor.predict(sub.x_train, batch_size=100, verbose=0)
    raw = len(sub.x_train) / (time.perf_counter() - t)
    with tempfile.TemporaryDirectory() as tmp:
        cache = ensure_cache(spec, sub, cut=cut, resolution=resolution, flip=False, weights=weights,
                             root=tmp, progress=False, model=model)
        n = len(sub.x_train) + len(sub.x_test)
        extraction = n / cache.stats["seconds"]
        in_loop_predict = n / cache.manifest["extraction"]["predict_seconds"]
    out = {"backbone": spec.name, "cut_layer": cut_layer, "resolution": resolution,
           "weights": str(weights), "images": images, "raw_predict_images_per_second": raw,
           "extraction_images_per_second": extraction, "ratio": extraction / raw,
           "in_loop_predict_images_per_second": in_loop_predict,
           "share_of_extraction_time_in_predict": extraction / in_loop_predict,
           "goal_ratio": 0.9, "recorded": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_json(results / "bench_cache.json", out)
    return out


def _rss_bytes() -> int:
    """Resident set size of this process (Linux /proc)."""
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def bench_search(cache: Cache, splits: Splits, spec: backbones.BackboneSpec, trials: int,
                 epoch_images: int, results: Path, weights: str | None = "imagenet",
                 max_epochs: int = space.MAX_EPOCHS) -> dict:
    """Median/p90 Optuna trial time on the cache vs one end-to-end epoch with the backbone in
    the loop (timed on ``epoch_images`` images, scaled to the training split), and resident
    memory after every trial. Goals: median trial <= 1 s, ratio >= 500x, RSS growth after the
    first 10 trials <= 5 %."""
    import keras
    import optuna

    from search.engines import optuna_engine
    from search.engines.objective import PooledData

    data = PooledData.from_cache(cache, splits)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0),
                                pruner=optuna_engine.make_pruner("hyperband"))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rss: list[int] = []
    study.optimize(optuna_engine.make_objective(data, cache.path.name, max_epochs, 0),
                   n_trials=trials, catch=(Exception,), gc_after_trial=True,
                   callbacks=[lambda study, trial: rss.append(_rss_bytes())])
    seconds = np.array([t.user_attrs["seconds"] for t in study.trials if "seconds" in t.user_attrs])

    keras.backend.clear_session()
    key = cache.key
    model = spec.build(weights=weights, size=key["resolution"])
    from search.final import stitch

    head = heads.build_head(space.DEFAULT_PARAMS, (model.outputs[0].shape[-1],))
    e2e = heads.compile_for(stitch(spec, model, head, key["cut_layer"], key["resolution"], tta=False),
                            space.DEFAULT_PARAMS)
    n = min(epoch_images, len(splits.train_idx))
    x = splits.x_train[splits.train_idx[:n]].astype(np.float32)
    y = one_hot(splits.y_train[splits.train_idx[:n]])
    e2e.fit(x[:64], y[:64], batch_size=64, epochs=1, verbose=0)  # warm-up: trace once
    t = time.perf_counter()
    e2e.fit(x, y, batch_size=128, epochs=1, verbose=0)
    epoch = (time.perf_counter() - t) * len(splits.train_idx) / n
    median = float(np.median(seconds))
    out = {"cache": cache.path.name, "trials": len(seconds),
           "trial_seconds_median": median, "trial_seconds_p90": float(np.percentile(seconds, 90)),
           "states": {s: sum(t.state.name == s for t in study.trials) for s in ("COMPLETE", "PRUNED", "FAIL")},
           "end_to_end_epoch_seconds": epoch, "end_to_end_epoch_timed_images": n,
           "train_images": len(splits.train_idx), "ratio_epoch_to_median_trial": epoch / median,
           "max_epochs": max_epochs,
           "rss_mb_after_trial": [round(r / 2**20, 1) for r in rss],
           "rss_growth_after_10_trials_pct": (100 * (rss[-1] - rss[9]) / rss[9]) if len(rss) > 10 else None,
           "goals": {"median_trial_seconds": 1.0, "ratio": 500, "rss_growth_after_10_trials_pct": 5},
           "recorded": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_json(results / "bench_search.json", out)
    return out
