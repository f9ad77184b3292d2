"""The paper: ``docs/paper_template.md`` (Jinja2) + ``results/`` -> ``docs/paper.md`` and ``docs/paper.html``.

Entry point: :func:`write_paper`. The template holds the prose, its conditions and its loops;
:func:`build_context` gives it the JSON files of ``results/`` as they are, numbers derived from
them (``d``: no sentences), the tables and the code listings. A name the template uses that the
results do not hold is an error (``StrictUndefined``), as is a number that is missing (``None``).
The template types no digits outside its reference list and figure, table and listing numbers
(``tests/test_paper.py`` checks, and checks the rendered prose's sentence length, that no commit
hash or clock time is in the body, and that every listed reference is cited).
Filters: ``pct`` (0.8712 -> 87.12 %), ``pct0``, ``pct1``, ``f1``, ``f2``, ``int``, ``gb``, ``gib``.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

import numpy as np

from search.compare import cpu_flags, reference_method, same_cpu, wilson_interval
from search.config import GOALS, fidelity_key
from search.errors import UserError
from search.io import atomic_path, read_json, save_figure
from search.report import confusion_figure

RESULT_FILES = ("final", "final_cold", "evaluate", "seeds", "frontier", "search_effect", "search_effect_tail_shipped",
                "search_effect_fold_t", "search_effect_more_seeds", "search_pair", "study_head", "study_tail",
                "bench_cache", "bench_search", "bench_memory")
PIPELINE = {"cache": "frozen pass (cache)", "head": "head on pooled features", "tail": "tail fine-tuning",
            "bn_reestimate": "batch-norm re-estimation", "tta_choice": "test-time mirroring choice",
            "test": "test set", "stitch_and_save": "stitch, check and save", "total": "total"}
SAMPLE_SHOWN = 24  # test images in the picture on top


def _number(v: Any) -> float:
    if v is None:
        raise UserError("paper needs numbers missing from results/: a value is null")
    return float(v)


FILTERS = {
    "pct": lambda v: f"{100 * _number(v):.2f} %",
    "pct0": lambda v: f"{100 * _number(v):.0f} %",
    "pct1": lambda v: f"{100 * _number(v):.1f} %",
    "f1": lambda v: f"{_number(v):.1f}",
    "f2": lambda v: f"{_number(v):.2f}",
    "int": lambda v: f"{int(round(_number(v))):,}",
    "gb": lambda v: f"{_number(v) / 1e9:.1f}",
    "gib": lambda v: f"{_number(v) / 2**30:.0f}",
}


def render(template: str, context: dict) -> str:
    """The template filled from ``context``; a name it lacks raises UserError naming it."""
    import jinja2

    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    env.filters.update(FILTERS)
    try:
        return env.from_string(template).render(**context)
    except jinja2.UndefinedError as exc:
        raise UserError(f"paper needs numbers missing from results/: {exc.message}") from None


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.2f} %"


def _params_text(params: dict) -> str:
    return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in params.items())


def _source_of(obj: Any) -> str:
    import inspect
    import textwrap

    return textwrap.dedent(inspect.getsource(obj)).strip()


def listings() -> dict[str, str]:
    """Code the course asks to see, read from the code itself (so the paper cannot drift)."""
    import ast

    from search import backbones, final

    root = Path(__file__).resolve().parent.parent
    source = (root / "0-transfer.py").read_text()
    fn = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == "preprocess_data")
    return {"listing_input": _source_of(backbones.upsample) + "\n\n\n" + _source_of(backbones.input_stack),
            "listing_stitch": _source_of(final.stitch),
            "listing_preprocess": ast.get_source_segment(source, fn)}


def _interval(acc: float, n: int) -> str:
    lo, hi = wilson_interval(acc * n, n)
    return f"{_pct(lo)} to {_pct(hi)}"


def effect_rows(effect: dict) -> list[dict[str, Any]]:
    """Per dataset of ``search_effect.json``: the mean test accuracies, their difference, the
    larger of the two seed spreads, whether the difference exceeds it (an effect), and whether
    the shipping rule sent the defaults in every decision (then searched and default models are
    the same)."""
    from search import selection

    out = []
    for ds in effect.get("datasets", []):
        seeds = ds["seeds"]
        spread = max(ds["seed_spread_default"], ds["seed_spread_searched"])
        decisions = [v for s in seeds for v in s["shipped"].values()]
        out.append({"name": ds["name"], "n_seeds": len(seeds), "default": ds["mean_default_test"],
                    "searched": ds["mean_searched_test"], "difference_points": 100 * ds["mean_difference"],
                    "spread_points": 100 * spread, "effect": abs(ds["mean_difference"]) > spread,
                    "decisions": len(decisions), "defaults_shipped": decisions.count("default"),
                    "train_images": seeds[0]["train_images"], "test_images": seeds[0]["test_images"],
                    "classes": ds.get("classes"), "trials_head": seeds[0]["trials"]["head"]["trials"],
                    "trials_tail": seeds[0]["trials"]["tail"]["trials"],
                    "search_minutes": float(np.mean([s["search_seconds"] for s in seeds])) / 60,
                    # phase-2 parameters shipped from trials below the final's training (large data: the
                    # default budget's 4,000 images x 2 epochs) by a search that sampled the tail rate,
                    # which choice.resolve_params no longer does (a row without tail_search_rate predates
                    # the held rate: it sampled it)
                    "tails_searched_below_final": sum(s["shipped"]["tail"] == "search" and
                                                      s.get("tail_search_rate", True) is not False for s in seeds)
                    if seeds[0]["train_images"] >= selection.SMALL_DATA_ROWS else 0,
                    # searches whose phase 2 held the tail rate at its default, and how many shipped their tail
                    "tails_rate_held": sum(s.get("tail_search_rate") is False for s in seeds),
                    "tails_rate_held_shipped": sum(s.get("tail_search_rate") is False and
                                                   s["shipped"]["tail"] == "search" for s in seeds)})
    return out


def tail_shipped(shipped: dict | None, effect: dict | None) -> dict | None:
    """CIFAR-10's row of ``search_effect_tail_shipped.json`` (a run of the comparison in which
    phase-2 searches on a budget below the final's training, the rate held, shipped their best
    trials) beside ``search_effect.json``'s: the mean validation and test accuracy of the searched
    finals in each, the latter only where its seeds shipped the same heads (the same decision
    text) with the defaults' tail; None without the first."""
    row = next((d for d in (shipped or {}).get("datasets", []) if d["name"] == "cifar10"), None)
    if row is None:
        return None
    seeds = row["seeds"]
    out = {"n_seeds": len(seeds), "tails_shipped": sum(s["shipped"]["tail"] == "search" for s in seeds),
           "val": float(np.mean([s["searched_val"] for s in seeds])),
           "test": float(np.mean([s["searched_test"] for s in seeds])), "same_heads": None}
    main = {s["seed"]: s for d in (effect or {}).get("datasets", []) if d["name"] == "cifar10" for s in d["seeds"]}
    pairs = [(s, main.get(s["seed"])) for s in seeds]
    if all(m is not None and m["shipped"]["tail"] == "default" and m["why"]["head"] == s["why"]["head"]
           for s, m in pairs):
        out["same_heads"] = {"val": float(np.mean([m["searched_val"] for _, m in pairs])),
                             "test": float(np.mean([m["searched_test"] for _, m in pairs]))}
    return out


