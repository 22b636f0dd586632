"""``tune-signal`` / ``tune-position``: the two Optuna studies on their own (``python ml/tune/hyperparams.py``,
``python -m ml.tune.position`` are the seed's spellings).

Several workers on several machines share one study through ``--storage`` with the same ``--study-name``; see
:mod:`ml.tune.common` for resuming, seeding and the OOS guard.

    tune-signal --data ../shared/data/BTCUSDT_15m_2023_2024.csv --n-trials 100
    tune-signal --storage postgresql+psycopg2://u:pw@db:5432/optuna --study-name w47 --worker 1
    tune-position --demo --n-trials 20
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

from cli.common import build_parser, config_of, run, start
from core.config import Config, parse_config
from core.errors import UserError
from market.dataset import Dataset
from ml.tune import common
from ml.tune.common import DEFAULT_THREADS, StudyResult

log = logging.getLogger("ml.tune")


def _parser(kind: str, default_trials: str) -> argparse.ArgumentParser:
    """The options both studies take (the shared ones plus the study's own)."""
    ap = build_parser(__doc__, ["root", "data", "demo", "n_trials", "storage", "n_jobs", "quiet"], log_level="INFO",
                      prog=f"tune-{kind}",
                      overrides={"n_trials": {"help": f"trials to run (default config {default_trials})"},
                                 "n_jobs": {"help": "parallel trials in this process (default config "
                                                    "tuning.n_jobs; 2 uses both cores of a 2-core machine)"}})
    ap.add_argument("--dataset", default=None, help="a saved Dataset folder (market.dataset.Dataset.save) to reuse")
    ap.add_argument("--timeout", type=float, default=None, help="stop starting trials after this many seconds "
                    "(default config tuning.timeout_s)")
    ap.add_argument("--study-name", default=None, help="default: <kind>-<last train date>-<data fingerprint>")
    ap.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="library threads per trial "
                    f"(default {DEFAULT_THREADS}: measured faster and robust; see README)")
    ap.add_argument("--top-up", action="store_true", help="run only the trials missing to reach --n-trials "
                    "finished trials in the study (default: add --n-trials trials)")
    ap.add_argument("--worker", type=int, default=0, help="worker number when several processes share a "
                    "study (varies the sampler seed)")
    ap.add_argument("--seed", type=int, default=None, help="default config tuning.seed")
    return ap


def _inputs(args: argparse.Namespace) -> tuple[Config, Dataset, Path]:
    """Config, dataset and results folder of a study, from the shared options."""
    paths = start(args)
    common.resolve_storage(args.storage, paths.results)  # a malformed --storage fails before any expensive work
    cfg = config_of(args, paths)
    if args.seed is not None:
        raw = cfg.model_dump(mode="json")
        raw["tuning"]["seed"] = args.seed
        cfg = parse_config(raw, "--seed")
    if args.dataset:
        folder = Path(args.dataset)
        if not (folder / "dataset.json").exists():
            raise UserError(f"{folder}: not a saved dataset (dataset.json missing)")
        ds = Dataset.load(folder)
    else:
        from market.data import load_candles
        from market.dataset import build_dataset

        candles = load_candles(cfg, paths, data_path=args.data, demo=args.demo)
        ds = build_dataset(candles, cfg)
    return cfg, ds, paths.results


def _print_result(res: StudyResult) -> None:
    per = res.per_trial_seconds
    print(f"study={res.study.study_name} best_value={res.best_value:.6f} trials={res.n_trials} "
          f"ran={len(per)} mean_trial_s={(sum(per) / len(per)) if per else 0.0:.2f} "
          f"best_params={res.files['best_params']}")


def signal_main(argv: list[str] | None = None) -> int:
    """Tune the signal ensemble's hyperparameters (Optuna, purged walk-forward folds)."""
    from ml.tune.hyperparams import run_signal_study

    args = _parser("signal", "tuning.signal_trials").parse_args(argv)
    cfg, ds, results = _inputs(args)
    res = run_signal_study(ds, cfg, results, n_trials=args.n_trials, timeout=args.timeout, storage=args.storage,
                           study_name=args.study_name, n_jobs=args.n_jobs, threads=args.threads, top_up=args.top_up,
                           worker=args.worker)
    _print_result(res)
    return 0


def _signal_params(results: Path, path: str | None) -> dict[str, Any] | None:
    """The signal parameters for the out-of-fold probabilities: ``--signal-params FILE`` (a best_params JSON),
    else ``results/best_params_signal.json`` when the signal study has run, else the models' defaults (None)."""
    if path:
        p = Path(path)
        if not p.exists():
            raise UserError(f"{p}: signal parameters file not found")
        doc = json.loads(p.read_text())
        return dict(doc.get("model_params") or doc)
    if (results / "best_params_signal.json").exists():
        return common.load_best_params(results, "signal")
    return None


def position_main(argv: list[str] | None = None) -> int:
    """Tune the position (exit) model's hyperparameters (Optuna) on out-of-fold signal probabilities."""
    from ml.tune.hyperparams import oof_signal_proba
    from ml.tune.position import run_position_study

    ap = _parser("position", "tuning.position_trials")
    ap.add_argument("--signal-params", default=None, help="best_params JSON of the signal study (default "
                    "results/best_params_signal.json if present, else the signal models' defaults)")
    args = ap.parse_args(argv)
    cfg, ds, results = _inputs(args)
    sig = _signal_params(results, args.signal_params)
    t0 = time.perf_counter()
    oof = oof_signal_proba(ds, cfg, sig, n_jobs=args.threads)
    log.info("out-of-fold signal probabilities on %d bars in %.1fs (%s params)", oof.positions.size,
             time.perf_counter() - t0, "tuned" if sig else "default")
    res = run_position_study(ds, cfg, results, oof.p_long_short, n_trials=args.n_trials, timeout=args.timeout,
                             storage=args.storage, study_name=args.study_name, n_jobs=args.n_jobs,
                             top_up=args.top_up, worker=args.worker)
    _print_result(res)
    return 0


def signal_entry() -> None:
    """``tune-signal``, ``python ml/tune/hyperparams.py``, ``python -m ml.tune.hyperparams``."""
    run(signal_main)


def position_entry() -> None:
    """``tune-position``, ``python ml/tune/position.py``, ``python -m ml.tune.position``."""
    run(position_main)
