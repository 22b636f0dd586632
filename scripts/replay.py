#!/usr/bin/env python
"""Walk-forward replay: run the Sunday job on past weeks and score every decision on the weeks that followed it.

For each Sunday (02:00 UTC) from --start, --weeks times: the 13 phases exactly as cron runs them, on candles that
closed by then, in one replay root (results/replay-<id>/root) that carries models/, config.json, backups, the registry
and the studies from week to week; then the deployed set trades the following week (trading state carried), and
champion and challenger are both scored on the following --horizon-weeks. Policies side by side: gated (ours),
always adopt, never retrain, buy and hold. Outputs: results/replay-<id>/replay.json, replay.md, replay.png.

Last line: weeks=<int> commits=<int> right=<int> gated_return_pct=<f> adopt_return_pct=<f> frozen_return_pct=<f>
replay_s=<f>. Exit codes: 0 done, 2 bad input (one line naming the file or option).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.config import load_dotenv_file  # noqa: E402
from core.errors import UserError, cli_main  # noqa: E402
from core.paths import Paths  # noqa: E402
from ops.replay import Replay, ReplayOptions, default_replay_id, last_line  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="the candle history to replay (MT5 export, CSV or Parquet; default: the store)")
    ap.add_argument("--demo", action="store_true", help="replay the seeded demo candles (labelled DEMO)")
    ap.add_argument("--start", help="first Sunday (a date; a weekday moves to the next Sunday), e.g. 2024-09-01")
    ap.add_argument("--weeks", type=int, default=8, help="number of Sundays (default 8)")
    ap.add_argument("--quick", action="store_true", help="each week's job with --quick (about a year, few trials)")
    ap.add_argument("--n-trials", type=int, help="signal study trials per week (the position study gets half)")
    ap.add_argument("--horizon-weeks", type=int, default=4, help="weeks after each Sunday that judge it (default 4)")
    ap.add_argument("--gate", choices=["seed", "default"], help="override config pipeline.gate.mode (when present)")
    ap.add_argument("--root", help="project root whose config.json starts the replay and whose results/ gets it")
    ap.add_argument("--id", help="replay id (default: from start, weeks, data, --quick, --gate)")
    ap.add_argument("--resume", action="store_true", help="continue the replay after its last finished week")
    ap.add_argument("--workers", type=int, default=1, help="processes building challengers ahead (default 1)")
    ap.add_argument("--scheduler", help="Dask distributed scheduler address (tcp://host:8786) for the builds")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "httpcore", "numba", "matplotlib", "PIL", "urllib3", "filelock", "distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    paths = Paths.of(args.root)
    load_dotenv_file(paths.root)
    if args.workers < 1:
        raise UserError("--workers must be >= 1")
    if not args.resume and not args.start:
        raise UserError("--start is required (the first Sunday to replay)")
    data = str(Path(args.data).resolve()) if args.data else None
    if data is None and not args.demo and not args.resume:
        from core.config import load_config
        from market.data.store import store_path

        stored = store_path(paths, load_config(paths.config))
        if not stored.is_file():
            raise UserError(f"{stored}: no candle store to replay; give --data FILE or --demo")
        data = str(stored)  # the imported / MT5 history (refresh_data.py), read as a file
    opts = ReplayOptions(start=args.start or "2000-01-02", weeks=args.weeks, data=data, demo=args.demo,
                         quick=args.quick, n_trials=args.n_trials, horizon_weeks=args.horizon_weeks, gate=args.gate)
    if args.resume and not args.id and not args.start:
        raise UserError("--resume needs --id (or the same --start/--weeks/--data options as the replay)")
    rid = args.id or default_replay_id(opts)
    replay = Replay(paths, rid, opts, resume=args.resume, workers=args.workers, scheduler=args.scheduler,
                    progress=lambda s: print(s, flush=True))
    print(f"replay {rid}: {replay.opts.weeks} Sundays from {replay.sundays[0]} -> {replay.dir}", flush=True)
    result = replay.run()
    print(f"verdict: {result['verdict']}")
    print(f"report: {replay.dir / 'replay.md'}")
    print(last_line(result), flush=True)
    return 0


if __name__ == "__main__":
    cli_main(main)