def _datasets(comparison: dict | None) -> dict[str, dict]:
    """The dataset rows of a search-effect file (``search.effect``), by name."""
    return {d["name"]: d for d in (comparison or {}).get("datasets", [])}


def fold_t_rows(earlier: dict | None, effect: dict | None) -> list[dict]:
    """The sets of ``search_effect_fold_t.json`` (the comparison when cross-validated phase-1
    trials were compared by a paired t over the folds) whose decisions differ from
    ``search_effect.json``'s: per set, the decisions that shipped the defaults and the mean test
    difference under each rule."""
    now = _datasets(effect)
    out = []
    for old in (earlier or {}).get("datasets", []):
        new = now.get(old["name"])
        if new is None:
            continue
        shipped = [[s["shipped"][p] for p in ("head", "tail")] for s in old["seeds"]]
        if shipped == [[s["shipped"][p] for p in ("head", "tail")] for s in new["seeds"]]:
            continue
        out.append({"name": old["name"], "decisions": 2 * len(old["seeds"]),
                    "defaults_before": sum(x == "default" for pair in shipped for x in pair),
                    "difference_before": 100 * old["mean_difference"], "difference_now": 100 * new["mean_difference"]})
    return out


def more_seeds_rows(extra: dict | None, effect: dict | None) -> list[dict]:
    """The sets of ``search_effect_more_seeds.json`` (the comparison on further seeds) that
    ``search_effect.json`` has too: the further seeds, their test differences in points, their
    mean, and the mean over every seed of both files."""
    now = _datasets(effect)
    out = []
    for ds in (extra or {}).get("datasets", []):
        if ds["name"] not in now:
            continue
        diffs = [100 * (s["searched_test"] - s["default_test"]) for s in ds["seeds"]]
        every = diffs + [100 * (s["searched_test"] - s["default_test"]) for s in now[ds["name"]]["seeds"]]
        out.append({"name": ds["name"], "seeds": [s["seed"] for s in ds["seeds"]], "differences": diffs,
                    "mean": float(np.mean(diffs)), "n_all": len(every), "mean_all": float(np.mean(every))})
    return out


def _effect_table(effect: dict) -> str:
    rows = []
    for ds in effect.get("datasets", []):
        for s in ds["seeds"]:
            shipped = "/".join(s["shipped"][p] for p in ("head", "tail"))
            rows.append([ds["name"], s["seed"], f"{s['train_images']:,}",
                         f"{_pct(s['default_test'])} ({_pct(s['default_test_interval'][0])} to "
                         f"{_pct(s['default_test_interval'][1])})",
                         f"{_pct(s['searched_test'])} ({_pct(s['searched_test_interval'][0])} to "
                         f"{_pct(s['searched_test_interval'][1])})", shipped])
    return _table(["dataset", "seed", "training images", "default test (95 %)", "searched test (95 %)",
                   "shipped head/tail"], rows)


