"""The live bot: trades the deployed set (``models/`` + ``config.json``) on closed M15 bars.

    python scripts/live.py                      # shadow (the default): decisions + simulated fills journaled, no order
    python scripts/live.py --live               # market orders with stop/target (order_check, then order_send)
    python scripts/live.py --data FILE --from 2024-10-01 --to 2024-12-31   # a recorded feed, as fast as possible
    python scripts/live.py --parity 2024-11-05  # replay that day's journal through the backtester and compare

Bars come from MetaTrader 5 (the ``MetaTrader5`` package on Windows, the ``mt5linux`` bridge on Linux; credentials
MT5_LOGIN / MT5_PASSWORD / MT5_SERVER from the environment or .env) unless ``--data`` is given. Files go to
``<root>/live/<mode>/`` (``--state-dir``): state.json, journal/, days/, parity.jsonl, notifications.md.
A run prints ``parity: <n> mismatches over <bars> bars, <trades> trades`` after a recorded feed, after each UTC
day in the loop, and for ``--parity``.

Exit codes: 0 done; 1 a parity check found mismatches; 2 bad input (one line on stderr); 3 another instance runs
for this account / state folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cli.common import build_parser, run, start
from core.errors import UserError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = build_parser(__doc__.split("\n\n")[0], ["root", "data", "verbose"], log_level="INFO", prog="live")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--shadow", action="store_true", help="journal decisions and simulated fills, send nothing "
                                                             "(the default)")
    mode.add_argument("--live", action="store_true", help="send market orders with stop and target to MT5")
    ap.add_argument("--from", dest="start", default=None, help="with --data: window start (UTC, inclusive)")
    ap.add_argument("--to", dest="end", default=None, help="with --data: window end (UTC, exclusive)")
    ap.add_argument("--parity", metavar="DAY", default=None, help="re-run the backtester over DAY's journal")
    ap.add_argument("--state-dir", default=None, help="where state.json and the journal live "
                                                       "(default: <root>/live/<mode>)")
    ap.add_argument("--magic", type=int, default=None, help="magic number of this bot's positions (--live)")
    ap.add_argument("--keep-days", type=int, default=400, help="journal days kept (default 400)")
    ap.add_argument("--poll-seconds", type=float, default=5.0, help="how often MT5 is asked for a new bar")
    ap.add_argument("--max-bars", type=int, default=None, help="stop after this many bars (trials)")
    ap.add_argument("--rule-signal", action="store_true", help="the rule-based signal instead of the models")
    return ap.parse_args(argv)


def _state_dir(args: argparse.Namespace, paths, mode: str) -> Path:  # noqa: ANN001
    if args.state_dir:
        return Path(args.state_dir).resolve()
    if args.data:
        tag = f"{Path(args.data).stem}_{args.start or 'start'}_{args.end or 'end'}".replace(":", "")
        return paths.root / "live" / f"data-{tag}"
    if mode == "live":
        from core.config import secrets

        return paths.root / "live" / f"live-{secrets(['MT5_LOGIN']).get('MT5_LOGIN', 'account')}"
    return paths.root / "live" / "shadow"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from ops.bot.runner import Bot, BotOptions, load_deployed, parity_backtest, parity_day
    from ops.lock import run_lock

    paths = start(args, log_stream=sys.stdout)
    mode = "live" if args.live else "shadow"
    if args.live and args.data:
        raise UserError("--live needs the terminal: it cannot be combined with --data (use --shadow)")
    if (args.start or args.end) and not args.data:
        raise UserError("--from/--to only apply to a recorded feed (--data FILE)")
    if args.keep_days < 1:
        raise UserError("--keep-days must be >= 1")
    state_dir = _state_dir(args, paths, mode)

    if args.parity:
        import pandas as pd

        try:
            day = pd.Timestamp(args.parity).strftime("%Y-%m-%d")
        except (ValueError, TypeError):
            raise UserError(f"--parity: not a date: {args.parity!r}") from None
        res = parity_day(state_dir, day, paths, load_deployed(paths, args.rule_signal), mode)
        print(res.line())
        for d in res.details[:20]:
            print(f"  {d}")
        return 1 if res.mismatches else 0

    state_dir.mkdir(parents=True, exist_ok=True)
    with run_lock(paths, lock_path=state_dir / ".live.lock", holder="live bot instance"):
        broker = None
        if args.data:
            from core.config import load_config
            from ops.bot.feed import FileFeed

            feed = FileFeed(load_config(paths.config), paths.root, args.data, args.start, args.end)
        else:
            from core.config import load_config
            from ops.bot.feed import MT5Feed

            feed = MT5Feed(load_config(paths.config))
        if mode == "live":
            from ops.bot.broker import DEFAULT_MAGIC, MT5Broker

            broker = MT5Broker(feed.cfg, args.magic if args.magic is not None else DEFAULT_MAGIC)
        opts = BotOptions(mode=mode, state_dir=state_dir, keep_days=args.keep_days, poll_seconds=args.poll_seconds,
                          rule_signal=args.rule_signal, fsync=not args.data, max_bars=args.max_bars)
        bot = Bot(paths, feed, opts, broker=broker)
        bot.start()
        print(f"live bot: {mode}, set {bot.deployed.id}, state {state_dir}, "
              f"{'recorded feed ' + args.data if args.data else 'MT5'}", flush=True)
        n = bot.run()
        print(f"processed {n} bar(s); last bar {bot.last.time if bot.last else '-'}", flush=True)
        if args.data and feed.done(bot.last.time_ns if bot.last else None):
            if bot.start_state != _fresh(bot):
                print("parity: skipped (this run did not start from a fresh account)")
                return 0
            res = parity_backtest(state_dir, feed.candles, feed.start, feed.end, bot.deployed)
            bot.report_parity(res)
            for d in res.details[:20]:
                print(f"  {d}")
            (state_dir / "parity_backtest.json").write_text(json.dumps(res.to_json(), indent=2) + "\n")
            return 1 if res.mismatches else 0
    return 0


def _fresh(bot) -> dict:  # noqa: ANN001
    from backtest.policy import State

    return State.initial(bot.trader.params.initial_equity).to_dict()




def entry() -> None:
    """``live`` (installed command) and ``python scripts/live.py``."""
    run(main)
