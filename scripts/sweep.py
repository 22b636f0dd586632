#!/usr/bin/env python
"""Phase 11 on its own: sweep the active risk profile's grid on the first 70% of the OOS window.

Uses the deployed models (or ``--models DIR``) and the current candles; writes the full table (CSV) and a heatmap
to ``--out`` (default ``results/sweep-<UTC time>/``) and prints the top rows and the chosen parameters. The holdout
(last 30% of the OOS window) is never touched. ``--apply`` deploys the chosen values (config.json only, the models
stay) through ``ops.deploy.apply`` like every other deploy: under the run lock after start-up recovery, with a backup,
a registry version tagged ``sweep-<time>``, the journaled atomic switch (config.json keeps its file mode) and, in a
git work tree, a git commit. It refuses (exit 2) when the swept models (``--models``) are not the deployed set: the
values would go live with models they were not chosen for. Without ``--apply`` nothing outside ``--out`` changes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backtest.engine import prepare_arrays  # noqa: E402
from backtest.sweep import run_sweep, save_sweep, top_rows  # noqa: E402
from core.config import config_to_json, load_config, parse_config  # noqa: E402
from core.errors import UserError, cli_main  # noqa: E402
from core.io import sha256_file  # noqa: E402
from core.paths import Paths  # noqa: E402
from market.data import load_candles  # noqa: E402
from market.dataset import build_dataset  # noqa: E402
from ml.models.bundle import load_bundle  # noqa: E402
from ops import deploy  # noqa: E402
from ops.hub import make_registry  # noqa: E402
from ops.lock import run_lock  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root")
    ap.add_argument("--data", help="candle file instead of the store")
    ap.add_argument("--demo", action="store_true")
    ap.add_argument("--models", help="model folder (default: <root>/models)")
    ap.add_argument("--out", help="output folder (default: <root>/results/sweep-<time>)")
    ap.add_argument("--n-jobs", type=int, default=2)
    ap.add_argument("--apply", action="store_true", help="write the chosen parameters into config.json")
    args = ap.parse_args()

    paths = Paths.of(args.root)
    if not args.apply:
        return sweep(paths, args)
    with run_lock(paths):  # the whole run: the deployed set cannot change between the sweep and the deploy
        note = deploy.recover(paths)
        if note:
            print(f"recovered: {note}")
        return sweep(paths, args)


def sweep(paths: Paths, args: argparse.Namespace) -> int:
    """Sweep, print, and with ``--apply`` deploy the chosen values (the caller holds the lock and recovered)."""
    cfg = load_config(paths.config)
    models = Path(args.models) if args.models else paths.models
    if not (models / "manifest.json").exists():
        raise UserError(f"{models}: no trained models (manifest.json missing); run scripts/weekly_optimize.py or "
                        f"the retrain scripts first")
    if args.apply and not _is_deployed_set(paths, models):
        raise UserError(f"--apply: {models} is not the deployed model set (its manifest.json differs from "
                        f"{paths.models / 'manifest.json'}); sweep the deployed models to change config.json")
    t0 = time.perf_counter()
    candles = load_candles(cfg, paths, args.data, args.demo)
    ds = build_dataset(candles, cfg)
    bundle = load_bundle(models, ds.feature_names)
    arrays = prepare_arrays(ds.candles, ds.features, bundle, cfg)
    sp = ds.splits
    res = run_sweep(arrays, cfg, (int(sp.sweep[0]), int(sp.sweep[-1]) + 1), oos_bars=int(sp.oos.size),
                    n_jobs=args.n_jobs)
    stamp = f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}"
    out = Path(args.out) if args.out else paths.results / f"sweep-{stamp}"
    files = save_sweep(res, out)
    demo = " [DEMO DATA]" if ds.is_demo else ""
    idx = ds.candles.index
    print(f"sweep{demo}: {res.n_combos} combinations on {idx[res.window[0]]} .. {idx[res.window[1] - 1]} "
          f"(first {cfg.splits.sweep_fraction:.0%} of the OOS window), {res.n_eligible} eligible "
          f"(>= {res.min_trades} trades, max DD <= {cfg.profile.max_drawdown_pct}%), "
          f"{time.perf_counter() - t0:.1f}s")
    top = top_rows(res, 10)
    for row in top:
        print("  " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    print(f"table: {files['csv']}\nheatmap: {files['png']}")
    if res.best is None:
        print("no eligible combination: the current parameters stay")
        return 0
    print("chosen: " + json.dumps(res.best))
    if args.apply:
        raw = cfg.model_dump(mode="json")
        raw["trading"].update(res.best)
        text = config_to_json(parse_config(raw, str(paths.config)))
        run_id = f"sweep-{stamp}"
        scores = {"score": float(top[0]["score"]), "return_pct": float(top[0]["return_pct"]),
                  "max_drawdown_pct": float(top[0]["max_drawdown_pct"]), "trades": int(top[0]["trades"])}
        done = deploy.apply(paths, run_id, None, text, reason=f"sweep --apply {run_id}: {json.dumps(res.best)}",
                            scores=scores, details=f"swept on the sweep window {idx[res.window[0]]} .. "
                                                   f"{idx[res.window[1] - 1]}{demo}",
                            registry=make_registry(cfg, paths), git_commit=cfg.pipeline.git_commit,
                            keep_backups=cfg.pipeline.keep_backups)
        print(f"applied to {paths.config}: backup {done.backup.path}; {done.registry}; {done.git}")
    return 0


def _is_deployed_set(paths: Paths, models: Path) -> bool:
    """The swept folder holds the deployed set: same manifest bytes (the manifest pins every model file's sha256)."""
    deployed = paths.models / "manifest.json"
    return deployed.is_file() and sha256_file(deployed) == sha256_file(models / "manifest.json")


if __name__ == "__main__":
    cli_main(main)
