"""Walk-forward replay: run the Sunday job on past weeks and score every decision on the weeks that followed it.

Why: the gate says "commit" or "rollback" from numbers on a window the search itself partly chose; only the weeks
*after* a decision tell whether it was right. The replay makes that measurable, the way the cron would have lived it:

1. **The job as cron runs it.** For each Sunday S (02:00 UTC) the same 13 phases run through the same code path
   (:func:`ops.pipeline.run_pipeline`) in one replay root that carries ``models/`` + ``config.json``, backups, the
   registry and the study storage from week to week. The run's candle source ends at S
   (``RunOptions.cutoff`` -> :func:`market.data.closed_by`): only bars whose *close* is at or before S exist for it.
2. **The following week, as live.** The set deployed after the decision trades ``[S, S + 1 week)`` starting from
   the trading state the previous week ended with (equity, peak, breakers, streaks, open position, pending order):
   :func:`backtest.engine.run_arrays` with ``state`` and ``close_at_end=False``.
3. **The counterfactual.** Champion and challenger, whatever was decided, each from a fresh account on
   ``[S, S + H weeks)``: a commit was right when the challenger did at least as well by the project's score *and*
   by net profit; a rollback was right when it did worse by both. Weeks without a deployed set count apart.

Policies on the same weeks, each one equity curve: **gated** (as decided), **always adopt** (deploy every
challenger: FreqAI's habit; the challengers are the ones the gated chain built that Sunday), **never retrain** (the
first set the gated chain deployed, frozen), **buy and hold** (the symbol, no costs, for scale).

Parallel: the challenger of week k depends on the data up to S_k and on the deployed ``config.json`` it starts
from (its trading values enter the studies' fold backtests, the risk labels and the sweep's fallback), not on the
deployed models. Phases 2, 3 and 5-11 of week k therefore run ahead in worker processes (``--workers``) or on a Dask
cluster (``--scheduler``), speculating that ``config.json`` will still be what it is at dispatch time; phases 1, 4,
12 and 13 (backup + baseline, SHAP of the deployed models, the evaluation against the champion, the gate and the
switch) run in order in the replay root. A speculation whose ``config.json`` changed meanwhile (a commit changed the
trading values) is discarded and that week is rebuilt in the root, so the result is the sequential one, always.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import shutil
import tarfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.config import Config, config_to_json, load_config, parse_config
from core.errors import UserError
from core.io import atomic_write, atomic_write_json, fsync_dir, fsync_tree
from core.paths import Paths
from ml.models.manifest import signing_key

log = logging.getLogger("replay")

WEEK = pd.Timedelta(weeks=1)
CRON_HOUR = 2  # Sunday 02:00 UTC, as in crontab.example
WORKER_PHASES = [2, 3, 5, 6, 7, 8, 9, 10, 11]  # the challenger build: no deployed state read
POLICIES = ("gated", "adopt", "frozen", "hold")
POLICY_LABELS = {"gated": "gated (ours)", "adopt": "always adopt", "frozen": "never retrain", "hold": "buy and hold"}


# ------------------------------------------------------------------------------------------------ options
@dataclass
class ReplayOptions:
    """What a replay does; saved as ``spec.json`` so ``--resume`` continues with exactly the same choices."""

    start: str
    weeks: int
    data: str | None = None
    demo: bool = False
    quick: bool = False
    n_trials: int | None = None
    horizon_weeks: int = 4
    gate: str | None = None  # "seed" | "default": overrides config pipeline.gate.mode when that key exists

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sundays(start: Any, weeks: int) -> list[pd.Timestamp]:
    """``weeks`` Sundays at 02:00 UTC from the first Sunday on or after ``start``."""
    ts = pd.Timestamp(start)
    ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
    day = ts.normalize()
    first = day + pd.Timedelta(days=(6 - day.day_of_week) % 7) + pd.Timedelta(hours=CRON_HOUR)
    if first < ts:
        first += WEEK
    return [first + k * WEEK for k in range(weeks)]


def run_id_of(sunday: pd.Timestamp) -> str:
    """The run id of a replayed week: its Sunday (the format of ``ops.pipeline.new_run_id``)."""
    return sunday.strftime("%Y%m%dT%H%M%SZ")


def default_replay_id(opts: ReplayOptions) -> str:
    src = "demo" if opts.demo else Path(opts.data or "store").stem
    gate = f"-{opts.gate}" if opts.gate else ""
    return f"{pd.Timestamp(opts.start):%Y%m%d}-{opts.weeks}w-{src}{'-quick' if opts.quick else ''}{gate}"


def apply_gate_mode(raw: dict[str, Any], mode: str | None) -> tuple[dict[str, Any], str]:
    """Set ``pipeline.gate.mode`` in a raw config when this version's schema has it; returns the effective mode.

    Until the search-aware gate exists the only gate is the seed's rule, so ``seed`` is what runs either way and a
    ``default`` request is reported as not available (never silently pretended)."""
    from core.config import PipelineCfg

    if mode is None:
        gate = raw.get("pipeline", {}).get("gate")
        return raw, str(gate.get("mode", "default")) if isinstance(gate, dict) else "seed"
    if mode not in ("seed", "default"):
        raise UserError(f"--gate: '{mode}' is not one of seed, default")
    if "gate" in PipelineCfg.model_fields:
        gate = raw.setdefault("pipeline", {}).get("gate")
        if not isinstance(gate, dict):
            gate = {}
        gate["mode"] = mode
        raw["pipeline"]["gate"] = gate
        return raw, mode
    if mode == "default":
        log.warning("--gate default: this version has no pipeline.gate.mode; the seed gate is what runs")
    return raw, "seed"


# ------------------------------------------------------------------------------------------------ model sets
def _sha(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(hashlib.sha256(p).digest())
    return h.hexdigest()[:12]


class SetStore:
    """Every model set that was champion or challenger, once, by content (``sets/<id>/models`` + ``config.json``).

    Why copies: backups are pruned and staging folders are switched in; the scoring needs the exact sets that
    were decided about, after the fact, and a resumed replay must find them again."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def put(self, models_dir: Path, config_path: Path) -> str | None:
        manifest = models_dir / "manifest.json"
        if not manifest.is_file() or not config_path.is_file():
            return None
        sid = _sha(manifest.read_bytes(), config_path.read_bytes())
        dest = self.folder / sid
        if not dest.is_dir():
            tmp = self.folder / f".tmp-{sid}-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(models_dir, tmp / "models")
            shutil.copy2(config_path, tmp / "config.json")
            fsync_tree(tmp)  # on disk before the rename publishes it: a resumed replay trusts what it finds
            os.replace(tmp, dest)
            fsync_dir(self.folder)
        return sid

    def models(self, sid: str) -> Path:
        return self.folder / sid / "models"

    def config(self, sid: str) -> Config:
        return load_config(self.folder / sid / "config.json")