def _goals_table(ctx: dict, d: dict) -> str:
    """One row per goal of :data:`search.config.GOALS` that a results file measures, and the
    course's bar; "not measured" where no file does."""
    final, seeds, bench, memory = ctx["final"], ctx["seeds"], ctx.get("bench_search"), ctx.get("bench_memory")

    def verdict(ok: bool) -> str:
        return "met" if ok else "**not met**"

    course = GOALS.course_test_accuracy
    rows = [["course: saved model's test accuracy", f"at least {_pct(course)}", _pct(ctx["evaluate"]["accuracy"]),
             verdict(ctx["evaluate"]["accuracy"] >= course)]]
    tests = [r["test_accuracy"] for r in seeds["runs"]]
    rows.append(["test accuracy of each seed", f"at least {_pct(GOALS.test_accuracy_each)}", _pct(min(tests)),
                 verdict(min(tests) >= GOALS.test_accuracy_each)])
    rows.append(["mean test accuracy over seeds", f"at least {_pct(GOALS.test_accuracy_mean)}",
                 _pct(float(np.mean(tests))), verdict(float(np.mean(tests)) >= GOALS.test_accuracy_mean)])
    cold = final if not final["cache"]["reused"] else ctx.get("final_cold")  # a cold run of an earlier version
    if cold is None or cold["cache"]["reused"]:
        rows.append(["cold `make final`, normalized minutes", f"at most {GOALS.cold_final_normalized_minutes:g}",
                     "no cold run recorded", "not measured"])
    else:
        norm = cold["normalized_time"]["normalized_minutes"]
        rows.append(["cold `make final`, normalized minutes", f"at most {GOALS.cold_final_normalized_minutes:g}",
                     f"{norm:.1f}" + ("" if cold is final else " (an earlier cold run, Appendix A)"),
                     verdict(norm <= GOALS.cold_final_normalized_minutes)])
    if bench:
        m, tau = bench["phase1"]["trial_seconds_median"], bench["fidelity"]["kendall_tau"]
        rows.append(["median phase-1 trial (benchmark)", f"at most {GOALS.median_trial_seconds:g} s", f"{m:.2f} s",
                     verdict(m <= GOALS.median_trial_seconds)])
        rows.append(["phase-1 fidelity, Kendall's tau", f"at least {GOALS.kendall_tau:g}", f"{tau:.2f}",
                     verdict(tau >= GOALS.kendall_tau)])
        from search import space
        from search.config import FinalConfig
        from search.engines.objective import holds_rate

        tail = space.BUDGETS["tail"]
        budget = f"{tail.rows}x{tail.max_epochs}"  # bench-tail's name of the default
        # the space the default search draws from on this data: on CIFAR-10 its trials train less than
        # the final, so it holds the tail rate at its default, and bench-tail --fix measures that space
        rate = space.DEFAULT_TAIL["tail_learning_rate"]
        held = holds_rate(final["data"]["train"], tail.rows, tail.max_epochs, FinalConfig.tail_epochs)

        def tau(record: dict | None) -> float | None:  # at the default budget
            return (((record or {}).get("budgets") or {}).get(budget) or {}).get("kendall_tau")

        whole = tau(bench.get(fidelity_key(False)))
        fixed = bench.get(fidelity_key(False, ("tail_learning_rate",)))
        tail_tau = (tau(fixed) if _holds_default_rate(fixed) else None) if held else whole
        note = f" (the tail rate held at {rate:g}, as the search holds it here" + (
            f"; {whole:.2f} with the rate searched)" if whole is not None else ")") if held else ""
        rows.append(["phase-2 fidelity, Kendall's tau", f"at least {GOALS.tail_kendall_tau:g}",
                     "not measured" if tail_tau is None else f"{tail_tau:.2f}{note}",
                     "not measured" if tail_tau is None else verdict(tail_tau >= GOALS.tail_kendall_tau)])
        timed = bench.get("phase2_trials")
        minutes = timed["goal_trials_normalized"]["normalized_minutes"] if timed else None
        rows.append([f"{GOALS.tail_trials} phase-2 trials (benchmark), normalized minutes",
                     f"at most {GOALS.tail_trials_normalized_minutes:g}",
                     "not measured" if minutes is None else f"{minutes:.1f}",
                     "not measured" if minutes is None else verdict(minutes <= GOALS.tail_trials_normalized_minutes)])
    if memory:
        g = memory["released"]["growth_pct"]
        rows.append(["memory growth over a long search", f"at most {GOALS.memory_growth_pct:g} %", f"{g:+.1f} %",
                     verdict(g <= GOALS.memory_growth_pct)])
    small = [e for e in d["effect"] if e["name"] != "cifar10"]  # the bar is about the sets other than CIFAR-10
    if small:
        best = max(small, key=lambda e: e["difference_points"])
        rows.append(["search beats defaults on a small dataset", f"by at least {GOALS.search_gain_points:g} point",
                     f"{best['difference_points']:+.2f} points ({best['name']})",
                     verdict(best["difference_points"] >= GOALS.search_gain_points)])
    return _table(["goal", "bar", "measured", "verdict"], rows)


CPU_KINDS = (("amx_bf16", "AMX"), ("avx512_bf16", "AVX-512 BF16 and no AMX"), ("avx512f", "AVX-512 and no BF16"),
             ("avx2", "AVX2 only"))  # the recorded flags (final.CPU_FLAGS_RECORDED), fastest first
CROSS_CPU_TOLERANCE = 0.2  # normalized minutes of one run on two CPUs "differ" beyond this share


def cpu_kind(flags: list[str] | None) -> str | None:
    """A CPU's fastest recorded instruction set, in words (:data:`CPU_KINDS`); None if the run
    recorded no flags."""
    if flags is None:
        return None
    return next((words for flag, words in CPU_KINDS if flag in flags), "no AVX2")


def _each_mirror_shifted(final: dict) -> bool:
    """Whether the reported run tried each mirror over the training shifts (``final.stage_tta``),
    not only the better unshifted one, as runs before that rule did."""
    modes = list(final.get("val_accuracy_tta_candidates") or {})
    shifted = [m for m in modes if m.endswith("+shifts")]
    return bool(shifted) and len(shifted) == len(modes) - len(shifted)


def _other_cpu(run: dict, flags: list[str] | None) -> bool:
    """Whether a run of ``frontier.json`` recorded a CPU with other instruction sets than ``flags``."""
    return not same_cpu(run.get("cpu_flags"), flags)


