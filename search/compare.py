"""Comparisons of finished final runs (copies of ``results/final.json``), written under ``results/``.

Entry point: :func:`compare_runs`, behind ``python -m search.cli compare``. It writes

- ``frontier.json`` (+ ``frontier.png``): validation accuracy against cumulative wall seconds
  for each run: the frozen pass (the cache's extraction time, counted even when the run reused
  the cache), the head on pooled features, then each tail epoch; the test accuracy at the end
  (the test set is scored once per run, so there is one test point per run). A run whose
  ``final.json`` has ``normalized_time.by_stage`` also gets each point and its end in normalized
  minutes: its training seconds (head, tail) times its training factor, the rest times its
  inference factor. A reused cache's extraction is then counted as normalized in the run of the
  comparison that built that cache (same cache key); without one, the run has no normalized
  figures. The same runs also get ``normalized.reference``: the whole run normalized as the
  cost bar measures it (``final.normalized_time``: wall time times the in-run reference speed
  over 60 images/s), a reused cache's extraction at the speed of the run that built it; unlike
  the stage-by-stage figure it compares runs of different input sides. The figure plots
  normalized minutes (stage by stage) when any run has them (those runs only), else wall minutes;
- ``seeds.json``: the runs of the first run's recipe (:func:`recipe_of`) under different seeds,
  on the first run's kind of CPU, the latest finished run of each seed (earlier ones are listed
  as ``superseded``, runs on other CPUs as ``other_cpu``): test
  accuracy of each with its 95 % interval (Wilson, binomial on the test images), their mean,
  and the bars of :data:`search.config.GOALS`;
- ``search_pair.json`` when given a run with default parameters and one with searched ones:
  under the keys ``default`` and ``searched`` (each with its run's label), validation and test
  accuracy of each. (``search_effect.json``, across datasets and seeds, is ``search.effect``'s.)

Nothing here trains or scores a model: every figure is read from the runs' JSON files.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from search.config import GOALS
from search.errors import UserError
from search.io import read_json, save_figure, write_json
from search.space import DEFAULTS, PHASES, params_label, with_defaults


def wilson_interval(correct: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion ``correct / n``."""
    if n <= 0:
        raise ValueError("n must be positive")
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def _load(path: str | os.PathLike) -> dict:
    try:
        run = read_json(path)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read final run {path}: {exc}") from None
    for key in ("val_accuracy", "test_accuracy", "timings_seconds", "epochs", "cache", "config"):
        if key not in run:
            raise UserError(f"{path} is not a final run's JSON (no {key!r})")
    return run


def reference_method(run: dict) -> str | None:
    """How the run timed its reference call (``backbones.REFERENCE_METHODS``): runs recorded
    before the method was recorded timed Keras ``predict``; None without a reference."""
    reference = run["normalized_time"].get("reference")
    return reference.get("start", reference).get("method", "predict") if reference else None


