"""Refresh the candle store: read the source, validate, store atomically, print a summary.

Sources: ``--data FILE`` (MT5 export or plain CSV/Parquet), ``--demo`` (the seeded generator), else what config.json
says (MT5 when configured - data.source "mt5", or "auto" with MT5_LOGIN set - else data.file, else the demo).
Bad data or config: one line on stderr, exit code 2, and the store and config.json untouched. A file is merged into
the store (new bars added, overlapping bars must agree); ``--replace`` makes the file (or MT5's history) the whole
store instead, keeping the previous store under ``data/replaced/``. The command holds the root's run lock (as the
weekly job does): while a run holds it, it exits 3 at once.

    refresh-data --data ../shared/data/BTCUSDT_15m_2023_2024.csv
    python scripts/refresh_data.py --demo --root /tmp/run1
"""

from __future__ import annotations

import logging

from cli.common import build_parser, config_of, locked_and_recovered, run, start
from core.errors import UserError
from core.paths import remove_stale_temp_files
from market.data import refresh


def main(argv: list[str] | None = None) -> int:
    ap = build_parser(__doc__, ["root", "data", "demo"], prog="refresh-data")
    ap.add_argument("--replace", action="store_true",
                    help="replace the stored history by the file (or by MT5's history) instead of merging; the "
                         "previous store is kept under data/replaced/")
    args = ap.parse_args(argv)
    if args.replace and args.demo:
        raise UserError("--replace does not apply to --demo (the demo store is regenerated from its seed)")
    paths = start(args)
    cfg = config_of(args, paths)
    with locked_and_recovered(paths):  # the weekly job reads and writes the same store: one writer per root
        for name in remove_stale_temp_files(paths):
            logging.getLogger("market.data").warning("removed %s (left by a killed write)", name)
        result = refresh(cfg, paths, data_path=args.data, demo=args.demo, replace=args.replace)

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
