#!/usr/bin/env python
"""Retrain the calibrated signal ensemble (RF + XGBoost + LightGBM) and deploy it atomically.

Steps: load and validate the candles, build the dataset (features, triple-barrier labels, purged splits) and run
the look-ahead self-check; fit on the training window with early stopping on the last walk-forward fold and
calibrate on the later, purged calibration slice; write the three models into a staging folder seeded with the
currently deployed models (the position, SL/TP and risk models are kept), update its manifest, check that the saved
files load back and predict bit-identically; then switch ``models/`` atomically with ``ops.deploy.commit`` (the
config stays unchanged) and print what changed. Any problem: one line on stderr, exit code 2, ``models/`` untouched.

    python scripts/retrain_signal.py --data ../shared/data/BTCUSDT_15m_2023_2024.csv
    python scripts/retrain_signal.py --demo --root /tmp/run1 --params results/best_params_signal.json

Hyperparameters: ``--params FILE`` (JSON: ``{"model_params": {"rf": {...}, "xgb": {...}, "lgb": {...}}}`` as the
signal study writes it, or the nested mapping itself), else ``results/best_params_signal.json`` when present, else
:func:`ml.models.signal.default_params`.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.config import Config, load_config, load_dotenv_file  # noqa: E402
from core.errors import UserError, cli_main  # noqa: E402
from core.paths import Paths  # noqa: E402

PARAMS_FILE = "best_params_signal.json"


def load_params(path: str | None, paths: Paths) -> tuple[dict[str, Any] | None, str]:
    """(nested params or None for the defaults, where they came from)."""
    from ml.models.signal import SIGNAL_MODELS

    p = Path(path) if path else paths.results / PARAMS_FILE
    if not p.exists():
        if path:
            raise UserError(f"{p}: parameter file not found (--params)")
        return None, "defaults (no results/best_params_signal.json)"
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{p}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    nested = doc.get("model_params", doc) if isinstance(doc, dict) else None
    if not isinstance(nested, dict) or not nested or not set(nested) <= set(SIGNAL_MODELS) or \
            not all(isinstance(v, dict) for v in nested.values()):
        raise UserError(f"{p}: expected {{\"model_params\": {{\"rf\": {{...}}, \"xgb\": {{...}}, \"lgb\": {{...}}}}}} "
                        f"(per-model constructor parameters)")
    return nested, str(p)


def _fmt_metrics(m: dict[str, Any] | None) -> str:
    if not m:
        return "n/a"
    return (f"F1 {m.get('f1_macro', float('nan')):.4f} acc {m.get('accuracy', float('nan')):.4f} "
            f"brier {m.get('brier', float('nan')):.4f} ece {m.get('ece', float('nan')):.4f}")


def retrain(paths: Paths, cfg: Config, data: str | None, demo: bool, params_path: str | None, run_id: str,
            n_jobs: int | None, stage_only: bool) -> dict[str, Any]:
    """The whole retrain under the caller's run lock; returns a summary (also printed)."""
    from market.data import load_candles
    from market.dataset import build_dataset, lookahead_self_check
    from ml.models.signal import train_signal
    from ops.deploy import commit, stage_dir

    params, params_src = load_params(params_path, paths)
    config_text = paths.config.read_text(encoding="utf-8")

    candles = load_candles(cfg, paths, data, demo)
    is_demo = bool(candles.attrs.get("demo", False))
    tag = "DEMO " if is_demo else ""
    if is_demo:
        print("DEMO DATA: synthetic BTC-like candles, not a market - models trained on them are DEMO models")
    ds = build_dataset(candles, cfg)
    problems = lookahead_self_check(candles, ds.features, cfg)
    if problems:
        raise UserError(f"look-ahead self-check failed: {problems[0]}")
    print(f"{tag}data: {candles.attrs.get('source', data or 'store')}: {len(candles):,} bars "
          f"{candles.index[0]} .. {candles.index[-1]}")
    print(f"{tag}params: {params_src}")

    t0 = time.perf_counter()
    res = train_signal(ds, cfg, params, n_jobs=n_jobs)
    train_s = time.perf_counter() - t0
    tr = res["train_range"]
    tm = res["timings_s"]
    print(f"{tag}trained on fit {tr['n_fit']:,} samples ({tr['start']} .. {tr['fit_end']}), calibrated on "
          f"{tr['n_calib']:,} ({tr['calib_start']} .. {tr['end']}, {res['metrics']['calibration_method']}) in "
          f"{train_s:.1f} s (early stop {tm['early_stop']:.1f}, fit {tm['fit']:.1f}, calibrate {tm['calibrate']:.1f}); "
          f"rounds xgb {res['params']['xgb']['n_estimators']}, lgb {res['params']['lgb']['n_estimators']}")

    staged = stage_dir(paths, run_id)
    try:
        lines = _stage(paths, ds, res, staged, is_demo)
    except BaseException:
        # nothing was deployed: drop the half-written staging folder (never after commit() started: recovery may
        # need the staged files to roll a switch forward)
        shutil.rmtree(staged.parent, ignore_errors=True)
        raise
    if stage_only:
        lines.append(f"staged only (not deployed): {staged}")
    else:
        commit(paths, run_id, staged, config_text)
        lines.append(f"deployed {run_id}: {paths.models} (config.json unchanged)")
    for line in lines:
        print(f"{tag}{line}")
    return {"run_id": run_id, "staged": str(staged), "deployed": not stage_only, "metrics": res["metrics"],
            "timings_s": res["timings_s"], "lines": lines}


