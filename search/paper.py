"""The paper: ``docs/paper_template.md`` + ``results/`` -> ``docs/paper.md`` and ``docs/paper.html``.

Entry point: :func:`write_paper`. Every number in the paper is a ``{{ name | format }}``
placeholder filled from the JSON files in ``results/`` or from the code (search spaces, budgets,
code listings); a missing one is an error. The template types no digits outside its reference
list and figure, table and listing numbers (``tests/test_paper.py`` checks).
Formats: ``pct`` (0.8712 -> 87.12 %), ``pct1``, ``f2``, ``f3``, ``f4``, ``int``, ``min``
(seconds -> minutes), ``s`` (as is).
"""

from __future__ import annotations

import base64
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from search.config import GOALS
from search.errors import UserError
from search.io import atomic_path, read_json, save_figure
from search.report import confusion_figure

PLACEHOLDER = re.compile(r"\{\{\s*([\w.]+)\s*(?:\|\s*(\w+)\s*)?\}\}")
FORMATS = {
    "pct": lambda v: f"{100 * float(v):.2f} %",
    "pct1": lambda v: f"{100 * float(v):.1f} %",
    "f1": lambda v: f"{float(v):.1f}",
    "f2": lambda v: f"{float(v):.2f}",
    "f3": lambda v: f"{float(v):.3f}",
    "f4": lambda v: f"{float(v):.4f}",
    "int": lambda v: f"{int(round(float(v))):,}",
    "min": lambda v: f"{float(v) / 60:.1f}",
    "s": str,
    "pct0": lambda v: f"{100 * float(v):.0f} %",
    "gb": lambda v: f"{float(v) / 1e9:.1f}",
    "gib": lambda v: f"{float(v) / 2**30:.0f}",
    "len": lambda v: str(len(v)),
}


def _lookup(context: dict, dotted: str) -> Any:
    value: Any = context
    for part in dotted.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            raise KeyError(dotted)
    if value is None:
        raise KeyError(dotted)
    return value


def render(template: str, context: dict) -> str:
    """Fill every placeholder; raise UserError listing all that are missing."""
    missing: list[str] = []

    def fill(match: re.Match) -> str:
        name, fmt = match.group(1), match.group(2) or "s"
        try:
            return FORMATS[fmt](_lookup(context, name))
        except KeyError:
            missing.append(name)
            return match.group(0)

    text = PLACEHOLDER.sub(fill, template)
    if missing:
        raise UserError(f"paper needs numbers missing from results/: {sorted(set(missing))}")
    return text


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


def _effect_sentence(effect: dict) -> str:
    """What the search changed on each dataset of ``results/search_effect.json``, beside the seed spread."""
    parts = []
    for d in effect["datasets"]:
        n = len(d["seeds"])
        diff, spread = d["mean_difference"], max(d["seed_spread_default"], d["seed_spread_searched"])
        verdict = ("an effect larger than the seed spread" if abs(diff) > spread
                   else "within the seed spread, so not an effect")
        parts.append(f"on {d['name']} the searched models averaged {_pct(d['mean_searched_test'])} test accuracy "
                     f"against {_pct(d['mean_default_test'])} with the defaults over {n} seeds ({verdict})")
    return "Searched against default parameters, " + "; ".join(parts) + "."


