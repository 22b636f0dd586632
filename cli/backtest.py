"""``backtest`` (``python backtest/run.py``): backtest the deployed models (or the rule signal), print the metrics.

Windows: ``--oos-only`` runs the held-out OOS window (the last ``splits.oos_weeks`` weeks, the window the models never
trained on); ``--from/--to`` a chosen window; otherwise the last ``--lookback-weeks`` weeks. Any window that starts
before the OOS window is labelled "POSSIBLY IN-SAMPLE" in the table and the JSON: the models may have trained on it.

Exit codes: 0 ok; 2 bad input (config, data, window, gaps, missing/mismatched models; an unsigned, wrongly signed or
modified model set; config.json and models/ changing under the read), one line on stderr and nothing written. No
model file is ever unpickled (:mod:`ml.models.archive`). Outputs (``--json``, ``--trades``, ``--plot``) are written
only after the run succeeded, each atomically.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import pandas as pd

from cli.common import build_parser, config_of, run, start
from core.errors import UserError
from core.io import atomic_write, atomic_write_json

LABEL_OOS = "OOS"
LABEL_IN_SAMPLE = "POSSIBLY IN-SAMPLE"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = build_parser(__doc__.split("\n\n")[0], ["root", "data", "config", "models"], prog="backtest")
    ap.add_argument("--from", dest="start", default=None, help="window start (UTC date/time, inclusive)")
    ap.add_argument("--to", dest="end", default=None, help="window end (UTC date/time, exclusive)")
    ap.add_argument("--oos-only", action="store_true", help="only the held-out OOS window (last splits.oos_weeks)")
    ap.add_argument("--lookback-weeks", type=int, default=26, help="window without --oos-only/--from (default 26)")
    ap.add_argument("--step", action="store_true", help="reference step mode (bar by bar, like the live bot)")
    ap.add_argument("--rule-signal", action="store_true",
                    help="use the rule-based momentum signal (not a model) instead of trained models")
    ap.add_argument("--json", default=None, help="write metrics + score as JSON here")
    ap.add_argument("--plot", default=None, help="write the equity/drawdown PNG here")
    ap.add_argument("--trades", default=None, help="write the trade list CSV here")
    return ap.parse_args(argv)


def _window(index: pd.DatetimeIndex, args: argparse.Namespace, oos_weeks: int) -> tuple[int, int, bool]:
    """(start, end, in_sample) from the arguments (module docstring)."""
    from backtest.engine import resolve_window
    from market.splits import oos_start_position

    oos_start = oos_start_position(index, oos_weeks)
    if args.oos_only:
        if args.start or args.end:
            raise UserError("--oos-only cannot be combined with --from/--to")
        s, e = resolve_window(index, oos_start, len(index))
    elif args.start or args.end:
        for v in (args.start, args.end):
            if v is not None:
                try:
                    pd.Timestamp(v)
                except (ValueError, TypeError):
                    raise UserError(f"--from/--to: not a date/time: {v!r}") from None
        s, e = resolve_window(index, args.start, args.end)
    else:
        if args.lookback_weeks < 1:
            raise UserError("--lookback-weeks must be >= 1")
        begin = index[-1] + pd.Timedelta(minutes=15) - pd.Timedelta(weeks=args.lookback_weeks)
        s, e = resolve_window(index, int(index.searchsorted(begin, side="left")), len(index))
    return s, e, s < oos_start


def _config_and_predictor(args: argparse.Namespace, paths: Any) -> tuple[Any, Any]:
    """(config, predictor). With models: config.json and models/ read as ONE consistent pair
    (:func:`ml.models.bundle.load_deployed`: no deploy switch in progress, neither changed while being read, the
    manifest's signature and every file hash checked before anything is decoded)."""
    from market.features import feature_names

    models_dir = Path(args.models) if args.models else paths.models
    if args.rule_signal:
        from backtest.rules import RuleSignal

        cfg = config_of(args, paths)
        return cfg, RuleSignal(feature_names(cfg))
    if not (models_dir / "manifest.json").exists():
        config_of(args, paths)  # a bad config is reported first, as before
        raise UserError(f"no trained models in {models_dir} (manifest.json missing): train them first "
                        f"(scripts/weekly_optimize.py or scripts/retrain_*.py) or pass --rule-signal")
    from ml.models.bundle import load_deployed

    config_path = Path(args.config) if args.config else None
    deployed = load_deployed(paths, config_path=config_path, models_dir=models_dir)
    return deployed.config, deployed.bundle


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if not math.isfinite(v):
            return "inf" if v > 0 else ("-inf" if v < 0 else "nan")
        return f"{v:,.4f}" if abs(v) < 100 else f"{v:,.2f}"
    return str(v)


def format_table(summary: dict[str, Any], label: str) -> str:
    """The human-readable report."""
    m = summary["metrics"]
    w = summary["window"]
    rows = [
        ("window", f"{w['start']} .. {w['end']} ({w['bars']} bars)"),
        ("window label", label),
        ("mode", summary["mode"]),
        ("signal", summary["predictor"]),
        ("net profit", _fmt(m["net_profit"])),
        ("return %", _fmt(m["return_pct"])),
        ("max drawdown %", _fmt(m["max_drawdown_pct"])),
        ("Sharpe (daily, ann.)", _fmt(m["sharpe"])),
        ("Sortino (daily, ann.)", _fmt(m["sortino"])),
        ("profit factor", _fmt(m["profit_factor"])),
        ("win rate", _fmt(m["win_rate"])),
        ("trades", _fmt(m["trades"])),
        ("average R", _fmt(m["avg_r"])),
        ("exposure %", _fmt(m["exposure_pct"])),
        ("longest losing streak", _fmt(m["longest_losing_streak"])),
        ("breaker trips", _fmt(m["breaker_trips"])),
        ("orders skipped (size)", _fmt(summary["skipped_size"])),
        ("score", _fmt(m["score"])),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    if label == LABEL_IN_SAMPLE:
        lines.append("WARNING: this window starts before the OOS window: the models may have trained on it.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from backtest.engine import run_fast, run_step
    from backtest.metrics import json_safe
    from backtest.plots import plot_equity
    from market.data import load_candles
    from market.features import build_features

    paths = start(args)
    cfg, predictor = _config_and_predictor(args, paths)  # models verified before any data work
    candles = load_candles(cfg, paths, args.data)
    if len(candles) < 2:
        raise UserError("no candles to backtest")
    s, e, in_sample = _window(candles.index, args, cfg.splits.oos_weeks)
    if args.step:
        res = run_step(candles, predictor, cfg, s, e, in_sample=in_sample)
    else:
        res = run_fast(candles, build_features(candles, cfg), predictor, cfg, s, e, in_sample=in_sample)
    label = LABEL_IN_SAMPLE if in_sample else LABEL_OOS
    summary = res.summary()
    summary["metrics"] = json_safe(summary["metrics"])
    print(format_table(res.summary(), label))

    if args.json:
        doc = {"label": label, **summary, "score": summary["metrics"]["score"],
               "data": str(candles.attrs.get("source", args.data or "store")), "risk_profile": cfg.risk_profile}
        atomic_write_json(Path(args.json), doc, default=str)
    if args.trades:
        atomic_write(Path(args.trades), lambda p: res.trades.to_csv(p, index=False))
    if args.plot:
        plot_equity(Path(args.plot), res.equity, title=f"{cfg.symbol} {label}")  # atomic itself
    return 0


def entry() -> None:
    """``backtest`` (installed command) and ``python backtest/run.py``."""
    run(main)
