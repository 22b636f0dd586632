"""The 13 phases of the weekly run, as plain functions sharing state through files under ``results/<run id>/``.

Every phase reads what it needs from the files earlier phases wrote (the dataset cache, the studies' best params,
the staged models, the candidate config) so that a run killed anywhere can continue with ``--resume`` from the
last completed phase, in a new process. ``scripts/weekly_optimize.py`` is the table of contents; this module is the
chapters. Nothing here touches the deployed ``models/`` or ``config.json`` except phase 13, through
:mod:`ops.deploy` (backup, atomic switch, restore).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from core.config import Config, config_to_json, load_config, parse_config, redact_url, secrets
from core.errors import TooFewTrades, UserError
from core.io import atomic_write, atomic_write_json, atomic_write_text, copy_file_atomic, sha256_file
from core.paths import Paths, remove_stale_temp_files
from market.dataset import Dataset, build_dataset, lookahead_self_check
from ops import deploy
from ops.failure import end_failed_run
from ops.report import RunReport, telegram_text

log = logging.getLogger("weekly")

QUICK_HISTORY_DAYS = 365
# SHAP on a seeded row sample: ranks are stable at this size (checked on the real data) and it keeps phase 4 cheap
# (TreeExplainer on 600-tree boosters costs ~7 ms per row and class here).
SHAP_ROWS = 800
SHAP_ROWS_RF = 300
SHAP_FALLBACK_ROUNDS = 150
QUICK_TRIALS = (12, 6)


@dataclass
class RunOptions:
    """Command-line choices that change what a run does (saved with the run so ``--resume`` keeps them)."""

    demo: bool = False
    data: str | None = None
    quick: bool = False
    dry_run: bool = False
    n_trials: int | None = None
    storage: str | None = None
    phases: list[int] | None = None
    # "as of" time (ISO, UTC): the candle source ends there, only bars closed at or before it exist for the run
    # (the walk-forward replay runs past Sundays through this same code path; see market.data.closed_by)
    cutoff: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """What state.json and report.json keep: a storage URL's password is never written (see :func:`resumed`)."""
        out = dict(self.__dict__)
        if out.get("storage"):
            out["storage"] = redact_url(out["storage"])
        return out

    def resumed(self, cli: RunOptions) -> RunOptions:
        """These (stored) options for ``--resume``; the storage URL comes back from the resume's own ``--storage``
        when the stored one lost its password to redaction."""
        if self.storage and ":***@" in self.storage:
            if not cli.storage or redact_url(cli.storage) != self.storage:
                raise UserError(f"--resume: this run used --storage {self.storage}; its password is never stored: "
                                "pass the same --storage URL again")
            self.storage = cli.storage
        return self


