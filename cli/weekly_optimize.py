"""The weekly job (cron, Sunday 02:00 UTC): retrain, tune and safely redeploy the bot's models, or change nothing.

The 13 phases, in order (each a plain function in ``ops/pipeline.py``; outputs under ``results/<run id>/``):

 1. pre-flight, backup of models/ + config.json, baseline score of the deployed set
 2. MT5 connectivity check and candle refresh (or the file / demo source)
 3. dataset: features, labels, purged splits, look-ahead self-check
 4. SHAP importances of the three signal models (report only)
 5. Optuna study of the signal ensemble          6. Optuna study of the position model
 7. retrain + calibrate RF/XGB/LGB               8. position model
 9. SL/TP models                                10. risk model
11. config sweep on the first 70% of the OOS window, inside the risk profile's bounds
12. clean backtest on the whole OOS window (incl. the 30% holdout), new vs deployed
13. gate: commit (Hub push, atomic switch, success report) or rollback (restore backup, failure report)

Exit codes: 0 finished (committed, rolled back or dry run), 2 bad input before any phase ran (config, options, an
unwritable root), 3 another run holds the lock, 4 a phase failed (failure report sent, deployed state verified
unchanged), 5 a phase failed and the deployed state could not be verified (see README, Reliability).
"""

from __future__ import annotations

import sys
from pathlib import Path

from cli.common import build_parser, locked_and_recovered, run, start
from core.errors import UserError
from ops.pipeline import PHASE_NAMES, RunOptions, run_pipeline


def parse_phases(text: str | None) -> list[int] | None:
    """``"1-3,11"`` -> ``[1, 2, 3, 11]``; None runs them all."""
    if not text:
        return None
    out: set[int] = set()
    for part in text.split(","):
        a, _, b = part.partition("-")
        try:
            lo, hi = int(a), int(b or a)
        except ValueError:
            raise UserError(f"--phases: '{part}' is not a phase number or range (1-13)") from None
        if not (1 <= lo <= hi <= 13):
            raise UserError(f"--phases: '{part}' is outside 1-13")
        out.update(range(lo, hi + 1))
    return sorted(out)


def main(argv: list[str] | None = None) -> int:
    ap = build_parser(__doc__, ["root", "data", "demo", "quick", "n_trials", "storage", "verbose"], log_level="INFO",
                      overrides={"n_trials": {"help": "signal study trials (the position study gets half)"}},
                      prog="weekly-optimize")
    ap.add_argument("--dry-run", action="store_true", help="do everything but the commit")
    ap.add_argument("--resume", action="store_true", help="continue the last unfinished run after its last phase")
    ap.add_argument("--phases", help="run only these phases, e.g. '1-3,11' (debugging)")
    args = ap.parse_args(argv)
    paths = start(args, log_stream=sys.stdout)
    opts = RunOptions(demo=args.demo, data=str(Path(args.data).resolve()) if args.data else None, quick=args.quick,
                      dry_run=args.dry_run, n_trials=args.n_trials, storage=args.storage,
                      phases=parse_phases(args.phases))
    paths.results.mkdir(parents=True, exist_ok=True)
    with locked_and_recovered(paths):
        if not paths.config.exists():
            raise UserError(f"{paths.config}: config file not found (copy the repository's config.json there)")
        data = run_pipeline(paths, opts, resume=args.resume)
    dec = data.get("decision") or {}
    print("\nphase                     status   seconds")
    for p in sorted(data.get("phases", []), key=lambda p: p["number"]):
        name = PHASE_NAMES.get(p["number"], p["name"])
        print(f"{p['number']:>2} {name:<22} {p['status']:<8} {p.get('seconds') or 0:>8.1f}")
    total = sum(p.get("seconds") or 0 for p in data.get("phases", []))
    print(f"   {'total':<22} {'':<8} {total:>8.1f}")
    demo = " [DEMO DATA]" if data.get("demo") else ""
    print(f"\nrun {data['run_id']}{demo}: {dec.get('action', 'incomplete')} - {dec.get('reason', '')}")
    print(f"report: {paths.results / data['run_id'] / 'report.md'}")
    return 0


def entry() -> None:
    """``weekly-optimize`` (installed command) and ``python scripts/weekly_optimize.py``."""
    run(main)
