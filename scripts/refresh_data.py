#!/usr/bin/env python
"""Refresh the candle store: read the source, validate, store atomically, print a summary.

Sources: ``--data FILE`` (MT5 export or plain CSV/Parquet), ``--demo`` (the seeded generator), else what config.json
says (MT5 when configured - data.source "mt5", or "auto" with MT5_LOGIN set - else data.file, else the demo).
Bad data or config: one line on stderr, exit code 2, and the store and config.json untouched. A file is merged into
the store (new bars added, overlapping bars must agree); ``--replace`` makes the file the whole store instead. The
script holds the root's run lock (as the weekly job does): while a run holds it, it exits 3 at once.

    python scripts/refresh_data.py --data ../shared/data/BTCUSDT_15m_2023_2024.csv
    python scripts/refresh_data.py --demo --root /tmp/run1
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.config import load_config, load_dotenv_file  # noqa: E402
from core.errors import cli_main  # noqa: E402
from core.paths import Paths, remove_stale_temp_files  # noqa: E402
from market.data import refresh  # noqa: E402
from ops.lock import run_lock  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=None, help="run root with config.json and data/ (default: the repository)")
    ap.add_argument("--data", default=None, help="candle file to validate and store instead of the configured source")
    ap.add_argument("--demo", action="store_true", help="use the seeded demo generator (stored as ..._DEMO.parquet)")
    ap.add_argument("--replace", action="store_true",
                    help="with --data: replace the stored history by the file instead of merging (drops stored bars)")
    args = ap.parse_args()
    if args.data and args.demo:
        ap.error("--data and --demo exclude each other")
    if args.replace and not args.data:
        ap.error("--replace needs --data FILE")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")

    paths = Paths.of(args.root)
    load_dotenv_file(paths.root)
    cfg = load_config(paths.config)
    with run_lock(paths):  # the weekly job reads and writes the same store: one writer per root
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


if __name__ == "__main__":
    cli_main(main)