# ------------------------------------------------------------------------------------------------ scoring
@dataclass
class Segment:
    """One policy's bars of one window: marked equity, closed trades (global bar numbers), the state after."""

    equity: pd.Series
    trades: pd.DataFrame
    state: Any  # backtest.policy.State (global bar numbers)
    trips: int = 0


def _shift_state(state: Any, delta: int) -> Any:
    """A State with its bar numbers moved by ``delta`` (global <-> positions in a window's arrays)."""
    from backtest.policy import State

    d = state.to_dict()
    for k in ("entry_bar", "last_bar"):
        if d[k] >= 0:
            d[k] += delta
    d["cooldown_until"] += delta
    return State.from_dict(d)


class Scorer:
    """Backtests of stored model sets on windows of one candle frame, with the trading state carried.

    Features are computed once for the whole frame (they are causal and prefix-invariant: a row depends only on the
    bars before it, ``market.features``), predictions per set on a window that starts ``HISTORY_BARS`` before the
    Sunday (what the live bot keeps)."""

    def __init__(self, candles: pd.DataFrame, features: pd.DataFrame, sets: SetStore) -> None:
        from backtest.policy import decision_clock

        self.candles = candles
        self.features = features
        self.sets = sets
        self.index = candles.index
        self.day = decision_clock(self.index.as_unit("ns").asi8)[1]
        self._arrays: dict[tuple[str, int, int], Any] = {}

    def pos(self, ts: pd.Timestamp) -> int:
        return int(self.index.searchsorted(ts, side="left"))

    def _prepared(self, sid: str, lo: int, hi: int) -> tuple[Any, Any, Config]:
        from backtest.engine import prepare_arrays
        from backtest.policy import make_params
        from ml.models.bundle import load_bundle

        key = (sid, lo, hi)
        if key not in self._arrays:
            if len(self._arrays) > 8:
                self._arrays.pop(next(iter(self._arrays)))
            cfg = self.sets.config(sid)
            bundle = load_bundle(self.sets.models(sid), list(self.features.columns))
            arrays = prepare_arrays(self.candles.iloc[lo:hi], self.features.iloc[lo:hi], bundle, cfg)
            self._arrays[key] = (arrays, make_params(cfg), cfg)
        return self._arrays[key]

    def run(self, sid: str, start: pd.Timestamp, end: pd.Timestamp, *, state: Any = None, close_at_end: bool,
            horizon_end: pd.Timestamp | None = None) -> Segment:
        """Set ``sid`` trades the bars opening in ``[start, end)`` from ``state`` (None: a fresh account)."""
        from backtest.engine import run_arrays
        from backtest.live import HISTORY_BARS

        s, e = self.pos(start), self.pos(end)
        hi = max(e, self.pos(horizon_end)) if horizon_end is not None else e
        lo = max(0, s - HISTORY_BARS)
        arrays, params, _ = self._prepared(sid, lo, hi)
        local = _shift_state(state, -lo) if state is not None else None
        run = run_arrays(arrays, params, s - lo, e - lo, state=local, close_at_end=close_at_end)
        tr = run.trades
        trades = pd.DataFrame({"entry_bar": tr["entry"] + lo, "exit_bar": tr["exit"] + lo, "side": tr["side"],
                               "size": tr["size"], "entry_price": tr["entry_px"], "exit_price": tr["exit_px"],
                               "pnl": tr["pnl"], "r_multiple": tr["r"]})
        return Segment(pd.Series(run.equity, index=self.index[s:e]), trades, _shift_state(run.final_state, lo),
                       int(run.trip_bar.size))

    def flat(self, start: pd.Timestamp, end: pd.Timestamp, state: Any) -> Segment:
        """No deployed set: the account does not trade, its state is kept as it is."""
        s, e = self.pos(start), self.pos(end)
        return Segment(pd.Series(np.full(e - s, float(state.equity)), index=self.index[s:e]),
                       pd.DataFrame(columns=["entry_bar", "exit_bar", "side", "size", "entry_price", "exit_price",
                                             "pnl", "r_multiple"]), state)

    def metrics(self, equity: pd.Series, trades: pd.DataFrame, initial: float, min_trades: int, trips: int = 0
                ) -> dict[str, Any]:
        from backtest.metrics import compute_metrics, json_safe

        s = self.pos(equity.index[0])
        day = self.day[s:s + len(equity)]
        m = compute_metrics(equity.to_numpy(np.float64), day, trades["pnl"].to_numpy(np.float64),
                            trades["r_multiple"].to_numpy(np.float64), trades["entry_bar"].to_numpy(np.int64),
                            trades["exit_bar"].to_numpy(np.int64), float(initial), trips, int(min_trades))
        return json_safe(m)


