"""Study report: HTML (plotly from ``optuna.visualization``, embedded), PNGs, summary, CSV.

Entry point: :func:`write_report`. Reads an Optuna study (storage URL + name) or a KerasTuner
project (converted into an in-memory Optuna study with ``optuna.trial.create_trial``, so both
engines get the same plots), plus ``results/final.json`` when present, and writes under
``results/report/``: ``index.html``, ``*.png``, ``summary.md``, ``trials.csv``.
"""

from __future__ import annotations

import html
import json
import logging
import statistics
from pathlib import Path
from typing import Any

import optuna

from search.engines.base import METRIC
from search.errors import UserError
from search.io import atomic_path, read_json, save_figure

log = logging.getLogger(__name__)

FIGURES = {
    "optimization_history": "Optimization history",
    "param_importances": "Parameter importances",
    "parallel_coordinate": "Parallel coordinates",
    "slice": "Slice plots",
    "intermediate_values": "Intermediate values (pruning)",
    "trial_durations": "Trial durations",
}


def _kerastuner_study(directory: Path, project_name: str) -> optuna.Study:
    """A KerasTuner project as an in-memory Optuna study (same plots for both engines)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from search.engines.kerastuner_engine import read_trials

    trials = read_trials(directory, project_name)
    if not trials:
        raise UserError(f"no KerasTuner trials in {Path(directory, project_name)}")
    study = optuna.create_study(direction="maximize", study_name=f"kerastuner:{project_name}")
    for t in trials:
        dists = {}
        for name in t["params"]:
            cfg, kind = t["space"][name]["config"], t["space"][name]["class_name"]
            if kind == "Int":
                dists[name] = IntDistribution(cfg["min_value"], cfg["max_value"])
            elif kind == "Float":
                dists[name] = FloatDistribution(cfg["min_value"], cfg["max_value"], log=cfg["sampling"] == "log")
            elif kind == "Boolean":
                dists[name] = CategoricalDistribution([False, True])
            else:
                dists[name] = CategoricalDistribution(cfg["values"])
        done = t["state"] == "COMPLETE"
        study.add_trial(optuna.trial.create_trial(
            params=t["params"], distributions=dists, value=t["value"] if done else None,
            state=optuna.trial.TrialState.COMPLETE if done else optuna.trial.TrialState.FAIL,
            user_attrs={"kerastuner_trial": t["trial_id"]}))
    return study


def load_study(results: str | Path = "results", storage: str | None = None, study_name: str | None = None,
               kerastuner_dir: str | None = None, phase: str = "head") -> optuna.Study:
    """The study to report: explicit arguments, else the newest ``phase`` search in ``results/searches/``."""
    if kerastuner_dir:
        directory = Path(kerastuner_dir)
        return _kerastuner_study(directory.parent, directory.name)
    if storage is None:
        pointers = sorted(Path(results, "searches").glob(f"{phase}-*.json"), key=lambda p: p.stat().st_mtime)
        if not pointers:
            raise UserError(f"no {phase} search to report in {Path(results, 'searches')}; run `make search` first")
        pointer = read_json(pointers[-1])
        if pointer["engine"] == "kerastuner":
            return _kerastuner_study(Path(pointer["directory"]), pointer["project_name"])
        storage, study_name = pointer["storage"], study_name or pointer["study_name"]
    from search.engines.optuna_engine import open_study

    if study_name is None:
        names = optuna.get_all_study_names(storage)
        if not names:
            raise UserError(f"no study in {storage}")
        study_name = names[-1]
    return open_study(storage, study_name, create=False)


def _durations(study: optuna.Study) -> list[float]:
    return [(t.datetime_complete - t.datetime_start).total_seconds() for t in study.trials
            if t.datetime_complete and t.datetime_start]


def _plotly_figures(study: optuna.Study) -> dict[str, Any]:
    """Each named figure, or the reason it could not be drawn."""
    import plotly.graph_objects as go
    from optuna import visualization as vis

    makers = {
        "optimization_history": vis.plot_optimization_history,
        "param_importances": vis.plot_param_importances,
        "parallel_coordinate": vis.plot_parallel_coordinate,
        "slice": vis.plot_slice,
        "intermediate_values": vis.plot_intermediate_values,
    }
    out: dict[str, Any] = {}
    for name, make in makers.items():
        try:
            out[name] = make(study)
        except Exception as exc:  # e.g. importances need >= 2 complete trials
            out[name] = f"not drawn: {exc}"
    durations = _durations(study)
    if durations:  # optuna.visualization has no duration histogram: drawn here
        fig = go.Figure(go.Histogram(x=durations, nbinsx=30))
        fig.update_layout(title="Trial durations", xaxis_title="seconds", yaxis_title="trials")
        out["trial_durations"] = fig
    else:
        out["trial_durations"] = "not drawn: no finished trial"
    for fig in out.values():  # the metric's name, not Optuna's generic "Objective Value"
        if not isinstance(fig, str):
            fig.for_each_yaxis(lambda a: a.update(title_text=METRIC) if a.title.text == "Objective Value" else None)
            fig.for_each_xaxis(lambda a: a.update(title_text=METRIC) if a.title.text == "Objective Value" else None)
    return out


def _pngs(study: optuna.Study, final: dict | None, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import numpy as np
    from optuna.visualization import matplotlib as vis_mpl


    written = []
    complete = sum(t.state.name == "COMPLETE" for t in study.trials)
    titles = {"optimization_history": f"Optimization history ({len(study.trials)} trials)",
              "param_importances": f"Parameter importances (fANOVA on {complete} complete trials)"}
    for name, make in {"optimization_history": lambda s: vis_mpl.plot_optimization_history(s, target_name=METRIC),
                       "param_importances": lambda s: vis_mpl.plot_param_importances(s, target_name=METRIC),
                       "intermediate_values": lambda s: _relabel(vis_mpl.plot_intermediate_values(s))}.items():
        try:
            ax = make(study)
        except Exception as exc:
            log.info("PNG %s not drawn: %s", name, exc)
            continue
        if name in titles and hasattr(ax, "set_title"):
            ax.set_title(titles[name])
        fig = ax.figure if hasattr(ax, "figure") else np.ravel(ax)[0].figure
        fig.set_size_inches(8, 5)
        save_figure(fig, out / f"{name}.png", dpi=110)
        written.append(f"{name}.png")
    if final and "test_confusion_matrix" in final:
        confusion_figure(final, out / "confusion_matrix.png")
        written.append("confusion_matrix.png")
    return written


def confusion_figure(final: dict, path: Path) -> None:
    """The final model's test confusion matrix (``final.json``'s counts) as a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cm = np.array(final["test_confusion_matrix"])
    names = final["class_names"]
    fig, ax = plt.subplots(figsize=(7, 6))
    im = ax.imshow(cm, cmap="Blues")
    k = len(names)
    ax.set_xticks(range(k), names, rotation=45, ha="right")
    ax.set_yticks(range(k), names)
    ax.grid(False)  # a style's grid would cross the counts
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(k):
        for j in range(k):
            ax.text(j, i, cm[i, j], ha="center", va="center", fontsize=7,
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_title(f"Test confusion matrix (accuracy {final['test_accuracy']:.4f})")
    fig.colorbar(im)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def built_from(final: dict, study_name: str) -> bool:
    """Whether a final run's parameters came from ``study_name``: shipped from it, or weighed
    against its defaults' trial there (``params_provenance[phase]``)."""
    for p in (final.get("params_provenance") or {}).values():
        if study_name in (p.get("study"), (p.get("search") or {}).get("study")):
            return True
    return False


def final_of(study_name: str, results: str | Path) -> tuple[dict | None, Path | None]:
    """The latest final run built from ``study_name``: ``RESULTS/final.json`` or a named run's
    ``RESULTS/runs/NAME/final.json``; ``(None, None)`` when none was."""
    candidates = [Path(results) / "final.json", *sorted(Path(results).glob("runs/*/final.json"))]
    found = []
    for path in candidates:
        try:
            run = read_json(path)
        except (OSError, ValueError):
            continue
        if built_from(run, study_name):
            found.append((str(run.get("finished", "")), path, run))
    if not found:
        return None, None
    _, path, run = max(found, key=lambda f: f[0])
    return run, path


def _title(study: optuna.Study) -> str:
    """``Phase 1 (head) search, MobileNet at 224 px cut at conv_pw_11_relu`` from the study's name
    (``<phase>-<backbone>-<side>-<cut layer>[-flip]-<digest>``), or the name itself."""
    parts = study.study_name.split("-")
    names = {"head": "Phase 1 (head)", "tail": "Phase 2 (tail)"}
    if len(parts) >= 5 and parts[0] in names and parts[2].isdigit():
        return f"{names[parts[0]]} search, {parts[1]} at {parts[2]} px cut at {parts[3]}"
    return f"Search {study.study_name}"


def _relabel(ax: Any) -> Any:
    """Optuna's matplotlib axes with the metric's name where it wrote "Objective Value"."""

    if hasattr(ax, "get_ylabel") and ax.get_ylabel() == "Objective Value":
        ax.set_ylabel(METRIC)
    return ax


def summarize(study: optuna.Study, final: dict | None) -> dict:
    """Counts, best trial, timings: what ``summary.md`` and the paper quote."""
    from search.engines.optuna_engine import summarize as counts

    durations = _durations(study)
    summary: dict[str, Any] = {
        **counts(study), "total_trial_seconds": sum(durations),
        "median_trial_seconds": statistics.median(durations) if durations else None,
        "pruners": list(study.user_attrs.get("pruners", [])),  # empty: not recorded (KerasTuner, older studies)
    }
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    if complete:
        best = study.trials[summary["best_number"]] if summary.get("best_number") is not None else None
        summary["best_user_attrs"] = best.user_attrs if best is not None else {}
        summary["top"] = [{"number": t.number, "value": t.value, "params": t.params}
                          for t in sorted(complete, key=lambda t: -t.value)[:5]]
    # every finished trial: its state, value (or last reported value when pruned) and parameters
    summary["finished"] = [
        {"number": t.number, "state": t.state.name, "params": t.params,
         "value": t.value if t.value is not None else (t.intermediate_values[max(t.intermediate_values)]
                                                       if t.intermediate_values else None),
         "epochs": len(t.intermediate_values), "defaults": bool(t.user_attrs.get("defaults"))}
        for t in study.trials if t.state.is_finished()]
    if final:
        summary["final"] = {k: final.get(k) for k in ("val_accuracy", "test_accuracy", "frozen_val_accuracy", "tta")}
        summary["cache_key"] = final.get("cache", {}).get("key")
    return summary


def _summary_md(s: dict) -> str:
    lines = [f"# Search report: {s['study_name']}", ""]
    lines.append(f"- Trials: {s['trials']} (complete {s['complete']}, pruned {s['pruned']}, failed {s['failed']})")
    if s["median_trial_seconds"] is not None:
        lines.append(f"- Trial time: total {s['total_trial_seconds']:.1f} s, median {s['median_trial_seconds']:.2f} s")
    if "best_value" in s:
        lines += [f"- Best trial: #{s['best_number']}, val accuracy {s['best_value']:.4f}", "", "| parameter | value |",
                  "|---|---|"] + [f"| {k} | {v} |" for k, v in s["best_params"].items()]
    else:
        lines.append("- No trial completed (all pruned or failed): nothing to recommend yet.")
    if "final" in s:
        f = s["final"]
        lines += ["", f"## Final model ({s.get('final_source')})", "",
                  f"- Validation accuracy {f['val_accuracy']:.4f}, test accuracy {f['test_accuracy']:.4f}",
                  f"- Cache key: `{json.dumps(s.get('cache_key'))}`"]
    else:
        lines += ["", "## Final model", "", "No final model was built from this study yet."]
    lines += ["", "## Reproduce", "", "```", "make search", "make final", "make report", "```", ""]
    return "\n".join(lines)


def _html(study: optuna.Study, figures: dict, summary: dict, final: dict | None) -> str:
    title = html.escape(_title(study))
    parts = ["<!doctype html><html><head><meta charset='utf-8'>",
             f"<title>{title}</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px}"
             ".missing{color:#a00}</style></head><body>",
             f"<h1>{title}</h1>", f"<p>Study <code>{html.escape(study.study_name)}</code>.</p>"]
    if not final:
        parts.append("<h2>Final model</h2><p id='final-metrics'>No final model was built from this study yet "
                     "(<code>make final</code> after this search builds one).</p>")
    if final:
        parts.append(f"<h2>Final model</h2><p id='final-metrics'>Validation accuracy "
                     f"<b>{final['val_accuracy']:.4f}</b>, test accuracy <b>{final['test_accuracy']:.4f}</b> "
                     f"(mirror averaging: {final.get('tta')}).</p>")
        if "test_per_class_accuracy" in final:
            rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.3f}</td></tr>"
                           for k, v in final["test_per_class_accuracy"].items())
            parts.append(f"<table id='per-class'><tr><th>class</th><th>test accuracy</th></tr>{rows}</table>")
            cm = final["test_confusion_matrix"]
            head = "".join(f"<th>{html.escape(n[:5])}</th>" for n in final["class_names"])
            body = "".join(f"<tr><th>{html.escape(n)}</th>" + "".join(f"<td>{v}</td>" for v in row) + "</tr>"
                           for n, row in zip(final["class_names"], cm, strict=True))
            parts.append(f"<h3>Test confusion matrix (rows: true)</h3><table id='confusion'><tr><th></th>{head}"
                         f"</tr>{body}</table>")
    counts = f"{summary['trials']} trials: {summary['complete']} complete, {summary['pruned']} pruned, " \
             f"{summary['failed']} failed. Pruner: {', '.join(summary['pruners']) or 'not recorded'}."
    parts.append(f"<h2>Search</h2><p id='counts'>{counts}</p>")
    if "best_value" not in summary:
        parts.append("<p class='missing' id='no-complete'>No trial completed (all pruned or failed): "
                     "the plots below that need completed trials are omitted.</p>")
    first = True
    for name, title in FIGURES.items():
        fig = figures[name]
        parts.append(f"<h3>{title}</h3>")
        if isinstance(fig, str):
            parts.append(f"<p class='missing' id='{name}'>{html.escape(fig)}</p>")
            continue
        parts.append(fig.to_html(full_html=False, include_plotlyjs=True if first else False, div_id=name))
        first = False
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(out: str | Path = "results/report", results: str | Path = "results", storage: str | None = None,
                 study_name: str | None = None, kerastuner_dir: str | None = None, phase: str = "head") -> dict:
    """Write ``index.html``, PNGs, ``summary.md`` and ``trials.csv`` under ``out``; return the summary."""
    out = Path(out)
    study = load_study(results, storage, study_name, kerastuner_dir, phase)
    if not study.trials:
        raise UserError(f"study {study.study_name!r} has no trials yet")
    final, final_path = final_of(study.study_name, results)
    summary = summarize(study, final)
    summary["final_source"] = str(final_path) if final_path else None
    figures = _plotly_figures(study)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "index.html") as tmp:
        tmp.write_text(_html(study, figures, summary, final))
    summary["pngs"] = _pngs(study, final, out)
    with atomic_path(out / "summary.md") as tmp:
        tmp.write_text(_summary_md(summary))
    with atomic_path(out / "trials.csv") as tmp:
        study.trials_dataframe().to_csv(tmp, index=False)
    from search.io import write_json

    write_json(out / "summary.json", summary)
    write_json(Path(results) / f"study_{phase}.json", summary)  # small, committed: what the paper cites
    return summary
