"""What a run can change, stated once: the final model's configuration and its defaults.

Light on purpose (no TensorFlow): the CLI reads its defaults from here, ``search.final`` trains
from it, ``search.finetune`` checks precisions against :data:`PRECISIONS`.
"""

from __future__ import annotations

from dataclasses import dataclass

from search import space
from search.errors import UserError

PRECISIONS = ("auto", "float32", "mixed_bfloat16")
MIRRORS = ("images", "maps", "none")
CHUNK_SIZE = 2000  # images per resumable chunk of the cache's extraction (a killed run redoes at most one)
PARAM_MODES = ("auto", "default", "study")


@dataclass(frozen=True)
class Goals:
    """Every goal and bar the project measures itself against, stated once; the benchmarks,
    ``compare`` and the paper read them from :data:`GOALS`."""

    course_test_accuracy: float = 0.87  # the course's bar for the saved cifar10.h5
    test_accuracy_each: float = 0.88  # the final model on each seed (issue 31's bar)
    test_accuracy_mean: float = 0.885  # ... and their mean
    test_accuracy_goal_mean: float = 0.895
    cold_final_normalized_minutes: float = 30.0  # a cold `make final`, normalized by the in-run speed
    extraction_over_raw_predict: float = 0.9  # bench-cache
    median_trial_seconds: float = 2.0  # bench-search, phase 1
    stretch_median_trial_seconds: float = 1.0
    kendall_tau: float = 0.6  # phase-1 fidelity: trial budget against full training
    tail_kendall_tau: float = 0.5  # phase-2 fidelity: trial budget against >= 5 epochs on >= 20,000 rows (issue 28)
    tail_trials: int = 24  # phase-2 trials of a default search on CIFAR-10 ...
    tail_trials_normalized_minutes: float = 15.0  # ... within this many normalized minutes (issue 28)
    search_gain_points: float = 1.0  # search + final over final on the defaults, on a non-CIFAR set (issue 28)
    memory_growth_pct: float = 5.0  # bench-memory, trial 10 to the last


GOALS = Goals()


def fidelity_key(search_depth: bool, fixed: tuple[str, ...] = ()) -> str:
    """Where ``bench-tail`` writes in ``results/bench_search.json`` (and the paper reads):
    ``phase2_fidelity`` for the search's default space (the depth fixed),
    ``phase2_fidelity_search_depth`` with the depth sampled, and ``..._fixed_<name>_...`` with
    the parameters ``fixed`` held at one value (``bench-tail --fix``)."""
    key = "phase2_fidelity_search_depth" if search_depth else "phase2_fidelity"
    return key + "".join(f"_fixed_{name}" for name in sorted(fixed))


@dataclass
class FinalConfig:
    """Everything ``make final`` can change; the defaults are the documented recipe.

    ``params``: ``"auto"`` (each phase's best trial on this cache key if a search exists and it
    beats the defaults' trial by more than the noise, ``search.selection.decide``; else the
    defaults), ``"default"``, ``"study"`` (the best trial; error if a phase has no search), or a
    dict ``{"head": {...}, "tail": {...}}`` (keys checked against the space; missing keys take
    the defaults).

    ``mirror``: how images are mirrored for augmentation (:data:`MIRRORS`).
    ``"maps"`` (default) mirrors the cached activation maps (the frozen pass runs over the 60,000
    images once); ``"images"`` also caches the mirrored images' activations (120,000 images,
    twice the extraction and the disk). Test-time averaging (``tta``) is chosen on validation
    among ``final.tta_candidates`` and the best of them over the tail's training shifts
    (``final.stage_tta``); without cached mirror images, the mirrored images' activations are
    computed at test time for the validation and test splits only.
    ``tail_precision``: :data:`PRECISIONS`; ``"auto"`` times a few tail steps in both on the
    cached maps and trains in mixed bfloat16 when it is at least 10 % faster
    (``finetune.measure_precision``).
    ``reference_resolution``: the input side at which the run measures this machine's speed
    (``final.normalized_time``); None, the backbone's native side, whatever ``resolution`` is,
    so that runs at different sides are normalized by the same measurement (tests set a small
    side to stay fast: ``--reference-resolution``).
    ``bn_passes`` defaults to 0: re-estimating the tail's BN statistics lowered
    validation accuracy in the run recorded in ``results/ablation.json`` and costs minutes.
    """

    backbone: str = "MobileNet"
    weights: str | None = "imagenet"
    cut: str | None = None
    resolution: int | None = None
    reference_resolution: int | None = None  # the in-run speed reference's input side (None: native)
    mirror: str = "maps"
    data: str | None = None
    image_size: int | None = None
    val_size: int | None = None
    seed: int = 0
    params: str | dict = "auto"
    head_epochs: int = 30
    tail_epochs: int = 8  # seed 0 at 176 px, rate 1e-3: validation 0.8894 at 8 epochs, 0.8870 at 6
    tail_batch_size: int = 128
    tail_precision: str = "auto"
    bn_passes: int = 0
    tta: bool = True
    output: str = "cifar10.h5"
    results: str = "results"
    run_dir: str | None = None  # a named run's own folder (RESULTS/runs/NAME): its final.json and stage rows
    cache_root: str = "cache"
    build_cache: bool = True
    parity_images: int = 500
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.params, str) and self.params not in PARAM_MODES:
            raise UserError(f"params must be one of {list(PARAM_MODES)} or a dict, got {self.params!r}")
        if isinstance(self.params, dict):
            if set(self.params) - set(space.PHASES):
                raise UserError(f"params takes the phases {list(space.PHASES)}, got {sorted(self.params)}")
            for phase, values in self.params.items():
                if not isinstance(values, dict):
                    raise UserError(f"params[{phase!r}] must be an object of parameters, got {values!r}")
                space.check_params(phase, values)
        if self.mirror not in MIRRORS:
            raise UserError(f"mirror must be 'images', 'maps' or 'none', got {self.mirror!r}")
        if self.tail_precision not in PRECISIONS:
            raise UserError(f"tail_precision must be one of {list(PRECISIONS)}, got {self.tail_precision!r}")
        for name in ("head_epochs", "tail_epochs", "bn_passes"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be >= 0, got {getattr(self, name)}")
