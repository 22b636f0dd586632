"""Plumbing shared by the two Optuna studies: storage, seeded/resumable studies, fold loop, guards, artefacts, logs.

Why a module of its own: the signal study (:mod:`ml.tune.hyperparams`) and the position study
(:mod:`ml.tune.position`) must follow exactly the same rules, and those rules are where tuning usually goes wrong:

* **Storage.** Default ``sqlite:///<root>/results/optuna.db`` (one machine; ``optuna-dashboard`` can show it). Any
  SQLAlchemy URL via ``--storage`` (``postgresql+psycopg2://user:pw@host:5432/db``) lets several workers on several
  machines share one study: each worker calls :func:`create_or_load_study` with the same name. RDB storages get a
  heartbeat, so a worker that dies leaves no trial stuck in RUNNING: the next worker marks it FAIL.
* **Resumable.** ``load_if_exists``: re-running with the same storage and study name *continues* the study. By default
  a run *adds* ``n_trials`` trials (Optuna's own meaning of ``n_trials``); with ``top_up=True`` (``--top-up``) it runs
  only the trials still *missing* to reach ``n_trials`` finished (complete or pruned) trials, which is what a resumed
  weekly run wants. Several workers with ``top_up`` stop together once the study holds ``n_trials`` finished trials.
* **One study per dataset.** The default study name carries a fingerprint of the data and the config sections that
  change the objective, so next week's run starts a fresh study instead of mixing objective values computed on other
  data. Loading a study whose recorded fingerprint differs is refused.
* **Seeded.** The TPE sampler's seed is derived from ``(seed, trials already in the study, worker)``: a fresh study
  with the same seed proposes the same parameter sequence, while a resumed study (or a second worker) does not replay
  the first trials' random start-up parameters. Exact repetition needs ``n_jobs=1`` and one worker: parallel trials
  finish in a timing-dependent order, which TPE then sees.
* **The OOS window is never seen.** Every index an objective touches goes through :func:`guard_indices`, which raises
  :class:`OOSLeakError` (not a ``UserError``: a leak is a bug, never a bad input) when one reaches ``oos_start``.
* **Artefacts.** ``results/optuna_study.pkl`` (signal study; the seed project's file, a joblib dump of the study copied
  into memory so the pickle does not need the database), ``results/optuna_study_position.pkl``,
  ``results/best_params_<kind>.json`` and ``results/optuna_history_<kind>.png``, all written atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import optuna
from optuna.pruners import BasePruner, MedianPruner
from optuna.samplers import TPESampler
from optuna.study import MaxTrialsCallback
from optuna.trial import FrozenTrial, TrialState

from core.config import Config
from core.errors import UserError
from core.io import atomic_write, atomic_write_json

if TYPE_CHECKING:
    from market.dataset import Dataset

log = logging.getLogger("ml.tune")

STUDY_FILES = {"signal": "optuna_study.pkl", "position": "optuna_study_position.pkl"}
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
HEARTBEAT_S = 30  # an RDB trial whose worker stopped beating for GRACE_S is failed by the next worker
GRACE_S = 120


class OOSLeakError(RuntimeError):
    """An objective was about to read a bar of the final OOS window. Always a bug, never caught by the studies."""


# --------------------------------------------------------------------------------------------------- guards
def guard_indices(positions: np.ndarray | Sequence[int], oos_start: int, what: str = "indices") -> np.ndarray:
    """Return ``positions`` as int64 after checking that none reaches the OOS window (``>= oos_start``) or is negative.

    Why raise instead of filter: silently dropping OOS rows would hide the bug that produced them; the tuning result
    would still look fine while the final evaluation is contaminated.
    """
    arr = np.asarray(positions, dtype=np.int64).ravel()
    if arr.size and (int(arr.max()) >= oos_start or int(arr.min()) < 0):
        bad = int(arr.max()) if int(arr.max()) >= oos_start else int(arr.min())
        raise OOSLeakError(f"{what}: position {bad} is outside the tuning window [0, {oos_start}) (OOS starts there)")
    return arr


# --------------------------------------------------------------------------------------------------- storage
def default_storage(results_dir: Path) -> str:
    """``sqlite:///<results_dir>/optuna.db`` (absolute, so workers started from any folder share it)."""
    return f"sqlite:///{Path(results_dir).resolve() / 'optuna.db'}"