def _search_texts(ctx: dict) -> dict[str, str]:
    """Sentences about the searches, the importance basis and the BN mode, from the study files."""
    head, tail, effect = ctx.get("study_head"), ctx.get("study_tail"), ctx.get("search_pair")
    out = {}
    if head:
        pruners = " then ".join(head.get("pruners") or []) or "a pruner not recorded with the study"
        text = (f"The phase-1 study `{head['study_name']}` ran {head['trials']} trials under {pruners} "
                f"({head['complete']} complete, "
                f"{head['pruned']} pruned, {head['failed']} failed; median trial "
                f"{head['median_trial_seconds']:.2f} s); its best head reached {_pct(head.get('best_value'))} "
                "validation accuracy at the trial budget (Figures 4 and 5).")
        out["importance_basis"] = f"computed from the {head['complete']} completed trials of that study"
    else:
        text = "No phase-1 search was run for the reported cache key (Figures 4 and 5 come from an earlier study)."
        out["importance_basis"] = "from the study that produced the figure"
    if tail:
        text += (f" The phase-2 study `{tail['study_name']}` ran {tail['trials']} trials ({tail['complete']} "
                 f"complete, {tail['pruned']} pruned, {tail['failed']} failed; median trial "
                 f"{tail['median_trial_seconds']:.1f} s); its best trial reached {_pct(tail.get('best_value'))} at "
                 "its budget.")
        text += _defaults_trial_sentence(tail) + _pruned_at_last_epoch_sentence(tail)
    else:
        text += " No phase-2 search was run for the reported cache key."
    out["search_sentence"] = text
    modes: dict[str, list[float]] = {}
    for t in (tail or {}).get("finished", []):
        if t.get("value") is not None and "bn_mode" in t["params"]:
            modes.setdefault(t["params"]["bn_mode"], []).append(t["value"])
    frozen = [(seed, v, d) for change, seed, v, d in _variant_pairs(ctx.get("ablation", []))
              if change == "bn_mode=frozen"]
    if frozen:
        seed, v, d = frozen[-1]
        out["bn_sentence"] = (f"we measured it: with the statistics frozen (`bn_mode` frozen, seed {seed}, one run "
                              f"each, Table 5) the final model reached {_pct(v['val_accuracy'])} validation accuracy "
                              f"against {_pct(d['val_accuracy'])} with batch statistics.")
    elif len(modes) == 2:
        out["bn_sentence"] = (f"in the phase-2 search the best trial with batch statistics reached "
                              f"{_pct(max(modes['batch']))} against {_pct(max(modes['frozen']))} with the statistics "
                              f"frozen ({len(modes['batch'])} and {len(modes['frozen'])} trials, at the trial budget).")
    else:
        out["bn_sentence"] = ("we did not measure frozen statistics against batch statistics in this run's searches "
                              "(an earlier session's exploratory runs favoured batch statistics).")
    if ctx.get("search_effect", {}).get("datasets"):
        out["search_discussion"] = _effect_sentence(ctx["search_effect"])
        out["search_effect_file"] = "and `results/search_effect.json` (searched against default parameters)"
    elif effect:
        d, s_ = effect["default"], effect["searched"]
        margin = _margin(effect, ctx)
        out["search_discussion"] = (
            f"Under one seed and one cache, both phases' searched parameters reached {_pct(s_['val_accuracy'])} "
            f"validation and {_pct(s_['test_accuracy'])} test accuracy, against {_pct(d['val_accuracy'])} and "
            f"{_pct(d['test_accuracy'])} with the defaults: the search "
            + ("won on validation." if effect["searched_wins_on_validation"] else
               "did **not** win on validation" + (
                   margin + "; a difference this small says neither is better." if margin
                   else "; its trials ran on a few thousand images for a couple of epochs, a budget at which the final "
                   "model's ranking is not preserved.") + _lag_sentence(ctx))
            + _same_tail_sentence(d, s_)
            + _versions_sentence(d.get("code_version"), s_.get("code_version")))
        out["search_effect_file"] = "and `results/search_effect.json` (searched against default parameters)"
    else:
        out["search_discussion"] = "We did not compare searched and default parameters under one seed in this run."
        out["search_effect_file"] = ""
    return out


def _pruner_sentence() -> str:
    """How a phase-1 trial can be stopped: the default pruner and its rungs, from the code."""
    from search import space
    from search.engines.optuna_engine import DEFAULT_PRUNER, PRUNERS, rung_steps

    rungs = " and ".join(f"{s + 1}" for s in rung_steps(space.BUDGETS["head"].max_epochs))
    names = {"asha": "asynchronous successive halving (ASHA; Li et al., 2020)",
             "hyperband": "Hyperband (Li et al., 2018)", "median": "the median rule", "none": "no pruner"}
    others = ", ".join(f"`{p}`" for p in PRUNERS if p != DEFAULT_PRUNER)
    return (f"can be stopped by Optuna's pruner, by default {names[DEFAULT_PRUNER]}: after epochs {rungs} only "
            f"the best third of the trials that reached that epoch go on (`--pruner` also takes {others}; "
            f"Hyperband, the default before, spreads trials over brackets whose first judgement comes later)")


def _rungs_sentence(bench_search: dict) -> str:
    """Kendall tau at each pruner rung, and the same search under the other pruner(s)."""
    parts = []
    rungs = bench_search["fidelity"].get("rungs")
    if rungs:
        parts.append("the score a trial reports ranks the same configurations with tau "
                     + ", ".join(f"{r['kendall_tau']:.2f} after {r['epochs']} epochs" for r in rungs
                                 if r["step"] is not None) + " (the pruner's judgements)")
    for other in (bench_search["fidelity"].get("other_budgets") or {}).values():
        parts.append(f"the same trial budget in batches of {other['budget']['batch_size']} rows instead of "
                     f"{bench_search['fidelity']['fast_budget']['batch_size']} ranked them with tau "
                     f"{other['kendall_tau']:.2f}")
    phase1 = bench_search["phase1"]
    for name, other in (phase1.get("other_pruners") or {}).items():
        parts.append(f"the same search under `{name}` instead of `{phase1['pruner']}`: median trial "
                     f"{other['trial_seconds_median']:.2f} s, best {_pct(other['best_value'])} against "
                     f"{_pct(phase1['best_value'])}")
    return "; ".join(parts)


