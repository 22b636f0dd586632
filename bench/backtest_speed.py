"""Backtest speed: fast mode (compiled kernel) and step mode (the live Trader), on the real BTC candles.

Workload (printed): ``../shared/data/BTCUSDT_15m_2023_2024.csv`` (70,175 bars) tiled once to 140,350 bars (the second
copy rescaled to continue the price path), the rule-based signal (not a model) with rule-based SL/TP distances, a
small real LightGBM position (exit) model and risk model (30 trees each, trained on seeded synthetic targets), and the
full logic: sizing, spread/slippage/commission, session and spread filters, stops/targets with gaps, model and time
exits, daily-loss and losing-streak breakers. The drawdown halt is off and lots are fine-grained (1e-4) so that the
account keeps trading to the last bar (a halted account would make the loop trivially fast).

Fast-mode figures (after compilation; the one-off precompute of features and signal predictions is reported apart):

* ``cold``: every position path walked, the exit model's trees evaluated at every in-position bar;
* ``warm``: the same run repeated (position paths memoised, see backtest/nb.py);
* ``sweep``: the moderate profile's whole grid (confidence x risk % x SL x TP multipliers x session sets) in a row,
  the workload of the config sweep: paths are reused only between trials with the same SL/TP multipliers.

The headline ``fast_bars_per_s`` is the sweep throughput with both models (bars simulated per second of wall time
over all trials, metrics included) through the product's sweep runner (``backtest.sweep.score_params``) with the
threads phase 11 uses (2, ``--threads``: the kernel releases the GIL); the one-thread figure is printed above it.
Also printed: the same sweep without the risk model (the risk model is evaluated at every entry decision, so its
cost grows with trees x trades) and with the shipped breakers (trials that halt early are cheap).
Step mode runs ``Trader.step`` (features from the bounded history window, predictor on one row) over 5,000 bars.
Last line: ``fast_bars_per_s=<int> step_bars_per_s=<int>``.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import platform
import statistics
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
REAL = REPO.parent / "shared" / "data" / "BTCUSDT_15m_2023_2024.csv"


def load_real(path: Path, spread_points: float) -> pd.DataFrame:
    """The shared BTC file as a standard candle frame (spread from config: the file has none)."""
    df = pd.read_csv(path)
    df.index = pd.DatetimeIndex(pd.to_datetime(df.pop("timestamp_utc"), utc=True), name="time")
    df["tick_volume"] = df["volume"]
    df["real_volume"] = df.pop("volume")
    df["spread"] = spread_points
    return df[["open", "high", "low", "close", "tick_volume", "spread", "real_volume"]].astype("float64")


def tile(df: pd.DataFrame, copies: int) -> pd.DataFrame:
    """Append rescaled copies so the price path continues (no jump at the seam) on a continuous 15-min grid."""
    parts = [df]
    for _ in range(copies - 1):
        last = parts[-1]
        k = float(last["close"].iloc[-1] / df["open"].iloc[0])
        nxt = df.copy()
        for c in ("open", "high", "low", "close"):
            nxt[c] = df[c] * k
        nxt.index = last.index[-1] + pd.Timedelta(minutes=15) + (df.index - df.index[0])
        parts.append(nxt)
    out = pd.concat(parts)
    out.index.name = "time"
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description="backtest speed benchmark")
    ap.add_argument("--data", default=str(REAL))
    ap.add_argument("--tile", type=int, default=2, help="copies of the data (default 2: ~140k bars)")
    ap.add_argument("--step-bars", type=int, default=5000)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2, help="sweep threads for the headline (phase 11 uses 2)")
    args = ap.parse_args()

    from backtest.engine import prepare_arrays, run_arrays, run_step
    from backtest.live import HISTORY_BARS
    from backtest.policy import make_params, replace_params
    from backtest.rules import RuleSignal, toy_exit_model, toy_risk_model
    from backtest.sweep import score_params
    from core.config import default_config
    from market.features import build_features

    cfg = default_config()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus, python {platform.python_version()}")
    base = load_real(Path(args.data), cfg.costs.default_spread_points)
    candles = tile(base, args.tile)
    n = len(candles)
    print(f"data: {Path(args.data).name} {len(base):,} bars x {args.tile} = {n:,} bars "
          f"({candles.index[0]} .. {candles.index[-1]})")

    t0 = time.perf_counter()
    feats = build_features(candles, cfg)
    t_feat = time.perf_counter() - t0
    em = toy_exit_model(feats, seed=1)
    rm = toy_risk_model(seed=2)
    pred = RuleSignal(list(feats.columns), sltp_rule=True, exit_model=em, risk_model=rm)
    t0 = time.perf_counter()
    arrays = prepare_arrays(candles, feats, pred, cfg)
    t_prep = time.perf_counter() - t0
    print(f"precompute (one-off): features {t_feat:.2f} s, predictions + arrays {t_prep:.2f} s")
    print(f"signal: {pred.name}; exit model {em[0].n_trees} trees on {em[1].size} market cols + 5 state; "
          f"risk model {rm.n_trees} trees")

    p = replace_params(make_params(cfg), max_drawdown_halt_pct=100.0, volume_min=1e-4, volume_step=1e-4)
    start = 800  # after the feature warm-up
    bars = n - start
    t0 = time.perf_counter()
    first = run_arrays(arrays, p, start, memo_paths=False)
    print(f"first call (compile or cache load): {time.perf_counter() - t0:.2f} s; trades {first.n_trades:,}, "
          f"breaker trips {first.trip_bar.size}, skipped {first.skipped_size}")
    reasons = np.bincount(first.trades["reason"], minlength=6)[1:]
    print(f"exits: stop {reasons[0]}, target {reasons[1]}, model {reasons[2]}, time {reasons[3]}, end {reasons[4]}")

    def timed(fn, reps: int) -> list[float]:  # noqa: ANN001
        out = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
        return out

    cold = timed(lambda: run_arrays(arrays, p, start, memo_paths=False), args.repeats)
    run_arrays(arrays, p, start)
    warm = timed(lambda: run_arrays(arrays, p, start), args.repeats)
    rate = lambda ts: bars / statistics.median(ts)  # noqa: E731
    print(f"fast cold (paths walked, exit trees per bar): median {statistics.median(cold) * 1e3:.2f} ms "
          f"= {rate(cold) / 1e6:.1f} M bars/s (best {bars / min(cold) / 1e6:.1f})")
    print(f"fast warm (memoised paths):                   median {statistics.median(warm) * 1e3:.2f} ms "
          f"= {rate(warm) / 1e6:.1f} M bars/s (best {bars / min(warm) / 1e6:.1f})")

    prof = cfg.profile
    grid = list(itertools.product(prof.confidence_threshold.grid(), prof.risk_percent.grid(),
                                  prof.sl_multiplier.grid(), prof.tp_multiplier.grid(), prof.session_sets))

    def sweep(arr, base_params, n_jobs: int) -> tuple[float, int]:  # noqa: ANN001
        """The grid through the product's sweep runner (backtest.sweep.score_params, metrics included)."""
        arr.clear_paths()
        ps = [replace_params(base_params, confidence_threshold=conf, risk_percent=risk, sl_multiplier=slm,
                             tp_multiplier=tpm, sessions=sess) for conf, risk, slm, tpm, sess in grid]
        t0 = time.perf_counter()
        ms, _ = score_params(arr, ps, start, arr.n, prof.min_trades, n_jobs)
        return time.perf_counter() - t0, sum(m["trades"] for m in ms)

    t_one, tr_one = sweep(arrays, p, 1)
    print(f"sweep, both models, 1 thread: {len(grid)} trials (moderate grid) incl. metrics in {t_one:.2f} s = "
          f"{t_one / len(grid) * 1e3:.2f} ms/trial = {len(grid) * bars / t_one / 1e6:.1f} M bars/s "
          f"(avg {tr_one / len(grid):,.0f} trades/trial)")
    t_sweep, tr_sweep = sweep(arrays, p, args.threads)
    sweep_rate = len(grid) * bars / t_sweep
    print(f"sweep, both models, {args.threads} threads (as phase 11 runs it): {t_sweep:.2f} s = "
          f"{sweep_rate / 1e6:.1f} M bars/s (x{t_one / t_sweep:.2f} of one thread; same trades: "
          f"{tr_sweep == tr_one})")
    no_risk = dataclasses.replace(arrays, use_risk=False, _paths=OrderedDict(), _ws={})
    t_nr, _ = sweep(no_risk, p, 1)
    print(f"sweep, position model only (no risk model), 1 thread: {t_nr / len(grid) * 1e3:.2f} ms/trial = "
          f"{len(grid) * bars / t_nr / 1e6:.1f} M bars/s  [the risk model costs "
          f"{(t_one - t_nr) / max(tr_one, 1) * 1e6:.2f} us per trade, {rm.n_trees} trees]")
    shipped = make_params(cfg)
    t_sh, tr_sh = sweep(arrays, shipped, 1)
    print(f"sweep, shipped breakers (25 % halt), 1 thread: {t_sh / len(grid) * 1e3:.2f} ms/trial = "
          f"{len(grid) * bars / t_sh / 1e6:.1f} M bars/s (avg {tr_sh / len(grid):,.0f} trades/trial before halts)")

    s0 = 1000
    s1 = min(s0 + args.step_bars, len(base))
    t0 = time.perf_counter()
    step = run_step(base, pred, cfg, s0, s1, params=p)
    t_step = time.perf_counter() - t0
    step_rate = (s1 - s0) / t_step
    print(f"step mode: {s1 - s0:,} bars in {t_step:.1f} s = {step_rate:.0f} bars/s "
          f"({len(step.trades)} trades; features per bar from the last {HISTORY_BARS} bars)")
    print(f"speed-up fast (sweep) / step: {sweep_rate / step_rate:,.0f}x")
    print(f"fast_bars_per_s={int(sweep_rate)} step_bars_per_s={int(step_rate)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
