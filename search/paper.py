"""The paper: ``docs/paper_template.md`` + ``results/`` -> ``docs/paper.md`` and ``docs/paper.html``.

Entry point: :func:`write_paper`. Results numbers in the paper are ``{{ name | format }}``
placeholders filled from results files; a missing one is an error. The template itself still
types some facts (layer sizes, layer names, search ranges, versions): issue 15 tracks moving
them to placeholders too.
Formats: ``pct`` (0.8712 -> 87.12 %), ``pct1``, ``f2``, ``f3``, ``f4``, ``int``, ``min``
(seconds -> minutes), ``s`` (as is).
"""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

from search.errors import UserError
from search.io import atomic_path, read_json, save_figure

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


def build_context(results: Path) -> dict:
    """Everything the template may cite, read from ``results/`` (missing files leave gaps)."""
    ctx: dict[str, Any] = {}
    for name in ("final", "bench_cache", "bench_search", "ablation", "evaluate"):
        path = results / f"{name}.json"
        if path.exists():
            ctx[name] = read_json(path)
    summary = results / "report" / "summary.json"
    if summary.exists():
        ctx["study"] = read_json(summary)
    final = ctx.get("final")
    if final:
        t = final["timings_seconds"]
        extraction = (final["cache"].get("extraction") or {}).get("seconds")
        if extraction is not None:
            ctx["derived"] = {"cold_total_seconds": extraction + t["total"]}
        ctx["epochs_table"] = _table(
            ["epoch", "train accuracy", "val accuracy (no mirror)", "cumulative minutes"],
            [[e["epoch"], f"{100 * e['accuracy']:.2f} %", f"{100 * e['val_accuracy']:.2f} %",
              f"{e['seconds'] / 60:.1f}"] for e in final["epochs"]])
        ctx["per_class_table"] = _table(
            ["class", "test accuracy"], [[k, f"{100 * v:.1f} %"] for k, v in final["test_per_class_accuracy"].items()])
        ctx["timings_table"] = _table(["stage", "seconds"], [[k, f"{v:.0f}"] for k, v in t.items()])
        ctx["ablation_table"] = _table(
            ["stage", "val accuracy", "kept"],
            [[r["stage"], f"{100 * r['val_accuracy']:.2f} %", {True: "yes", False: "no"}.get(r.get("chosen"), "")]
             for r in final["stages"]])
    study = ctx.get("study")
    if study and study.get("top"):
        ctx["top_trials_table"] = _table(
            ["trial", "val accuracy", "layers", "optimizer", "learning rate", "dropout"],
            [[t["number"], f"{100 * t['value']:.2f} %", t["params"].get("n_layers"), t["params"].get("optimizer"),
              f"{t['params'].get('learning_rate', 0):.2e}", f"{t['params'].get('dropout', 0):.2f}"]
             for t in study["top"]])
    return ctx


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
    """Render ``docs/paper.md`` and ``docs/paper.html``; figures under ``docs/figures/``."""
    import shutil

    results, docs = Path(results), Path(docs)
    template = (docs / "paper_template.md").read_text()
    ctx = build_context(results)
    if "final" not in ctx:
        raise UserError(f"{results / 'final.json'} missing: run `make final` first")
    figures = docs / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    prediction_grid(ctx["final"], data, figures / "predictions.png")
    epoch_figure(ctx["final"], figures / "tail_epochs.png")
    for name in ("optimization_history.png", "param_importances.png", "confusion_matrix.png"):
        src = results / "report" / name
        if not src.exists():
            raise UserError(f"{src} missing: run `make report` first")
        shutil.copyfile(src, figures / name)
    text = render(template, ctx)
    with atomic_path(docs / "paper.md") as tmp:
        tmp.write_text(text)
    with atomic_path(docs / "paper.html") as tmp:
        tmp.write_text(to_html(text, docs))
    return docs / "paper.md"