def _variant_pairs(rows: list[dict]) -> list[tuple[str, Any, dict, dict]]:
    """``(change, seed, variant row, default row)`` for each ``--params`` variant of the ablation:
    the variant's latest chosen final row and the latest default run's of the same seed, cut and
    input side (``change`` is what the variant sets, ``warmup_fraction=0.0``)."""

    def chosen(label: str, seed: Any, scope: tuple) -> dict | None:
        finals = [r for r in rows if r.get("params") == label and r.get("seed") == seed and r.get("chosen")
                  and r["stage"].startswith("final") and (r.get("cut"), r.get("resolution")) == scope]
        return finals[-1] if finals else None

    out = []
    for label in dict.fromkeys(r["params"] for r in rows if "=" in str(r.get("params", ""))):
        runs = dict.fromkeys((r.get("seed"), (r.get("cut"), r.get("resolution")))
                             for r in rows if r.get("params") == label)
        for seed, scope in runs:
            variant, default = chosen(label, seed, scope), chosen("default/default", seed, scope)
            if variant and default:
                change = label.split("/", 1)[1].split(", ", 1)[1] if ", " in label else label
                out.append((change, seed, variant, default))
    return out


def _variant_sentence(rows: list[dict]) -> str:
    """Each ``--params`` variant's chosen final row against the latest default run of its seed
    and scope (:func:`_variant_pairs`)."""
    out = [f"with {change} (seed {seed}) the chosen final validation accuracy was {_pct(variant['val_accuracy'])}, "
           f"against {_pct(default['val_accuracy'])} for the latest default run of that seed (one run each)"
           for change, seed, variant, default in _variant_pairs(rows)]
    return (" Parameter variants: " + "; ".join(out) + ".") if out else ""


def _versions_sentence(default: str | None, searched: str | None) -> str:
    """A caveat when the compared runs are not known to come from the same code."""
    if default and searched and default == searched and not default.endswith("-dirty"):
        return ""
    return (f" The two runs are not known to come from the same code (code versions: default "
            f"{default or 'not recorded'}, searched {searched or 'not recorded'}), so the comparison is indicative.")


def _margin(effect: dict, ctx: dict) -> str:
    """The validation difference of the searched-vs-default comparison in images, when it is small."""
    n_val = (ctx.get("final") or {}).get("data", {}).get("val")
    diff = effect["val_difference"]
    if not n_val or abs(diff) * n_val > 10:
        return ""
    images = round(abs(diff) * n_val)
    return f" (by {images} of the {n_val:,} validation images, well inside the noise of one run)"


def _same_tail_sentence(default: dict, searched: dict) -> str:
    """Which phase the compared runs differ in, when one phase's parameters are the same."""
    same = [p for p in ("head", "tail") if default["params"].get(p) == searched["params"].get(p)]
    if len(same) != 1:
        return ""
    other = "head" if same == ["tail"] else "tail"
    return (f" The {same[0]} parameters of the two runs are the same (the {same[0]}'s search chose the defaults), "
            f"so the comparison measures the searched {other} alone.")


def _defaults_trial_sentence(study: dict) -> str:
    """The documented defaults run as a trial of the study (``--default-trial``), against its best."""
    trial = next((t for t in study.get("finished", []) if t.get("defaults")), None)
    if trial is None or trial.get("value") is None:
        return " The defaults were not run as a trial of this study, so its budget's ranking of them is unknown."
    state = ("completed" if trial["state"] == "COMPLETE"
             else f"{trial['state'].lower()} after {trial['epochs']} epoch(s)")
    if trial["number"] == study.get("best_number"):
        return (f" The best trial was the documented defaults themselves (trial {trial['number']}, {state}), so "
                "the parameters this search recommends are the defaults.")
    return (f" The documented defaults, run as trial {trial['number']} ({state}), scored {_pct(trial['value'])} at "
            f"that budget against the best trial's {_pct(study.get('best_value'))}.")