def resolve_storage(storage: str | None, results_dir: Path) -> str:
    """The storage URL to use: ``storage`` if given (validated), else :func:`default_storage`.

    A bare file path (``results/x.db``) is accepted as SQLite for convenience; anything else must be a SQLAlchemy URL.
    """
    if not storage:
        url = default_storage(results_dir)
    elif "://" not in storage:
        if storage.endswith((".db", ".sqlite", ".sqlite3")):
            url = f"sqlite:///{Path(storage).resolve()}"
        else:
            raise UserError(f"--storage {storage!r}: expected a database URL such as sqlite:///results/optuna.db or "
                            "postgresql+psycopg2://user:pw@host:5432/db")
    else:
        url = storage
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return url


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***`` (for logs, JSON and reports)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - a malformed URL is reported by the storage itself; never echo it raw
        return url.split("@")[-1] if "@" in url else url


def _set_wal(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def _sqlite_wal(storage: optuna.storages.RDBStorage) -> None:
    """Every connection of ``storage`` in WAL mode with ``synchronous=NORMAL``.

    Why: in its default mode SQLite syncs the disk at every commit, and a trial commits ~30 times (each suggested
    parameter, each fold's report, the attributes, the state). Measured with an instant objective: 243 ms per trial
    against 134 ms with WAL (29 ms in memory), ~15 s of a 150-trial weekly run. WAL still survives a killed process
    (the log is replayed on the next open); a power cut can lose the last commits, never corrupt the file, and a
    study is re-runnable. The database is never copied as a file (backups and the Hub take models and config only),
    so its ``-wal`` / ``-shm`` companions need no care."""
    from sqlalchemy import event

    event.listen(storage.engine, "connect", _set_wal)
    storage.engine.dispose()  # connections opened before the listener (table creation) are not reused


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """An :class:`optuna.storages.RDBStorage` with a heartbeat, and for SQLite a lock timeout and WAL mode.

    Why the timeout: with parallel trials (``n_jobs > 1``) the SQLite file is written from several threads; the default
    5 s lock wait can fail a trial on a slow disk.
    """
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": 60}
    else:
        kwargs["pool_pre_ping"] = True
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    for attempt in range(6):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat: stable enough
                storage = optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT_S,
                                                     grace_period=GRACE_S)
            if url.startswith("sqlite"):
                _sqlite_wal(storage)
            return storage
        except (IntegrityError, ProgrammingError):
            # Two workers creating the tables of a fresh database at once: one loses the race; the tables exist now.
            if attempt == 5:
                raise
            time.sleep(0.3 + 0.3 * attempt)
        except ImportError as exc:
            raise UserError(f"storage {redact_url(url)}: database driver missing ({exc})") from None
        except Exception as exc:  # sqlalchemy OperationalError and friends: unreachable server, bad credentials
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"storage {redact_url(url)}: cannot open ({first})") from None
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------------------------------- studies
def fingerprint(ds: Dataset, cfg: Config, space_version: str) -> str:
    """A short hash of what changes the objective: the candles, the label/split/feature/trading/cost config, the seed
    and the search-space version. Different fingerprint = different study."""
    parts = {
        "data": ds.data_hash(),
        "oos_start": int(ds.splits.oos_start),
        "cfg": {k: cfg.model_dump(mode="json")[k] for k in ("labels", "splits", "features", "trading", "costs",
                                                             "breakers", "symbol_spec")},
        "seed": cfg.tuning.seed,
        "space": space_version,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def default_study_name(kind: str, ds: Dataset, cfg: Config, space_version: str) -> str:
    """``<kind>-<last training bar date>-<fingerprint>``: readable in the dashboard, unique per dataset."""
    last = ds.candles.index[min(ds.splits.oos_start, len(ds.candles)) - 1]
    return f"{kind}-{last:%Y%m%d}-{fingerprint(ds, cfg, space_version)}"


def sampler_seed(seed: int, n_existing: int, worker: int = 0) -> int:
    """Deterministic sampler seed for a (re)started worker; see the module docstring for why it depends on all three."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, n_existing, worker]).generate_state(1)[0])


def create_or_load_study(name: str, storage: str | optuna.storages.BaseStorage, seed: int,
                         direction: str = "maximize", pruner: BasePruner | None = None, *, worker: int = 0,
                         n_startup_trials: int = 10, user_attrs: dict[str, Any] | None = None) -> optuna.Study:
    """Create the study, or load it when it exists (``load_if_exists=True``), with a seeded multivariate TPE sampler.

    ``pruner`` defaults to :func:`median_pruner`: a trial may be pruned after its first fold, once five trials
    have finished. ``user_attrs`` are recorded on a new study; a recorded
    ``fingerprint`` that differs from the given one means the study was made on other data and is refused.
    """
    # One log line per trial: ours (_Progress, after each trial) says more than Optuna's own INFO lines ("Trial N
    # finished ...", "A new study created ..."), which would double every trial in the weekly log.
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    st = open_storage(storage) if isinstance(storage, str) else storage
    pr = pruner if pruner is not None else median_pruner()
    study = optuna.create_study(storage=st, study_name=name, direction=direction, pruner=pr, load_if_exists=True,
                                sampler=TPESampler(seed=seed))
    attrs = dict(user_attrs or {})
    old_fp = study.user_attrs.get("fingerprint")
    if old_fp is not None and attrs.get("fingerprint") is not None and old_fp != attrs["fingerprint"]:
        raise UserError(f"study {name!r} in this storage was created on other data or settings (fingerprint {old_fp}, "
                        f"now {attrs['fingerprint']}): pass another --study-name")
    for key, value in attrs.items():
        if key not in study.user_attrs:
            study.set_user_attr(key, value)
    n_existing = len(study.get_trials(deepcopy=False))
    # multivariate + constant liar are Optuna 5.0's defaults; spelled out so that an upgrade cannot change the search.
    study.sampler = TPESampler(seed=sampler_seed(seed, n_existing, worker), n_startup_trials=n_startup_trials,
                               multivariate=True, constant_liar=True)
    return study


def find_predecessor(study: optuna.Study) -> optuna.study.StudySummary | None:
    """The most recent *other* study of the same kind and search space in the same storage (last week's study).

    "Most recent" is by the start time of its first trial; a study made on the very same data (same fingerprint) is
    not a predecessor, it is this study under another name."""
    me = study.user_attrs
    best: optuna.study.StudySummary | None = None
    for s in optuna.get_all_study_summaries(study._storage, include_best_trial=True):
        ua = s.user_attrs
        if s.study_name == study.study_name or ua.get("kind") != me.get("kind"):
            continue
        if ua.get("space_version") != me.get("space_version") or ua.get("fingerprint") == me.get("fingerprint"):
            continue
        if s.best_trial is None or s.datetime_start is None:
            continue
        if best is None or s.datetime_start > best.datetime_start:
            best = s
    return best


def warm_start(study: optuna.Study, k: int, source: optuna.Study | None = None) -> dict[str, Any] | None:
    """Enqueue the ``k`` best complete parameter sets of last week's study (:func:`find_predecessor`) as this
    study's first trials, once, when the study is new. Their old objective values are NOT reused (the data
    changed): the sets are only proposals, evaluated afresh like any trial, so warm-starting changes where the
    search starts, never what a trial computes. Records ``predecessor`` / ``warm_start`` on the study (report,
    dashboard lineage). Returns that record, or None (cold start). ``source``: the study as it is in the durable
    storage, where last week's studies are, when ``study`` is its in-memory copy (:func:`run_study`)."""
    if k <= 0 or study.get_trials(deepcopy=False):
        return None
    home = source or study
    prev = find_predecessor(home)
    if prev is None:
        return None
    old = optuna.load_study(study_name=prev.study_name, storage=home._storage)
    done = [t for t in old.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    reverse = old.direction == optuna.study.StudyDirection.MAXIMIZE
    done.sort(key=lambda t: (-t.value if reverse else t.value, t.number))
    seeds = done[:k]
    for t in seeds:
        study.enqueue_trial(dict(t.params), user_attrs={"warm_start_from": f"{prev.study_name}#{t.number}"},
                            skip_if_exists=True)
    rec = {"predecessor": prev.study_name, "enqueued": len(seeds),
           "predecessor_best_value": float(old.best_value), "enqueued_trials": [t.number for t in seeds]}
    study.set_user_attr("predecessor", prev.study_name)
    study.set_user_attr("warm_start", rec)
    log.info("%s study %r: warm start with the %d best sets of %r", study.user_attrs.get("kind"), study.study_name,
             len(seeds), prev.study_name)
    return rec


def median_pruner() -> MedianPruner:
    """The default pruner: ``MedianPruner(n_startup_trials=5, n_warmup_steps=0)`` on the running fold mean.

    At fold ``k`` a trial is compared with the other trials *at the same fold*, so folds of different difficulty
    are not mixed. It may stop a trial after its first fold: the folds are expanding walk-forward windows, so the
    first is the cheapest (a quarter of a trial's cost on the real data) and it already tells most hopeless sets
    apart. Measured on the real 2023-2024 file, 100 trials: pruning from the second fold on took 193 s (83 pruned
    after fold 1), from the first 106 s (87 pruned after fold 0), best objective 0.39416 vs 0.39362 (the tolerance
    the benchmark holds it to is 0.01); README "Performance".
    """
    return MedianPruner(n_startup_trials=5, n_warmup_steps=0)


def make_pruner(kind: str, enabled: bool = True) -> BasePruner:
    """The fold-wise pruner by name (``tuning.pruner``); ``enabled=False`` = no pruning (the slow reference).

    * ``median``: :func:`median_pruner` on the running fold mean, from the first fold on.
    * ``wilcoxon``: Optuna's ``WilcoxonPruner`` on the per-fold values (paired with the best trial's folds). Why it
      is not the default: with 3 folds it cannot prune: a one-sided signed-rank test on the 2 paired folds seen
      before the last has a smallest possible p-value of 0.25 > its 0.1 threshold (README, measured: 0 pruned).
    """
    from optuna.pruners import NopPruner, WilcoxonPruner

    if not enabled:
        return NopPruner()
    if kind == "wilcoxon":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return WilcoxonPruner(p_threshold=0.1, n_startup_steps=2)
    if kind == "median":
        return median_pruner()
    raise ValueError(f"unknown pruner {kind!r}")


def n_finished(study: optuna.Study) -> int:
    """Complete + pruned trials (what ``top_up`` counts; failed trials are retried)."""
    return len(study.get_trials(deepcopy=False, states=FINISHED))


# --------------------------------------------------------------------------------------------------- fold loop
def _per_fold(trial: optuna.Trial) -> bool:
    from optuna.pruners import WilcoxonPruner

    return isinstance(getattr(getattr(trial, "study", None), "pruner", None), WilcoxonPruner)


FoldFn = Callable[[int, np.ndarray, np.ndarray], tuple[float, dict[str, Any]]]


def run_folds(trial: optuna.Trial, folds: Sequence[tuple[np.ndarray, np.ndarray]], fold_fn: FoldFn,
              oos_start: int, to_positions: Callable[[np.ndarray], np.ndarray] | None = None) -> float:
    """Mean of ``fold_fn(k, train_idx, val_idx)`` over the folds, with per-fold reporting and pruning.

    Guards every fold's indices before the objective sees them (``to_positions`` maps fold indices that are not bar
    positions, e.g. position-model rows, to every bar position they read). The value reported at step ``k`` is the
    running mean of folds ``0..k``: what the final value would be if the remaining folds scored the same, so the
    median pruner compares like with like. No pruning after the last fold: the cost is spent and a complete value is
    worth more.
    Per-fold values and extra metrics go to the trial's user attributes for the report.
    """
    values: list[float] = []
    for k, (tr, va) in enumerate(folds):
        if to_positions is None:
            tr = guard_indices(tr, oos_start, f"fold {k} train")
            va = guard_indices(va, oos_start, f"fold {k} validation")
        else:
            guard_indices(to_positions(np.asarray(tr, dtype=np.int64)), oos_start, f"fold {k} train bars")
            guard_indices(to_positions(np.asarray(va, dtype=np.int64)), oos_start, f"fold {k} validation bars")
        value, extra = fold_fn(k, tr, va)
        value = float(value) if np.isfinite(value) else 0.0
        values.append(value)
        trial.set_user_attr(f"fold{k}", {"value": round(value, 6), **extra})
        running = float(np.mean(values))
        # WilcoxonPruner pairs fold k with the best trial's fold k: it wants the fold's own value
        trial.report(value if _per_fold(trial) else running, step=k)
        if k < len(folds) - 1 and trial.should_prune():  # after the last fold nothing is left to save
            raise optuna.TrialPruned(f"pruned after fold {k} (running mean {running:.4f})")
    return float(np.mean(values)) if values else 0.0


# --------------------------------------------------------------------------------------------------- run + results
@dataclass
class StudyResult:
    """What a study run returns. ``per_trial_seconds`` are the wall times of the trials *this call* ran."""

    best_params: dict[str, Any]
    best_value: float
    n_trials: int
    per_trial_seconds: list[float]
    study: optuna.Study
    files: dict[str, Path] = field(default_factory=dict)


class _Progress:
    """Optuna callback: one log line per finished trial, and the trial durations of this run."""

    def __init__(self, kind: str, target: int | None) -> None:
        self.kind = kind
        self.target = target
        self.durations: list[float] = []

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        dur = trial.duration.total_seconds() if trial.duration else 0.0
        self.durations.append(dur)
        try:
            best = f"best={study.best_value:.4f} (#{study.best_trial.number})"
        except ValueError:
            best = "best=n/a"
        value = f"{trial.value:.4f}" if trial.value is not None else "-"
        of = f"/{self.target}" if self.target else ""
        steps = len(trial.intermediate_values)
        log.info("%s trial %d%s %s value=%s %s folds=%d %.1fs", self.kind, len(self.durations), of,
                 trial.state.name.lower(), value, best, steps, dur)


def optimize(study: optuna.Study, objective: Callable[[optuna.Trial], float], kind: str, n_trials: int,
             timeout: float | None = None, n_jobs: int = 1, top_up: bool = False) -> list[float]:
    """Run the trials (see the module docstring for ``top_up``); returns this run's trial durations in seconds."""
    callbacks: list[Callable[[optuna.Study, FrozenTrial], None]] = []
    if top_up:
        todo = max(0, n_trials - n_finished(study))
        callbacks.append(MaxTrialsCallback(n_trials, states=FINISHED))  # other workers count too
    else:
        todo = n_trials
    progress = _Progress(kind, todo)
    callbacks.append(progress)
    if todo <= 0:
        log.info("%s study %r already holds %d finished trials: nothing to run", kind, study.study_name,
                 n_finished(study))
        return []
    log.info("%s study %r: running %d trial(s)%s, n_jobs=%d", kind, study.study_name, todo,
             f" (timeout {timeout:.0f}s)" if timeout else "", n_jobs)
    study.optimize(objective, n_trials=todo, timeout=timeout, n_jobs=n_jobs, callbacks=callbacks,
                   gc_after_trial=False)
    return progress.durations


def run_study(study: optuna.Study, objective: Callable[[optuna.Trial], float], kind: str, n_trials: int, *,
              timeout: float | None = None, n_jobs: int = 1, top_up: bool = False, warm_start_trials: int = 0,
              buffered: bool = False) -> list[float]:
    """Warm-start (:func:`warm_start`) and run (:func:`optimize`) ``study``; returns this run's trial durations.

    ``buffered`` (the weekly run passes it; it holds the run lock, so nothing else writes its study): with a SQLite
    storage and one trial at a time, the trials run against an in-memory copy of the study and the finished ones
    are added to the database when the study ends, also when it ends by an exception (``finally``). Why: a trial
    writes ~70-80 rows one commit at a time (each parameter, each fold's report and attributes, the state) and the
    sampler re-reads the trials through SQLAlchemy, ~0.1 s per trial against ~0.02 s in memory (measured), i.e.
    ~15 s of a 150-trial weekly run. The same seed gives the same trials either way (tested). What it gives up: a
    trial in progress when the process is killed is not in the database (the resumed run re-runs it; the study is
    seeded, so it proposes the same parameters), and ``optuna-dashboard`` shows this run's trials when its studies
    end, not live. Studies shared by several workers (PostgreSQL, ``--worker``) are never buffered.
    """
    if not (buffered and n_jobs == 1 and storage_url(study).startswith("sqlite")):
        warm_start(study, warm_start_trials)
        return optimize(study, objective, kind, n_trials, timeout=timeout, n_jobs=n_jobs, top_up=top_up)
    mem_storage = optuna.storages.InMemoryStorage()
    optuna.copy_study(from_study_name=study.study_name, from_storage=study._storage, to_storage=mem_storage)
    mem = optuna.load_study(study_name=study.study_name, storage=mem_storage, sampler=study.sampler,
                            pruner=study.pruner)
    n_before = len(mem.get_trials(deepcopy=False))
    try:
        warm_start(mem, warm_start_trials, source=study)
        return optimize(mem, objective, kind, n_trials, timeout=timeout, n_jobs=n_jobs, top_up=top_up)
    finally:
        done = [t for t in mem.get_trials(deepcopy=False)[n_before:] if t.state.is_finished()]
        if done:
            study.add_trials(done)
        for key, value in mem.user_attrs.items():
            if study.user_attrs.get(key) != value:
                study.set_user_attr(key, value)


def study_in_memory(study: optuna.Study) -> optuna.Study:
    """A copy of ``study`` in an :class:`~optuna.storages.InMemoryStorage`: picklable without the database."""
    mem = optuna.storages.InMemoryStorage()
    optuna.copy_study(from_study_name=study.study_name, from_storage=study._storage, to_storage=mem)
    copy = optuna.load_study(study_name=study.study_name, storage=mem, sampler=study.sampler, pruner=study.pruner)
    return copy


def plot_history(study: optuna.Study, path: Path, title: str) -> None:
    """Objective per trial (complete dots, pruned crosses at their last reported value) and the best so far."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    trials = study.get_trials(deepcopy=False, states=FINISHED)
    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    done = [(t.number, t.value) for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    pruned = [(t.number, t.intermediate_values[max(t.intermediate_values)]) for t in trials
              if t.state == TrialState.PRUNED and t.intermediate_values]
    if done:
        xs, ys = zip(*done, strict=True)
        ax.scatter(xs, ys, s=14, color="tab:blue", label="complete")
        best = np.maximum.accumulate(np.asarray(ys, dtype=float)) if study.direction.name == "MAXIMIZE" else \
            np.minimum.accumulate(np.asarray(ys, dtype=float))
        ax.step(xs, best, where="post", color="tab:red", label="best so far")
    if pruned:
        xs, ys = zip(*pruned, strict=True)
        ax.scatter(xs, ys, s=14, marker="x", color="tab:gray", label="pruned (last fold mean)")
    ax.set_xlabel("trial")
    ax.set_ylabel("objective")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if done or pruned:
        ax.legend(loc="lower right", fontsize=8)
    atomic_write(path, lambda p: fig.savefig(p, format="png"))


def storage_url(study: optuna.Study) -> str:
    """The study's storage URL, password redacted ("in-memory" when it has none)."""
    st = study._storage
    url = getattr(st, "url", None) or getattr(getattr(st, "_backend", None), "url", None)
    return redact_url(url) if url else "in-memory"


def save_results(study: optuna.Study, results_dir: Path, kind: str, extra: dict[str, Any] | None = None
                 ) -> dict[str, Path]:
    """Write the study pickle, ``best_params_<kind>.json`` and the history PNG; returns their paths.

    The JSON holds the best trial's parameters (what the retrain scripts read), its value and per-fold attributes, and
    the study's identity (name, redacted storage URL, fingerprint, trial counts).
    """
    import joblib

    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    files = {"study": results_dir / STUDY_FILES[kind], "best_params": results_dir / f"best_params_{kind}.json",
             "history": results_dir / f"optuna_history_{kind}.png"}
    mem = study_in_memory(study)
    atomic_write(files["study"], lambda p: joblib.dump(mem, p))
    counts = {s.name.lower(): len(study.get_trials(deepcopy=False, states=(s,))) for s in TrialState}
    best = study.best_trial
    doc = {
        "kind": kind,
        "best_params": best.params,
        "best_value": best.value,
        "best_trial": best.number,
        "best_user_attrs": best.user_attrs,
        "study_name": study.study_name,
        "storage": storage_url(study),
        "study_user_attrs": study.user_attrs,
        "trials": counts,
        "written_at": datetime.now(UTC).isoformat(timespec="seconds"),
        **(extra or {}),
    }
    atomic_write_json(files["best_params"], doc, default=str)
    plot_history(study, files["history"], f"{kind} study {study.study_name}: best {best.value:.4f} (#{best.number})")
    return files


def load_best_params(results_dir: Path, kind: str) -> dict[str, Any]:
    """The tuned parameters in ``results/best_params_<kind>.json`` as the model's fit function takes them (key
    ``model_params``, e.g. nested per signal model; else the flat Optuna ``best_params``). :class:`UserError` when
    the study has not run."""
    path = Path(results_dir) / f"best_params_{kind}.json"
    if not path.exists():
        raise UserError(f"{path}: no tuned {kind} parameters (run python -m ml.tune."
                        f"{'hyperparams' if kind == 'signal' else 'position'} first)")
    doc = json.loads(path.read_text())
    return dict(doc.get("model_params") or doc["best_params"])


def finish(study: optuna.Study, durations: list[float], results_dir: Path, kind: str,
           extra: dict[str, Any] | None = None) -> StudyResult:
    """Save the artefacts and build the :class:`StudyResult`; a study without a complete trial is a user error."""
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise UserError(f"{kind} study {study.study_name!r} has no complete trial (all pruned or failed); "
                        "raise --n-trials or --timeout")
    files = save_results(study, results_dir, kind, extra)
    log.info("%s study %r: best %.4f (trial #%d), %d finished trial(s); wrote %s", kind, study.study_name,
             study.best_value, study.best_trial.number, n_finished(study), ", ".join(p.name for p in files.values()))
    return StudyResult(best_params=dict(study.best_params), best_value=float(study.best_value),
                       n_trials=len(study.trials), per_trial_seconds=durations, study=study, files=files)


# Library threads per trial. Measured on this 2-core machine with other work running (README, "What a trial costs"):
# XGBoost/LightGBM with 2 OpenMP threads took 3-30x LONGER than with 1 as soon as a core was busy elsewhere (their
# per-round barriers spin while a thread is descheduled), and the weekly run shares the machine with the live bot.
# So each trial runs single-threaded and both cores are used by ``n_jobs=2`` parallel trials instead.
DEFAULT_THREADS = 1


def cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
