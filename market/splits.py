"""Leak-free splits: training window, purged walk-forward folds, calibration slice, and the OOS window.

Layout on the time axis (positions are integer bar indices)::

    | warm-up | ---------------- train --------------------------- | embargo | ------- OOS ------- |
              | fold blocks (walk-forward) ... | calib |                     | sweep 70% | hold 30% |

* **OOS** = the last ``oos_weeks`` weeks of bars. Its first ``sweep_fraction`` is what the config sweep may see; the
  rest is the holdout that only the final evaluation sees. The Optuna studies never see any of it.
* **train** = samples before the OOS start, *purged* (no label end ``t1`` reaches the OOS start) and *embargoed*
  (no sample within ``embargo`` bars of the OOS start; ``embargo >= horizon``).
* **calib** = the chronologically last ``calibration_fraction`` of train, used by ``calibrate_models()``; the models
  are fit on ``fit`` = train before it, purged and embargoed the same way.
* **folds** = expanding walk-forward folds inside ``fit``: fold ``k`` validates on block ``k + 1`` and trains on the
  blocks before it, purged against that block's start.

Only samples with a full feature warm-up and a valid (fully observed) label are ever used for fitting.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from core.config import Config, default_config
from core.errors import UserError
from market.features import WARMUP_BARS


@dataclass
class Splits:
    """Integer bar positions of every window (see the module docstring)."""

    n_bars: int
    oos_start: int
    embargo: int
    train: np.ndarray
    fit: np.ndarray
    calib: np.ndarray
    oos: np.ndarray
    sweep: np.ndarray
    holdout: np.ndarray
    folds: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)

    def describe(self, index: pd.DatetimeIndex) -> dict[str, object]:
        """Sizes and date ranges, for reports."""

        def rng(a: np.ndarray) -> dict[str, object]:
            if a.size == 0:
                return {"n": 0}
            return {"n": int(a.size), "start": str(index[a[0]]), "end": str(index[a[-1]])}

        return {
            "embargo_bars": self.embargo, "train": rng(self.train), "fit": rng(self.fit), "calib": rng(self.calib),
            "oos": rng(self.oos), "sweep": rng(self.sweep), "holdout": rng(self.holdout),
            "folds": [{"train": rng(tr), "val": rng(va)} for tr, va in self.folds],
        }


def _purge(cand: np.ndarray, t1: np.ndarray, boundary: int, embargo: int) -> np.ndarray:
    """Keep candidates whose label ends before ``boundary`` and that lie at least ``embargo`` bars before it."""
    return cand[(t1[cand] < boundary) & (cand + embargo < boundary)]


def oos_start_position(index: pd.DatetimeIndex, oos_weeks: int) -> int:
    """First bar of the OOS window: the last ``oos_weeks`` weeks ending with the last bar's close."""
    end = index[-1] + pd.Timedelta(minutes=15)
    return int(index.searchsorted(end - pd.Timedelta(weeks=oos_weeks), side="left"))


def make_splits(index: pd.DatetimeIndex, labels: pd.DataFrame, config: Config | None = None,
                sample_mask: np.ndarray | None = None) -> Splits:
    """Compute all windows. ``labels`` is :func:`market.labels.triple_barrier`'s frame; ``sample_mask`` (e.g. CUSUM
    events) further restricts the samples used for fitting (never the OOS bar ranges)."""
    cfg = config or default_config()
    sp = cfg.splits
    n = len(index)
    t1 = labels["t1"].to_numpy(np.int64)
    embargo = max(sp.embargo_bars, cfg.labels.horizon_bars)
    oos_start = oos_start_position(index, sp.oos_weeks)
    usable = labels["valid"].to_numpy(bool).copy()
    usable[:WARMUP_BARS] = False
    if sample_mask is not None:
        usable &= np.asarray(sample_mask, dtype=bool)
    cand = np.flatnonzero(usable[:oos_start])
    train = _purge(cand, t1, oos_start, embargo)
    if oos_start >= n or train.size < 200:
        raise UserError(
            f"not enough data: {n} bars give {train.size} training samples before an OOS window of "
            f"{sp.oos_weeks} weeks (config splits.oos_weeks, data.history_days)"
        )
    oos = np.arange(oos_start, n, dtype=np.int64)
    n_sweep = int(np.floor(oos.size * sp.sweep_fraction))
    sweep, holdout = oos[:n_sweep], oos[n_sweep:]

    calib_start = int(train[int(train.size * (1 - sp.calibration_fraction))])
    calib = train[train >= calib_start]
    fit = _purge(train[train < calib_start], t1, calib_start, embargo)

    folds: list[tuple[np.ndarray, np.ndarray]] = []
    blocks = np.array_split(fit, sp.n_folds + 1)
    for k in range(1, len(blocks)):
        val = blocks[k]
        if val.size == 0:
            continue
        prior = np.concatenate(blocks[:k])
        tr = _purge(prior, t1, int(val[0]), embargo)
        folds.append((tr, val))
    return Splits(n_bars=n, oos_start=oos_start, embargo=embargo, train=train, fit=fit, calib=calib, oos=oos,
                  sweep=sweep, holdout=holdout, folds=folds)