def _pruned_at_last_epoch_sentence(study: dict) -> str:
    """Trials recorded PRUNED although they had trained every epoch of the budget: judged at
    their last epoch, which the engine no longer does (``optuna_engine.pruning_callback``); a
    study's best is chosen among COMPLETE trials only."""
    max_epochs = (study.get("best_user_attrs") or {}).get("budget", {}).get("max_epochs")
    late = [t for t in study.get("finished", []) if t["state"] == "PRUNED" and max_epochs
            and t.get("epochs", 0) >= max_epochs]
    if not late:
        return ""
    best_all = max(t["value"] for t in study["finished"] if t.get("value") is not None)
    return (f" {len(late)} of its pruned trials had trained all {max_epochs} epochs: the pruner judged them after "
            "their last epoch, which the search no longer does, and a study picks its best among completed trials "
            "only; " + ("none of them scored higher than the best, so the choice is unchanged."
                        if best_all <= (study.get("best_value") or 0) else
                        f"the best of all its trials scored {_pct(best_all)}, so a rerun would choose differently."))


def _lag_sentence(ctx: dict) -> str:
    """Why the searched run lost, when its tail's BN momentum differs from the default run's."""
    searched, default = ctx.get("searched_run"), ctx.get("final")
    if not searched or not default or not searched.get("epochs") or not default.get("epochs"):
        return ""
    m_s, m_d = searched["params"]["tail"].get("bn_momentum"), default["params"]["tail"].get("bn_momentum")
    if m_s == m_d:
        return ""
    return (f" Its trials were validated after re-estimating the tail's BatchNormalization statistics (PreciseBN), "
            f"which hides how far moving averages lag; the search chose momentum {m_s:g} (the default is {m_d:g}), "
            f"and in the final run, which keeps the moving averages, validation after the first epoch was "
            f"{_pct(searched['epochs'][0]['val_accuracy'])} against {_pct(default['epochs'][0]['val_accuracy'])} with "
            f"the defaults (`results/final_searched_seed0.json`), catching up only as the rate decayed.")


def _cost_sentence(tail_epoch: float | None, e2e: float | None, extraction: float,
                   e2e_recorded: str | None = None) -> str:
    """A cached tail epoch against an end-to-end epoch, and when the cache pays for itself."""
    if not tail_epoch:
        return "The reported run trained no tail epoch."
    text = f"A cached tail epoch took {tail_epoch:.1f} s"
    if not e2e:
        return text + "; no end-to-end epoch was timed (`make bench-search` times one)."
    text += (f" against {e2e:.1f} s estimated for one epoch with the backbone in the loop "
             f"(`results/bench_search.json`, {e2e / tail_epoch:.1f}×; timed by `make bench-search`"
             + (f" at {e2e_recorded}" if e2e_recorded else "")
             + ", not in the reported run, and machines here differ up to 2× between days, so the ratio is "
             "indicative)")
    if e2e > tail_epoch:
        return text + (f"; counting the {extraction / 60:.1f} min of extraction, the cache pays for itself after "
                       f"{extraction / (e2e - tail_epoch):.1f} epochs.")
    return text + ": here the cache saves no time per epoch."


COLD_BAR_MINUTES = COLD_GOAL_MINUTES = GOALS.cold_final_normalized_minutes  # now the bar


def _cold_sentence(cold: float, final: dict) -> str:
    """The cold run's wall time, and normalized by the machine speed bench-cache measured."""
    text = f"From a cold cache the whole run took {cold / 60:.1f} min on this machine"
    norm = final.get("normalized_time")
    if not norm or final["cache"]["reused"]:
        return text + "."
    if "reference" in norm:  # measured in the run itself
        lo, hi = norm["normalized_minutes_range"]
        return (text + f"; normalized to a machine whose raw frozen pass runs at "
                f"{norm['reference_images_per_second']:.0f} images/s by the speed the run measured at its start "
                f"({norm['reference']['images_per_second']:.1f} images/s), {norm['normalized_minutes']:.1f} min "
                f"({lo:.1f} to {hi:.1f} over the repeats).")
    return (text + f"; normalized to a machine whose raw frozen pass runs at "
            f"{norm['reference_images_per_second']:.0f} images/s (`bench-cache` measured "
            f"{norm['raw_predict_images_per_second']:.1f} images/s here, "
            f"{bench_cache_when(norm.get('bench_cache_recorded'), final)}{_indicative(norm, final)}), "
            f"{norm['normalized_minutes']:.1f} min.")


def _indicative(norm: dict, final: dict, joiner: str = ", so ") -> str:
    """The caveat for a normalization whose ``bench-cache`` did not run just before the run,
    after ``joiner`` (none for a speed measured in the run)."""
    if "reference" in norm:
        return ""
    if bench_cache_when(norm.get("bench_cache_recorded"), final) == "just before the run":
        return ""
    return joiner + "the normalization is indicative: this machine's speed changes from hour to hour"