def _brief(m: dict[str, Any] | None) -> dict[str, Any] | None:
    if not m:
        return None
    return {k: m.get(k) for k in ("score", "return_pct", "net_profit", "max_drawdown_pct", "sharpe", "trades")}


def judge(action: str, champion: dict[str, Any] | None, challenger: dict[str, Any] | None) -> dict[str, Any] | None:
    """Was the decision right, by the following weeks? None when there is nothing to judge (no deployed set: the
    week counts apart; or no challenger). A commit is right when the challenger did at least as well as the
    champion by score and by net profit; a rollback is right when the challenger did worse by both."""
    if champion is None or challenger is None or action not in ("commit", "rollback"):
        return None
    better_score = challenger["score"] >= champion["score"]
    better_profit = challenger["net_profit"] >= champion["net_profit"]
    if action == "commit":
        by_score, by_profit = better_score, better_profit
    else:
        by_score, by_profit = not better_score, not better_profit
    return {"by_score": bool(by_score), "by_profit": bool(by_profit), "right": bool(by_score and by_profit)}


def tally(weeks: list[dict[str, Any]]) -> dict[str, int]:
    """Counts over week records: decisions, judged weeks, right ones, weeks counted apart."""
    out = {"weeks": len(weeks), "commits": 0, "rollbacks": 0, "errors": 0, "judged": 0, "right": 0,
           "right_by_score": 0, "right_by_profit": 0, "no_deployed_set": 0}
    for w in weeks:
        a = w.get("decision")
        out["commits"] += a == "commit"
        out["rollbacks"] += a == "rollback"
        out["errors"] += a == "error"
        if w.get("champion") is None:
            out["no_deployed_set"] += 1
        j = w.get("judgement")
        if j:
            out["judged"] += 1
            out["right"] += j["right"]
            out["right_by_score"] += j["by_score"]
            out["right_by_profit"] += j["by_profit"]
    return out


# ------------------------------------------------------------------------------------------------ workers
def build_challenger(spec: dict[str, Any]) -> dict[str, Any]:
    """Phases 2, 3 and 5-11 of one week in a scratch root (a worker process or a Dask worker).

    Only the data up to the cutoff and the ``config.json`` given are read. Returns where the outputs are, or (for a
    remote worker, ``ship=True``) the outputs themselves as a tar archive."""
    from ops import deploy
    from ops.lock import run_lock
    from ops.pipeline import RunOptions, run_pipeline

    t0 = time.perf_counter()
    root = Path(spec["scratch"])
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    (root / "config.json").write_text(spec["config_json"])
    paths = Paths.of(root)
    paths.results.mkdir()
    opts = RunOptions(**{**spec["options"], "phases": WORKER_PHASES})
    with run_lock(paths):
        deploy.recover(paths)
        run_pipeline(paths, opts, run_id=spec["run_id"])
    out: dict[str, Any] = {"scratch": str(root), "config_sha": spec["config_sha"], "run_id": spec["run_id"],
                           "seconds": time.perf_counter() - t0, "pid": os.getpid()}
    if spec.get("ship"):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for rel in (f"results/{spec['run_id']}", f"staging/{spec['run_id']}"):
                if (root / rel).exists():
                    tar.add(root / rel, arcname=rel)
        out["archive"] = buf.getvalue()
        shutil.rmtree(root, ignore_errors=True)
    return out


class _Pool:
    """One interface over a local process pool and a Dask cluster: ``submit(fn, arg) -> future.result()``."""

    def __init__(self, workers: int, scheduler: str | None) -> None:
        self.ship = scheduler is not None
        self.size = workers
        self._client: Any = None
        self._pool: ProcessPoolExecutor | None = None
        if scheduler is not None:
            from distributed import Client

            self._client = Client(scheduler, timeout="30s")
            self.size = max(workers, len(self._client.scheduler_info().get("workers", {})) or 1)
        else:
            import multiprocessing as mp

            self._pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"))

    def submit(self, fn: Callable[[dict[str, Any]], dict[str, Any]], arg: dict[str, Any]) -> Any:
        if self._client is not None:
            return self._client.submit(fn, arg, pure=False)
        from concurrent.futures.process import BrokenProcessPool

        assert self._pool is not None
        try:
            return self._pool.submit(fn, arg)
        except BrokenProcessPool:  # a worker died (killed, out of memory): a fresh pool, the replay goes on
            import multiprocessing as mp

            log.warning("a build worker died; starting a new process pool")
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = ProcessPoolExecutor(max_workers=self.size, mp_context=mp.get_context("spawn"))
            return self._pool.submit(fn, arg)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)


