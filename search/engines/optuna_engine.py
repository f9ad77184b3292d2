"""Optuna engine: seeded TPE over conditional parameters, a per-epoch pruner, any storage URL.

The study opens unchanged in the ``optuna`` CLI and in optuna-dashboard: its objective is named
"validation accuracy" (``study.set_metric_names``), parameters are the names of
``search.space.suggest``, user attrs hold ``seconds``, ``epochs``, ``cache``, ``phase``,
``budget`` (and ``fail_reason`` for a failed trial).
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any

import keras
import optuna

from search import selection, space
from search.engines.base import METRIC, check_outcome, check_same_budget, default_study_name, summary, write_pointer
from search.errors import UserError

log = logging.getLogger(__name__)
PRUNERS = ("asha", "hyperband", "median", "none")
DEFAULT_PRUNER = "asha"


def default_storage(results: str | Path = "results") -> str:
    return f"sqlite:///{Path(results) / 'study.db'}"


MIN_RESOURCE, REDUCTION_FACTOR = 1, 3  # of both successive-halving pruners


def step_offset(max_epochs: int) -> int:
    """What a trial of ``max_epochs`` epochs adds to an epoch's index (from 0) to get the step it
    reports to the pruner: 0, except for a 2-epoch trial (phase 2's budget on CIFAR-10), whose
    epochs are reported as steps 1 and 2 so that the first rung (step ``MIN_RESOURCE``) judges it
    after its first epoch. Reported from 0, its first rung would be its last epoch, and it could
    never be pruned (Optuna's steps cannot put a rung at step 0)."""
    return 1 if 1 < max_epochs <= MIN_RESOURCE + 1 else 0


def rung_steps(max_epochs: int) -> tuple[int, ...]:
    """The steps (as reported: epoch index + :func:`step_offset`) where the default pruner judges
    a trial of ``max_epochs``: ``1, 3, 9, ...`` before its last step."""
    last = max_epochs - 1 + step_offset(max_epochs)
    steps, step = [], MIN_RESOURCE
    while step < last:  # a rung at the last step would judge a finished trial
        steps.append(step)
        step *= REDUCTION_FACTOR
    return tuple(steps)


def rung_epochs(max_epochs: int) -> tuple[int, ...]:
    """The epochs (index from 0) after which the default pruner judges a trial of ``max_epochs``:
    ``(1, 3)`` (after epochs 2 and 4) with phase 1's 8, ``(0,)`` (after epoch 1) with phase 2's 2."""
    return tuple(step - step_offset(max_epochs) for step in rung_steps(max_epochs))


def make_pruner(name: str, max_epochs: int) -> optuna.pruners.BasePruner:
    """Asynchronous successive halving, Hyperband (``max_resource`` = the trial's epoch budget
    plus its :func:`step_offset`), median, or none.

    ``asha`` (the default) and Hyperband both use rungs ``1, 3, 9, ...`` of Optuna's steps (the
    epoch index ``KerasPruningCallback`` reports, from 0: a rung at step 1 judges a trial after its
    second epoch; a 2-epoch trial's steps start at 1, :func:`step_offset`, and it is judged after
    its first) with reduction factor 3. ASHA puts every trial in the most aggressive bracket,
    where a trial goes on past a rung only among the best third there; Hyperband spreads trials
    over brackets whose first rung comes later (with an 8-epoch budget, about half the trials are
    first judged at step 3), which costs time and protects slow starters. ``make bench-search``
    times both pruners on the same search and measures how well each rung's score ranks
    configurations against full training (``fidelity.rungs``).
    """
    if name == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=MIN_RESOURCE, reduction_factor=REDUCTION_FACTOR)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=MIN_RESOURCE,
                                              max_resource=max_epochs + step_offset(max_epochs),
                                              reduction_factor=REDUCTION_FACTOR)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise UserError(f"unknown pruner {name!r}; choose one of {list(PRUNERS)}")


def record_pruner(study: optuna.Study, name: str) -> list[str]:
    """Add ``name`` to the study's ``pruners`` user attr (the pruners its trials ran under, in the
    order first used: Optuna stores no pruner with a study); returns the list."""
    pruners = list(study.user_attrs.get("pruners", []))
    if name not in pruners:
        pruners.append(name)
        study.set_user_attr("pruners", pruners)
    return pruners


def check_budget(study: optuna.Study, budget: dict) -> None:
    """Refuse to add trials to ``study`` if any of its trials ran at another budget
    (:func:`search.engines.check_same_budget`)."""
    for trial in study.get_trials(deepcopy=False):
        check_same_budget(study.study_name, trial.user_attrs.get("budget"), budget)


