"""Refresh the candle store: read the source, validate, store atomically, print a summary.

Sources: ``--data FILE`` (MT5 export or plain CSV/Parquet), ``--demo`` (the seeded generator), else what config.json
says (MT5 when configured - data.source "mt5", or "auto" with MT5_LOGIN set - else data.file, else the demo).
Bad data or config: one line on stderr, exit code 2, and the store and config.json untouched.

    refresh-data --data ../shared/data/BTCUSDT_15m_2023_2024.csv
    python scripts/refresh_data.py --demo --root /tmp/run1
"""

from __future__ import annotations

from cli.common import build_parser, config_of, run, start
from market.data import refresh


def main(argv: list[str] | None = None) -> int:
    ap = build_parser(__doc__, ["root", "data", "demo"], prog="refresh-data")
    args = ap.parse_args(argv)
    paths = start(args)
    cfg = config_of(args, paths)
    result = refresh(cfg, paths, data_path=args.data, demo=args.demo)

    tag = "DEMO " if result.is_demo else ""
    if result.is_demo:
        print("DEMO DATA: synthetic BTC-like candles, not a market - results made from them are DEMO results")
    print(f"{tag}source: {result.source}")
    for line in result.report.summary_lines():
        if not line.startswith("warning: "):
            print(f"{tag}{line}")
    for w in dict.fromkeys(result.warnings + result.report.warnings):
        print(f"{tag}warning: {w}")
    print(f"{tag}stored: {result.stored} ({result.new_bars} new bars)")
    return 0


def entry() -> None:
    """``refresh-data`` (installed command) and ``python scripts/refresh_data.py``."""
    run(main)