# ------------------------------------------------------------------------------------------------ the replay
@dataclass
class _Chain:
    """What carries from week to week besides the replay root: the policies' trading states and sets."""

    states: dict[str, Any] = field(default_factory=dict)
    adopt_set: str | None = None
    frozen_set: str | None = None


class Replay:
    """One replay under ``<project>/results/replay-<id>/`` (its own root under ``root/``, never another one)."""

    def __init__(self, project: Paths, replay_id: str, opts: ReplayOptions, *, resume: bool = False,
                 workers: int = 1, scheduler: str | None = None,
                 progress: Callable[[str], None] = print) -> None:
        self.dir = project.results / f"replay-{replay_id}"
        self.id = replay_id
        self.progress = progress
        self.workers = max(1, int(workers))
        self.scheduler = scheduler
        spec_path = self.dir / "spec.json"
        if resume:
            if not spec_path.is_file():
                raise UserError(f"{self.dir}: no replay to resume (spec.json missing)")
            spec = json.loads(spec_path.read_text())
            self.opts = ReplayOptions(**spec["options"])
            self.gate_mode = spec["gate_mode"]
        else:
            if spec_path.exists():
                raise UserError(f"{self.dir}: replay {replay_id} exists already (use --resume, or another --id)")
            self.opts = opts
            self._validate(project)
            self.dir.mkdir(parents=True, exist_ok=True)
            raw = json.loads(load_config(project.config).model_dump_json())
            raw, self.gate_mode = apply_gate_mode(raw, opts.gate)
            cfg = parse_config(raw, f"{project.config} (+ --gate)")
            root = self.dir / "root"
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
            (root / "config.json").write_text(config_to_json(cfg))
            (root / "results").mkdir()
            atomic_write_json(spec_path, {"id": replay_id, "options": opts.to_dict(), "gate_mode": self.gate_mode,
                                          "created": pd.Timestamp.now("UTC").isoformat()})
        # One signing key for everything this replay saves and loads: its root's sets, the copies under sets/ and
        # the local workers' scratch roots under work/ all lie below self.dir, where the key file is looked for first
        # (ml.models.manifest.key_root). Remote Dask workers need MODEL_SIGNING_KEY in their environment instead.
        signing_key(self.dir, create=True)
        self.paths = Paths.of(self.dir / "root")
        self.sets = SetStore(self.dir / "sets")
        (self.dir / "weeks").mkdir(exist_ok=True)
        self.sundays = sundays(self.opts.start, self.opts.weeks)

    def _validate(self, project: Paths) -> None:
        o = self.opts
        if o.weeks < 1:
            raise UserError("--weeks must be >= 1")
        if o.horizon_weeks < 1:
            raise UserError("--horizon-weeks must be >= 1")
        if o.n_trials is not None and o.n_trials < 1:
            raise UserError("--n-trials must be >= 1")
        if o.data is None and not o.demo:
            raise UserError("give --data FILE or --demo: the replay needs one fixed candle history")
        if o.data is not None and not Path(o.data).is_file():
            raise UserError(f"{o.data}: candle file not found")
        try:
            pd.Timestamp(o.start)
        except ValueError:
            raise UserError(f"--start: '{o.start}' is not a date") from None

    # -------------------------------------------------------------------------------------------- inputs
    def _run_options(self, sunday: pd.Timestamp) -> Any:
        from ops.pipeline import RunOptions

        o = self.opts
        return RunOptions(demo=o.demo, data=str(Path(o.data).resolve()) if o.data else None, quick=o.quick,
                          n_trials=o.n_trials, cutoff=sunday.isoformat())

    def _run_cfg(self) -> Config:
        """The config the weekly runs train with (config.json + --quick / --n-trials), for the scoring frame."""
        from ops.pipeline import RunContext

        ctx = RunContext(paths=self.paths, run_id="replay", options=self._run_options(self.sundays[0]),
                         report=None, cfg=load_config(self.paths.config))  # type: ignore[arg-type]
        return ctx.run_cfg

    def _scorer(self) -> Scorer:
        """The whole candle history (the runs only ever see it cut at their Sunday) and its features."""
        from market.data import validate
        from market.data.demo import demo_candles
        from market.data.sources import read_file
        from market.features import build_features

        cfg = self._run_cfg()
        if self.opts.demo:
            frame, name = demo_candles(cfg), "demo"
        else:
            frame, name = read_file(self.opts.data, cfg), str(self.opts.data)
        candles, _ = validate(frame, cfg, name)
        first, last = self.sundays[0], self.sundays[-1] + WEEK
        if candles.index[0] > first - pd.Timedelta(days=30) or candles.index[-1] + pd.Timedelta(minutes=15) < last:
            raise UserError(f"{name}: candles cover {candles.index[0]} .. {candles.index[-1]}; a replay of "
                            f"{self.opts.weeks} weeks from {first} needs history before it and bars up to {last}")
        return Scorer(candles, build_features(candles, cfg), self.sets)

    # -------------------------------------------------------------------------------------------- one week
    def _config_sha(self) -> str:
        return hashlib.sha256(self.paths.config.read_bytes()).hexdigest()

    def _spec(self, k: int) -> dict[str, Any]:
        rid = run_id_of(self.sundays[k])
        return {"scratch": str(self.dir / "work" / rid), "config_json": self.paths.config.read_text(),
                "config_sha": self._config_sha(), "run_id": rid,
                "options": self._run_options(self.sundays[k]).to_dict(), "ship": self.scheduler is not None}

    def _import(self, built: dict[str, Any]) -> None:
        """Adopt a worker's phases 2, 3, 5-11 as the first phases of this week's run in the replay root."""
        from ops.pipeline import load_state, save_state

        rid = built["run_id"]
        src = Path(built["scratch"])
        if "archive" in built:
            src = self.dir / "work" / f"{rid}-shipped"
            shutil.rmtree(src, ignore_errors=True)
            with tarfile.open(fileobj=io.BytesIO(built["archive"]), mode="r:gz") as tar:
                tar.extractall(src, filter="data")
        for rel in (f"results/{rid}", f"staging/{rid}"):
            dst = self.paths.root / rel
            shutil.rmtree(dst, ignore_errors=True)
            if (src / rel).exists():
                shutil.copytree(src / rel, dst)
        st = load_state(self.paths, rid)
        st["options"]["phases"] = None
        st["finished"] = False
        save_state(self.paths, rid, st)
        shutil.rmtree(src, ignore_errors=True)

    def _run_week(self, k: int, built: dict[str, Any] | None) -> tuple[dict[str, Any], str]:
        """The job for Sunday k in the replay root (finishing a run a kill interrupted); returns its report."""
        from ops import deploy
        from ops.lock import run_lock
        from ops.pipeline import load_state, run_pipeline, save_state, unfinished_runs

        rid = run_id_of(self.sundays[k])
        state_file = self.paths.results / rid / "state.json"
        with run_lock(self.paths):
            recovered = deploy.recover(self.paths)
            if recovered:
                log.warning("replay root recovery: %s", recovered)
            if state_file.is_file() and load_state(self.paths, rid).get("finished"):
                how = "finished before"
            elif state_file.is_file():
                run_pipeline(self.paths, self._run_options(self.sundays[k]), resume=True)
                how = "resumed"
            elif built is not None and built["config_sha"] == self._config_sha():
                for other in unfinished_runs(self.paths):  # what a new run would do first (run_pipeline)
                    st = load_state(self.paths, other)
                    st.update(finished=True, abandoned=True)
                    save_state(self.paths, other, st)
                self._import(built)
                run_pipeline(self.paths, self._run_options(self.sundays[k]), resume=True)
                how = "built ahead"
            else:
                run_pipeline(self.paths, self._run_options(self.sundays[k]), run_id=rid)
                how = "sequential" if built is None else "rebuilt (config changed since dispatch)"
        return json.loads((self.paths.results / rid / "report.json").read_text()), how

    def _sets_of(self, rid: str, report: dict[str, Any]) -> tuple[str | None, str | None, str | None]:
        """(champion, challenger, deployed after the decision) as stored set ids."""
        backup = self.paths.backups / rid
        champion = self.sets.put(backup / "models", backup / "config.json")
        staged = self.paths.staging / rid / "models"
        cand = self.paths.results / rid / "config.candidate.json"
        action = (report.get("decision") or {}).get("action")
        deployed = self.sets.put(self.paths.models, self.paths.config)
        challenger = deployed if action == "commit" else self.sets.put(staged, cand)
        return champion, challenger, deployed

    def _week_record(self, k: int, report: dict[str, Any], how: str, seconds: float, scorer: Scorer,
                     chain: _Chain) -> tuple[dict[str, Any], dict[str, Segment]]:
        s = self.sundays[k]
        rid = run_id_of(s)
        dec = report.get("decision") or {}
        failed = [p for p in report.get("phases", []) if p.get("status") == "failed"]
        action = dec.get("action") if dec else None
        if action is None:
            action = "error"
        champion, challenger, deployed = self._sets_of(rid, report)
        if action == "error":
            deployed = champion
        ev = report.get("evaluation") or {}
        end1 = s + WEEK
        endh = min(s + self.opts.horizon_weeks * WEEK, scorer.index[-1] + pd.Timedelta(minutes=15))
        cfg = load_config(self.paths.config)
        min_trades = cfg.profile.min_trades
        cf: dict[str, Any] = {}
        for name, sid in (("champion", champion), ("challenger", challenger)):
            if sid is None:
                cf[name] = None
                continue
            one = scorer.run(sid, s, end1, close_at_end=True, horizon_end=endh)
            hor = scorer.run(sid, s, endh, close_at_end=True)
            init = float(self.sets.config(sid).trading.initial_equity)
            cf[name] = {"next_week": _brief(scorer.metrics(one.equity, one.trades, init, min_trades, one.trips)),
                        "horizon": _brief(scorer.metrics(hor.equity, hor.trades, init, min_trades, hor.trips))}
        judgement = judge(action, (cf["champion"] or {}).get("horizon"), (cf["challenger"] or {}).get("horizon"))
        # the policies: one week each, carrying their trading state
        if chain.frozen_set is None and deployed is not None:
            chain.frozen_set = deployed
        if challenger is not None:
            chain.adopt_set = challenger
        last = k == len(self.sundays) - 1
        segs: dict[str, Segment] = {}
        for pol, sid in (("gated", deployed), ("adopt", chain.adopt_set), ("frozen", chain.frozen_set)):
            st = chain.states[pol]
            segs[pol] = (scorer.run(sid, s, end1, state=st, close_at_end=last, horizon_end=endh) if sid
                         else scorer.flat(s, end1, st))
            chain.states[pol] = segs[pol].state
        ev_keys = ("baseline_full", "new_full", "baseline_holdout", "new_holdout")
        rec = {
            "week": k + 1, "sunday": str(s), "cutoff": str(s), "run_id": rid, "decision": action,
            "reason": dec.get("reason") or ("; ".join(f"phase {p['number']}: {p.get('error')}" for p in failed)),
            "gate": report.get("gate"), "gate_mode": self.gate_mode, "built": how, "seconds": round(seconds, 1),
            "champion": champion, "challenger": challenger, "deployed": deployed,
            "oos": {k2: _brief(ev.get(k2)) for k2 in ev_keys},
            "counterfactual": cf, "horizon_end": str(endh), "judgement": judgement,
            "seen": _seen(self.paths, rid, report),
            "policies": {p: {"sets": sid, "start_equity": float(segs[p].equity.iloc[0]),
                             "end_equity": float(segs[p].equity.iloc[-1]), "trades": len(segs[p].trades)}
                         for p, sid in (("gated", deployed), ("adopt", chain.adopt_set),
                                        ("frozen", chain.frozen_set))},
            "chain": {"states": {p: st.to_dict() for p, st in chain.states.items()}, "adopt_set": chain.adopt_set,
                      "frozen_set": chain.frozen_set},
        }
        return rec, segs

    # -------------------------------------------------------------------------------------------- the loop
    def run(self) -> dict[str, Any]:
        from backtest.policy import State

        t0 = time.perf_counter()
        scorer = self._scorer()
        init = float(load_config(self.paths.config).trading.initial_equity)
        done = self._finished_weeks()
        chain = _Chain(states={p: State.initial(init) for p in ("gated", "adopt", "frozen")})
        if done:
            c = done[-1]["chain"]
            chain = _Chain(states={p: State.from_dict(d) for p, d in c["states"].items()},
                           adopt_set=c["adopt_set"], frozen_set=c["frozen_set"])
            self.progress(f"resuming replay {self.id} after week {len(done)} of {len(self.sundays)}")
        pool = _Pool(self.workers, self.scheduler) if (self.workers > 1 or self.scheduler) else None
        futures: dict[int, Any] = {}
        try:
            for k in range(len(done), len(self.sundays)):
                if pool is not None:
                    for j in range(k, min(len(self.sundays), k + pool.size + 1)):
                        rid = run_id_of(self.sundays[j])
                        if j not in futures and not (self.paths.results / rid / "state.json").exists():
                            try:
                                futures[j] = pool.submit(build_challenger, self._spec(j))
                            except Exception as exc:  # no worker available: that week is built in the root
                                log.warning("week %d: could not dispatch its build (%s)", j + 1, exc)
                tw = time.perf_counter()
                built = None
                fut = futures.pop(k, None)
                if fut is not None:
                    try:
                        built = fut.result()
                    except Exception as exc:  # a worker failure: the week is built here instead
                        log.warning("week %d: the worker failed (%s); building it in the replay root", k + 1, exc)
                try:
                    report, how = self._run_week(k, built)
                except UserError as exc:
                    rid = run_id_of(self.sundays[k])
                    p = self.paths.results / rid / "report.json"
                    report = json.loads(p.read_text()) if p.is_file() else {"phases": []}
                    if not any(ph.get("status") == "failed" for ph in report.get("phases", [])):
                        # failed outside a phase (e.g. the lock or the recovery): the error is the reason
                        report.setdefault("phases", []).append({"number": 0, "status": "failed", "error": str(exc)})
                    how = "failed"
                secs = time.perf_counter() - tw
                rec, segs = self._week_record(k, report, how, secs, scorer, chain)
                self._save_week(k, rec, segs)
                done.append(rec)
                g = segs["gated"].equity
                self.progress(f"week {k + 1}/{len(self.sundays)} {self.sundays[k]:%Y-%m-%d %H:%M} "
                              f"{rec['decision']:<8} gated week {100 * (g.iloc[-1] / g.iloc[0] - 1):+.2f}% "
                              f"right={_yes(rec['judgement'])} [{how}] {secs:.1f}s | {rec['reason'][:90]}")
        finally:
            if pool is not None:
                for f in futures.values():
                    with contextlib.suppress(Exception):
                        f.cancel()
                pool.close()
            shutil.rmtree(self.dir / "work", ignore_errors=True)
        result = self._summarise(done, scorer, time.perf_counter() - t0)
        return result

    def summary(self) -> dict[str, Any]:
        """replay.json / replay.md / replay.png from the weeks finished so far (a replay still running, or killed)."""
        done = self._finished_weeks()
        if not done:
            raise UserError(f"{self.dir}: no finished week yet")
        spent = sum(float(w.get("seconds") or 0.0) for w in done)
        return self._summarise(done, self._scorer(), spent)

    def _finished_weeks(self) -> list[dict[str, Any]]:
        out = []
        for k in range(len(self.sundays)):
            p = self.dir / "weeks" / f"{k + 1:03d}.json"
            if not (p.is_file() and (self.dir / "weeks" / f"{k + 1:03d}.parquet").is_file()):
                break
            out.append(json.loads(p.read_text()))
        return out

    def _save_week(self, k: int, rec: dict[str, Any], segs: dict[str, Segment]) -> None:
        """Curves first, then the record (its presence marks the week finished for --resume)."""
        base = self.dir / "weeks" / f"{k + 1:03d}"
        eq = pd.DataFrame({p: s.equity for p, s in segs.items()})
        atomic_write(base.with_suffix(".parquet"), eq.to_parquet)
        trades = pd.concat([s.trades.assign(policy=p) for p, s in segs.items() if len(s.trades)],
                           ignore_index=True) if any(len(s.trades) for s in segs.values()) else pd.DataFrame()
        trades.to_csv(base.with_suffix(".trades.csv"), index=False)
        atomic_write_json(base.with_suffix(".json"), rec, default=str)

    # -------------------------------------------------------------------------------------------- outputs
    def _summarise(self, weeks: list[dict[str, Any]], scorer: Scorer, seconds: float) -> dict[str, Any]:
        cfg = load_config(self.paths.config)
        init = float(cfg.trading.initial_equity)
        curves = pd.concat([pd.read_parquet(self.dir / "weeks" / f"{k + 1:03d}.parquet")
                            for k in range(len(weeks))])
        trades = []
        for k in range(len(weeks)):
            p = self.dir / "weeks" / f"{k + 1:03d}.trades.csv"
            if p.stat().st_size > 1:
                trades.append(pd.read_csv(p))
        all_tr = pd.concat(trades, ignore_index=True) if trades else pd.DataFrame(columns=["policy", "pnl"])
        s0 = scorer.pos(curves.index[0])
        px0 = float(scorer.candles["open"].iloc[s0])
        curves["hold"] = init * scorer.candles["close"].reindex(curves.index).to_numpy() / px0
        totals = {}
        empty = pd.DataFrame({"pnl": [], "r_multiple": [], "entry_bar": [], "exit_bar": []})
        for pol in POLICIES:
            tr = all_tr[all_tr["policy"] == pol] if len(all_tr) else empty
            if pol == "hold":
                tr = empty
            m = scorer.metrics(curves[pol], tr, init, cfg.profile.min_trades)
            if pol == "hold":
                m["trades"] = 1
            totals[pol] = _brief(m)
        t = tally(weeks)
        result = {
            "id": self.id, "options": self.opts.to_dict(), "gate_mode": self.gate_mode,
            "demo": self.opts.demo, "horizon_weeks": self.opts.horizon_weeks, "tally": t, "totals": totals,
            "weeks": [{k: v for k, v in w.items() if k != "chain"} for w in weeks],
            "curves": {"index": [str(i) for i in curves.index[::16]],
                       **{p: [round(float(x), 2) for x in curves[p].to_numpy()[::16]] for p in POLICIES}},
            "replay_s": round(seconds, 1), "verdict": verdict(t, totals, self.opts.horizon_weeks),
            "finished": len(weeks) == len(self.sundays),
        }
        tmp = self.dir / "replay.json.tmp"
        tmp.write_text(json.dumps(result, indent=2, default=str))
        os.replace(tmp, self.dir / "replay.json")
        (self.dir / "replay.md").write_text(render_markdown(result))
        plot_replay(self.dir / "replay.png", curves, weeks, title=f"Walk-forward replay {self.id}"
                    + (" - DEMO DATA" if self.opts.demo else ""))
        return result