def check_storage(storage: str) -> Any:
    """The parsed SQLAlchemy URL of ``storage``; one clear error for a malformed one."""
    import sqlalchemy

    try:
        url = sqlalchemy.engine.make_url(storage)
    except Exception:
        raise UserError(f"malformed storage URL {storage!r} (e.g. sqlite:///results/study.db or "
                        "postgresql+psycopg2://user@host:port/db)") from None
    try:
        url.get_dialect()
    except Exception:
        raise UserError(f"unsupported storage URL {storage!r}: no SQLAlchemy dialect {url.drivername!r}") from None
    return url


def make_sampler(seed: int, n_trials: int) -> optuna.samplers.TPESampler:
    """TPE whose random start-up is a quarter of the budget (2..10 trials), not a fixed 10."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, min(10, n_trials // 4)),
                                          multivariate=True, group=True, constant_liar=True)


def open_study(storage: str, study_name: str, sampler: optuna.samplers.BaseSampler | None = None,
               pruner: optuna.pruners.BasePruner | None = None, create: bool = True,
               heartbeat: int | None = None) -> optuna.Study:
    """Create or load (``load_if_exists``) the study; one clear error for a bad storage.

    With ``heartbeat`` (seconds), running trials beat; a trial whose process died (SIGKILL)
    is marked FAIL when a worker next starts a trial, instead of staying RUNNING forever.
    """
    url = check_storage(storage)
    if url.drivername.startswith("sqlite") and url.database:
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            # a server restart leaves dead pooled connections: test each before use (not for SQLite)
            engine_kwargs = {} if url.drivername.startswith("sqlite") else {"pool_pre_ping": True}
            rdb = optuna.storages.RDBStorage(storage, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat,
                                             grace_period=2 * heartbeat if heartbeat else None)
            if not create:
                return optuna.load_study(storage=rdb, study_name=study_name, sampler=sampler, pruner=pruner)
            study = optuna.create_study(storage=rdb, study_name=study_name, direction="maximize",
                                        sampler=sampler, pruner=pruner, load_if_exists=True)
            if study.metric_names != [METRIC]:
                study.set_metric_names([METRIC])
            return study
    except UserError:
        raise
    except KeyError:
        raise UserError(f"no study {study_name!r} in {storage}") from None
    except Exception as exc:
        raise UserError(f"cannot open storage {url.render_as_string()}: {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0]}") from None


class OptunaEngine:
    """Optuna over a phase objective. Options are checked here, before any data is read."""

    def __init__(self, storage: str | None = None, pruner: str | None = None, heartbeat: int | None = None,
                 seed: int = 0, worker_index: int = 0, progress: bool = True,
                 results: str | Path = "results", reconnect_seconds: float = 60.0,
                 default_trial: bool = True) -> None:
        self.storage = storage or default_storage(results)
        check_storage(self.storage)
        self.pruner = pruner or DEFAULT_PRUNER
        make_pruner(self.pruner, 1)
        if heartbeat is not None and heartbeat < 1:
            raise UserError(f"--heartbeat must be at least 1 second, got {heartbeat}")
        self.heartbeat = 30 if heartbeat is None else heartbeat
        self.seed, self.worker_index, self.progress, self.results = seed, worker_index, progress, results
        self.reconnect_seconds = reconnect_seconds
        self.default_trial = default_trial
        self._trial_number: int | None = None  # the trial this process is running, if any

    def open(self, objective: Any, n_trials: int, study_name: str | None = None) -> optuna.Study:
        """The study for ``objective`` (created if new), with its sampler and pruner."""
        name = study_name or default_study_name(objective.phase, objective.cache_id)
        # Parallel workers on one study draw differently from one --seed.
        sampler = make_sampler(self.seed + 1000 * self.worker_index, n_trials)
        study = open_study(self.storage, name, sampler, make_pruner(self.pruner, objective.max_epochs),
                           heartbeat=self.heartbeat)
        check_budget(study, objective.budget)
        record_pruner(study, self.pruner)
        return study

    def run(self, objective: Any, n_trials: int, study_name: str | None = None,
            timeout: float | None = None) -> dict:
        """Run ``n_trials`` more trials in this process; point ``results/searches/`` at the study.

        If the study's database goes away (a PostgreSQL restart), the worker reconnects and
        carries on with the trials it still owes; after ``reconnect_seconds`` without a
        database it stops with one line (exit 2). The trial that was running when the
        connection broke is marked FAIL by this worker once it has reconnected; if it never
        reconnects, the trial stays RUNNING until its heartbeat expires, then any worker marks
        it FAIL. Finished trials are never rerun or duplicated.
        """
        import sqlalchemy

        study = self.open(objective, n_trials, study_name)
        fail_trials_without_heartbeat(study, 2 * self.heartbeat)
        if self.worker_index == 0:
            self.enqueue_defaults(study, objective.phase, objective.space_options)
        write_pointer(self.results, objective.phase, objective.cache_id,
                      {"engine": "optuna", "storage": self.storage, "study_name": study.study_name})
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        state = {"done": 0, "lost_since": None}

        def finished(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            # one line per trial, also without progress bars (a log to follow; tests wait on it)
            log.info("trial %d %s%s", trial.number, trial.state.name,
                     "" if trial.value is None else f" (value {trial.value:.4f})")
            state["done"] += 1
            state["lost_since"] = None
            self._trial_number = None

        while state["done"] < n_trials:
            try:
                study.optimize(self.objective_fn(objective), n_trials=n_trials - state["done"], timeout=timeout,
                               catch=(Exception,), show_progress_bar=self.progress, gc_after_trial=True,
                               callbacks=[finished])
                break
            except Exception as exc:
                if _in_chain(exc, lambda e: isinstance(e, optuna.exceptions.UpdateFinishedTrialError)
                             or (isinstance(e, ValueError) and str(e).startswith("Cannot tell a"))):
                    # its heartbeat lapsed (a database outage, or a starved process) and another
                    # worker marked it FAIL: that trial is over; carry on with the next
                    log.warning("a trial was marked FAIL by another worker after its heartbeat lapsed; continuing")
                    state["done"] += 1
                    self._trial_number = None
                    continue
                lost = _in_chain(exc, lambda e: isinstance(e, (sqlalchemy.exc.DBAPIError,
                                                               optuna.exceptions.StorageInternalError)))
                if lost is None:
                    raise
                reason = f"{type(lost).__name__}: {str(lost).splitlines()[0][:200]}"
                state["lost_since"] = state["lost_since"] or time.monotonic()
                if time.monotonic() - state["lost_since"] > self.reconnect_seconds:
                    raise UserError(f"lost the study database for {self.reconnect_seconds:.0f} s ({reason}); "
                                    f"{state['done']} trials finished here are kept: rerun the same command "
                                    "to continue") from None
                log.warning("study database unreachable (%s); reconnecting", reason)
                time.sleep(2)
                try:
                    study = self.open(objective, n_trials, study.study_name)
                except UserError:
                    continue
                self._fail_broken_trial(study)
        return check_outcome(summarize(study))

    def enqueue_defaults(self, study: optuna.Study, phase: str, options: dict | None = None) -> None:
        """Make a new study's first trial the documented defaults (``space.default_trial``), so
        the search measures them at its own budget and its best can be compared with them there
        (with ``default_trial``; a study that has trials is left as it is)."""
        if self.default_trial and not study.trials:
            study.enqueue_trial(space.default_trial(phase, **(options or {})), user_attrs={"defaults": True},
                                skip_if_exists=True)

    def _fail_broken_trial(self, study: optuna.Study) -> None:
        """After a reconnect, tell FAIL the trial this process was running when the database went
        away, if it is still RUNNING: one that broke before its first heartbeat was recorded has
        no heartbeat for other workers to see lapse, and would stay RUNNING for ever."""
        number, self._trial_number = self._trial_number, None
        if number is None:
            return
        try:
            if study.trials[number].state == optuna.trial.TrialState.RUNNING:
                study.tell(number, state=optuna.trial.TrialState.FAIL)
                log.warning("trial %d broke with the database connection: marked FAIL", number)
        except Exception as exc:  # another worker marked it first, or the database went away again
            log.warning("could not mark trial %d FAIL (%s); its heartbeat will", number, type(exc).__name__)

    def objective_fn(self, objective: Any):
        def run_trial(trial: optuna.Trial) -> float:
            self._trial_number = trial.number
            params = space.suggest(objective.phase, trial, **objective.space_options)
            start = time.perf_counter()
            trial.set_user_attr("cache", objective.cache_id)
            trial.set_user_attr("phase", objective.phase)
            trial.set_user_attr("budget", objective.budget)
            epochs = _EpochCount()
            try:
                model = objective.build(params, seed=self.seed + trial.number)
                value = objective.fit(model, objective.max_epochs,
                                      [epochs, pruning_callback(trial, objective.max_epochs)])
                score = getattr(objective, "last_score", None)
                if score is not None:  # the estimate's spread (search.selection)
                    trial.set_user_attr("scores", score.scores)
                    trial.set_user_attr("n", score.n)
                    if score.hits:
                        trial.set_user_attr("hits", score.hits)
            except optuna.TrialPruned:
                raise
            except Exception as exc:
                trial.set_user_attr("fail_reason", f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
                raise
            finally:
                trial.set_user_attr("seconds", time.perf_counter() - start)
                trial.set_user_attr("epochs", epochs.count)
            return value

        return run_trial


def fail_trials_without_heartbeat(study: optuna.Study, grace_seconds: float) -> list[int]:
    """Mark FAIL the RUNNING trials that never recorded a heartbeat and started more than
    ``grace_seconds`` ago; return their numbers.

    Optuna's own stale-trial check (``fail_stale_trials``, run at every trial start) skips a
    trial with no heartbeat row: one whose process died (SIGKILL, a lost database) between
    creating the trial and its first heartbeat would stay RUNNING for ever. A live trial beats
    within a second of its start, so one that has not after the grace period is dead. Reads
    Optuna's RDB heartbeat table (an internal model); on any other storage nothing is done.
    """
    from datetime import datetime, timedelta

    backend = getattr(study._storage, "_backend", study._storage)
    try:
        from optuna.storages._rdb import models
        from optuna.storages._rdb.storage import _create_scoped_session

        if not isinstance(backend, optuna.storages.RDBStorage):
            return []
        with _create_scoped_session(backend.scoped_session) as session:
            now = datetime.now()  # the clock Optuna writes datetime_start with
            orphans = [t.number for t in session.query(models.TrialModel)
                       .filter(models.TrialModel.study_id == study._study_id,
                               models.TrialModel.state == optuna.trial.TrialState.RUNNING).all()
                       if not t.heartbeats and t.datetime_start is not None
                       and now - t.datetime_start > timedelta(seconds=grace_seconds)]
    except Exception as exc:  # an Optuna whose internals moved: keep Optuna's own check only
        log.warning("could not look for trials without a heartbeat (%s)", type(exc).__name__)
        return []
    for number in orphans:
        try:
            study.tell(number, state=optuna.trial.TrialState.FAIL)
            log.warning("trial %d never recorded a heartbeat (its process died at its start): marked FAIL", number)
        except Exception as exc:  # another worker marked it first
            log.warning("could not mark trial %d FAIL (%s)", number, type(exc).__name__)
    return orphans


def _in_chain(exc: BaseException, match: Any) -> BaseException | None:
    """The exception in ``exc``'s cause/context chain for which ``match`` is true, if any: Optuna
    may raise another exception while handling a database error (e.g. an ``UnboundLocalError``
    from its trial bookkeeping), so the whole chain is walked."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if match(exc):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def pruning_callback(trial: optuna.Trial, max_epochs: int) -> keras.callbacks.Callback:
    """Optuna's ``KerasPruningCallback`` on validation accuracy that reports every epoch (at step
    epoch index + :func:`step_offset`) but asks the pruner nothing after the last one (epoch
    ``max_epochs - 1``).

    A rung at the last step would judge a trial that has already trained in full: Optuna's
    successive halving then marks it PRUNED, and a study's best trial is chosen among COMPLETE
    ones only. With the phase-2 budget of 2 epochs reported from step 0, the rung at step 1 was
    the last epoch, and a search run that way (study ``tail-MobileNet-224-conv_pw_11_relu-35aa909a6b06``
    of 2026-11-30 17:40) recorded 7 of its 8 finished trials as PRUNED; sparing the last epoch
    then left such a trial nothing to be judged at, and no phase-2 trial on CIFAR-10 was ever
    pruned. Its steps now start at 1, so it is judged after its first epoch.
    """
    from optuna_integration import KerasPruningCallback

    offset = step_offset(max_epochs)

    class SparingLastEpoch(KerasPruningCallback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            if epoch < max_epochs - 1:
                return super().on_epoch_end(epoch + offset, logs)
            score = (logs or {}).get(self._monitor)
            if score is not None:
                self._trial.report(float(score), step=epoch + offset)

    return SparingLastEpoch(trial, "val_accuracy")


class _EpochCount(keras.callbacks.Callback):
    """Counts the epochs a trial finished (recorded as its ``epochs`` user attr). It must come
    before the pruning callback: a pruned trial stops inside that callback's ``on_epoch_end``, and
    the epoch it was judged after was trained too."""

    count = 0

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.count += 1


def summarize(study: optuna.Study) -> dict:
    """The run summary (:func:`search.engines.base.summary`) of ``study``'s trials."""
    reasons = [t.user_attrs["fail_reason"] for t in study.trials if "fail_reason" in t.user_attrs]
    return summary(study.study_name, [(t.state.name, t.value, t.params, t.number) for t in study.trials],
                   reasons[0] if reasons else None)


def best_params(storage: str, study_name: str) -> tuple[dict, dict]:
    study = open_study(storage, study_name, create=False)
    try:
        best = study.best_trial
    except ValueError:
        raise UserError(f"study {study_name!r} has no completed trial yet") from None
    defaults = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                if t.user_attrs.get("defaults")]
    return dict(best.params), {
        "engine": "optuna", "storage": storage, "study": study_name, "trial": best.number, "value": best.value,
        "score": selection.Score.from_record(best.value, best.user_attrs).as_dict(),
        "default_score": (selection.Score.from_record(defaults[0].value, defaults[0].user_attrs).as_dict()
                          if defaults else None),
        "best_is_default": bool(best.user_attrs.get("defaults")), "budget": best.user_attrs.get("budget")}