def curve(run: dict) -> dict[str, Any]:
    """One run's (cumulative seconds, validation accuracy) points and its final test point, with
    what tells runs apart: the cut layer, input side, backbone weights' fingerprint, cache bytes,
    seed, parameters (``head/tail`` as :func:`search.space.params_label` says them), when the
    run finished and the CPU's recorded instruction sets (``cpu_flags``, None if not recorded);
    with ``normalized_time.by_stage`` the same points in normalized minutes (a reused cache's
    extraction left for :func:`compare_runs` to add)."""
    extraction = float((run["cache"].get("extraction") or {}).get("seconds") or 0.0)
    head = float(run["timings_seconds"].get("head", 0.0))
    points = [{"stage": "frozen features + head", "seconds": extraction + head,
               "val_accuracy": run.get("frozen_val_accuracy")}]
    for e in run["epochs"]:
        points.append({"stage": f"tail epoch {e['epoch']}", "seconds": extraction + head + e["seconds"],
                       "val_accuracy": e["val_accuracy"]})
    total = float(run["timings_seconds"]["total"]) + (extraction if run["cache"]["reused"] else 0.0)
    timed = run.get("normalized_time") or {}
    by_stage = timed.get("by_stage")
    normalized = None
    if by_stage:  # the extraction of a reused cache is added by compare_runs from the run that built it
        own = 0.0 if run["cache"]["reused"] else extraction * by_stage["inference_factor"] / 60
        reference = None
        if timed.get("normalized_minutes") is not None and timed.get("wall_minutes"):
            # the bar's measure (final.normalized_time): the whole run's wall time times the
            # in-run reference speed over the reference machine's, a factor the run recorded
            factor = timed["normalized_minutes"] / timed["wall_minutes"]
            reference = {"factor": factor, "final_minutes": float(timed["normalized_minutes"]),
                         "extraction_minutes": 0.0 if run["cache"]["reused"] else extraction / 60 * factor}
        normalized = {"extraction_minutes": own, "training_factor": by_stage["training_factor"],
                      "inference_factor": by_stage["inference_factor"],
                      "points": [own + (p["seconds"] - extraction) * by_stage["training_factor"] / 60
                                 for p in points],
                      "final_minutes": float(by_stage["normalized_minutes"]),
                      "reference": reference,
                      "extraction_from": None if run["cache"]["reused"] else "this run",
                      "reference_method": reference_method(run)}
    return {"points": points, "normalized": normalized, "cache_key": _key_id(run["cache"]["key"]),
            "final": {"seconds": total, "val_accuracy": run["val_accuracy"],
                      "test_accuracy": run["test_accuracy"], "tta": run.get("tta_chosen")},
            "extraction_seconds": extraction, "cache_reused": run["cache"]["reused"],
            "cut_layer": run["cache"]["key"].get("cut_layer"), "resolution": run["cache"]["key"].get("resolution"),
            "weights_fingerprint": run["cache"]["key"].get("weights_fingerprint"),
            "cache_bytes": run["cache"].get("bytes"), "seed": run["config"]["seed"],
            "tail_epochs": run["config"].get("tail_epochs"),
            "tail_precision": run.get("tail_precision_resolved"),
            "params": params_label(run.get("params_provenance") or {}), "param_changes": param_changes(run),
            "flip": run["cache"]["key"].get("flip"), "finished": run.get("finished"),
            "cpu_flags": cpu_flags(run)}


def param_changes(run: dict) -> dict[str, dict[str, Any]]:
    """Per phase not taken from a search, the parameters whose values differ from today's
    defaults (:data:`search.space.DEFAULTS`), a run's own values completed by
    :func:`search.space.with_defaults`: what a run recorded under older defaults changed."""
    provenance = run.get("params_provenance") or {}
    out = {}
    for phase in PHASES:
        if (provenance.get(phase) or {}).get("source") == "search":
            continue
        values = with_defaults(phase, (run.get("params") or {}).get(phase) or {})
        changed = {k: v for k, v in values.items() if v != DEFAULTS[phase].get(k)}
        if changed:
            out[phase] = changed
    return out


def _key_id(key: dict) -> str:
    return json.dumps(key, sort_keys=True)


def _complete_normalized(frontier: dict[str, dict]) -> None:
    """Add a reused cache's extraction, as normalized in the run that built it, to the normalized
    figures of the runs that reused it; a run with no such builder among ``frontier`` loses them.
    Of several runs that built the same cache, the measurement taken is the latest finished on a
    CPU with the reused run's recorded instruction sets (``cpu_flags``), else the latest."""
    builders = sorted(((run.get("finished") or "", label) for label, run in frontier.items()
                       if run["normalized"] and not run["cache_reused"]))
    for run in frontier.values():
        norm = run["normalized"]
        if not norm or not run["cache_reused"]:
            continue
        same_key = [label for _, label in builders if frontier[label]["cache_key"] == run["cache_key"]]
        if not same_key:
            run["normalized"] = None
            continue
        on_cpu = [label for label in same_key if frontier[label].get("cpu_flags") == run.get("cpu_flags")]
        label = (on_cpu or same_key)[-1]
        builder = frontier[label]["normalized"]
        minutes = builder["extraction_minutes"]
        norm.update(extraction_minutes=minutes, extraction_from=label, points=[m + minutes for m in norm["points"]],
                    final_minutes=norm["final_minutes"] + minutes)
        reference = norm.get("reference")
        if reference is not None:
            if builder.get("reference") is None:
                norm["reference"] = None
            else:
                extra = builder["reference"]["extraction_minutes"]
                reference.update(extraction_minutes=extra, final_minutes=reference["final_minutes"] + extra)


