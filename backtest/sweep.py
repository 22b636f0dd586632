"""Phase 11: the config sweep over the active risk profile's grid, on the first part of the OOS window only.

Why it is cheap: the models' predictions are state-independent and computed once (``prepare_arrays``); every grid
point then only changes scalar ``Params`` and reruns the compiled kernel over the sweep bars. Grid points are split
into chunks that run in parallel worker processes (``n_jobs``) when the sweep is big enough to pay for them; each
worker receives the prepared arrays once.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from backtest.engine import MarketArrays, run_arrays
from backtest.policy import make_params, replace_params
from core.config import Config
from core.io import atomic_write

PARALLEL_MIN_BAR_RUNS = 50_000_000  # grid points x bars above which the sweep fans out to worker processes
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


def _run_chunk(arrays: MarketArrays, cfg: Config, points: list[dict[str, Any]], start: int, end: int,
               min_trades: int) -> tuple[list[dict[str, Any]], np.ndarray]:
    """Score every point, and keep its daily returns (the equity at each day's last bar: one gather per point)."""
    from backtest.stats import daily_returns, day_ends

    base = make_params(cfg)
    rows = []
    ends = day_ends(arrays.day[start:end])
    daily = np.empty((ends.size, len(points)))
    for pt in points:
        p = replace_params(base, **{k: (list(v) if k == "sessions" else v) for k, v in pt.items()})
        run = run_arrays(arrays, p, start, end, check=False)
        m = run.metrics(arrays, min_trades)
        daily[:, len(rows)] = daily_returns(run.equity, arrays.day[start:end], p.initial_equity, ends)
        rows.append({**{k: ("+".join(v) if k == "sessions" else v) for k, v in pt.items()},
                     "score": m["score"], "return_pct": m["return_pct"], "max_drawdown_pct": m["max_drawdown_pct"],
                     "trades": m["trades"], "win_rate": m["win_rate"], "profit_factor": m["profit_factor"],
                     "sharpe": m["sharpe"]})
    return rows, daily


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
    # Processes only pay off for big sweeps: measured here, 864 points x 5,644 bars take 0.25 s in one process and
    # 2.6 s with two (worker start-up + numba cache load dominate). Same results either way.
    big = len(points) * (end - start) > PARALLEL_MIN_BAR_RUNS
    chunks = [points[i::n_jobs] for i in range(n_jobs)] if n_jobs > 1 and big else [points]
    if len(chunks) > 1:
        from joblib import Parallel, delayed

        parts = Parallel(n_jobs=len(chunks), backend="loky", max_nbytes=None)(
            delayed(_run_chunk)(arrays, cfg, ch, start, end, min_trades) for ch in chunks)
        daily = np.empty((parts[0][1].shape[0], len(points)))
        for i, (_, d) in enumerate(parts):
            daily[:, i::len(chunks)] = d
        rows = [None] * len(points)  # type: ignore[list-item]
        for i, (part, _) in enumerate(parts):
            rows[i::len(chunks)] = part
    else:
        rows, daily = _run_chunk(arrays, cfg, points, start, end, min_trades)
    table = pd.DataFrame(rows)
    table["grid_id"] = np.arange(len(points))
    table["eligible"] = (table["trades"] >= min_trades) & (table["max_drawdown_pct"] <= prof.max_drawdown_pct)
    table["distance"] = table.apply(lambda r: _distance(r, cfg), axis=1)
    table = table.sort_values(["eligible", "score", "distance"], ascending=[False, False, True], kind="mergesort")
    table = table.reset_index(drop=True)
    daily = np.ascontiguousarray(daily[:, table["grid_id"].to_numpy()])
    table = table.drop(columns="grid_id")
    from backtest.stats import day_ends

    end_bars = start + day_ends(arrays.day[start:end])
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