def _factor(run: dict, default_cut: str, default_side: int, default_precision: str | None = None,
            default_epochs: int | None = None, default_flags: list[str] | None = None) -> str:
    """What a run of ``frontier.json`` changed against the default recipe (and the reported run's
    tail precision, tail epochs and CPU), in words."""
    parts = []
    if run.get("cut_layer") != default_cut:
        parts.append(f"cut at `{run.get('cut_layer')}`")
    if run.get("resolution") != default_side:
        parts.append(f"{run.get('resolution')} px input")
    label = run.get("params")
    if label not in (None, "default/default") and "search" in label.split("/"):
        parts.append("searched parameters")
    for changed in (run.get("param_changes") or {}).values():  # against today's defaults
        parts.extend(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in changed.items())
    if default_epochs and run.get("tail_epochs") not in (None, default_epochs):
        parts.append(f"{run['tail_epochs']} tail epochs")
    if default_precision and run.get("tail_precision") not in (None, default_precision):
        parts.append(f"{run['tail_precision']} tail")
    if run.get("flip"):
        parts.append("mirrored images cached")
    if _other_cpu(run, default_flags):
        parts.append(f"CPU with {cpu_kind(run['cpu_flags'])}")
    return ", ".join(parts) or "default recipe"


def _like_reported(frontier: dict | None, final: dict) -> list[dict]:
    """The runs of ``frontier.json`` with the reported run's seed, parameters label, cut and side."""
    from search import space

    label, key = space.params_label(final.get("params_provenance") or {}), final["cache"]["key"]
    return [r for r in (frontier or {}).get("runs", {}).values()
            if r.get("seed") == final["config"]["seed"] and r.get("params") == label
            and r.get("cut_layer") == key["cut_layer"] and r.get("resolution") == key["resolution"]]


def _precision_words(precision: str | None) -> str:
    return "mixed bfloat16" if precision == "mixed_bfloat16" else "single precision"


def _precision_pair(frontier: dict | None, final: dict) -> dict | None:
    """The latest run of ``frontier.json`` with the reported run's seed, parameters, cut and side
    but its tail in the other precision, on the same kind of CPU where both recorded theirs: its
    accuracies and the reported run's lead in points."""
    used = final.get("tail_precision_resolved")
    pairs = [r for r in _like_reported(frontier, final) if r.get("tail_precision")
             and r["tail_precision"] != used and not _other_cpu(r, cpu_flags(final))]
    if not pairs:
        return None
    other = max(pairs, key=lambda r: r.get("finished") or "")
    return {"precision": _precision_words(other["tail_precision"]),
            "val": _pct(other["final"]["val_accuracy"]), "test": _pct(other["final"]["test_accuracy"]),
            "lead_points": 100 * (final["test_accuracy"] - other["final"]["test_accuracy"])}


def _setting(run: dict, final: dict) -> str:
    """What a run of ``frontier.json`` varied against the reported run ``final`` (:func:`_factor`)."""
    key = final["cache"]["key"]
    return _factor(run, key["cut_layer"], key["resolution"], final.get("tail_precision_resolved"),
                   (final.get("config") or {}).get("tail_epochs"), cpu_flags(final))


def across_cpus(frontier: dict | None, final: dict) -> dict | None:
    """The same recipe on two kinds of CPU: the latest run of ``frontier.json`` with the reported
    run's seed, parameters, cut, side and tail epochs on a CPU with other recorded instruction
    sets, beside the reported run's own entry. Each run's CPU (:func:`cpu_kind`), wall minutes,
    minutes by the cost bar's measure (``normalized.reference``) and by stage, tail precision and
    test accuracy; ``ratio``: the other run's bar minutes over the reported run's, ``differs``:
    beyond :data:`CROSS_CPU_TOLERANCE`. None without such a pair, or without normalized figures."""
    runs = list((frontier or {}).get("runs", {}).values())
    own = next((r for r in runs if r.get("finished") == final.get("finished")), None)
    same = [r for r in _like_reported(frontier, final) if _other_cpu(r, cpu_flags(final))
            and not r.get("param_changes") and r.get("tail_epochs") == final["config"].get("tail_epochs")]
    if own is None or not same:
        return None
    other = max(same, key=lambda r: r.get("finished") or "")
    if not (own.get("normalized") or {}).get("reference") or not (other.get("normalized") or {}).get("reference"):
        return None

    def figures(run: dict) -> dict:
        return {"cpu": cpu_kind(run["cpu_flags"]), "wall": run["final"]["seconds"] / 60,
                "minutes": run["normalized"]["reference"]["final_minutes"],
                "by_stage": run["normalized"]["final_minutes"], "test": _pct(run["final"]["test_accuracy"]),
                "precision": _precision_words(run.get("tail_precision"))}

    there, here = figures(other), figures(own)
    ratio = there["minutes"] / here["minutes"]
    return {**there, **{f"own_{k}": v for k, v in here.items()}, "ratio": ratio,
            "differs": abs(ratio - 1) > CROSS_CPU_TOLERANCE}


def _runs_table(frontier: dict, final: dict) -> str:
    runs = list((frontier or {}).get("runs", {}).values())
    rows = []
    for run in sorted(runs, key=lambda r: (r.get("finished") or "")):
        factor = _setting(run, final)
        norm = (run.get("normalized") or {}).get("final_minutes")
        reference = ((run.get("normalized") or {}).get("reference") or {}).get("final_minutes")
        rows.append([factor, run.get("seed"), _pct(run["final"]["val_accuracy"]), _pct(run["final"]["test_accuracy"]),
                     f"{run['final']['seconds'] / 60:.1f}", "–" if reference is None else f"{reference:.1f}",
                     "–" if norm is None else f"{norm:.1f}"])
    return _table(["setting varied", "seed", "validation", "test", "wall minutes", "normalized minutes",
                   "normalized by stage"], rows)


