"""Phase 11: the config sweep over the active risk profile's grid, on the first part of the OOS window only.

Why it is cheap: the models' predictions are state-independent and computed once (``prepare_arrays``); every grid
point then only changes scalar ``Params`` and reruns the compiled kernel over the sweep bars. Grid points run in
``n_jobs`` threads (:func:`score_params`): the kernel releases the GIL, the threads share the prepared arrays, and
there is nothing to start or to copy (worker processes cost ~2.6 s of start-up and numba cache loading, more than
most sweeps).

Selection rule (documented in the README):

1. only points inside the active profile's bounds exist (the grid is built from them, nothing else);
2. a point is *eligible* when it has at least ``profile.min_trades`` trades on the sweep window and its max drawdown
   does not exceed ``profile.max_drawdown_pct`` (the gate's floors, scaled to the sweep window's share of the OOS
   window for the trade count);
3. the eligible point with the highest ``score`` wins; ties go to the point closest to the current config;
4. no eligible point: the current trading parameters are kept (and the report says so).

The holdout (the last ``1 - sweep_fraction`` of OOS) is never passed to this module.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from backtest.engine import MarketArrays, run_arrays
from backtest.policy import Params, make_params, replace_params
from backtest.stats import daily_returns
from core.config import Config
from core.io import atomic_write

SWEPT = ("confidence_threshold", "risk_percent", "sl_multiplier", "tp_multiplier", "sessions")


@dataclass
class SweepResult:
    table: pd.DataFrame  # one row per grid point, sorted best first
    daily: np.ndarray  # days x grid points: daily returns on the sweep window, columns in the table's order (PBO)
    days: pd.DatetimeIndex  # the UTC day of each row of ``daily``
    best: dict[str, Any] | None  # the chosen trading parameters (None: keep current)
    min_trades: int
    n_combos: int
    n_eligible: int
    window: tuple[int, int]


def grid(cfg: Config) -> list[dict[str, Any]]:
    """Every combination of the active profile's grids (sessions = the profile's session sets)."""
    prof = cfg.profile
    axes = [prof.confidence_threshold.grid(), prof.risk_percent.grid(), prof.sl_multiplier.grid(),
            prof.tp_multiplier.grid(), [tuple(s) for s in prof.session_sets]]
    return [dict(zip(SWEPT, combo, strict=True)) for combo in itertools.product(*axes)]


def score_params(arrays: MarketArrays, params: Sequence[Params], start: int, end: int, min_trades: int,
                 n_jobs: int = 2, *, ends: np.ndarray | None = None) -> tuple[list[dict[str, Any]], np.ndarray]:
    """Run and score every ``Params`` on bars ``[start, end)``: their metrics, in order, and (with ``ends``, the
    positions in the window of the days' last bars) their daily returns as a days x points matrix.

    ``n_jobs`` threads share the market arrays; each works on its own :meth:`MarketArrays.fork` (output buffers and
    path memo) while the compiled kernel runs without the GIL. Points with the same position paths
    (:meth:`MarketArrays.path_key`: the SL/TP multipliers) go to the same thread, so no path is walked twice, and
    run one group after the other: the memo being read is then one group's (3.4 MB per 140k bars, cache-sized)
    instead of every group's at once (16 in the moderate grid: ~54 MB, and a cache miss per trade). Same numbers for
    any ``n_jobs`` and order (each point's run depends only on its own Params; the memo only caches paths)."""
    n = len(params)
    metrics: list[dict[str, Any]] = [{} for _ in range(n)]
    daily = np.empty((0 if ends is None else ends.size, n))
    day = arrays.day[start:end]

    def work(arr: MarketArrays, idx: list[int]) -> None:
        for i in idx:
            run = run_arrays(arr, params[i], start, end, check=False, copy=False)
            metrics[i] = run.metrics(arr, min_trades)
            if ends is not None:
                daily[:, i] = daily_returns(run.equity, day, params[i].initial_equity, ends)

    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault(MarketArrays.path_key(p, end), []).append(i)
    n_jobs = max(1, min(int(n_jobs), len(groups)))
    if n_jobs == 1:
        work(arrays, [i for g in groups.values() for i in g])
        return metrics, daily
    shares: list[list[int]] = [[] for _ in range(n_jobs)]
    for g in sorted(groups.values(), key=len, reverse=True):  # biggest first, each to the least loaded thread
        min(shares, key=len).extend(g)
    with ThreadPoolExecutor(max_workers=n_jobs, thread_name_prefix="sweep") as pool:
        for f in [pool.submit(work, arrays.fork(), sh) for sh in shares]:
            f.result()
    return metrics, daily


def _distance(row: pd.Series, cfg: Config) -> float:
    t = cfg.trading
    prof = cfg.profile
    d = 0.0
    for k in ("confidence_threshold", "risk_percent", "sl_multiplier", "tp_multiplier"):
        b = getattr(prof, k)
        d += abs(float(row[k]) - getattr(t, k)) / max(b.max - b.min, 1e-9)
    d += 0.0 if row["sessions"] == "+".join(t.sessions) else 1.0
    return d


def run_sweep(arrays: MarketArrays, cfg: Config, window: tuple[int, int], oos_bars: int | None = None,
              n_jobs: int = 2) -> SweepResult:
    """Sweep the grid over bar positions ``[start, end)`` (the sweep part of the OOS window).

    ``oos_bars`` (the full OOS length) scales the profile's ``min_trades`` to the sweep window's share."""
    start, end = arrays.window(*window)
    prof = cfg.profile
    share = (end - start) / oos_bars if oos_bars else 1.0
    min_trades = max(1, int(math.ceil(prof.min_trades * min(1.0, share))))
    points = grid(cfg)
    base = make_params(cfg)
    params = [replace_params(base, **{k: (list(v) if k == "sessions" else v) for k, v in pt.items()})
              for pt in points]
    ends = arrays.day_ends(start, end)
    ms, daily = score_params(arrays, params, start, end, min_trades, n_jobs, ends=ends)
    rows = [{**{k: ("+".join(v) if k == "sessions" else v) for k, v in pt.items()},
             "score": m["score"], "return_pct": m["return_pct"], "max_drawdown_pct": m["max_drawdown_pct"],
             "trades": m["trades"], "win_rate": m["win_rate"], "profit_factor": m["profit_factor"],
             "sharpe": m["sharpe"]} for pt, m in zip(points, ms, strict=True)]
    table = pd.DataFrame(rows)
    table["grid_id"] = np.arange(len(points))
    table["eligible"] = (table["trades"] >= min_trades) & (table["max_drawdown_pct"] <= prof.max_drawdown_pct)
    table["distance"] = table.apply(lambda r: _distance(r, cfg), axis=1)
    table = table.sort_values(["eligible", "score", "distance"], ascending=[False, False, True], kind="mergesort")
    table = table.reset_index(drop=True)
    daily = np.ascontiguousarray(daily[:, table["grid_id"].to_numpy()])
    table = table.drop(columns="grid_id")
    end_bars = start + ends
    days = pd.DatetimeIndex(arrays.index[end_bars]).floor("D")
    best = None
    if bool(table["eligible"].any()):
        r = table.iloc[0]
        best = {"confidence_threshold": float(r["confidence_threshold"]), "risk_percent": float(r["risk_percent"]),
                "sl_multiplier": float(r["sl_multiplier"]), "tp_multiplier": float(r["tp_multiplier"]),
                "sessions": str(r["sessions"]).split("+")}
    return SweepResult(table=table, daily=daily, days=days, best=best, min_trades=min_trades, n_combos=len(points),
                       n_eligible=int(table["eligible"].sum()), window=(start, end))


def save_sweep(result: SweepResult, out_dir: Path) -> dict[str, Path]:
    """Write the full table (CSV), every point's daily returns (``sweep_returns.npz``) and a heatmap (best score per
    confidence threshold x SL multiplier)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv = out_dir / "sweep.csv"
    atomic_write(csv, lambda tmp: result.table.to_csv(tmp, index=False, float_format="%.6g"))
    # every configuration's daily returns, columns in the table's order: the deflated Sharpe ratio and PBO read it
    npz = out_dir / "sweep_returns.npz"
    atomic_write(npz, lambda tmp: np.savez_compressed(tmp, daily=result.daily, days=result.days.asi8))
    png = out_dir / "sweep_heatmap.png"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = result.table
    piv = t.pivot_table(index="confidence_threshold", columns="sl_multiplier", values="score", aggfunc="max")
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    vals = piv.to_numpy(dtype=float)
    lim = float(np.nanmax(np.abs(vals))) if np.isfinite(vals).any() else 1.0
    im = ax.imshow(vals, cmap="RdYlGn", vmin=-lim, vmax=lim, aspect="auto", origin="lower")
    ax.set_xticks(range(piv.shape[1]), [f"{c:g}" for c in piv.columns])
    ax.set_yticks(range(piv.shape[0]), [f"{c:g}" for c in piv.index])
    ax.set_xlabel("sl_multiplier")
    ax.set_ylabel("confidence_threshold")
    ax.set_title("Sweep: best score over risk %, TP and sessions")
    for i in range(vals.shape[0]):
        for j in range(vals.shape[1]):
            if np.isfinite(vals[i, j]):
                ax.text(j, i, f"{vals[i, j]:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, label="score")
    fig.tight_layout()
    atomic_write(png, lambda tmp: fig.savefig(tmp, dpi=110))
    plt.close(fig)
    return {"csv": csv, "png": png, "returns": npz}


def top_rows(result: SweepResult, k: int = 5) -> list[dict[str, Any]]:
    cols = ["confidence_threshold", "risk_percent", "sl_multiplier", "tp_multiplier", "sessions", "score",
            "return_pct", "max_drawdown_pct", "trades", "eligible"]
    return [{c: (bool(v) if c == "eligible" else v) for c, v in row.items()}
            for row in result.table[cols].head(k).to_dict("records")]


def load_sweep_returns(out_dir: Path) -> np.ndarray | None:
    """The days x configurations daily-return matrix saved by :func:`save_sweep` (None when absent)."""
    f = out_dir / "sweep_returns.npz"
    if not f.exists():
        return None
    with np.load(f) as z:
        return np.asarray(z["daily"], dtype=np.float64)
