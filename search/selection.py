"""Selection that respects noise: how a trial is scored, and when a searched trial may ship.

Entry point: :func:`decide`, ``decide(best, default)``: whether the best trial of a study beats
the documented defaults' trial (always run first, on the same rows or folds) by more than the
noise of the comparison. Engine-neutral: it reads two :class:`Score` records, whatever engine
wrote them.

Scores (the model is scikit-learn's model selection: every score comes with its spread):

- **Large data** (at least :data:`SMALL_DATA_ROWS` training images): a
  trial is scored once on the validation split, ``n`` images, and records which images it got
  right (``hits``). Two trials of a study are scored on the same images, so the comparison is
  paired: per image, the difference of the two hits (-1, 0 or 1); the margin is their mean and
  its standard error their standard deviation over ``sqrt(n)`` (the z-test behind McNemar's).
  Without hits (trials recorded before they were kept), the unpaired binomial standard error
  ``sqrt(p1 (1 - p1) / n + p2 (1 - p2) / n)`` stands in, which is larger.
- **Small data** (fewer training images): a trial of either phase is scored by stratified
  k-fold cross-validation (:data:`FOLDS` folds) on the training images, a head trial on their
  cached pooled features, a tail trial on their cached maps; the validation split stays
  untouched for the final model's own choices. The study keeps each fold's accuracy; the
  trial's value is their mean, its standard error ``sd / sqrt(k)``. Two trials of one study
  share their folds, so the comparison is paired. A trial also keeps which training images it
  got right when held out (each exactly once), and two trials are compared image by image over
  all of them, as on one split but over every training image instead of the validation split's
  few (1,500 instead of 300 for a folder of 1,800). Trials recorded without those hits (phase-1
  trials before they were kept) are compared by the fold-by-fold differences (paired t).

The shipping rule: the searched trial ships when its margin over the defaults exceeds a
one-sided :data:`CONFIDENCE` bound of the noise (normal on paired images; paired t on folds);
otherwise the defaults ship. Selecting the best of many trials still flatters it (the winner's
curse): the rule guards against shipping noise, not against every optimistic estimate.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass, field
from typing import Any

SMALL_DATA_ROWS = 5000  # fewer training images than this: trials of both phases are cross-validated
FOLDS = 5  # k of the k-fold cross-validation
MIN_FOLD_ROWS_PER_CLASS = 2  # a class with fewer training images per fold than this: fewer folds
MIN_VAL_PER_CLASS = 50  # the validation split holds at least this many images per class ...
MAX_VAL_SHARE = 0.3  # ... but never more than this share of the training images
DEFAULT_VAL_SHARE = 0.1  # otherwise 10 % of the training images (CIFAR-10: 5,000 of 50,000)
CONFIDENCE = 0.95  # one-sided: the searched trial must beat the defaults at this confidence


def default_val_size(n_train: int, n_classes: int) -> int:
    """The validation images carved from ``n_train`` training images of ``n_classes`` classes:
    10 %, raised to :data:`MIN_VAL_PER_CLASS` per class, capped at :data:`MAX_VAL_SHARE` of the
    images (and at least one per class). CIFAR-10: 5,000; 1,000 images of 4 classes: 200."""
    share = round(DEFAULT_VAL_SHARE * n_train)
    floor = MIN_VAL_PER_CLASS * n_classes
    return int(max(n_classes, min(max(share, floor), math.floor(MAX_VAL_SHARE * n_train))))


def folds_for(labels: Any, wanted: int = FOLDS) -> int:
    """How many folds ``labels`` (the training images' classes) allow, at most ``wanted``: each
    class needs :data:`MIN_FOLD_ROWS_PER_CLASS` images per fold. 1 means no cross-validation."""
    import numpy as np

    counts = np.bincount(np.asarray(labels))
    counts = counts[counts > 0]
    if not len(counts):
        return 1
    return int(max(1, min(wanted, counts.min() // MIN_FOLD_ROWS_PER_CLASS)))


def pack_hits(hits: Any) -> str:
    """Which validation images a trial got right (booleans, in the split's order), as base64 of
    their bits: 5,000 images take 836 characters in a study."""
    import numpy as np

    return base64.b64encode(np.packbits(np.asarray(hits, dtype=bool)).tobytes()).decode("ascii")


def unpack_hits(packed: str, n: int) -> Any:
    """The ``n`` booleans :func:`pack_hits` packed."""
    import numpy as np

    return np.unpackbits(np.frombuffer(base64.b64decode(packed), dtype=np.uint8))[:n].astype(bool)


@dataclass
class Score:
    """A trial's estimate: ``value`` (the mean), ``scores`` (one per fold; one value on a single
    split), ``n`` (the images its ``hits`` cover: the validation split, or every training image
    held out once across the folds) and ``hits`` (:func:`pack_hits` of the images it got right;
    None for trials recorded before they were kept)."""

    value: float
    scores: list[float] = field(default_factory=list)
    n: int | None = None
    hits: str | None = None

    @property
    def folds(self) -> int:
        return len(self.scores)

    @property
    def se(self) -> float | None:
        """Standard error of ``value``: across folds, or binomial on one split; None if unknown."""
        if self.folds >= 2:
            return _sd(self.scores) / math.sqrt(self.folds)
        if self.n:
            return math.sqrt(max(self.value * (1 - self.value), 0.0) / self.n)
        return None

    def as_dict(self, hits: bool = True) -> dict[str, Any]:
        out = {"value": self.value, "scores": list(self.scores), "n": self.n, "se": self.se}
        return {**out, "hits": self.hits} if hits else out

    @classmethod
    def from_record(cls, value: float, attrs: dict[str, Any]) -> Score:
        """From a trial's value and its recorded ``scores``/``n``/``hits`` (older trials lack them)."""
        return cls(float(value), [float(s) for s in attrs.get("scores") or []], attrs.get("n"), attrs.get("hits"))


def _sd(xs: list[float]) -> float:
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def decide(best: Score, default: Score | None, best_is_default: bool = False) -> dict[str, Any]:
    """``{"ship": "search" | "default", "why": ..., margin, se, threshold, best, default}``.

    ``best`` ships only if ``best.value - default.value`` exceeds ``threshold`` = the one-sided
    :data:`CONFIDENCE` quantile times the standard error of the margin: the normal on the
    image-by-image differences when both recorded the same images' hits (one split, or the
    out-of-fold images of a cross-validated trial), else Student's t on the paired fold
    differences when both were cross-validated on the same folds, else the normal on the
    binomial errors.
    Without a defaults' score the rule cannot be applied and the defaults ship.
    """
    out: dict[str, Any] = {"best": best.as_dict(hits=False),
                           "default": default.as_dict(hits=False) if default else None, "confidence": CONFIDENCE}
    if best_is_default:
        return {**out, "ship": "default", "why": "the defaults' trial is the study's best", "margin": 0.0}
    if default is None:
        return {**out, "ship": "default",
                "why": "the study has no defaults' trial to compare with (run with --default-trial)"}
    margin = best.value - default.value
    if best.hits and default.hits and best.n and best.n == default.n and best.folds == default.folds:
        from statistics import NormalDist

        import numpy as np

        d = unpack_hits(best.hits, best.n).astype(float) - unpack_hits(default.hits, best.n).astype(float)
        se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else 0.0
        discordant = int(np.count_nonzero(d))
        where = f"out-of-fold images ({best.folds} folds)" if best.folds >= 2 else "validation images"
        q, test = NormalDist().inv_cdf(CONFIDENCE), f"paired over {best.n} {where}, {discordant} scored differently"
    elif best.folds >= 2 and best.folds == default.folds:
        diffs = [b - d for b, d in zip(best.scores, default.scores, strict=True)]
        se = _sd(diffs) / math.sqrt(len(diffs))
        from scipy.stats import t

        q, test = float(t.ppf(CONFIDENCE, len(diffs) - 1)), f"paired t over {len(diffs)} folds"
    else:
        se_b, se_d = best.se, default.se
        if se_b is None or se_d is None:
            return {**out, "ship": "default", "margin": margin,
                    "why": "the trials record no sample size, so their noise is unknown"}
        from statistics import NormalDist

        se = math.sqrt(se_b ** 2 + se_d ** 2)
        q, test = NormalDist().inv_cdf(CONFIDENCE), f"binomial, {best.n} validation images"
    threshold = q * se
    ship = "search" if margin > threshold else "default"
    verb = "beats" if ship == "search" else "does not beat"
    why = (f"the best trial {verb} the defaults by more than the noise: margin {margin:+.4f} vs "
           f"{q:.2f} x SE {se:.4f} = {threshold:.4f} ({test})")
    return {**out, "ship": ship, "why": why, "margin": margin, "se": se, "threshold": threshold, "test": test}
