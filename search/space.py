"""The one search space of each phase, written once and served to both engines.

Entry point: :func:`suggest`, ``suggest(phase, source)``, where ``source`` is an Optuna
``Trial`` or a KerasTuner ``HyperParameters``; it returns a plain parameter dict.

- Phase ``"head"``: the classifier head and its optimizer, trained on cached pooled features
  (``search.train.train_head``).
- Phase ``"tail"``: how the layers after the cut are fine-tuned together with the phase-1 head
  on cached cut activations (``search.finetune.train_tail``).

Parameters are *conditional*: ``units_1`` exists only with two or more layers, ``activation``
and ``batch_norm`` only with a hidden layer, ``weight_decay`` only for AdamW/SGD. Optuna samples
them define-by-run; KerasTuner declares them under ``conditional_scope``; either way an
inactive parameter is neither sampled nor shown as "important".

``DEFAULTS[phase]`` is what ``make final`` uses when no study exists for its cache key
(``--params default``); the comments above them say where the values come from. Keys of
``DEFAULTS`` that a phase does not search (``bn_momentum``) are fixed settings, filled in by
:func:`with_defaults` for trials and final alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

PHASES = ("head", "tail")
UNITS = (128, 256, 512, 1024)
MAX_DENSE_LAYERS = 2
HEAD_BATCH_SIZE = 512  # the final head's batch (fixed: the learning rate is searched instead)

# The best phase-1 trial of a real search on this data (MobileNet, cut last2, 224 px, JPEG
# CIFAR-10): study head-MobileNet-224-conv_pw_11_relu-flip-b11b247267a3, trial 11, validation
# accuracy 0.7872 at the trial budget of then (10,000 images, 8 epochs, batches of 512); trained on all rows by
# `make final` it reached 0.8280 (results/v1/final_seed0.json, frozen_val_accuracy). Values as sampled.
DEFAULT_HEAD: dict[str, Any] = {
    "n_layers": 2,
    "units_0": 1024,
    "units_1": 1024,
    "activation": "swish",
    "batch_norm": False,
    "dropout": 0.4422925628952646,
    "optimizer": "adamw",
    "learning_rate": 0.0012128472513504903,
    "weight_decay": 0.0046530714921628955,
    "label_smoothing": 0.13329495010766768,
}
# The tail recipe of the earlier sessions' fixed stage 2 (AdamW 5e-4, decay 0.05, cosine,
# smoothing 0.1, +-1-cell shifts, BN with batch statistics), plus a 10 % warm-up and BN momentum
# 0.9 (issue 16: validation lagged in early epochs with momentum 0.99). Kept over the phase-2
# searches' choices: study tail-MobileNet-224-conv_pw_11_relu-flip-b11b247267a3 (6 trials of 2,000
# images x 2 epochs) picked a tail rate of 5.8e-5 (0.8588 validation under `make final` against
# 0.8802, results/v1/final_searched_seed0.json); with PreciseBN in the trials, study
# tail-MobileNet-224-conv_pw_11_relu-35aa909a6b06-with-momentum (8 x 4,000 x 2) picked momentum 0.99
# and reached 0.8784 against 0.8828 (results/final_searched_momentum_seed0.json); without the momentum
# in the space, study tail-MobileNet-224-conv_pw_11_relu-35aa909a6b06 (renamed ...-before-batch128
# when phase-1 trials moved to batches of 128) reached 0.8756 (git show
# 74da5da:results/final_searched_seed0.json); the next tail search chose these defaults (README,
# "Searched against default parameters"). The tail rate then moved from 5e-4 to 1e-3, the
# lead of the phase-2 fidelity benchmark's reference training (results/bench_search.json,
# phase2_fidelity: the larger rates ranked first at 20,000 rows x 5 epochs), measured on the
# frontier (results/frontier.json: final_lr1e3_e5_seed0, final_r176_e6_lr1e3_seed0/seed1).
DEFAULT_TAIL: dict[str, Any] = {
    "tail_learning_rate": 1e-3,
    "weight_decay": 0.05,
    "warmup_fraction": 0.1,
    "label_smoothing": 0.1,
    "shift": 1,
    "bn_mode": "batch",
    "bn_momentum": 0.9,
    "head_lr_multiplier": 1.0,
    "unfreeze_blocks": 2,  # the whole tail of the default cut (last2); fewer if the cut leaves fewer
    # a fixed setting (not searched): momentum of the exponential moving average of the tail's and
    # head's weights that validation, the best epoch and the saved model use (optimizer use_ema;
    # 0: off, the weights as trained)
    "ema_momentum": 0.0,
}
MAX_UNFREEZE = 2  # blocks of the default cut's tail (MobileNet last2)
DEFAULTS: dict[str, dict[str, Any]] = {"head": DEFAULT_HEAD, "tail": DEFAULT_TAIL}


@dataclass(frozen=True)
class Budget:
    """A phase's default budget: trials per search, stratified rows and epochs per trial,
    whether the rows' cached mirror images are added as extra rows (phase 1), and the rows per
    optimizer step of a phase-1 trial (None: the final head's, :data:`HEAD_BATCH_SIZE`)."""

    trials: int
    rows: int | None
    max_epochs: int
    mirrored: bool = False
    batch_size: int | None = None


# Defaults of `make search` (see README: sized so both phases fit in about 30 minutes here).
# A phase-1 trial steps in batches of 128, a quarter of the final head's: 632 optimizer steps
# in its 8 epochs of 10,000 rows instead of 160, so a small learning rate is not ranked low for
# want of steps; `make bench-search` scores both batch sizes against full training
# (results/bench_search.json, fidelity; README, "Phase-1 trial time"). Phase 2 runs 24 trials
# (issue 28: at least config.GOALS.tail_trials): with ASHA judging a 2-epoch trial after its
# first epoch, 24 of them took 13.7 normalized minutes on CIFAR-10's 176-pixel cache, 13 pruned,
# with the tail rate held (`make bench-tail ARGS="--time-trials 24"`, results/bench_search.json,
# phase2_trials; 14.2 and 11 pruned with the rate searched, an earlier run).
BUDGETS = {"head": Budget(trials=40, rows=10000, max_epochs=8, batch_size=128),
           "tail": Budget(trials=24, rows=4000, max_epochs=2)}


def head_trial_batch_size() -> int:
    """Rows per optimizer step of a phase-1 trial by default (``BUDGETS["head"]``)."""
    return BUDGETS["head"].batch_size or HEAD_BATCH_SIZE


class Source(Protocol):
    """What :func:`suggest` needs from an engine: three kinds of parameter and a condition.

    ``when(parent, value, active, draw)`` declares the parameters ``draw`` samples as active only
    while parameter ``parent`` (whose sampled value is ``value``) is one of ``active``; it returns
    what ``draw`` returned, or None when inactive.
    """

    def int(self, name: str, low: int, high: int) -> int: ...
    def float(self, name: str, low: float, high: float, log: bool = False) -> float: ...
    def choice(self, name: str, values: tuple) -> Any: ...
    def when(self, parent: str, value: Any, active: tuple, draw: Callable[[], Any]) -> Any: ...


class OptunaSource:
    """Adapter: Optuna ``Trial.suggest_*`` (define-by-run: a condition is plain control flow)."""

    def __init__(self, trial: Any) -> None:
        self.trial = trial

    def int(self, name: str, low: int, high: int) -> int:
        return self.trial.suggest_int(name, low, high)

    def float(self, name: str, low: float, high: float, log: bool = False) -> float:
        return self.trial.suggest_float(name, low, high, log=log)

    def choice(self, name: str, values: tuple) -> Any:
        return self.trial.suggest_categorical(name, list(values))

    def when(self, parent: str, value: Any, active: tuple, draw: Callable[[], Any]) -> Any:
        return draw() if value in active else None


class KerasTunerSource:
    """Adapter: KerasTuner ``HyperParameters``; conditions through ``conditional_scope``.

    KerasTuner draws every declared parameter; one declared inside a scope whose condition
    does not hold is inactive (``hp.values`` omits it, the oracle ignores it).
    """

    def __init__(self, hp: Any) -> None:
        self.hp = hp

    def int(self, name: str, low: int, high: int) -> int:
        if low == high:  # one value: KerasTuner's Fixed (Int refuses an empty range)
            return self.hp.Fixed(name, low)
        return self.hp.Int(name, low, high)

    def float(self, name: str, low: float, high: float, log: bool = False) -> float:
        if low == high:  # one value: KerasTuner's Fixed
            return self.hp.Fixed(name, low)
        return self.hp.Float(name, low, high, sampling="log" if log else "linear")

    def choice(self, name: str, values: tuple) -> Any:
        if tuple(values) == (False, True):
            return self.hp.Boolean(name)
        return self.hp.Choice(name, list(values))

    def when(self, parent: str, value: Any, active: tuple, draw: Callable[[], Any]) -> Any:
        with self.hp.conditional_scope(parent, list(active)):
            return draw()


def _adapt(source: Any) -> Source:
    if hasattr(source, "suggest_float"):
        return OptunaSource(source)
    if hasattr(source, "Float") and hasattr(source, "conditional_scope"):
        return KerasTunerSource(source)
    return source


def suggest_head(s: Source) -> dict[str, Any]:
    """Head architecture and optimizer: 0-2 dense layers, dropout, Adam/AdamW/SGD, smoothing."""
    n = s.int("n_layers", 0, MAX_DENSE_LAYERS)
    p: dict[str, Any] = {"n_layers": n}
    hidden = tuple(range(1, MAX_DENSE_LAYERS + 1))
    for i in range(MAX_DENSE_LAYERS):
        units = s.when("n_layers", n, hidden[i:], lambda i=i: s.choice(f"units_{i}", UNITS))
        if n > i:
            p[f"units_{i}"] = units
    hidden_params = s.when("n_layers", n, hidden, lambda: {
        "activation": s.choice("activation", ("relu", "gelu", "swish")),
        "batch_norm": s.choice("batch_norm", (False, True))})
    if n:
        p.update(hidden_params)
    p["dropout"] = s.float("dropout", 0.0, 0.5)
    p["optimizer"] = s.choice("optimizer", ("adam", "adamw", "sgd"))
    p["learning_rate"] = s.float("learning_rate", 1e-4, 3e-2, log=True)
    wd = s.when("optimizer", p["optimizer"], ("adamw", "sgd"), lambda: s.float("weight_decay", 1e-6, 1e-2, log=True))
    if p["optimizer"] != "adam":
        p["weight_decay"] = wd
    p["label_smoothing"] = s.float("label_smoothing", 0.0, 0.2)
    return p


def suggest_tail(s: Source, max_unfreeze: int = MAX_UNFREEZE, search_depth: bool = False,
                 search_rate: bool = True) -> dict[str, Any]:
    """Tail fine-tuning: how many of the tail's last blocks train (0: the head alone on the
    frozen tail; ``max_unfreeze``: the whole tail of the cache's cut, the blocks before the
    unfrozen ones running frozen), AdamW peak rate, decay, warm-up, smoothing, shifts, BN mode,
    head rate.

    The depth is searched (0 to ``max_unfreeze``) only with ``search_depth``; otherwise it is
    fixed at ``max_unfreeze`` (an integer parameter of one value: Optuna records it, KerasTuner
    declares it ``Fixed``). A phase-2 trial budget cannot choose it: at 4,000 to 12,000 rows its
    ranking of depths was the reverse of training on 20,000 rows for 5 epochs, where fine-tuning
    the whole tail ranked best (``make bench-tail``, ``results/bench_search.json``,
    ``phase2_fidelity_search_depth``), as in the ablation. (With the depth fixed, the default
    budget does not rank the rates as the longer training does either, nor do 2,000 rows x 4
    epochs or 8,000 x 2: ``phase2_fidelity``, taus 0.00, -0.07 and 0.29. With the rate held at
    1e-3 the default budget ranked the rest with tau 0.69 over 8 configurations, mostly by the BN
    mode: the three with batch statistics ranked above the five frozen ones at both budgets,
    ``phase2_fidelity_fixed_tail_learning_rate``.)

    The tail rate is searched (5e-5 to 3e-3) only with ``search_rate``; otherwise it is held at
    ``DEFAULT_TAIL["tail_learning_rate"]`` (a float parameter of one value), which is what a
    search whose trials train less than the final does (``objective.TailObjective.search_rate``):
    such a budget ranks the rates the wrong way round but, the rate held, ranks the rest with
    tau 0.69 (above; its winners still did not carry over to the final, so they do not ship
    under ``auto``: ``search.engines.choice``).

    The BN momentum is not searched: a phase-2 trial validates after PreciseBN
    (``finetune.precise_bn``) has replaced the moving statistics, so its score cannot depend on
    the momentum, and a sampled value would be noise that ships (study
    ``tail-MobileNet-224-conv_pw_11_relu-35aa909a6b06``, renamed ``...-with-momentum``, picked
    0.99 this way and its final lagged). It stays fixed at ``DEFAULT_TAIL["bn_momentum"]``.
    """
    rate = DEFAULT_TAIL["tail_learning_rate"]
    p: dict[str, Any] = {
        "unfreeze_blocks": s.int("unfreeze_blocks", 0 if search_depth else max_unfreeze, max_unfreeze),
        "tail_learning_rate": s.float("tail_learning_rate", *((5e-5, 3e-3) if search_rate else (rate, rate)), log=True),
        "weight_decay": s.float("weight_decay", 1e-3, 0.2, log=True),
        "warmup_fraction": s.float("warmup_fraction", 0.0, 0.3),
        "label_smoothing": s.float("label_smoothing", 0.0, 0.2),
        "shift": s.int("shift", 0, 2),
        "bn_mode": s.choice("bn_mode", ("batch", "frozen")),
    }
    p["head_lr_multiplier"] = s.float("head_lr_multiplier", 0.1, 10.0, log=True)
    return p


SUGGEST: dict[str, Callable[[Source], dict[str, Any]]] = {"head": suggest_head, "tail": suggest_tail}


def suggest(phase: str, source: Any, **options: Any) -> dict[str, Any]:
    """Sample one configuration of ``phase`` from an Optuna trial or KerasTuner ``hp``;
    ``options`` bound the space by what the cache allows and the budget can rank (an
    objective's ``space_options``: the tail's ``max_unfreeze`` blocks, ``search_depth`` and
    ``search_rate``)."""
    return SUGGEST[check_phase(phase)](_adapt(source), **options)


class _Recorder:
    """A :class:`Source` that declares every parameter (all branches) and records its range."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, str]] = {}

    def _add(self, name: str, values: str) -> None:
        self.rows.setdefault(name, {"name": name, "values": values, "condition": ""})

    def int(self, name: str, low: int, high: int) -> int:
        self._add(name, f"fixed at {low}" if low == high else f"integer {low}–{high}")
        return high

    def float(self, name: str, low: float, high: float, log: bool = False) -> float:
        self._add(name, f"fixed at {low:g}" if low == high else f"{low:g}–{high:g}" + (", log scale" if log else ""))
        return low

    def choice(self, name: str, values: tuple) -> Any:
        self._add(name, ", ".join(str(v) for v in values))
        return values[-1]

    def when(self, parent: str, value: Any, active: tuple, draw: Callable[[], Any]) -> Any:
        before = set(self.rows)
        out = draw()
        for name in set(self.rows) - before:
            self.rows[name]["condition"] = f"{parent} in {', '.join(str(a) for a in active)}"
        return out


def describe(phase: str, **options: Any) -> list[dict[str, str]]:
    """Every parameter of ``phase`` with its range and condition (for the paper and ``--help``);
    ``options`` as :func:`suggest` (the tail's depth reads "fixed at 2" unless ``search_depth``)."""
    recorder = _Recorder()
    SUGGEST[check_phase(phase)](recorder, **options)
    return list(recorder.rows.values())


def parse_fixed(phase: str, items: list[str], **options: Any) -> dict[str, Any]:
    """``NAME=VALUE`` items (``bench-tail --fix``) as ``{name: value}``: each name a parameter of
    ``phase``'s space (``options`` as :func:`suggest`), each value of its default's type; one
    clear error for an unknown name or a value that does not parse."""
    from search.errors import UserError

    names = sorted(row["name"] for row in describe(phase, **options))
    out: dict[str, Any] = {}
    for item in items:
        name, sep, text = (part.strip() for part in item.partition("="))
        if not sep or name not in names:
            raise UserError(f"--fix takes NAME=VALUE with NAME a {phase} parameter ({', '.join(names)}); got {item!r}")
        kind = type(DEFAULTS[phase].get(name, ""))
        try:
            if kind is bool:
                if text.lower() not in ("true", "false"):
                    raise ValueError(text)
                out[name] = text.lower() == "true"
            else:
                out[name] = kind(text)
        except ValueError:
            raise UserError(f"--fix {name}: {text!r} is not a {kind.__name__}") from None
    return out


def check_phase(phase: str) -> str:
    from search.errors import UserError

    if phase not in PHASES:
        raise UserError(f"unknown phase {phase!r}; choose one of {list(PHASES)}")
    return phase


class _Fixed:
    """A :class:`Source` that answers every parameter from ``values`` and records which were
    asked (the active ones), as Optuna's ``FixedTrial`` does, without an engine."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.values, self.params = values, {}

    def _get(self, name: str) -> Any:
        if name not in self.values:
            raise KeyError(name)
        self.params[name] = self.values[name]
        return self.values[name]

    def int(self, name: str, low: int, high: int) -> int:
        return self._get(name)

    def float(self, name: str, low: float, high: float, log: bool = False) -> float:
        return self._get(name)

    def choice(self, name: str, values: tuple) -> Any:
        return self._get(name)

    def when(self, parent: str, value: Any, active: tuple, draw: Callable[[], Any]) -> Any:
        return draw() if value in active else None


def default_trial(phase: str, **options: Any) -> dict[str, Any]:
    """``DEFAULTS[phase]`` as a trial of the phase's space would record it: only the parameters
    the space samples (and only those active for these values), e.g. for Optuna's
    ``enqueue_trial``. A fixed setting such as ``bn_momentum`` is left out. ``options``: as
    :func:`suggest` (``max_unfreeze`` caps the default's unfrozen blocks; without
    ``search_depth`` the depth is the space's one value, ``max_unfreeze``)."""
    values = dict(DEFAULTS[check_phase(phase)])
    if "max_unfreeze" in options:
        values["unfreeze_blocks"] = min(values["unfreeze_blocks"], options["max_unfreeze"])
        if not options.get("search_depth"):
            values["unfreeze_blocks"] = options["max_unfreeze"]
    fixed = _Fixed(values)
    SUGGEST[phase](fixed, **options)
    return fixed.params


def active(phase: str, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` (complete: :func:`with_defaults`) less the conditional parameters their values
    make inactive (``units_1`` with one layer, ``weight_decay`` with Adam); fixed settings
    (keys of ``DEFAULTS`` the space does not sample, such as ``bn_momentum``) are kept."""
    fixed = _Fixed(params)
    SUGGEST[check_phase(phase)](fixed)
    declared = {row["name"] for row in describe(phase)}
    return {k: v for k, v in params.items() if k in fixed.params or k not in declared}


def check_params(phase: str, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` if every key is a parameter or fixed setting of ``phase``; else one
    :class:`~search.errors.UserError` naming the unknown keys and the valid ones."""
    from search.errors import UserError

    valid = {row["name"] for row in describe(check_phase(phase))} | set(DEFAULTS[phase])
    unknown = sorted(set(params) - valid)
    if unknown:
        raise UserError(f"unknown {phase} parameter(s) {unknown}; valid: {sorted(valid)}")
    return params


def with_defaults(phase: str, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` completed with ``DEFAULTS[phase]`` for keys a trial did not sample."""
    return {**DEFAULTS[check_phase(phase)], **params}


def params_label(provenance: dict[str, dict]) -> str:
    """A final run's parameters in a few words, ``head/tail`` (as ``results/ablation.json`` rows
    and ``results/frontier.json`` runs say them): per phase ``default``, ``search``, or for
    ``--params`` JSON the defaults with what it changed (``default, warmup_fraction=0.0``).

    ``provenance``: phase -> ``{"source": "default"|"search"|"given", "values": {...}, ...}``
    (a final run's ``params_provenance``); a phase missing from it reads ``?``.
    """

    def one(p: dict) -> str:
        source = str(p.get("source", "?"))
        if source != "given":
            return source
        return ", ".join(["default", *(f"{k}={v}" for k, v in sorted((p.get("values") or {}).items()))])

    return "/".join(one(provenance.get(phase, {})) for phase in PHASES)