def bench_cache_when(recorded: str | None, final: dict) -> str:
    """When ``bench-cache`` ran relative to the final run (``final.json``'s ``finished`` less its
    total seconds): "just before it" within an hour, else how many hours apart, said to be
    apart."""
    from datetime import datetime, timedelta

    if not recorded or not final.get("finished"):
        return "at a time not recorded"
    bench = datetime.fromisoformat(recorded)
    start = datetime.fromisoformat(final["finished"]) - timedelta(seconds=final["timings_seconds"]["total"])
    hours = (start - bench).total_seconds() / 3600
    if 0 <= hours <= 1:
        return "just before the run"
    return f"{abs(hours):.1f} h {'before' if hours > 0 else 'after'} the run started"


def _precision_sentence(final: dict) -> str:
    """How the tail was trained: float32 or mixed bfloat16, and the run's own step timing that
    chose it (``precision_probe``, recorded when ``--tail-precision auto`` measured)."""
    precision = final.get("tail_precision_resolved", "float32")
    probe = final.get("precision_probe")
    timed = (f"; timed on the cached maps before training, a mixed-bfloat16 step ran {probe['speedup']:.2f}x as fast "
             f"as a float32 step, and the run uses bfloat16 only from {probe['threshold']:.2f}x" if probe else "")
    if precision == "float32":
        return f"The tail trained in float32{timed}."
    return f"The tail trained in mixed bfloat16, variables in float32{timed}; the saved model computes in float32."


def _mirror_sentence(final: dict) -> str:
    """Test-time mirroring: the plain model's validation accuracy beside each candidate's."""
    cands = final.get("val_accuracy_tta_candidates") or {}
    if not cands:
        return ""
    return ("The reported recipe mirrors maps in training and computes the mirrored images' activations only "
            "for the validation and test images, at test time; on validation the plain model scored "
            f"{_pct(final['val_accuracy_plain'])}, "
            + ", ".join(f"averaging with the mirrored {m} {_pct(v)}" for m, v in cands.items()) + ".")