def cpu_flags(run: dict) -> list[str] | None:
    """The instruction sets a final run recorded for its CPU (``final.cpu_description``); None if
    it recorded none."""
    return ((run.get("machine") or {}).get("cpu") or {}).get("flags")


def same_cpu(flags: list[str] | None, other: list[str] | None) -> bool:
    """Whether two runs' recorded instruction sets (:func:`cpu_flags`) are those of one kind of
    CPU: True when either recorded none."""
    return flags is None or other is None or flags == other


def recipe_of(run: dict) -> dict:
    """What defines a recipe: the configuration less the seed and where things are written, and
    the parameters each phase trained with, completed by the fixed defaults
    (:func:`search.space.with_defaults`: a run recorded before a setting existed ran its default),
    and the cut layer and input side it ran at (from its cache key: a side given as the default's
    value and a side left to the default are one recipe)."""
    skip = {"seed", "output", "results", "run_dir", "cache_root", "progress", "build_cache", "params",
            "cut", "resolution"}
    params = {phase: with_defaults(phase, run["params"].get(phase) or {}) for phase in PHASES}
    key = run["cache"]["key"]
    return ({k: v for k, v in run["config"].items() if k not in skip}
            | {"params": params, "cut_layer": key.get("cut_layer"), "resolution": key.get("resolution")})


