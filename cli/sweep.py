"""Phase 11 on its own: sweep the active risk profile's grid on the first 70% of the OOS window.

Uses the deployed models (or ``--models DIR``) and the current candles; writes the full table (CSV) and a heatmap
to ``--out`` (default ``results/sweep-<UTC time>/``) and prints the top rows and the chosen parameters. The holdout
(last 30% of the OOS window) is never touched. ``--apply`` deploys the chosen values (config.json only, the models
stay) through ``ops.deploy.apply`` like every other deploy: under the run lock after start-up recovery (for the whole
command, so the deployed set cannot change between the sweep and the deploy), with a backup, a registry version
tagged ``sweep-<UTC time>``, the journaled atomic switch (config.json keeps its file mode) and, in a git work tree,
a git commit. It refuses (exit 2) when the swept models (``--models``) are not the deployed set: the values would go
live with models they were not chosen for. Without ``--apply`` nothing outside ``--out`` changes.

    sweep --demo --n-jobs 2
    python scripts/sweep.py --root /tmp/run1 --apply
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import UTC, datetime
from pathlib import Path

from cli.common import build_parser, config_of, locked_and_recovered, run, start
from core.config import config_to_json, parse_config
from core.errors import UserError
from core.io import sha256_file
from core.paths import Paths


def main(argv: list[str] | None = None) -> int:
    ap = build_parser(__doc__, ["root", "data", "demo", "models", "out", "n_jobs"], prog="sweep",
                      overrides={"out": {"help": "output folder (default: <root>/results/sweep-<UTC time>)"},
                                 "n_jobs": {"default": 2, "help": "worker processes (default %(default)s)"}})
    ap.add_argument("--apply", action="store_true", help="deploy the chosen parameters (config.json) through "
                                                         "ops.deploy.apply: backup, registry tag, atomic switch")
    args = ap.parse_args(argv)
    paths = start(args)
    if not args.apply:
        return sweep(args, paths)
    with locked_and_recovered(paths):
        return sweep(args, paths)


def sweep(args: argparse.Namespace, paths: Paths) -> int:
    """Sweep, print, and with ``--apply`` deploy the chosen values (the caller holds the lock and recovered)."""
    from backtest.engine import prepare_arrays
    from backtest.sweep import run_sweep, save_sweep, top_rows
    from market.data import load_candles
    from market.dataset import build_dataset
    from ml.models.bundle import load_bundle

    cfg = config_of(args, paths)
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
        from ops import deploy
        from ops.hub import make_registry

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


def entry() -> None:
    """``sweep`` (installed command) and ``python scripts/sweep.py``."""
    run(main)
