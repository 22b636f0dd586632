"""Phase 11 on its own: sweep the active risk profile's grid on the first 70% of the OOS window.

Uses the deployed models (or ``--models DIR``) and the current candles; writes the full table (CSV) and a heatmap
to ``--out`` (default ``results/sweep-<UTC time>/``) and prints the top rows and the chosen parameters. The holdout
(last 30% of the OOS window) is never touched. ``--apply`` writes the chosen values into config.json (validated,
atomically, under the run lock after start-up recovery); without it nothing outside ``--out`` changes.

    sweep --demo --n-jobs 2
    python scripts/sweep.py --root /tmp/run1 --apply
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path

from cli.common import build_parser, config_of, locked_and_recovered, run, start
from core.config import config_to_json, load_config, parse_config
from core.errors import UserError
from core.io import atomic_write_text


def main(argv: list[str] | None = None) -> int:
    ap = build_parser(__doc__, ["root", "data", "demo", "models", "out", "n_jobs"], prog="sweep",
                      overrides={"out": {"help": "output folder (default: <root>/results/sweep-<UTC time>)"},
                                 "n_jobs": {"default": 2, "help": "worker processes (default %(default)s)"}})
    ap.add_argument("--apply", action="store_true", help="write the chosen parameters into config.json")
    args = ap.parse_args(argv)
    paths = start(args)

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
    t0 = time.perf_counter()
    candles = load_candles(cfg, paths, args.data, args.demo)
    ds = build_dataset(candles, cfg)
    bundle = load_bundle(models, ds.feature_names)
    arrays = prepare_arrays(ds.candles, ds.features, bundle, cfg)
    sp = ds.splits
    res = run_sweep(arrays, cfg, (int(sp.sweep[0]), int(sp.sweep[-1]) + 1), oos_bars=int(sp.oos.size),
                    n_jobs=args.n_jobs)
    out = Path(args.out) if args.out else paths.results / f"sweep-{datetime.now(UTC):%Y%m%dT%H%M%SZ}"
    files = save_sweep(res, out)
    demo = " [DEMO DATA]" if ds.is_demo else ""
    idx = ds.candles.index
    print(f"sweep{demo}: {res.n_combos} combinations on {idx[res.window[0]]} .. {idx[res.window[1] - 1]} "
          f"(first {cfg.splits.sweep_fraction:.0%} of the OOS window), {res.n_eligible} eligible "
          f"(>= {res.min_trades} trades, max DD <= {cfg.profile.max_drawdown_pct}%), "
          f"{time.perf_counter() - t0:.1f}s")
    for row in top_rows(res, 10):
        print("  " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    print(f"table: {files['csv']}\nheatmap: {files['png']}")
    if res.best is None:
        print("no eligible combination: the current parameters stay")
        return 0
    print("chosen: " + json.dumps(res.best))
    if args.apply:
        with locked_and_recovered(paths):
            raw = load_config(paths.config).model_dump(mode="json")
            raw["trading"].update(res.best)
            atomic_write_text(paths.config, config_to_json(parse_config(raw, str(paths.config))))
        print(f"applied to {paths.config}")
    return 0


def entry() -> None:
    """``sweep`` (installed command) and ``python scripts/sweep.py``."""
    run(main)