def build_context(results: Path) -> dict:
    """Everything the template may cite, read from ``results/`` and the code (missing files leave gaps)."""
    from search import space
    from search.compare import wilson_interval

    ctx: dict[str, Any] = {}
    for name in ("final", "bench_cache", "bench_search", "bench_memory", "ablation", "evaluate", "seeds", "frontier",
                 "search_effect", "search_pair", "study_head", "study_tail"):
        path = results / f"{name}.json"
        if path.exists():
            ctx[name] = read_json(path)
    if (results / "final_searched_seed0.json").exists():
        ctx["searched_run"] = read_json(results / "final_searched_seed0.json")
    final = ctx.get("final")
    ctx.update(listings())
    for phase in space.PHASES:
        ctx[f"{phase}_space_table"] = _table(["parameter", "values", "only when"],
                                             [[f"`{r['name']}`", r["values"], r["condition"] or "always"]
                                              for r in space.describe(phase)])
    if not final:
        return ctx
    t, cache = final["timings_seconds"], final["cache"]
    extraction = float((cache.get("extraction") or {}).get("seconds") or 0.0)
    cut = cache["arrays"]["train_orig_cut"]
    epochs = final["epochs"]
    tail_epoch = float(np.mean(np.diff([0.0] + [e["seconds"] for e in epochs]))) if epochs else None
    n_test = int(final["data"]["test"])
    lo, hi = wilson_interval(final["test_accuracy"] * n_test, n_test)
    prov = final["params_provenance"]
    head_src = (f"The head's parameters come from trial {prov['head']['trial']} of the phase-1 study "
                f"`{prov['head']['study']}`" if prov["head"]["source"] == "search" else
                "The head uses the documented default (`DEFAULT_HEAD`, the best trial of an earlier phase-1 search "
                "on this data)")
    tail_src = (f"the tail's from trial {prov['tail']['trial']} of the phase-2 study `{prov['tail']['study']}`."
                if prov["tail"]["source"] == "search" else
                "the tail's are the documented default recipe (`DEFAULT_TAIL`), which no phase-2 search chose.")
    tta = final.get("tta_chosen", "none")
    if final.get("val_accuracy_tta") is None:
        tta_sentence = "test-time mirroring was not tried."
    elif tta != "none":
        tta_sentence = (f"averaging with the prediction on the mirrored {tta} (kept: it raised validation "
                        f"accuracy) gives {_pct(final['val_accuracy_tta'])}.")
    else:
        tta_sentence = (f"averaging with the mirrored {final['config']['mirror']} ({_pct(final['val_accuracy_tta'])}) "
                        "was not kept: it lowered validation accuracy.")
    per_class = final["test_per_class_accuracy"]
    worst = sorted(per_class, key=per_class.get)[:2]
    cm = np.array(final["test_confusion_matrix"])
    off = cm - np.diag(np.diag(cm))
    i, j = np.unravel_index(off.argmax(), off.shape)
    names = final["class_names"]
    bench_search, bench_cache, seeds = ctx.get("bench_search", {}), ctx.get("bench_cache", {}), ctx.get("seeds", {})
    e2e = bench_search.get("end_to_end_epoch_seconds")
    cold = extraction + t["total"] if cache["reused"] else t["total"]
    goal = []
    if bench_search:
        m, goal_m = bench_search["phase1"]["trial_seconds_median"], bench_search["phase1"]["goal_median_trial_seconds"]
        ratio = bench_search.get("ratio_epoch_to_median_phase1_trial")
        base = bench_search["phase1"].get("baseline")
        tau, goal_tau = bench_search["fidelity"]["kendall_tau"], bench_search["fidelity"]["goal_kendall_tau"]
        goal.append(f"the median phase-1 trial took {m:.2f} s (goal at most {goal_m:g} s: "
                    f"{'met' if m <= goal_m else 'not met'}"
                    + (f"; the same search fed as plain Keras code feeds it, timed in the same run: "
                       f"{base['trial_seconds_median']:.2f} s" if base else "")
                    + (f"; one end-to-end epoch timed in the same run took as long as {ratio:.0f} such trials"
                       if ratio else "") + "), "
                    f"and the fast fidelity ranked {bench_search['fidelity']['configs']} configurations with "
                    f"Kendall's tau {tau:.2f} against full training (goal at least {goal_tau:g}: "
                    f"{'met' if tau >= goal_tau else 'not met'})")
        if _rungs_sentence(bench_search):
            goal.append(_rungs_sentence(bench_search))
    memory = ctx.get("bench_memory", {}).get("released")
    if memory:
        last = memory["trials"]
        end = memory[f"rss_mb_after_trial_{last}"]
        goal.append(f"over a {last}-trial phase-1 search resident memory went from "
                    f"{memory['rss_mb_after_trial_10']:.0f} MB after trial 10 to {end:.0f} MB "
                    f"({memory['growth_pct']:+.1f} %, goal within {ctx['bench_memory']['goal_growth_pct']:g} %: "
                    f"{'met' if ctx['bench_memory']['meets_goal'] else 'not met'}; `results/bench_memory.json`)")
    norm = final.get("normalized_time")
    if norm and not cache["reused"]:
        met = "met" if norm["normalized_minutes"] <= COLD_BAR_MINUTES else "not met"
        goal.append(f"a cold `make final` took {norm['normalized_minutes']:.1f} min normalized to a "
                    f"{norm['reference_images_per_second']:.0f} images/s machine (bar at most {COLD_BAR_MINUTES} min, "
                    f"goal {COLD_GOAL_MINUTES}: {met}{_indicative(norm, final, '; ')})")
    if seeds:
        goal.append(f"{len(seeds['runs'])} seeds scored a mean test accuracy of {_pct(seeds['mean_test_accuracy'])} "
                    f"(bar: each at least {_pct(seeds['bar_each'])}, mean at least {_pct(seeds['bar_mean'])}: "
                    f"{'met' if seeds['meets_bars'] else 'not met'})")
    ctx["derived"] = {
        "figure1_caption": (f"{len(final['test_sample_predictions']['index'])} test images drawn at random (seed "
                            f"{final['config']['seed']}) with the reported model's prediction; a mistake is "
                            "written in red with the true label below it."),
        "params_sentence": f"{head_src}; {tail_src}",
        "tta_sentence": tta_sentence,
        "test_ci": f"{_pct(lo)} to {_pct(hi)}",
        "ci_pct": "95 %",
        "cold_minutes": cold / 60,
        "cold_sentence": _cold_sentence(cold, final),
        "fold_sentence": (
            f"The pass runs an inference-only copy of the frozen part in which every batch normalization is folded "
            f"into the convolution before it (the same function up to float rounding); in `bench-cache` that "
            f"extraction ran at {bench_cache['extraction_images_per_second']:.1f} images/s against "
            f"{bench_cache['raw_predict_images_per_second']:.1f} images/s for Keras's `predict` of the layers as "
            "the application builds them." if bench_cache.get("extraction_folds_batch_norm") else ""),
        "precision_sentence": _precision_sentence(final),
        "pruner_sentence": _pruner_sentence(),
        "goal_sentence": ("Measured against the project's goals: " + "; ".join(goal) + ".") if goal else "",
        "n_train_all": final["data"]["train"] + final["data"]["val"],
        "image_side": final["data"].get("image_shape", [32])[0],
        "cut_shape": " × ".join(str(d) for d in cut["shape"][1:]),
        "cut_dtype": cut["dtype"],
        "pool_dim": cache["arrays"]["train_orig_pool"]["shape"][1],
        "n_images": sum(a["shape"][0] for k, a in cache["arrays"].items() if k.endswith("_cut")),
        "extraction_minutes": extraction / 60,
        "head_rows": f"{space.BUDGETS['head'].rows:,}", "head_epochs": space.BUDGETS["head"].max_epochs,
        "head_trial_batch": space.head_trial_batch_size(), "head_final_batch": space.HEAD_BATCH_SIZE,
        "tail_rows": f"{space.BUDGETS['tail'].rows:,}", "tail_epochs": space.BUDGETS["tail"].max_epochs,
        "tail_layers": (f"`{final['backbone_layers']['tail'][0]}` … `{final['backbone_layers']['tail'][-1]}`, "
                        f"{final['backbone_layers']['tail_with_weights']} weighted layers with "
                        f"{final['backbone_layers']['tail_parameters']:,} weights, against "
                        f"{final['backbone_layers']['frozen_parameters']:,} frozen"),
        "tta_model": (f", averaged with the same on the mirrored {tta}" if tta != "none" else ""),
        "worst_classes": (f"the lowest test accuracies are {worst[0]} ({_pct(per_class[worst[0]])}) and {worst[1]} "
                          f"({_pct(per_class[worst[1]])}), and the most frequent confusion is {names[i]} taken for "
                          f"{names[j]} ({off[i, j]} images)"
                          + ("; cats and dogs share pose, fur and background at this size" if {names[i], names[j]}
                             == {"cat", "dog"} else "")),
        "cost_sentence": _cost_sentence(tail_epoch, e2e, extraction, bench_search.get("recorded")),
        "bench_sentence": (
            f"In `bench-cache`, run {bench_cache_when(bench_cache.get('recorded'), final)}, extraction ran at "
            f"{bench_cache['extraction_images_per_second']:.1f} images/s against "
            f"{bench_cache['raw_predict_images_per_second']:.1f} images/s for a bare `predict` of the same layers "
            f"(ratio {bench_cache['ratio']:.2f})"
            + (f"; TensorFlow's BFC allocator against glibc's malloc: "
               f"{bench_cache['frozen_pass_speedup_bfc_over_glibc']:.2f}× on the frozen pass."
               if bench_cache.get("frozen_pass_speedup_bfc_over_glibc") else ".")
            if bench_cache else ""),
        "mirror_sentence": {
            "images": "The mirrored images are run through the frozen part too and cached (`--mirror images`): "
                      "training picks the original or the mirrored image's activations at random, and test-time "
                      "mirroring averages the two.",
            "maps": "Mirroring is applied to the cached *maps* in training (`--mirror maps`): a mirrored activation "
                    "map stands in for the activations of the mirrored image, which halves the frozen pass; for "
                    "test-time mirroring the frozen part runs on the mirrored validation and test images when the "
                    "model is scored (nothing more is cached).",
            "none": "No mirroring is used (`--mirror none`)."}[final["config"]["mirror"]],
        "maps_discussion": _mirror_sentence(final),
        "cache_name": Path(cache["path"]).name,
        "head_params": _params_text(final["params"]["head"]),
        "tail_params": _params_text(final["params"]["tail"]),
        **_search_texts(ctx),
    }
    ctx["stages_table"] = _table(
        ["stage", "val accuracy", "kept"],
        [[r["stage"], _pct(r["val_accuracy"]), {True: "yes", False: "no"}.get(r.get("chosen"), "")]
         for r in final["stages"]])
    ctx["timings_table"] = _table(["stage", "seconds"], [[k, f"{v:.0f}"] for k, v in t.items()])
    if seeds:
        ctx["seeds_table"] = _table(
            ["seed", "val accuracy", "test accuracy", "95 % interval", "cache"],
            [[r["seed"], _pct(r["val_accuracy"]), _pct(r["test_accuracy"]),
              f"{_pct(r['test_ci95'][0])} – {_pct(r['test_ci95'][1])}", "reused" if r["cache_reused"] else "built"]
             for r in seeds["runs"]])
    rows = ctx.get("ablation", [])
    scopes = _scopes(rows)
    ctx["ablation_scope"] = _scope_sentence(scopes, (ctx.get("frontier") or {}).get("runs", {}), seeds)
    ctx["ablation_scope"] += _variant_sentence(rows)
    by_scope = ["cut", "px"] if len(scopes) > 1 else []  # columns only when they tell rows apart
    ctx["ablation_table"] = _table(
        ["recorded", "seed", "params (head/tail)", *by_scope, "mirror", "stage", "val accuracy", "kept"],
        [[r.get("recorded", "")[:16], r.get("seed", ""), r.get("params", "not recorded"),
          *([f"`{r.get('cut')}`", r.get("resolution")] if by_scope else []),
          r.get("mirror", "images" if r.get("flip") else "none"),
          r["stage"], _pct(r.get("val_accuracy")), {True: "yes", False: "no"}.get(r.get("chosen"), "")]
         for r in rows])
    return ctx


