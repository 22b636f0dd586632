"""Equity and drawdown chart (PNG), optionally a baseline next to the new run.

Why a fixed, headless (Agg) figure: it is attached to the weekly report and the Telegram message, generated on
servers without a display.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from core.io import atomic_write


def _drawdown_pct(equity: pd.Series) -> pd.Series:
    peak = equity.cummax()
    return (equity / peak - 1.0) * 100.0


def plot_equity(path: str | Path, equity: pd.Series, *, baseline: pd.Series | None = None,
                title: str = "Equity", labels: tuple[str, str] = ("new", "baseline")) -> Path:
    """Write a two-panel PNG: equity on top, drawdown (%) below; ``baseline`` adds a second curve to both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    try:
        ax1.plot(equity.index, equity.to_numpy(), lw=1.0, color="tab:blue", label=labels[0])
        ax2.fill_between(equity.index, _drawdown_pct(equity).to_numpy(), 0.0, color="tab:red", alpha=0.35,
                         label=labels[0])
        if baseline is not None and len(baseline):
            ax1.plot(baseline.index, baseline.to_numpy(), lw=1.0, color="tab:gray", label=labels[1])
            ax2.plot(baseline.index, _drawdown_pct(baseline).to_numpy(), lw=0.8, color="tab:gray", label=labels[1])
            ax1.legend(loc="upper left")
        ax1.set_title(title)
        ax1.set_ylabel("equity")
        ax2.set_ylabel("drawdown %")
        ax1.grid(alpha=0.3)
        ax2.grid(alpha=0.3)
        fig.tight_layout()
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100))
    finally:
        plt.close(fig)
    return path