def _seen(paths: Paths, rid: str, report: dict[str, Any]) -> dict[str, Any]:
    """The last bar the run could see and the ranges it recorded (the cut's evidence, in the week record)."""
    out: dict[str, Any] = {}
    cand = paths.results / rid / "candles.parquet"
    if cand.is_file():
        idx = pd.read_parquet(cand, columns=["close"]).index
        out["last_bar_open"] = str(idx[-1])
        out["last_bar_close"] = str(idx[-1] + pd.Timedelta(minutes=15))
    man = paths.staging / rid / "models" / "manifest.json"
    if not man.is_file() and (report.get("decision") or {}).get("action") == "commit":
        man = paths.models / "manifest.json"
    if man.is_file():
        models = json.loads(man.read_text()).get("models", {})
        ranges = [m.get("train_range") for m in models.values() if isinstance(m, dict) and m.get("train_range")]
        if ranges:
            out["train_end"] = max(str(r.get("end")) for r in ranges)
    return out


def _yes(j: dict[str, Any] | None) -> str:
    return "-" if not j else ("yes" if j["right"] else "no")


def verdict(t: dict[str, int], totals: dict[str, Any], horizon: int) -> str:
    """One sentence a trader can act on."""
    g, a, f = (totals[p]["return_pct"] for p in ("gated", "adopt", "frozen"))
    judged = t["judged"]
    right = f"{t['right']} of {judged} judged decisions were right over the following {horizon} weeks" if judged \
        else "no decision could be judged (no deployed set before the challengers)"
    best = max(("gated", g), ("always adopt", a), ("never retrain", f), key=lambda x: x[1])[0]
    if max(g, a, f) - min(g, a, f) < 1e-9:
        helped, best = "the three traded the same sets, so the gate made no difference yet", "a tie"
    elif g >= max(a, f):
        helped = "the gate helped"
    else:
        helped = "the gate did not beat " + ("always adopting" if a > g else "never retraining")
    n = t["weeks"]
    return (f"Over {n} week{'s' if n != 1 else ''} the gated bot returned {g:+.2f}% (always adopt {a:+.2f}%, never "
            f"retrain {f:+.2f}%; best: {best}): {helped}, and {right}.")


