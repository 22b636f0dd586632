"""Walk-forward replay: run the Sunday job on past weeks and score every decision on the weeks that followed it.

For each Sunday (02:00 UTC) from --start, --weeks times: the 13 phases exactly as cron runs them, on candles that
closed by then, in one replay root (results/replay-<id>/root) that carries models/, config.json, backups, the registry
and the studies from week to week; then the deployed set trades the following week (trading state carried), and
champion and challenger are both scored on the following --horizon-weeks. Policies side by side: gated (ours),
always adopt, never retrain, buy and hold. Outputs: results/replay-<id>/replay.json, replay.md, replay.png.

    replay --data ../shared/data/BTCUSDT_15m_2023_2024.csv --start 2024-09-01 --weeks 8 --quick
    python scripts/replay.py --demo --start 2025-10-05 --weeks 6 --quick --workers 2 --gate seed

Last line: weeks=<int> commits=<int> right=<int> gated_return_pct=<f> adopt_return_pct=<f> frozen_return_pct=<f>
replay_s=<f>. Exit codes: 0 done, 2 bad input (one line naming the file or option).
"""

from __future__ import annotations

from pathlib import Path

from cli.common import build_parser, config_of, run, start
from core.errors import UserError


def main(argv: list[str] | None = None) -> int:
    ap = build_parser(__doc__, ["root", "data", "demo", "quick", "n_trials", "verbose"], prog="replay",
                      overrides={"data": {"help": "the candle history to replay (MT5 export, CSV or Parquet; "
                                                  "default: the root's candle store)"},
                                 "quick": {"help": "each week's job with --quick (about a year, few trials)"},
                                 "n_trials": {"help": "signal study trials per week (the position study: half)"}})
    ap.add_argument("--start", help="first Sunday (a date; a weekday moves to the next Sunday), e.g. 2024-09-01")
    ap.add_argument("--weeks", type=int, default=8, help="number of Sundays (default %(default)s)")
    ap.add_argument("--horizon-weeks", type=int, default=4, help="weeks after each Sunday that judge its decision "
                                                                 "(default %(default)s)")
    ap.add_argument("--gate", choices=["seed", "default"], help="override config pipeline.gate.mode")
    ap.add_argument("--id", help="replay id (default: from start, weeks, data, --quick, --gate)")
    ap.add_argument("--resume", action="store_true", help="continue the replay after its last finished week")
    ap.add_argument("--report-only", action="store_true", help="write replay.json/md/png from the weeks finished so "
                                                                   "far and exit (a replay still running or killed)")
    ap.add_argument("--workers", type=int, default=1, help="processes building challengers ahead (default 1)")
    ap.add_argument("--scheduler", metavar="ADDRESS", help="Dask distributed scheduler (tcp://host:8786) that "
                                                           "builds the challengers")
    args = ap.parse_args(argv)
    paths = start(args)

    from ops.replay import Replay, ReplayOptions, default_replay_id, last_line

    if args.workers < 1:
        raise UserError("--workers must be >= 1")
    if not (args.resume or args.report_only) and not args.start:
        raise UserError("--start is required (the first Sunday to replay)")
    data = str(Path(args.data).resolve()) if args.data else None
    if data is None and not args.demo and not (args.resume or args.report_only):
        from market.data.store import store_path

        stored = store_path(paths, config_of(args, paths))
        if not stored.is_file():
            raise UserError(f"{stored}: no candle store to replay; give --data FILE or --demo")
        data = str(stored)  # the imported / MT5 history (refresh_data.py), read as a file
    opts = ReplayOptions(start=args.start or "2000-01-02", weeks=args.weeks, data=data, demo=args.demo,
                         quick=args.quick, n_trials=args.n_trials, horizon_weeks=args.horizon_weeks, gate=args.gate)
    rid = args.id or default_replay_id(opts)
    replay = Replay(paths, rid, opts, resume=args.resume or args.report_only, workers=args.workers,
                    scheduler=args.scheduler, progress=lambda s: print(s, flush=True))
    if args.report_only:
        result = replay.summary()
        print(f"{result['tally']['weeks']} of {replay.opts.weeks} weeks finished; report: {replay.dir / 'replay.md'}")
        print(last_line(result), flush=True)
        return 0
    print(f"replay {rid}: {replay.opts.weeks} Sundays from {replay.sundays[0]} -> {replay.dir}", flush=True)
    result = replay.run()
    print(f"verdict: {result['verdict']}")
    print(f"report: {replay.dir / 'replay.md'}")
    print(last_line(result), flush=True)
    return 0


def entry() -> None:
    """``replay`` (installed command) and ``python scripts/replay.py``."""
    run(main)