def compare_runs(runs: dict[str, str | os.PathLike], results: str | os.PathLike = "results",
                 default_run: str | None = None, searched_run: str | None = None) -> dict:
    """Write ``frontier.json``/``.png``, ``seeds.json`` (runs sharing the first run's recipe and
    kind of CPU, the latest of each seed; runs of the recipe on another CPU are listed as
    ``other_cpu``) and, with ``default_run`` and ``searched_run`` (labels of ``runs``),
    ``search_pair.json``.

    Args:
        runs: label -> path of a final run's JSON.
    """
    if not runs:
        raise UserError("compare needs at least one final run (LABEL=PATH)")
    loaded = {label: _load(path) for label, path in runs.items()}
    results = Path(results)
    frontier = {label: {"path": str(runs[label]), **curve(run)} for label, run in loaded.items()}
    _complete_normalized(frontier)
    write_json(results / "frontier.json", {"runs": frontier, "note": "seconds are cumulative wall seconds on the "
                                          "machine of each run; extraction counted even when the cache was reused; "
                                          "normalized: minutes scaled stage by stage, where the run recorded its "
                                          "training step (null where not); the inference factor from the "
                                          "run's reference call, timed as reference_method says (compiled "
                                          "calls read faster than predict, so runs of the two methods "
                                          "compare only roughly)"})
    _plot_frontier(frontier, results / "frontier.png")
    out = {"frontier": frontier}

    first = next(iter(loaded.values()))
    same = {label: run for label, run in loaded.items() if recipe_of(run) == recipe_of(first)}
    # the seeds' spread is measured on one kind of CPU: the first run's (where both recorded theirs)
    other_cpu = sorted(label for label, run in same.items() if not same_cpu(cpu_flags(run), cpu_flags(first)))
    same = {label: run for label, run in same.items() if label not in other_cpu}
    latest: dict[Any, str] = {}  # one run per seed: the latest finished
    for label, run in same.items():
        seed, kept = run["config"]["seed"], latest.get(run["config"]["seed"])
        if kept is None or (run.get("finished") or "") > (same[kept].get("finished") or ""):
            latest[seed] = label
    superseded = sorted(set(same) - set(latest.values()))
    same = {label: run for label, run in same.items() if label in latest.values()}
    if len(same) >= 2:
        rows = []
        for label, run in same.items():
            n = int(run["data"]["test"])
            lo, hi = wilson_interval(run["test_accuracy"] * n, n)
            rows.append({"label": label, "seed": run["config"]["seed"], "val_accuracy": run["val_accuracy"],
                         "test_accuracy": run["test_accuracy"], "test_images": n, "test_ci95": [lo, hi],
                         "total_seconds": run["timings_seconds"]["total"], "cache_reused": run["cache"]["reused"],
                         "tail_precision": run.get("tail_precision_resolved"),
                         "code_version": (run.get("machine") or {}).get("code_version")})
        tests = [r["test_accuracy"] for r in rows]
        seeds = {"recipe": recipe_of(first), "runs": rows, "superseded": superseded, "other_cpu": other_cpu,
                 "mean_test_accuracy": float(np.mean(tests)),
                 "min_test_accuracy": float(np.min(tests)), "bar_each": GOALS.test_accuracy_each,
                 "bar_mean": GOALS.test_accuracy_mean, "goal_mean": GOALS.test_accuracy_goal_mean,
                 "meets_bars": bool(min(tests) >= GOALS.test_accuracy_each
                                    and np.mean(tests) >= GOALS.test_accuracy_mean)}
        write_json(results / "seeds.json", seeds)
        out["seeds"] = seeds

    if default_run or searched_run:
        if default_run not in loaded or searched_run not in loaded:
            raise UserError(f"search effect needs both runs among {sorted(loaded)}")
        d, s = loaded[default_run], loaded[searched_run]
        if d["config"]["seed"] != s["config"]["seed"] or d["cache"]["key"] != s["cache"]["key"]:
            raise UserError("search effect compares runs of one seed on one cache key")
        effect = {role: {"label": label, "path": str(runs[label]), "params": run["params"],
                         "params_provenance": run["params_provenance"], "val_accuracy": run["val_accuracy"],
                         "test_accuracy": run["test_accuracy"],
                         "code_version": run.get("machine", {}).get("code_version")}  # None: not recorded
                  for role, label, run in (("default", default_run, d), ("searched", searched_run, s))}
        effect["searched_wins_on_validation"] = s["val_accuracy"] > d["val_accuracy"]
        effect["val_difference"] = s["val_accuracy"] - d["val_accuracy"]
        effect["test_difference"] = s["test_accuracy"] - d["test_accuracy"]
        write_json(results / "search_pair.json", effect)
        out["search_pair"] = effect
    return out