EFFECT_RUN = re.compile(r"effect/(?P<dataset>[\w.-]+)-seed(?P<seed>\d+)/final\.json$")


def study_source(study: dict | None) -> dict | None:
    """Which search of the search-effect comparison a study report (``study_head.json``,
    ``report.summarize``) comes from, read from the final run it names (``final_source``, a
    ``.../effect/<dataset>-seed<N>/final.json`` of ``search.effect``): ``{"dataset", "seed"}``,
    or None for a study of another origin."""
    match = EFFECT_RUN.search(str((study or {}).get("final_source") or ""))
    return {"dataset": match["dataset"], "seed": int(match["seed"])} if match else None


def within_cost_bar(frontier: dict | None, final: dict, bar: float = GOALS.cold_final_normalized_minutes
                    ) -> dict | None:
    """The setting of ``frontier.json`` (as :func:`_factor` names it against the reported run)
    whose runs on two seeds or more all took at most ``bar`` minutes by the cost bar's measure
    (``normalized.reference``, compiled reference calls only) and whose mean test accuracy is
    the highest: its name, seeds, slowest run's minutes and mean test and validation accuracy;
    None if no setting qualifies."""
    groups: dict[str, list[dict]] = {}
    for run in (frontier or {}).get("runs", {}).values():
        norm = run.get("normalized") or {}
        if norm.get("reference_method") == "compiled" and norm.get("reference"):
            groups.setdefault(_setting(run, final), []).append(run)
    best = None
    for label, runs in groups.items():
        seeds = {r.get("seed") for r in runs}
        minutes = max(r["normalized"]["reference"]["final_minutes"] for r in runs)
        if len(seeds) < 2 or minutes > bar:
            continue
        row = {"setting": label, "seeds": sorted(seeds), "minutes": minutes, "bar": bar,
               "mean_test": float(np.mean([r["final"]["test_accuracy"] for r in runs])),
               "mean_val": float(np.mean([r["final"]["val_accuracy"] for r in runs]))}
        if best is None or row["mean_test"] > best["mean_test"]:
            best = row
    return best


def _effect_command(effect: dict, row: dict) -> str:
    """The command that wrote a dataset's row of ``search_effect.json`` (older rows: the file's)."""
    return row.get("command") or effect.get("command") or "make search-effect"


def _provenance_table(ctx: dict) -> str:
    """Appendix A: which run wrote each file the paper reads, its code version and its command."""
    final = ctx["final"]
    rows = [["`results/final.json`", "the reported run", final["machine"].get("code_version") or "not recorded",
             "`transfer-search final`" + ("" if final["config"]["seed"] == 0 else f" --seed {final['config']['seed']}"),
             final.get("finished", "")]]
    if ctx.get("final_cold"):
        cold = ctx["final_cold"]
        rows.append(["`results/final_cold.json`", "the latest cold `make final`",
                     cold["machine"].get("code_version") or "not recorded", "`make final` on a fresh clone",
                     cold.get("finished", "")])
    if ctx.get("evaluate"):
        rows.append(["`results/evaluate.json`", "course's script on the saved model", "", "`make evaluate`",
                     ctx["evaluate"].get("recorded", "")])
    for run in ctx["seeds"]["runs"]:
        rows.append(["`results/seeds.json`", f"seed {run['seed']}", run.get("code_version") or "not recorded",
                     "`transfer-search final`", run.get("finished", "")])
    for name in ("search_effect", "search_effect_tail_shipped", "search_effect_fold_t", "search_effect_more_seeds"):
        comparison = ctx.get(name) or {}
        for ds in comparison.get("datasets", []):
            rows.append([f"`results/{name}.json`", ds["name"], ds.get("code_version") or "not recorded",
                         f"`{_effect_command(comparison, ds)}`", ds.get("recorded") or comparison.get("recorded", "")])
    effect = ctx.get("search_effect") or {}
    for name in ("study_head", "study_tail"):
        if ctx.get(name):
            source = study_source(ctx[name])
            row = _datasets(effect).get(source["dataset"]) if source else None
            if row is not None:  # one of the searches of the search-effect comparison
                rows.append([f"`results/{name}.json`", f"study `{ctx[name]['study_name']}`",
                             row.get("code_version") or "not recorded",
                             f"`{_effect_command(effect, row)}` (seed {source['seed']}), "
                             "then `transfer-search report`", ""])
            else:
                rows.append([f"`results/{name}.json`", f"study `{ctx[name]['study_name']}`", "", "`make search`", ""])
    for name in ("bench_cache", "bench_search", "bench_memory", "frontier"):
        if ctx.get(name):
            rows.append([f"`results/{name}.json`", name.replace("_", " "), "", f"`make {name.replace('_', '-')}`"
                         if name != "frontier" else "`transfer-search compare`", ctx[name].get("recorded", "")])
    return _table(["file", "run", "code version", "command", "recorded"], rows)


