"""Search engines over the cached pooled features: Optuna (default) and KerasTuner.

Entry point: :func:`run_search`. Both engines sample ``search.space.suggest`` and build with
``search.heads.build_head`` through :class:`search.engines.objective.PooledData`; both record
a pointer in ``results/latest_search.json`` that :func:`best_params` (used by ``make final``)
follows back to the study itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from search.errors import UserError
from search.io import read_json

ENGINES = ("optuna", "kerastuner")
LATEST = "latest_search.json"


def run_search(engine: str, **kwargs: Any) -> dict:
    """Run ``engine`` (``"optuna"`` or ``"kerastuner"``); return the best trial's summary."""
    if engine == "optuna":
        from search.engines import optuna_engine

        return optuna_engine.run(**kwargs)
    if engine == "kerastuner":
        from search.engines import kerastuner_engine

        return kerastuner_engine.run(**kwargs)
    raise UserError(f"unknown engine {engine!r}; choose one of {list(ENGINES)}")


def best_params(results: str | Path = "results", pointer: dict | None = None) -> tuple[dict, str]:
    """The best trial's parameters of the latest search, read from the study itself.

    Returns ``(params, description)``. Raises UserError when no search exists.
    """
    path = Path(results) / LATEST
    if pointer is None:
        if not path.exists():
            raise UserError(f"no search found ({path} missing); run `make search` first")
        pointer = read_json(path)
    if pointer["engine"] == "optuna":
        from search.engines import optuna_engine

        return optuna_engine.best_params(pointer["storage"], pointer["study_name"])
    from search.engines import kerastuner_engine

    return kerastuner_engine.best_params(pointer["directory"], pointer["project_name"])