def _plot_frontier(frontier: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    normalized = {label: run for label, run in frontier.items() if run["normalized"]}
    for label, run in (normalized or frontier).items():
        xs = run["normalized"]["points"] if normalized else [p["seconds"] / 60 for p in run["points"]]
        end = run["normalized"]["final_minutes"] if normalized else run["final"]["seconds"] / 60
        pts = [(x, p) for x, p in zip(xs, run["points"], strict=True) if p["val_accuracy"] is not None]
        line, = ax.plot([x for x, _ in pts], [100 * p["val_accuracy"] for _, p in pts], "o-", label=label)
        ax.plot(end, 100 * run["final"]["test_accuracy"], "*", ms=12, color=line.get_color())
    ax.axhline(87, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("cumulative normalized minutes (frozen pass, head, tail epochs)" if normalized
                  else "cumulative wall minutes (frozen pass, head, tail epochs)")
    ax.set_ylabel("accuracy (%): validation (line), test (star)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


TABLE_START, TABLE_END = "<!-- results-table:start -->", "<!-- results-table:end -->"


def results_table(results: str | os.PathLike = "results") -> str:
    """The README's results table, in Markdown, from the committed files of ``results/``:
    ``seeds.json`` (the default recipe on CIFAR-10, one row per seed; a seed run by another code
    version than ``final.json``'s is labelled so), ``final.json`` (the latest final run, with its
    normalized minutes when its cache was cold), ``final_cold.json`` (the latest cold run, when
    kept), ``evaluate.json`` (the
    course's script on the saved model) and ``search_effect.json`` (searched against default
    parameters, per dataset, mean over seeds; labelled when run by another code version than
    ``final.json``'s). A file that is missing leaves its rows out."""
    results = Path(results)

    def pct(x: float) -> str:
        return f"{100 * x:.2f} %"

    def ci(acc: float, n: int) -> str:
        lo, hi = wilson_interval(round(acc * n), n)
        return f"{pct(acc)} ({100 * lo:.1f}–{100 * hi:.1f})"

    rows = ["| data | model | validation | test (95 % interval) | file |", "|---|---|---|---|---|"]
    latest = (read_json(results / "final.json").get("machine") or {}).get("code_version") \
        if (results / "final.json").exists() else None
    if (results / "seeds.json").exists():
        seeds = read_json(results / "seeds.json")
        for r in seeds["runs"]:
            older = "" if latest and r.get("code_version") == latest else " (another code version)"
            rows.append(f"| CIFAR-10 | default recipe, seed {r['seed']}{older} | "
                        f"{pct(r['val_accuracy'])} | "
                        f"{ci(r['test_accuracy'], r['test_images'])} | `seeds.json` |")
    for name, what in (("final", "the latest `make final`"), ("final_cold", "the latest cold `make final`")):
        if not (results / f"{name}.json").exists():
            continue
        final = read_json(results / f"{name}.json")
        norm = final.get("normalized_time") or {}
        cost = "; cache reused" if final["cache"]["reused"] else ""
        if norm.get("normalized_minutes") and not final["cache"]["reused"]:
            cost = f"; {norm['normalized_minutes']:.1f} min normalized"
            if norm.get("normalized_minutes_range"):
                lo, hi = norm["normalized_minutes_range"]
                cost += f", {lo:.1f}–{hi:.1f} over its speed measurements"
            if (norm.get("by_stage") or {}).get("normalized_minutes"):
                cost += f"; {norm['by_stage']['normalized_minutes']:.1f} with training scaled by its own step"
        source = str(final["data"]["source"])
        data = "CIFAR-10" if "cifar10" in source.lower() else Path(source).name
        rows.append(f"| {data} | {what}, seed "
                    f"{final['config']['seed']}{cost} | {pct(final['val_accuracy'])} | "
                    f"{ci(final['test_accuracy'], final['data']['test'])} | `{name}.json` |")
    if (results / "evaluate.json").exists():
        ev = read_json(results / "evaluate.json")
        rows.append(f"| CIFAR-10 | the course's script on `cifar10.h5` | | {pct(ev['accuracy'])} | `evaluate.json` |")
    if (results / "search_effect.json").exists():
        for d in read_json(results / "search_effect.json").get("datasets", []):
            n = d["seeds"][0]["test_images"]
            seeds = ", ".join(str(s["seed"]) for s in d["seeds"])
            older = "" if latest and d.get("code_version") == latest else " (another code version)"
            for role in ("default", "searched"):
                val = float(np.mean([s[f"{role}_val"] for s in d["seeds"]]))
                rows.append(f"| {d['name']} ({d['seeds'][0]['train_images']} training images) | {role} parameters, "
                            f"mean of seeds {seeds}{older} | {pct(val)} | {ci(d[f'mean_{role}_test'], n)} | "
                            "`search_effect.json` |")
    return "\n".join(rows)


def update_readme(readme: str | os.PathLike = "README.md", results: str | os.PathLike = "results") -> bool:
    """Replace the table between :data:`TABLE_START` and :data:`TABLE_END` in ``readme`` with
    :func:`results_table`; True if the file changed."""
    path = Path(readme)
    text = path.read_text()
    if TABLE_START not in text or TABLE_END not in text:
        raise UserError(f"{path} has no {TABLE_START} ... {TABLE_END} block")
    head, rest = text.split(TABLE_START, 1)
    _, tail = rest.split(TABLE_END, 1)
    new = f"{head}{TABLE_START}\n{results_table(results)}\n{TABLE_END}{tail}"
    if new != text:
        from search.io import atomic_path

        with atomic_path(path) as tmp:
            tmp.write_text(new)
    return new != text
