"""Equity and drawdown chart (PNG), optionally a baseline next to the new run.

Why a fixed, headless (Agg) figure: it is attached to the weekly report and the Telegram message, generated on
servers without a display.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
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


def _save(fig: object, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))  # type: ignore[attr-defined]
    return path


def plot_bootstrap(path: str | Path, means: np.ndarray, observed: float, prob_better: float | None, *,
                   margin: float = 0.0, title: str = "Paired block bootstrap") -> Path:
    """Histogram of the bootstrap means of the daily-return difference (new - deployed, in % per day) with the
    observed mean and the margin marked: the share of the histogram right of the margin is P(new beats deployed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    try:
        m = np.asarray(means, dtype=np.float64) * 100.0
        ax.hist(m, bins=60, color="tab:blue", alpha=0.6, label=f"{m.size} block resamples")
        ax.axvline(observed * 100.0, color="black", lw=1.6, label=f"observed {observed * 100:+.4f}%/day")
        ax.axvline(margin * 100.0, color="tab:red", lw=1.0, ls="--", label="no difference")
        p = "n/a" if prob_better is None else f"{prob_better:.1%}"
        ax.set_title(f"{title}: P(new beats deployed) = {p}")
        ax.set_xlabel("mean daily return difference, new - deployed (% per day)")
        ax.set_ylabel("resamples")
        ax.legend(loc="upper left", fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_cscv(path: str | Path, rank_pairs: np.ndarray, logits: np.ndarray, pbo: float, *,
              title: str = "Sweep overfitting (CSCV)") -> Path:
    """Left: every sweep configuration's in-sample vs out-of-sample relative rank on a sample of CSCV splits, the
    in-sample winners highlighted (a real edge puts them top right; luck scatters them). Right: the logits of the
    winners' out-of-sample ranks; PBO is the share at or left of 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    try:
        rp = np.asarray(rank_pairs, dtype=np.float64)
        if rp.size:
            ax1.scatter(rp[:, 0, :].ravel(), rp[:, 1, :].ravel(), s=2, alpha=0.15, color="tab:gray",
                        rasterized=True, label="all configurations")
            best = np.argmax(rp[:, 0, :], axis=1)
            ax1.scatter(rp[np.arange(rp.shape[0]), 0, best], rp[np.arange(rp.shape[0]), 1, best], s=18,
                        color="tab:red", label="in-sample best")
        ax1.axhline(0.5, color="black", lw=0.8, ls="--")
        ax1.set_xlabel("in-sample relative rank")
        ax1.set_ylabel("out-of-sample relative rank")
        ax1.set_xlim(0, 1)
        ax1.set_ylim(0, 1)
        ax1.legend(loc="lower left", fontsize=8)
        ax1.grid(alpha=0.3)
        lg = np.asarray(logits, dtype=np.float64)
        ax2.hist(lg[np.isfinite(lg)], bins=40, color="tab:purple", alpha=0.7)
        ax2.axvline(0.0, color="black", lw=1.0)
        ax2.set_xlabel("logit of the in-sample winner's out-of-sample rank")
        ax2.set_ylabel("splits")
        fig.suptitle(f"{title}: PBO = {pbo:.1%} over {lg.size} splits")
        fig.tight_layout()
        return _save(fig, path)
    finally:
        plt.close(fig)