def _tail_fidelity(fidelity: dict | None) -> dict | None:
    """A complete ``bench-tail``: its configurations (of every depth, or of the search's one) and
    reference (rows, epochs, median seconds), and its budgets, fewest rows x epochs first, each
    with its taus against the reference (overall, and within depth when depths were sampled) and
    its median seconds, and the tau over the pairs that share the BN mode when both modes were
    drawn; None if there is none."""
    if not fidelity or not fidelity.get("complete") or not fidelity.get("budgets"):
        return None
    from search.bench import kendall_tau

    rows = fidelity.get("rows") or []
    modes = [r["params"].get("bn_mode") for r in rows]
    by_mode = len(set(modes)) > 1  # the BN mode was sampled: how well the budget ranks within one mode
    budgets = [{"rows": b["budget"]["rows"], "epochs": b["budget"]["max_epochs"], "tau": b["kendall_tau"],
                "tau_within": b.get("kendall_tau_within_depth") if fidelity.get("search_depth") else None,
                "tau_within_bn": kendall_tau([r[name] for r in rows], [r["full"] for r in rows], modes)
                if by_mode and all(name in r for r in rows) else None,
                "seconds": b["seconds_median"]}
               for name, b in fidelity["budgets"].items()]
    fixed = ", ".join(f"{name.replace('_', ' ')} at {value:g}" if isinstance(value, float) else
                      f"{name.replace('_', ' ')} at {value}" for name, value in (fidelity.get("fixed") or {}).items())
    return {"configs": fidelity["configs"], "search_depth": bool(fidelity.get("search_depth")), "fixed": fixed,
            # the space a search holds its rate in (its trials training less than the final: CIFAR-10's)
            "held_rate": _holds_default_rate(fidelity),
            "side": _cache_side(fidelity.get("cache")), "ref_rows": fidelity["reference"]["rows"],
            "ref_epochs": fidelity["reference"]["max_epochs"], "ref_seconds": fidelity["full_seconds_median"],
            "budgets": sorted(budgets, key=lambda b: b["rows"] * b["epochs"])}


def _holds_default_rate(fidelity: dict | None) -> bool:
    """Whether a ``bench-tail`` record held exactly the tail rate, at its default: the space a
    search draws from when its trials train less than the final (CIFAR-10's)."""
    from search import space

    return ((fidelity or {}).get("fixed") or {}) == {"tail_learning_rate": space.DEFAULT_TAIL["tail_learning_rate"]}


def _cache_side(cache_id: str | None) -> int | None:
    """The input side of a cache named ``<backbone>-<side>-<cut>-...`` (``cache.CacheKey.id``)."""
    parts = (cache_id or "").split("-")
    return int(parts[1]) if len(parts) > 2 and parts[1].isdigit() else None


def _tail_trials(timed: dict | None) -> dict | None:
    """``bench-tail --time-trials``: the trials, their budget, how many were pruned, median and
    mean wall seconds, the speed-up over the Keras-validated baseline, and the goal's trials in
    normalized minutes; None if not run."""
    if not timed:
        return None
    return {"trials": timed["trials"], "rows": timed["budget"]["rows"], "epochs": timed["budget"]["max_epochs"],
            "pruned": timed["states"]["PRUNED"], "wall_per_trial": timed["wall_seconds_per_trial"],
            "side": _cache_side(timed.get("cache")), "median": timed["trial_seconds_median"],
            "baseline_median": (timed.get("baseline") or {}).get("trial_seconds_median"),
            "speedup": timed.get("speedup_same_configurations"), "goal_trials": timed["goal_trials"],
            "goal_minutes": timed["goal_normalized_minutes"],
            "minutes": timed["goal_trials_normalized"]["normalized_minutes"],
            "wall_minutes": timed["goal_trials_normalized"]["wall_minutes"]}


