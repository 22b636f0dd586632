"""Triple-barrier labels (long / short / no trade) with their end times, and the CUSUM event filter.

The labelling mirrors how the bot trades, so that a label means "this trade would have worked":

* decision at the close of bar ``i``, fill at the open of bar ``i + 1``;
* barriers scaled by ATR at the decision: a *long* wins when ``fill + pt_atr * ATR`` is touched before
  ``fill - sl_atr * ATR``; a *short* wins when ``fill - pt_atr * ATR`` is touched before ``fill + sl_atr * ATR``;
* barriers are live from the fill bar itself and checked on each bar's high/low; when one bar touches both, the stop
  counts first (the conservative rule of the backtester);
* at most ``horizon_bars`` bars are examined (vertical barrier).

``label`` is ``1`` (long wins), ``-1`` (short wins) or ``0`` (neither). ``t1`` is the index position of the last bar
whose data decided the label: what purging must respect. Bars whose horizon runs past the end of the data are marked
``valid = False``; they are never trained on.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from numba import njit

from core.config import Config, default_config

CLASSES = (-1, 0, 1)  # class index 0 = short, 1 = no trade, 2 = long (sklearn sorts labels this way)


@njit(cache=True)
def _side_outcome(high: np.ndarray, low: np.ndarray, start: int, stop_at: int, fill: float, win: float, lose: float,
                  long: bool) -> tuple[int, int]:
    """(+1 win / -1 loss / 0 neither, bar index where decided) for one side."""
    for j in range(start, stop_at):
        if long:
            hit_lose = low[j] <= lose
            hit_win = high[j] >= win
        else:
            hit_lose = high[j] >= lose
            hit_win = low[j] <= win
        if hit_lose:
            return -1, j
        if hit_win:
            return 1, j
    return 0, stop_at - 1


@njit(cache=True)
def _triple_barrier(open_: np.ndarray, high: np.ndarray, low: np.ndarray, close: np.ndarray, atr: np.ndarray,
                    horizon: int, pt: float, sl: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    n = close.shape[0]
    label = np.zeros(n, dtype=np.int8)
    t1 = np.full(n, n - 1, dtype=np.int64)
    ret = np.full(n, np.nan)
    valid = np.zeros(n, dtype=np.bool_)
    for i in range(n):
        a = atr[i]
        if i + horizon >= n or not np.isfinite(a) or a <= 0:
            t1[i] = min(i + horizon, n - 1)
            continue
        fill = open_[i + 1]
        end = i + 1 + horizon
        lo_res, lo_j = _side_outcome(high, low, i + 1, end, fill, fill + pt * a, fill - sl * a, True)
        sh_res, sh_j = _side_outcome(high, low, i + 1, end, fill, fill - pt * a, fill + sl * a, False)
        if lo_res == 1:
            label[i] = 1
        elif sh_res == 1:
            label[i] = -1
        t1[i] = max(lo_j, sh_j)
        ret[i] = (close[t1[i]] - fill) / a
        valid[i] = True
    return label, t1, ret, valid


def triple_barrier(candles: pd.DataFrame, atr: np.ndarray | pd.Series, config: Config | None = None) -> pd.DataFrame:
    """Labels for every bar: columns ``label`` (int8), ``t1`` (int64 position), ``ret_atr``, ``valid``."""
    cfg = config or default_config()
    lab = cfg.labels
    label, t1, ret, valid = _triple_barrier(
        candles["open"].to_numpy(np.float64), candles["high"].to_numpy(np.float64),
        candles["low"].to_numpy(np.float64), candles["close"].to_numpy(np.float64),
        np.asarray(atr, dtype=np.float64), lab.horizon_bars, lab.pt_atr, lab.sl_atr,
    )
    return pd.DataFrame({"label": label, "t1": t1, "ret_atr": ret, "valid": valid}, index=candles.index)


@njit(cache=True)
def _cusum(logc: np.ndarray, scale: np.ndarray, h: float) -> np.ndarray:
    n = logc.shape[0]
    out = np.zeros(n, dtype=np.bool_)
    s_pos = 0.0
    s_neg = 0.0
    for i in range(1, n):
        thr = h * scale[i]
        if not np.isfinite(thr) or thr <= 0:
            continue
        d = logc[i] - logc[i - 1]
        s_pos = max(0.0, s_pos + d)
        s_neg = min(0.0, s_neg + d)
        if s_pos >= thr:
            s_pos = 0.0
            out[i] = True
        elif s_neg <= -thr:
            s_neg = 0.0
            out[i] = True
    return out


def cusum_events(candles: pd.DataFrame, atr: np.ndarray | pd.Series, threshold_atr: float) -> np.ndarray:
    """Boolean mask of CUSUM events (symmetric filter on log returns, threshold in ATR units of the bar).

    ``threshold_atr <= 0`` marks every bar. Causal: event ``i`` depends on bars ``<= i`` only. Training on events
    instead of every bar gives fewer, less overlapping samples (Lopez de Prado, AFML ch. 2.5).
    """
    n = len(candles)
    if threshold_atr <= 0:
        return np.ones(n, dtype=bool)
    close = candles["close"].to_numpy(np.float64)
    scale = np.asarray(atr, dtype=np.float64) / close
    return _cusum(np.log(close), scale, float(threshold_atr))