def render_markdown(r: dict[str, Any]) -> str:
    demo = " (DEMO DATA)" if r["demo"] else ""
    o = r["options"]
    src = "demo" if o["demo"] else o["data"]
    lines = [f"# Walk-forward replay {r['id']}{demo}", "",
             f"{r['tally']['weeks']} Sunday{'s' if r['tally']['weeks'] != 1 else ''}"
             + ("" if r.get("finished", True) else f" (of {o['weeks']}: in progress)")
             + f" from {o['start']} on {src}{', --quick' if o['quick'] else ''}; gate "
             f"{r['gate_mode']}; horizon {r['horizon_weeks']} weeks; {r['replay_s']:.0f} s.", "",
             f"**Verdict:** {r['verdict']}", "",
             "| policy | return % | max DD % | Sharpe (daily) | trades |", "|---|---:|---:|---:|---:|"]
    for p in POLICIES:
        m = r["totals"][p]
        lines.append(f"| {POLICY_LABELS[p]} | {m['return_pct']:+.2f} | {m['max_drawdown_pct']:.2f} | "
                     f"{m['sharpe']:.2f} | {m['trades']} |")
    lines += ["", "| week | Sunday | decision | OOS score champion -> challenger | gated next week % | "
              f"{r['horizon_weeks']}w champion: score / net | {r['horizon_weeks']}w challenger: score / net | right |",
              "|---:|---|---|---|---:|---|---|---|"]
    for w in r["weeks"]:
        oos = w["oos"]
        b = oos.get("baseline_full") or {}
        n = oos.get("new_full") or {}
        pol = w["policies"]["gated"]
        gw = 100 * (pol["end_equity"] / pol["start_equity"] - 1) if pol["start_equity"] else 0.0
        cf = w["counterfactual"]

        def hz(x: dict[str, Any] | None) -> str:
            h = (x or {}).get("horizon")
            return "none" if not h else f"{h['score']:+.2f} / {h['net_profit']:+.0f}"

        right = "apart (no deployed set)" if w["champion"] is None else _yes(w["judgement"])
        lines.append(f"| {w['week']} | {w['sunday'][:16]} | {w['decision']} | {_num(b.get('score'))} -> "
                     f"{_num(n.get('score'))} | {gw:+.2f} | {hz(cf.get('champion'))} | {hz(cf.get('challenger'))} "
                     f"| {right} |")
    t = r["tally"]
    lines += ["", f"Decisions: {t['commits']} commits, {t['rollbacks']} rollbacks, {t['errors']} errors; "
              f"{t['no_deployed_set']} weeks without a deployed set (counted apart). Right: {t['right']} of "
              f"{t['judged']} (by score {t['right_by_score']}, by net profit {t['right_by_profit']}).", "",
              "![equity curves](replay.png)", ""]
    return "\n".join(lines)