def _scopes(rows: list[dict]) -> list[tuple[str, int]]:
    """The (cut layer, input side) pairs of ablation rows, the most frequent first."""
    counts = Counter((r.get("cut"), r.get("resolution")) for r in rows)
    return sorted(counts, key=lambda k: (-counts[k], str(k)))


def _scope_sentence(scopes: list[tuple[str, int]], runs: dict[str, dict], seeds: dict | None = None) -> str:
    """What the ablation says about cut depth and resolution: nothing when every row shares one;
    else, per (cut, side), the latest seed-0 default-parameter run of ``results/frontier.json``:
    its validation and test accuracy, cache size, frozen pass and whole run (extraction counted),
    and, given ``seeds`` (``results/seeds.json``), how far the seeds of one recipe differ."""
    if len(scopes) == 1:
        return (f"Every row uses the cut `{scopes[0][0]}` at {scopes[0][1]} px: the cut depth and the input "
                "resolution were not ablated in final runs, and this paper makes no claim about either.")
    out = "Rows span the cuts and input sides " + ", ".join(f"`{c}` at {r} px" for c, r in scopes) + "."
    parts, weights = [], set()
    for cut, side in scopes:
        same = [run for run in runs.values() if (run.get("cut_layer"), run.get("resolution")) == (cut, side)
                and run.get("seed") == 0 and run.get("params") == "default/default"]
        if not same:
            continue
        run = max(same, key=lambda r: r.get("finished") or "")
        weights.add(run.get("weights_fingerprint"))
        parts.append(f"`{cut}` at {side} px: validation {_pct(run['final']['val_accuracy'])}, test "
                     f"{_pct(run['final']['test_accuracy'])}, a cache of {run['cache_bytes'] / 1e9:.1f} GB, the "
                     f"frozen pass {run['extraction_seconds'] / 60:.1f} min and the whole run "
                     f"{run['final']['seconds'] / 60:.1f} min")
    if parts:
        out += (" With default parameters and seed 0 (the latest run of each, `results/frontier.json`; times are wall "
                "minutes of runs on different hours of a shared machine): " + "; ".join(parts) + ".")
        if len(parts) > 1 and len(weights) == 1 and None not in weights:
            out += f" These runs load the same backbone weights (fingerprint `{weights.pop()}`) at every side."
        vals = [r["val_accuracy"] for r in (seeds or {}).get("runs", [])]
        if len(parts) > 1 and len(vals) > 1:
            out += (f" One run per setting: the {len(vals)} seeds of the default recipe differ by "
                    f"{100 * (max(vals) - min(vals)):.2f} points of validation accuracy (Table 4), a yardstick for "
                    "these differences.")
    return out