def build_context(results: Path) -> dict:
    """Everything the template may cite: the JSON files of ``results/`` under their names,
    derived numbers under ``d``, the tables and the listings."""
    from search import selection, space

    ctx: dict[str, Any] = {}
    for name in RESULT_FILES:
        path = results / f"{name}.json"
        if path.exists():
            ctx[name] = read_json(path)
    ctx.update(listings())
    for phase in space.PHASES:
        ctx[f"{phase}_space_table"] = _table(["parameter", "values", "only when"],
                                             [[f"`{r['name']}`", r["values"], r["condition"] or "always"]
                                              for r in space.describe(phase)])
    final = ctx.get("final")
    if not final or "seeds" not in ctx or "evaluate" not in ctx:
        return ctx
    cache, epochs, seeds = final["cache"], final["epochs"], ctx["seeds"]
    extraction = float((cache.get("extraction") or {}).get("seconds") or 0.0)
    tail_epoch = float(np.mean(np.diff([0.0] + [e["seconds"] for e in epochs]))) if epochs else 0.0
    cm = np.array(final["test_confusion_matrix"])
    off = cm - np.diag(np.diag(cm))
    i, j = np.unravel_index(off.argmax(), off.shape)
    names, per_class = final["class_names"], final["test_per_class_accuracy"]
    worst = sorted(per_class, key=per_class.get)[:2]
    norm = final["normalized_time"]
    tests = [r["test_accuracy"] for r in seeds["runs"]]
    bench, study_head = ctx.get("bench_search") or {}, ctx.get("study_head") or {}
    pair = ctx.get("search_pair")
    default_trial = next((t for t in study_head.get("finished", []) if t.get("defaults")), None)
    tail_study = ctx.get("study_tail") or {}
    e2e = bench.get("end_to_end_epoch_seconds")
    probe = final.get("precision_probe")
    d: dict[str, Any] = {
        "sample_shown": min(SAMPLE_SHOWN, len(final["test_sample_predictions"]["index"])),
        "n_images": sum(a["shape"][0] for k, a in cache["arrays"].items() if k.endswith("_cut")),
        "extraction_minutes": extraction / 60,
        "head_trial_seconds": study_head.get("median_trial_seconds") or bench.get("phase1", {}).get(
            "trial_seconds_median"),
        "bench_trial_seconds": bench.get("phase1", {}).get("trial_seconds_median"),
        "tail_epoch_seconds": tail_epoch, "tail_epoch_minutes": tail_epoch / 60,
        "e2e_epoch_seconds": e2e, "e2e_over_tail": (e2e / tail_epoch) if e2e and tail_epoch else None,
        "break_even_epochs": extraction / (e2e - tail_epoch) if e2e and tail_epoch and e2e > tail_epoch else None,
        "ci_level": 0.95,
        "test_ci": _interval(ctx["evaluate"]["accuracy"], int(final["data"]["test"])),
        "has_plain_test": final.get("test_accuracy_plain") is not None,
        "n_train_all": final["data"]["train"] + final["data"]["val"],
        "image_side": final["data"].get("image_shape", [32])[0],
        "cut_shape": " by ".join(str(x) for x in cache["arrays"]["train_orig_cut"]["shape"][1:]),
        "pool_dim": cache["arrays"]["train_orig_pool"]["shape"][1],
        "head_rows": space.BUDGETS["head"].rows, "head_epochs": space.BUDGETS["head"].max_epochs,
        "tail_rows": space.BUDGETS["tail"].rows, "tail_epochs": space.BUDGETS["tail"].max_epochs,
        "small_data_rows": selection.SMALL_DATA_ROWS, "folds": selection.FOLDS, "confidence": selection.CONFIDENCE,
        "precision_probe": probe,
        "precision_speedup": probe["speedup"] if probe else None,
        "precision_threshold_pct": 100 * (probe["threshold"] - 1) if probe else None,
        "precision_used": final.get("tail_precision_resolved", final["config"]["tail_precision"]),
        "reference_ips": norm["reference_images_per_second"],
        "reference_methods": (ctx.get("bench_cache") or {}).get("reference_speed_by_method"),
        "reference_method": reference_method(final),
        "speed_min": norm["reference"].get("min", norm["reference"]["images_per_second"]),
        "speed_max": norm["reference"].get("max", norm["reference"]["images_per_second"]),
        "speed": norm["reference"]["images_per_second"],
        # the side the reference was measured at (runs before it was fixed at the native side: their own)
        "reference_side": norm["reference"].get("start", norm["reference"]).get("resolution"),
        "wall_minutes": norm["wall_minutes"], "normalized_minutes": norm["normalized_minutes"],
        "normalized_lo": norm["normalized_minutes_range"][0], "normalized_hi": norm["normalized_minutes_range"][1],
        "by_stage": norm.get("by_stage"),
        "tail_share": final["timings_seconds"]["tail"] / final["timings_seconds"]["total"],
        "tail_gain_points": 100 * (final["val_accuracy_plain"] - final["frozen_val_accuracy"]),
        "seed_spread_points": 100 * (max(tests) - min(tests)),
        "precision_pair": _precision_pair(ctx.get("frontier"), final),
        "within_cost_bar": within_cost_bar(ctx.get("frontier"), final),
        "across_cpus": across_cpus(ctx.get("frontier"), final),
        "tta_each_mirror_shifted": _each_mirror_shifted(final),
        "study_source": study_source(ctx.get("study_head")),
        "tail_fidelity": [f for f in (_tail_fidelity(bench.get(key)) for key in (
            fidelity_key(True), fidelity_key(False), *sorted(k for k in bench if "_fixed_" in k))) if f],
        "tail_trials": _tail_trials(bench.get("phase2_trials")),
        "seeds_same_code": len({r.get("code_version") for r in seeds["runs"]}) == 1
        and seeds["runs"][0].get("code_version") is not None,
        "worst_0": f"{worst[0]} at {_pct(per_class[worst[0]])}",
        "worst_1": f"{worst[1]} at {_pct(per_class[worst[1]])}",
        "confused_true": names[i], "confused_pred": names[j], "confused_count": int(off[i, j]),
        "effect": effect_rows(ctx.get("search_effect") or {}),
        "tail_shipped": tail_shipped(ctx.get("search_effect_tail_shipped"), ctx.get("search_effect")),
        "fold_t": fold_t_rows(ctx.get("search_effect_fold_t"), ctx.get("search_effect")),
        "more_seeds": more_seeds_rows(ctx.get("search_effect_more_seeds"), ctx.get("search_effect")),
        "head_default_value": default_trial["value"] if default_trial else None,
        "tail_best_is_defaults": bool(tail_study) and any(
            t.get("defaults") and t["number"] == tail_study.get("best_number") for t in tail_study.get("finished", [])),
        "pair_difference_points": 100 * (pair["searched"]["test_accuracy"] - pair["default"]["test_accuracy"])
        if pair else None,
        "head_params": _params_text(final["params"]["head"]), "tail_params": _params_text(final["params"]["tail"]),
    }
    d["effect_all_defaults"] = bool(d["effect"]) and all(e["defaults_shipped"] == e["decisions"] for e in d["effect"])
    if pair:
        n = int(final["data"]["test"])
        lo, hi = wilson_interval(pair["default"]["test_accuracy"] * n, n)
        d["pair_within_ci"] = lo <= pair["searched"]["test_accuracy"] <= hi
    cold = ctx.get("final_cold")
    if cold and cold.get("finished") != final.get("finished") and probe and cold.get("precision_probe"):
        # training and inference speed of the two runs' machines (each measured in its own run)
        d["step"], d["cold_step"] = probe["step_seconds"]["float32"], cold["precision_probe"]["step_seconds"]["float32"]
        d["cold_speed"] = cold["normalized_time"]["reference"]["images_per_second"]
        d["step_ratio"], d["speed_ratio"] = d["step"] / d["cold_step"], d["cold_speed"] / d["speed"]
    else:
        d["step"] = None
    d["bar_each"], d["bar_mean"] = GOALS.test_accuracy_each, GOALS.test_accuracy_mean
    d["seeds_meet_bars"] = min(tests) >= GOALS.test_accuracy_each and float(np.mean(tests)) >= GOALS.test_accuracy_mean
    ctx["d"] = d
    ctx["goals_table"] = _goals_table(ctx, d)
    ctx["stages_table"] = _table(
        ["stage", "validation accuracy", "kept"],
        [[r["stage"], _pct(r["val_accuracy"]), {True: "yes", False: "no"}.get(r.get("chosen"), "")]
         for r in final["stages"]])
    t = final["timings_seconds"]
    ctx["timings_table"] = _table(["stage", "seconds"], [[PIPELINE[k], f"{t[k]:.0f}"] for k in PIPELINE if k in t])
    ctx["seeds_table"] = _table(
        ["seed", "validation", "test", "95 % interval", "compute precision"],
        [[r["seed"], _pct(r["val_accuracy"]), _pct(r["test_accuracy"]),
          f"{_pct(r['test_ci95'][0])} to {_pct(r['test_ci95'][1])}", r.get("tail_precision") or "not recorded"]
         for r in seeds["runs"]])
    ctx["effect_table"] = _effect_table(ctx.get("search_effect") or {})
    ctx["runs_table"] = _runs_table(ctx.get("frontier"), final)
    ctx["provenance_table"] = _provenance_table(ctx)
    return ctx