def _num(x: Any) -> str:
    return "none" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{float(x):+.3f}"


def plot_replay(path: Path, curves: pd.DataFrame, weeks: list[dict[str, Any]], title: str) -> Path:
    """The policies' equity curves with a marker at every Sunday: commit (green), rollback (red), other (grey)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"gated": "tab:blue", "adopt": "tab:orange", "frozen": "tab:green", "hold": "tab:gray"}
    fig, ax = plt.subplots(figsize=(11, 5))
    try:
        for p in POLICIES:
            ax.plot(curves.index, curves[p].to_numpy(), lw=1.6 if p == "gated" else 1.0, color=colors[p],
                    ls={"adopt": "--", "frozen": ":"}.get(p, "-"), label=POLICY_LABELS[p],
                    alpha=1.0 if p != "hold" else 0.6)  # styles: curves that coincide stay visible
        seen: set[str] = set()
        for w in weeks:
            ts = pd.Timestamp(w["sunday"])
            i = min(int(curves.index.searchsorted(ts)), len(curves) - 1)
            y = float(curves["gated"].iloc[i])
            kind = w["decision"] if w["decision"] in ("commit", "rollback") else "other"
            style = {"commit": ("^", "tab:green"), "rollback": ("v", "tab:red"), "other": ("o", "0.5")}[kind]
            ax.axvline(ts, color=style[1], lw=0.5, alpha=0.4)
            ax.plot([ts], [y], marker=style[0], color=style[1], ms=9, ls="none",
                    label=kind if kind not in seen else None)
            seen.add(kind)
        ax.set_title(title)
        ax.set_ylabel("equity")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
        fig.tight_layout()
        tmp = path.with_name(path.name + ".tmp.png")
        fig.savefig(tmp, dpi=90)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
    return path


def last_line(result: dict[str, Any]) -> str:
    t, tot = result["tally"], result["totals"]
    return (f"weeks={t['weeks']} commits={t['commits']} right={t['right']} "
            f"gated_return_pct={tot['gated']['return_pct']:.4f} adopt_return_pct={tot['adopt']['return_pct']:.4f} "
            f"frozen_return_pct={tot['frozen']['return_pct']:.4f} replay_s={result['replay_s']:.1f}")


__all__ = ["Replay", "ReplayOptions", "Scorer", "SetStore", "build_challenger", "judge", "last_line", "sundays",
           "tally", "verdict"]