@dataclass
class RunContext:
    """Everything a phase needs: where things are, the run's config, options, and the report being written."""

    paths: Paths
    run_id: str
    options: RunOptions
    report: RunReport
    cfg: Config  # the deployed config.json as it was at the start of the run (never changed by the run)
    _cache: dict[str, Any] = field(default_factory=dict)

    @property
    def run_dir(self) -> Path:
        return self.paths.results / self.run_id

    @property
    def staging(self) -> Path:
        return deploy.stage_dir(self.paths, self.run_id)

    @property
    def run_cfg(self) -> Config:
        """The config the run trains and evaluates with: config.json, with ``--quick`` / ``--n-trials`` applied."""
        if "run_cfg" not in self._cache:
            raw = self.cfg.model_dump(mode="json")
            if self.options.quick:
                raw["data"]["history_days"] = min(raw["data"]["history_days"], QUICK_HISTORY_DAYS)
                raw["data"]["demo_bars"] = min(raw["data"]["demo_bars"], QUICK_HISTORY_DAYS * 96)
                raw["tuning"]["signal_trials"] = min(raw["tuning"]["signal_trials"], QUICK_TRIALS[0])
                raw["tuning"]["position_trials"] = min(raw["tuning"]["position_trials"], QUICK_TRIALS[1])
            if self.options.n_trials:
                raw["tuning"]["signal_trials"] = self.options.n_trials
                raw["tuning"]["position_trials"] = max(1, self.options.n_trials // 2)
            self._cache["run_cfg"] = parse_config(raw, "run config")
        return self._cache["run_cfg"]

    @property
    def entry_cfg(self) -> Config:
        """The run config with the entry threshold at the profile's minimum (:func:`ml.models.specs.entry_config`):
        what the position study and the position and SL/TP models learn from."""
        if "entry_cfg" not in self._cache:
            from ml.models.specs import entry_config

            self._cache["entry_cfg"] = entry_config(self.run_cfg)
        return self._cache["entry_cfg"]

    def pruner(self) -> Any:
        """``tuning.pruner`` (median by default); ``tuning.pruning = false`` = no pruning (the reference)."""
        from ml.tune.common import make_pruner

        return make_pruner(self.run_cfg.tuning.pruner, self.run_cfg.tuning.pruning)

    def study_storage(self) -> str:
        """``--storage``, else ONE SQLite file under results/ for every run: each run's studies sit next to last
        week's, which is what the warm start reads and what optuna-dashboard shows as the lineage."""
        from ml.tune.common import default_storage

        return self.options.storage or default_storage(self.paths.results)

    def dataset(self) -> Dataset:
        if "ds" not in self._cache:
            folder = self.run_dir / "dataset"
            if not (folder / "dataset.json").exists():
                raise UserError(f"{folder}: no dataset for run {self.run_id}; run phase 3 first")
            self._cache["ds"] = Dataset.load(folder)
        return self._cache["ds"]

    def write_json(self, name: str, obj: Any) -> Path:
        """Write a phase output durably (a kill or power cut leaves the old file or the new one)."""
        return atomic_write_json(self.run_dir / name, obj, default=str)

    def read_json(self, name: str) -> Any:
        p = self.run_dir / name
        if not p.exists():
            raise UserError(f"{p}: missing output of an earlier phase (run the phases in order, or --resume)")
        return json.loads(p.read_text())


# ------------------------------------------------------------------------------------------------ helpers
def _metrics_of(result_metrics: dict[str, Any]) -> dict[str, Any]:
    from backtest.metrics import json_safe

    return json_safe(result_metrics)


def _backtest(models_dir: Path, cfg: Config, ds: Dataset, windows: dict[str, tuple[int, int]],
              keep: dict[str, Any] | None = None) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Fast backtests of the model set in ``models_dir`` with ``cfg``'s trading params on several windows
    (``keep`` receives the prepared arrays under ``"arrays"``: the signal probabilities for the direction check)."""
    from backtest.engine import prepare_arrays, run_arrays
    from backtest.policy import make_params
    from ml.models.bundle import load_bundle

    bundle = load_bundle(models_dir, ds.feature_names)
    arrays = prepare_arrays(ds.candles, ds.features, bundle, cfg)
    params = make_params(cfg)
    if keep is not None:
        keep["arrays"] = arrays
    out, results = {}, {}
    for name, (s, e) in windows.items():
        run = run_arrays(arrays, params, s, e)
        res = run.to_result(arrays, min_trades=cfg.profile.min_trades, in_sample=False)
        out[name] = _metrics_of(res.metrics)
        results[name] = res
    return out, results


def _oos_windows(ds: Dataset) -> dict[str, tuple[int, int]]:
    sp = ds.splits
    return {"full": (int(sp.oos[0]), int(sp.oos[-1]) + 1), "sweep": (int(sp.sweep[0]), int(sp.sweep[-1]) + 1),
            "holdout": (int(sp.holdout[0]), int(sp.holdout[-1]) + 1)}


def _has_models(folder: Path) -> bool:
    return (folder / "manifest.json").is_file()


def _staged_keys(ctx: RunContext) -> set[str]:
    try:
        return set(json.loads((ctx.staging / "manifest.json").read_text()).get("models", {}))
    except (OSError, ValueError):
        return set()


_PhaseFn = Callable[[RunContext, dict[str, Any]], None]


def _degradable(label: str, fallback: str, needs: tuple[str, ...] = ()) -> Callable[[_PhaseFn], _PhaseFn]:
    """An optional model's phase: too few trades to train it (or a missing prerequisite model) is not a failed run.

    The run goes on without that model, which the backtester, the sweep and the bot already handle (no exit model;
    SL/TP from ``trading.fixed_sl_atr`` / ``fixed_tp_atr``; risk multiplier 1.0), and the report says so, the way a
    skipped position study already degrades to default parameters. The gate still decides on the result."""

    def wrap(fn: _PhaseFn) -> _PhaseFn:
        def phase(ctx: RunContext, s: dict[str, Any]) -> None:
            missing = [k for k in needs if k not in _staged_keys(ctx)]
            try:
                if missing:
                    raise TooFewTrades(f"it needs the {', '.join(missing)} model(s), not trained in this run")
                fn(ctx, s)
            except TooFewTrades as exc:
                note = f"{label} not trained ({exc}); {fallback}"
                s["skipped"] = str(exc)
                s["fallback"] = fallback
                ctx.report.data.setdefault("notes", []).append(note)
                log.warning("%s", note)

        phase.__doc__, phase.__name__ = fn.__doc__, fn.__name__
        return phase

    return wrap


# ------------------------------------------------------------------------------------------------ phases
def phase_preflight(ctx: RunContext, s: dict[str, Any]) -> None:
    """Config and environment checks, free disk, backup of the deployed state, and the baseline score."""
    paths, cfg = ctx.paths, ctx.cfg
    free_mb = shutil.disk_usage(paths.root).free // 2**20
    s["free_disk_mb"] = int(free_mb)
    if free_mb < cfg.pipeline.min_free_disk_mb:
        raise UserError(f"{paths.root}: only {free_mb} MB free, config pipeline.min_free_disk_mb is "
                        f"{cfg.pipeline.min_free_disk_mb}")
    present = sorted(secrets())
    s["secrets_present"] = present  # names only, never values
    s["integrations"] = {
        "candles": "file " + str(ctx.options.data) if ctx.options.data else ("demo" if ctx.options.demo else
                                                                             _source_name(cfg)),
        "hub": "huggingface" if cfg.hub.repo_id and "HF_TOKEN" in present else "local registry",
        "telegram": "telegram" if {"TELEGRAM_TOKEN", "TELEGRAM_CHAT_ID"} <= set(present) else "file",
    }
    copy_file_atomic(paths.config, ctx.run_dir / "config.old.json")
    b = deploy.backup(paths, ctx.run_id)
    s["backup"] = {"path": str(b.path), "hashes": b.hashes}
    ctx.report.set("models_before", b.hashes)
    from ops.bot.runner import since_last_deploy

    ctx.report.set("live", since_last_deploy(paths))  # what the deployed set did in the bot since its deploy
    if not _has_models(paths.models):
        s["baseline"] = None
        s["note"] = "no deployed models: first run, only the absolute floors apply"
        return
    from ml.models.manifest import ModelIntegrityError, verify

    try:
        from market.data import load_candles

        verify(paths.models)  # signature + hashes of the deployed set itself (errors name models/, not the backup)
        candles = load_candles(ctx.run_cfg, paths, ctx.options.data, ctx.options.demo, cutoff=ctx.options.cutoff)
        ds = build_dataset(candles, ctx.run_cfg)
        m, _ = _backtest(b.models_dir, cfg, ds, {"full": _oos_windows(ds)["full"]})
        s["baseline"] = m["full"]
    except ModelIntegrityError:
        raise  # unsigned, forged or modified: a security event, never "no baseline" (see ml.models.manifest)
    except UserError as exc:
        s["baseline"] = None
        s["note"] = f"the deployed models could not be evaluated ({exc}); only the floors apply"
        log.warning("baseline unavailable: %s", exc)


def _source_name(cfg: Config) -> str:
    from market.data import resolve_source

    return resolve_source(cfg)


def phase_data(ctx: RunContext, s: dict[str, Any]) -> None:
    """MT5 connectivity check + candle refresh (or the file / demo source); validated, stored atomically."""
    from market.data import closed_by, refresh, resolve_source
    from market.data.store import read_store, store_path
    from market.data.validate import trim_history, validate

    cfg, opts = ctx.run_cfg, ctx.options
    real_store = store_path(ctx.paths, cfg)
    if (opts.data is None and not opts.demo and cfg.data.source == "auto" and resolve_source(cfg) == "demo"
            and real_store.exists()):
        # No live source configured, but real history was imported (refresh_data.py --data FILE): use it rather
        # than the demo; there is nothing to refresh it from.
        stored = closed_by(read_store(real_store, cfg.data.max_rows), opts.cutoff)
        f, rep = trim_history(*validate(stored, cfg, str(real_store)), cfg)
        source, new_bars, is_demo = f"store {real_store.name} (no live source configured)", 0, False
    else:
        res = refresh(cfg, ctx.paths, opts.data, opts.demo, cutoff=opts.cutoff)
        rep, f, source, new_bars, is_demo = res.report, res.frame, res.source, res.new_bars, res.is_demo
    info = {"source": source + (" (DEMO)" if is_demo else ""), "rows": int(len(f)),
            "start": str(f.index[0]), "end": str(f.index[-1]), "new_bars": new_bars,
            "gaps": [{"start": str(g.start), "minutes": g.minutes} for g in getattr(rep, "gaps", [])],
            "spikes": int(getattr(rep, "spikes", 0) if not isinstance(getattr(rep, "spikes", 0), list)
                          else len(rep.spikes)),
            "demo": is_demo}
    s.update(info)
    ctx.report.set("data", info)
    ctx.report.data["demo"] = is_demo
    atomic_write(ctx.run_dir / "candles.parquet", f.to_parquet)


def phase_dataset(ctx: RunContext, s: dict[str, Any]) -> None:
    """Features, labels, splits; the look-ahead self-check stops the run if the features peek at the future."""
    import pandas as pd

    candles = pd.read_parquet(ctx.run_dir / "candles.parquet")
    candles.attrs["demo"] = bool(ctx.report.data.get("demo"))
    candles.attrs["source"] = (ctx.report.data.get("data") or {}).get("source", "")
    ds = build_dataset(candles, ctx.run_cfg)
    problems = lookahead_self_check(candles, ds.features, ctx.run_cfg)
    if problems:
        raise UserError("look-ahead self-check failed: " + "; ".join(problems))
    ds.save(ctx.run_dir / "dataset")
    ctx._cache["ds"] = ds
    s["splits"] = ds.splits.describe(candles.index)
    s["lookahead_check"] = "passed"
    s["n_features"] = len(ds.feature_names)


def phase_shap(ctx: RunContext, s: dict[str, Any]) -> None:
    """SHAP importances of the three signal models (the deployed ones, else quick default fits): report only."""
    from ml.models.signal import SIGNAL_MODELS, default_params, fit_signal_models, underlying
    from ml.shap_analysis import shap_report

    ds = ctx.dataset()
    cfg = ctx.run_cfg
    models = None
    if _has_models(ctx.paths.models):
        from ml.models.manifest import ModelIntegrityError, load_model

        try:
            models = {m: underlying(load_model(ctx.paths.models, f"signal_{m}", ds.feature_names))
                      for m in SIGNAL_MODELS}
            s["models"] = "deployed"
        except ModelIntegrityError:
            raise  # never degrade around a set that fails its integrity check
        except UserError as exc:
            log.warning("SHAP on fresh default models: deployed ones unusable (%s)", exc)
    if models is None:
        fit = ds.splits.fit
        params = default_params()
        for k in ("xgb", "lgb"):  # no validation set here: a fixed, modest number of rounds
            params[k] = {**params[k], "n_estimators": SHAP_FALLBACK_ROUNDS, "early_stopping_rounds": 0}
        models = fit_signal_models(ds.X[fit], ds.y[fit], params, cfg.tuning.seed)
        s["models"] = "default params fitted on the fit window"
    previous = _previous_shap(ctx)
    rep = shap_report(models, ds.X[ds.splits.train], ds.feature_names, cfg.features.protected,
                      ctx.run_dir / "shap", previous=previous, seed=cfg.tuning.seed, sample=SHAP_ROWS,
                      rf_sample=SHAP_ROWS_RF)
    lines = rep["flag_lines"]
    s["flags"] = lines
    s["mean_rank_agreement"] = rep.get("mean_rank_agreement")
    s["previous"] = str(previous) if previous else None
    ctx.report.set("shap", {"flags": lines, "mean_rank_agreement": rep.get("mean_rank_agreement"),
                            "top": [f["feature"] for f in rep.get("features", [])[:10] if isinstance(f, dict)
                                    and "feature" in f]})


def _previous_shap(ctx: RunContext) -> Path | None:
    runs = sorted(p for p in ctx.paths.results.glob("*/shap/shap_importance.csv") if p.parent.parent.name <
                  ctx.run_id)
    return runs[-1] if runs else None


def phase_signal_study(ctx: RunContext, s: dict[str, Any]) -> None:
    """Optuna study of the signal ensemble on purged walk-forward folds inside the training window."""
    from ml.tune.hyperparams import run_signal_study

    cfg = ctx.run_cfg
    res = run_signal_study(ctx.dataset(), cfg, ctx.run_dir, n_trials=cfg.tuning.signal_trials,
                           timeout=cfg.tuning.timeout_s, storage=ctx.study_storage(),
                           study_name=f"signal-{ctx.run_id}", n_jobs=cfg.tuning.n_jobs, top_up=True,
                           pruner=ctx.pruner(), buffered=True)
    _publish_study(ctx, "signal", res, s)


def _publish_study(ctx: RunContext, kind: str, res: Any, s: dict[str, Any]) -> None:
    import optuna

    from ml.tune.common import storage_url

    trials = res.study.trials
    n_pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in trials)
    info = {"n_trials": len(trials), "n_pruned": n_pruned, "best_value": res.best_value,
            "best_params": res.best_params,
            "mean_trial_s": float(np.mean(res.per_trial_seconds)) if res.per_trial_seconds else None,
            "study": res.study.study_name, "storage": storage_url(res.study),
            "predecessor": res.study.user_attrs.get("predecessor"),
            "warm_start": res.study.user_attrs.get("warm_start")}
    s.update(info)
    # the seed project's location: results/optuna_study.pkl (+ the position study beside it), and the latest tuned
    # parameters where the per-model retrain scripts look for them by default
    for f in [*ctx.run_dir.glob("optuna_study*.pkl"), ctx.run_dir / f"best_params_{kind}.json"]:
        if f.exists():
            shutil.copy2(f, ctx.paths.results / f.name)
    ctx.report.set(f"optuna_{kind}", info)


def phase_position_study(ctx: RunContext, s: dict[str, Any]) -> None:
    """Optuna study of the position model, on positions entered by out-of-fold signal predictions."""
    from ml.tune.common import load_best_params
    from ml.tune.hyperparams import OOF_CACHE, oof_signal_proba
    from ml.tune.position import run_position_study

    cfg = ctx.entry_cfg
    ds = ctx.dataset()
    oof = oof_signal_proba(ds, cfg, load_best_params(ctx.run_dir, "signal"), cache=ctx.run_dir / OOF_CACHE)
    try:
        res = run_position_study(ds, cfg, ctx.run_dir, oof.p_long_short, n_trials=cfg.tuning.position_trials,
                                 timeout=cfg.tuning.timeout_s, storage=ctx.study_storage(),
                                 study_name=f"position-{ctx.run_id}", top_up=True, pruner=ctx.pruner(),
                                 buffered=True)
    except UserError as exc:
        # Too few simulated trades for purged folds is a property of this week's data, not a broken run: the
        # position model is then trained with its default parameters, and the report says so.
        s["skipped"] = str(exc)
        ctx.report.set("optuna_position", {"skipped": str(exc)})
        ctx.report.data.setdefault("notes", []).append(f"position study skipped, default parameters used: {exc}")
        log.warning("position study skipped: %s", exc)
        return
    _publish_study(ctx, "position", res, s)


def _train_spec(ctx: RunContext, name: str, cfg: Config, params: dict[str, Any] | None) -> Any:
    """Train one row of the model table into the run's staging set (the same path the retrain scripts use)."""
    from ml.models.specs import SPECS, train_and_save

    ds = ctx.dataset()
    return train_and_save(SPECS[name], ds, cfg, ctx.staging, params, demo=ds.is_demo)


def phase_signal_models(ctx: RunContext, s: dict[str, Any]) -> None:
    """Retrain RF, XGB and LGB with the tuned parameters, then ``calibrate_models()``; saved to staging."""
    from ml.tune.common import load_best_params

    for f in ctx.staging.glob("*"):  # a resumed phase starts from a clean staging set
        f.unlink()
    out = _train_spec(ctx, "signal", ctx.run_cfg, load_best_params(ctx.run_dir, "signal"))
    s["metrics"] = out.metrics.get("val", {}).get("ensemble")
    s["timings_s"] = out.extra.get("timings_s")


@_degradable("position model", "no exit model: positions close at SL, TP or trading.max_holding_bars")
def phase_position_model(ctx: RunContext, s: dict[str, Any]) -> None:
    """Retrain the position (exit) model; needs the staged signal models."""
    from ml.tune.common import load_best_params

    tuned = ctx.run_dir / "best_params_position.json"
    params = load_best_params(ctx.run_dir, "position") if tuned.exists() else None
    s["metrics"] = _train_spec(ctx, "position", ctx.run_cfg, params).metrics.get("val")


@_degradable("SL/TP model", "SL/TP from config trading.fixed_sl_atr / fixed_tp_atr", ("position",))
def phase_sltp_models(ctx: RunContext, s: dict[str, Any]) -> None:
    """Retrain the LightGBM SL/TP regressors; need the staged signal and position models."""
    s["metrics"] = _train_spec(ctx, "sl_tp", ctx.run_cfg, None).metrics


@_degradable("risk model", "risk multiplier 1.0", ("position", "sl_tp"))
def phase_risk_model(ctx: RunContext, s: dict[str, Any]) -> None:
    """Retrain the risk-multiplier model on account-state labels from a full backtest; needs SL/TP."""
    s["metrics"] = _train_spec(ctx, "risk", ctx.run_cfg, None).metrics


def phase_sweep(ctx: RunContext, s: dict[str, Any]) -> None:
    """Config sweep inside the active profile's bounds on the first 70% of the OOS window only."""
    from backtest.engine import prepare_arrays
    from backtest.sweep import run_sweep, save_sweep, top_rows
    from ml.models.bundle import load_bundle

    ds, cfg = ctx.dataset(), ctx.run_cfg
    bundle = load_bundle(ctx.staging, ds.feature_names)
    arrays = prepare_arrays(ds.candles, ds.features, bundle, cfg)
    w = _oos_windows(ds)
    res = run_sweep(arrays, cfg, w["sweep"], oos_bars=w["full"][1] - w["full"][0], n_jobs=2)
    save_sweep(res, ctx.run_dir)
    old = ctx.cfg.trading
    chosen = res.best or {"confidence_threshold": old.confidence_threshold, "risk_percent": old.risk_percent,
                          "sl_multiplier": old.sl_multiplier, "tp_multiplier": old.tp_multiplier,
                          "sessions": list(old.sessions)}
    raw = ctx.cfg.model_dump(mode="json")  # config.json as deployed; only the swept trading values change
    raw["trading"].update(chosen)
    candidate = parse_config(raw, "candidate config")
    atomic_write_text(ctx.run_dir / "config.candidate.json", config_to_json(candidate))
    change = {k: (getattr(old, k) if k != "sessions" else list(old.sessions), chosen[k]) for k in chosen}
    info = {"fraction": cfg.splits.sweep_fraction, "n_combos": res.n_combos, "n_eligible": res.n_eligible,
            "min_trades": res.min_trades, "top": top_rows(res), "kept_current": res.best is None}
    s.update(info)
    ctx.report.set("sweep", info)
    ctx.report.set("config_change", change)


def phase_evaluate(ctx: RunContext, s: dict[str, Any]) -> None:
    """A clean backtest of the new models + candidate config on the whole OOS window (holdout shown apart),
    and of the deployed models + config on exactly the same windows."""
    from backtest.plots import plot_equity

    ds = ctx.dataset()
    w = {k: v for k, v in _oos_windows(ds).items() if k in ("full", "holdout")}
    cand = load_config(ctx.run_dir / "config.candidate.json")
    kept: dict[str, Any] = {}
    new, new_res = _backtest(ctx.staging, cand, ds, w, keep=kept)
    base_res: dict[str, Any] | None = None
    ev: dict[str, Any] = {"new_full": new["full"], "new_holdout": new["holdout"]}
    curves = {"new": new_res["full"].equity}
    backup_models = ctx.paths.backups / ctx.run_id / "models"
    if _has_models(backup_models):
        try:
            old_cfg = load_config(ctx.run_dir / "config.old.json")
            base, base_res = _backtest(backup_models, old_cfg, ds, w)
            ev["baseline_full"], ev["baseline_holdout"] = base["full"], base["holdout"]
            curves["baseline"] = base_res["full"].equity
        except UserError as exc:
            ev["baseline_error"] = str(exc)
    atomic_write(ctx.run_dir / "trades_new.csv", lambda tmp: new_res["full"].trades.to_csv(tmp, index=False))
    plot_equity(ctx.run_dir / "equity_baseline_vs_new.png", curves["new"], baseline=curves.get("baseline"),
                title=f"OOS equity, new vs deployed ({ctx.run_id})" + (" - DEMO DATA" if ds.is_demo else ""))
    ctx.write_json("evaluation.json", ev)
    s.update({k: {"score": v.get("score"), "trades": v.get("trades")} for k, v in ev.items() if isinstance(v, dict)})
    ctx.report.set("evaluation", ev)
    evidence = _evidence(ctx, ds, ev, new_res, base_res, kept["arrays"], w["full"])
    ctx.write_json("evidence.json", evidence)
    s["evidence"] = {k: v.get("reason") or "ok" for k, v in evidence.items() if isinstance(v, dict) and "ok" in v}
    ctx.report.set("evidence", evidence)


def _evidence(ctx: RunContext, ds: Dataset, ev: dict[str, Any], new_res: dict[str, Any],
              base_res: dict[str, Any] | None, arrays: Any, full: tuple[int, int]) -> dict[str, Any]:
    """The gate's five pieces of evidence (``backtest.stats``) plus their two pictures.

    1. paired block bootstrap of the daily-return difference new - deployed, on the full OOS window and on the
       holdout alone; 2. deflated Sharpe ratio of the new set on the full OOS window, N = Optuna trials + sweep rows,
       the variance of the sweep's Sharpe ratios; 3. PBO of the sweep (CSCV on its daily-return matrix); 4. the
       holdout results of both; 5. the signal's directional skill on the OOS bars (labels there are never trained
       on). Numbers that cannot be computed carry their reason; the gate treats them as failed conditions."""
    from backtest import stats as st
    from backtest.plots import plot_bootstrap, plot_cscv
    from backtest.sweep import load_sweep_returns

    g = ctx.cfg.pipeline.gate
    t0 = time.perf_counter()

    def daily(res: dict[str, Any]) -> dict[str, np.ndarray]:
        return {k: st.result_daily_returns(r.equity, r.params.initial_equity) for k, r in res.items()}

    rep = ctx.report.data
    n_optuna = sum(int((rep.get(k) or {}).get("n_trials") or 0) for k in ("optuna_signal", "optuna_position"))
    s0, e0 = full
    lab = ds.labels.iloc[s0:e0]
    out = st.gate_evidence(daily(new_res), daily(base_res) if base_res is not None else None,
                           load_sweep_returns(ctx.run_dir), n_optuna,
                           {"new": ev.get("new_holdout"), "baseline": ev.get("baseline_holdout")},
                           (arrays.p_long[s0:e0], arrays.p_short[s0:e0], lab["label"].to_numpy(),
                            lab["valid"].to_numpy()),
                           resamples=g.bootstrap_resamples, seed=g.bootstrap_seed, pbo_blocks=g.pbo_blocks,
                           **({"no_baseline": f"the deployed set could not be evaluated: {ev['baseline_error']}"}
                              if "baseline_error" in ev else {}))
    demo = " - DEMO DATA" if ds.is_demo else ""
    pb, pbo = out["paired_full"], out["pbo"]
    if pb.get("ok"):
        plot_bootstrap(ctx.run_dir / "gate_bootstrap.png", pb["_means"], pb["observed_mean"], pb["prob_better"],
                       title=f"New vs deployed, full OOS{demo}")
    if pbo.get("ok"):
        plot_cscv(ctx.run_dir / "gate_cscv.png", pbo["_rank_pairs"], pbo["_logits"], pbo["pbo"],
                  title=f"Sweep overfitting (CSCV){demo}")
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return st.strip_private(out)


def phase_commit(ctx: RunContext, s: dict[str, Any]) -> None:
    """Gate; then deploy (registry version, atomic switch, git commit: :func:`ops.deploy.apply`) or restore the
    backup. Always report."""
    from backtest.metrics import Floors, GateRules, gate
    from ops.hub import HubError, make_registry

    cfg, paths = ctx.cfg, ctx.paths
    ev = ctx.read_json("evaluation.json")
    evidence_file = ctx.run_dir / "evidence.json"
    evidence = json.loads(evidence_file.read_text()) if evidence_file.exists() else None
    baseline = ev.get("baseline_full")
    new = ev["new_full"]
    dec = gate(new, baseline, Floors.from_profile(cfg.profile), rules=GateRules.from_config(cfg.pipeline),
               evidence=evidence)
    b_score = None if baseline is None else baseline.get("score")
    ctx.report.set("gate", dec.to_dict())
    backup = deploy.load_backup(paths, ctx.run_id)
    action, reason = ("commit", dec.reason) if dec.passed else ("rollback", dec.reason)
    title = f"weekly {ctx.run_id}: score {new['score']:.4f} vs baseline " \
            f"{'none' if b_score is None else f'{b_score:.4f}'}"
    scores = {"score": new["score"], "baseline": b_score, "trades": new["trades"],
              "max_drawdown_pct": new["max_drawdown_pct"]}
    if ctx.options.dry_run:
        action, reason = f"dry-run ({action} skipped)", f"dry run: would {action}: {dec.reason}"
    elif dec.passed and _already_deployed(ctx):
        s["deployed"] = deploy.hash_state(paths)
        s["hub"] = "already pushed and deployed (resumed after the switch)"
        s["git"] = deploy.record_in_git(paths, deploy.message(ctx.run_id, title, scores, dec.arithmetic),
                                        cfg.pipeline.git_commit)
        ctx.report.set("models", s["deployed"])
    elif dec.passed:
        try:
            ctx.report.save()
            done = deploy.apply(paths, ctx.run_id, ctx.staging, (ctx.run_dir / "config.candidate.json").read_text(),
                                reason=title, scores=scores, details=dec.arithmetic,
                                registry=make_registry(cfg, paths), git_commit=cfg.pipeline.git_commit,
                                extra_files={"report.md": ctx.run_dir / "report.md"})
            s["hub"], s["git"], s["deployed"] = done.registry, done.git, done.hashes
            ctx.report.set("models", dict(done.hashes))
            ctx.report.set("model_hash", done.hashes.get("models/manifest.json"))
        except HubError as exc:
            action, reason = "rollback", f"gate passed but the Hub push failed: {exc}"
    if action == "rollback":
        if not deploy.verify(paths, backup.hashes):
            deploy.restore(paths, backup)
        s["restored"] = deploy.verify(paths, backup.hashes)
        if not s["restored"]:
            raise UserError("rollback: the deployed state does not match the backup's hashes")
    removed = deploy.prune_backups(paths, cfg.pipeline.keep_backups)
    s["pruned_backups"] = removed
    ctx.report.set("decision", {"action": action, "reason": reason})
    s["action"] = action
    _notify(ctx)
    ctx.report.data.setdefault("notes", [])


def _already_deployed(ctx: RunContext) -> bool:
    """True when a resumed phase 13 finds its own new set already switched in (killed after the switch).

    The expected hashes (staged models + candidate config) are recorded once, before the first push/switch."""
    intent = ctx.run_dir / "deploy_intent.json"
    if not intent.exists():
        expected = deploy.hash_models_dir(ctx.staging)
        expected["config.json"] = sha256_file(ctx.run_dir / "config.candidate.json")
        ctx.write_json("deploy_intent.json", {"hashes": dict(sorted(expected.items()))})
        return False
    return deploy.verify(ctx.paths, json.loads(intent.read_text())["hashes"])


def _notify(ctx: RunContext) -> None:
    from ops.notify import make_notifier

    ctx.report.save()
    notifier = make_notifier(ctx.cfg, ctx.paths, ctx.run_dir)
    png = [p for p in (ctx.run_dir / "equity_baseline_vs_new.png", ctx.run_dir / "gate_bootstrap.png",
                       ctx.run_dir / "gate_cscv.png") if p.exists()]
    ok = notifier.send(telegram_text(ctx.report.data), png)
    if not ok:
        log.warning("notification failed (the report is in %s)", ctx.run_dir)


class Phase(NamedTuple):
    """One row of the weekly run: its number (the ``--phases`` / ``--resume`` key), name and function."""

    number: int
    name: str
    run: Callable[[RunContext, dict[str, Any]], None]


PHASES: tuple[Phase, ...] = (
    Phase(1, "preflight+baseline", phase_preflight), Phase(2, "data", phase_data), Phase(3, "dataset", phase_dataset),
    Phase(4, "shap", phase_shap), Phase(5, "signal study", phase_signal_study),
    Phase(6, "position study", phase_position_study), Phase(7, "signal models", phase_signal_models),
    Phase(8, "position model", phase_position_model), Phase(9, "sl/tp models", phase_sltp_models),
    Phase(10, "risk model", phase_risk_model), Phase(11, "config sweep", phase_sweep),
    Phase(12, "oos evaluation", phase_evaluate), Phase(13, "commit or rollback", phase_commit),
)
PHASE_NAMES: dict[int, str] = {p.number: p.name for p in PHASES}


# ------------------------------------------------------------------------------------------------ run state
def _crash_point(name: str) -> None:
    """Test hook: ``WEEKLY_CRASH_AT=<name>`` SIGKILLs the process here (a real kill, for the kill test)."""
    if os.environ.get("WEEKLY_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def new_run_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


def _state_path(paths: Paths, run_id: str) -> Path:
    return paths.results / run_id / "state.json"


def load_state(paths: Paths, run_id: str) -> dict[str, Any]:
    return json.loads(_state_path(paths, run_id).read_text())


def save_state(paths: Paths, run_id: str, state: dict[str, Any]) -> None:
    atomic_write_json(_state_path(paths, run_id), state)


def unfinished_runs(paths: Paths) -> list[str]:
    out = []
    for p in sorted(paths.results.glob("*/state.json")):
        try:
            st = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if not st.get("finished"):
            out.append(st["run_id"])
    return out


def run_pipeline(paths: Paths, options: RunOptions, resume: bool = False, run_id: str | None = None
                 ) -> dict[str, Any]:
    """Run (or resume) the phases; the caller holds the lock and has called :func:`ops.deploy.recover`.

    ``run_id``: the new run's id instead of the clock's (the replay names each run after its Sunday)."""
    if resume:
        pending = unfinished_runs(paths)
        if not pending:
            raise UserError(f"{paths.results}: no unfinished run to resume")
        run_id = pending[-1]
        state = load_state(paths, run_id)
        options = RunOptions(**state["options"]).resumed(options)
        log.info("resuming run %s after phase(s) %s", run_id, state["completed"])
    else:
        load_config(paths.config)  # an unreadable or invalid config.json stops here: no run folder, no phase
        for rid in unfinished_runs(paths):
            log.warning("run %s did not finish; starting a new run (use --resume to continue it)", rid)
            st = load_state(paths, rid)
            st["finished"] = True
            st["abandoned"] = True
            save_state(paths, rid, st)
        if run_id is not None:
            if (paths.results / run_id / "state.json").exists():
                raise UserError(f"{paths.results / run_id}: run {run_id} exists already")
        else:
            run_id = new_run_id()
            while (paths.results / run_id).exists():
                time.sleep(1.0)
                run_id = new_run_id()
        (paths.results / run_id).mkdir(parents=True, exist_ok=True)
        state = {"run_id": run_id, "options": options.to_dict(), "completed": [], "finished": False}
        save_state(paths, run_id, state)
    cfg_path = paths.results / run_id / "config.old.json"
    cfg = load_config(cfg_path if cfg_path.exists() else paths.config)
    report = RunReport(paths.results / run_id, run_id, demo=options.demo)
    if report.data.pop("failure", None) is not None:  # a resumed failed run: its notes keep the earlier failure
        report.data["decision"] = None
    report.set("options", options.to_dict())
    ctx = RunContext(paths=paths, run_id=run_id, options=options, report=report, cfg=cfg)
    wanted = options.phases or [p.number for p in PHASES]
    current = (0, "start")
    try:
        for name in remove_stale_temp_files(paths):
            log.warning("removed %s (left by a killed write)", name)
        for number, name, run in PHASES:
            if number in state["completed"] or number not in wanted:
                continue
            current = (number, name)
            with report.phase(number, name) as summary:
                run(ctx, summary)
            state["completed"].append(number)
            save_state(paths, run_id, state)
            _crash_point(f"after_phase_{number}")
    except (Exception, KeyboardInterrupt) as exc:
        # Every failure ends like a rollback: state verified against the backup, failure report + notification,
        # exit 4 (5 when the state cannot be verified). See ops/failure.py.
        intent_file = ctx.run_dir / "deploy_intent.json"
        try:
            intent = json.loads(intent_file.read_text())["hashes"] if intent_file.exists() else None
        except (OSError, ValueError, KeyError):
            intent = None
        raise end_failed_run(paths, run_id, cfg, report, current, exc, intent) from None
    state["finished"] = True
    save_state(paths, run_id, state)
    report.save()
    return report.data