def prediction_grid(final: dict, data: str | None, out: Path, n: int = SAMPLE_SHOWN) -> None:
    """The picture at the top: the first ``n`` of the run's seeded random test sample with the
    model's prediction; a mistake is drawn in red with its true label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from search.data import load_cifar10

    splits = load_cifar10(data, val_size=10)  # only the test images are drawn
    preds = final["test_sample_predictions"]
    names = final["class_names"]
    fig, axes = plt.subplots(3, n // 3, figsize=(n // 3 * 1.4, 3 * 1.6))
    for i, ax in enumerate(axes.ravel()):
        if i >= len(preds["index"]):
            ax.axis("off")
            continue
        ax.imshow(splits.x_test[preds["index"][i]], interpolation="nearest")
        ok = preds["predicted"][i] == preds["true"][i]
        predicted, true = names[preds["predicted"][i]], names[preds["true"][i]]
        title = predicted if ok else f"{predicted}\n(true: {true})"
        ax.set_title(title, fontsize=7, color="black" if ok else "red")
        ax.axis("off")
    fig.suptitle(f"CIFAR-10 test images and the model's predictions (red: wrong); "
                 f"test accuracy {100 * final['test_accuracy']:.2f} %", fontsize=9)
    fig.tight_layout()
    save_figure(fig, out)


def epoch_figure(final: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = final["epochs"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([e["epoch"] for e in epochs], [100 * e["accuracy"] for e in epochs], "o-", label="train (augmented)")
    ax.plot([e["epoch"] for e in epochs], [100 * e["val_accuracy"] for e in epochs], "s-", label="validation")
    ax.axhline(100 * final["frozen_val_accuracy"], ls="--", c="gray", label="frozen features + head (val)")
    ax.set_xlabel("tail fine-tuning epoch")
    ax.set_ylabel("accuracy (%)")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, out)


def to_html(markdown_text: str, base: Path) -> str:
    """Self-contained HTML: images embedded as data URIs."""
    import markdown

    body = markdown.markdown(markdown_text, extensions=["tables", "fenced_code"])

    def embed(match: re.Match) -> str:
        path = base / match.group(1)
        if not path.exists():
            raise UserError(f"paper figure missing: {path}")
        return f'src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}"'

    body = re.sub(r'src="([^"]+\.png)"', embed, body)
    return ("<!doctype html><html><head><meta charset='utf-8'><title>Transfer learning for CIFAR-10</title>"
            "<style>body{font-family:Georgia,serif;max-width:820px;margin:auto;padding:1em;line-height:1.5}"
            "img{max-width:100%}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px}"
            "</style></head><body>" + body + "</body></html>")


def write_paper(results: str | Path = "results", docs: str | Path = "docs", data: str | None = None) -> Path:
    """Render ``docs/paper.md`` and ``docs/paper.html``; figures under ``docs/figures/``.

    The phase-1 study figure comes from ``results/report/`` (``make report``); where that folder
    is missing (a fresh clone has no study database), the committed copy in ``docs/figures/`` is
    kept and a warning says so.
    """
    import logging
    import shutil

    results, docs = Path(results), Path(docs)
    template = (docs / "paper_template.md").read_text()
    for name in ("final", "seeds", "evaluate"):
        if not (results / f"{name}.json").exists():
            raise UserError(f"{results / (name + '.json')} missing: the paper needs `make final`, "
                            "`make evaluate` and `transfer-search compare` first")
    ctx = build_context(results)
    figures = docs / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    text = render(template, ctx)  # fails on a missing number before any figure is drawn
    prediction_grid(ctx["final"], data, figures / "predictions.png")
    epoch_figure(ctx["final"], figures / "tail_epochs.png")
    confusion_figure(ctx["final"], figures / "confusion_matrix.png")  # the reported run's, whatever the report shows
    src = results / "report" / "optimization_history.png"
    if src.exists():
        shutil.copyfile(src, figures / src.name)
    elif (figures / src.name).exists():
        logging.getLogger(__name__).warning("%s missing: keeping the committed %s", src, figures / src.name)
    else:
        raise UserError(f"{src} missing: run `make report` first")
    with atomic_path(docs / "paper.md") as tmp:
        tmp.write_text(text)
    with atomic_path(docs / "paper.html") as tmp:
        tmp.write_text(to_html(text, docs))
    return docs / "paper.md"