def _stage(paths: Paths, ds: Any, res: dict[str, Any], staged: Path, is_demo: bool) -> list[str]:
    """Seed ``staged`` with the deployed models, save the new signal models, check the round trip; the
    "what changed" lines."""
    import numpy as np

    from ml.models.manifest import SIGNAL_KEYS, copy_set, load_model, read_manifest, save_model, verify
    from ml.models.signal import SIGNAL_MODELS, ensemble_proba

    sp = ds.splits
    tr = res["train_range"]
    old_table = read_manifest(paths.models)["models"] if (paths.models / "manifest.json").exists() else {}
    kept = copy_set(paths.models, staged)
    method = res["metrics"]["calibration_method"]
    for name in SIGNAL_MODELS:
        metrics = {
            "val": res["metrics"]["val"][name],
            "val_ensemble": res["metrics"]["val"]["ensemble"],
            "calib_in_sample_ensemble": res["metrics"]["calib_in_sample"],
            "early_stop_fold": res["metrics"]["early_stop_fold"].get(name),
            "demo": is_demo,
        }
        save_model(staged, f"signal_{name}", res["models"][name], feature_names=res["feature_names"],
                   train_range=tr, data_hash=res["data_hash"],
                   params={**res["params"][name], "calibration": method, "n_jobs": res["n_jobs"]},
                   seed=res["seed"], metrics=metrics, kind=f"signal_{name} (calibrated {method}, 3 classes)")

    # round trip: the saved files verify and predict exactly what the in-memory models predict
    verify(staged, SIGNAL_KEYS, res["feature_names"])
    loaded = {m: load_model(staged, f"signal_{m}", res["feature_names"]) for m in SIGNAL_MODELS}
    probe = ds.X[sp.calib[: min(512, sp.calib.size)]]
    if not np.array_equal(ensemble_proba(loaded, probe), ensemble_proba(res["models"], probe)):
        raise UserError(f"the models saved in {staged} do not reproduce the trained models' predictions")

    new_table = read_manifest(staged)["models"]
    lines = []
    for key in SIGNAL_KEYS:
        old, new = old_table.get(key), new_table[key]
        old_sha = old["sha256"][:12] if old else "none"
        same = " (identical file)" if old and old["sha256"] == new["sha256"] else ""
        lines.append(f"{key}: sha256 {old_sha} -> {new['sha256'][:12]}{same}; val "
                     f"{_fmt_metrics((old or {}).get('metrics', {}).get('val'))} -> "
                     f"{_fmt_metrics(new['metrics']['val'])}")
    old_ens = next((e["metrics"].get("val_ensemble") for e in old_table.values()
                    if e.get("kind", "").startswith("signal_")), None)
    lines.append(f"ensemble: val {_fmt_metrics(old_ens)} -> {_fmt_metrics(res['metrics']['val']['ensemble'])}")
    others = [k for k in kept if k not in SIGNAL_KEYS]
    lines.append(f"kept unchanged: {', '.join(others) if others else 'no other models'}")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=None, help="run root with config.json, data/, models/ (default: the repository)")
    ap.add_argument("--data", default=None, help="candle file to train on instead of the store")
    ap.add_argument("--demo", action="store_true", help="train on the seeded demo candles (DEMO models)")
    ap.add_argument("--params", default=None, help=f"JSON of tuned parameters (default: results/{PARAMS_FILE} if "
                                                   f"present, else the built-in defaults)")
    ap.add_argument("--run-id", default=None, help="id of the staging folder / deploy journal entry")
    ap.add_argument("--n-jobs", type=int, default=None,
                    help="threads for every model (default: the forest on all cores, the boosters on one)")
    ap.add_argument("--stage-only", action="store_true", help="write staging/<run-id>/models but do not deploy")
    args = ap.parse_args()
    if args.data and args.demo:
        ap.error("--data and --demo exclude each other")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")

    paths = Paths.of(args.root)
    load_dotenv_file(paths.root)
    cfg = load_config(paths.config)
    run_id = args.run_id or f"retrain-signal-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}"

    from ops.deploy import recover
    from ops.lock import run_lock

    with run_lock(paths):
        note = recover(paths)
        if note:
            print(f"recovered: {note}")
        retrain(paths, cfg, args.data, args.demo, args.params, run_id, args.n_jobs, args.stage_only)
    return 0


if __name__ == "__main__":
    cli_main(main)