def prediction_grid(final: dict, data: str | None, out: Path, n: int = 24) -> None:
    """The picture at the top: a seeded random sample of test images with the model's prediction;
    a mistake is drawn in red with its true label."""
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

    The study figures come from ``results/report/`` (``make report``); where that folder is
    missing (a fresh clone has no study database), the committed copies in ``docs/figures/``
    are kept and a warning says so.
    """
    import logging
    import shutil

    results, docs = Path(results), Path(docs)
    template = (docs / "paper_template.md").read_text()
    ctx = build_context(results)
    if "final" not in ctx:
        raise UserError(f"{results / 'final.json'} missing: run `make final` first")
    figures = docs / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    text = render(template, ctx)  # fails on a missing number before any figure is drawn
    prediction_grid(ctx["final"], data, figures / "predictions.png")
    epoch_figure(ctx["final"], figures / "tail_epochs.png")
    confusion_figure(ctx["final"], figures / "confusion_matrix.png")  # the reported run's, whatever the report shows
    sources = {name: results / "report" / name for name in ("optimization_history.png", "param_importances.png")}
    sources["frontier.png"] = results / "frontier.png"
    for name, src in sources.items():
        if src.exists():
            shutil.copyfile(src, figures / name)
        elif (figures / name).exists():
            logging.getLogger(__name__).warning("%s missing: keeping the committed %s", src, figures / name)
        else:
            raise UserError(f"{src} missing: run `make report` (and `python -m search.cli compare`) first")
    with atomic_path(docs / "paper.md") as tmp:
        tmp.write_text(text)
    with atomic_path(docs / "paper.html") as tmp:
        tmp.write_text(to_html(text, docs))
    return docs / "paper.md"
