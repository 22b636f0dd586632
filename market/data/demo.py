"""Seeded generator of BTC-like M15 candles: the embedded default when neither MT5 nor a file is configured.

Why it exists: the whole pipeline (features, labels, tuning, backtest, deployment) must run end to end on a fresh
machine without a broker account, and the demo must be able to show a model *learning* something. Every frame from
here has ``attrs["demo"] = True`` and a source that says "demo"; scripts label their output DEMO.

The model (all per 15-minute bar, UTC, 24/7 like BTCUSD; ``t`` is the bar index):

* **Volatility** ``sigma_t = 0.0025 * exp(f_t + s_t) * season(hour) * weekday(dow) / norm``: a stochastic-volatility
  model whose log-variance is the sum of a fast AR(1) ``f`` (phi 0.98, stationary sd 0.25) and a slow AR(1) ``s``
  (phi 0.998, stationary sd 0.35). Like GARCH it clusters volatility (|returns| stay autocorrelated for days) but it
  is linear in logs, so it is generated without a Python loop. ``season`` peaks at 15 UTC (US open, x1.35) and dips at
  03 UTC (x0.65) with a small London-open bump at 08 UTC; weekends run at 0.7 (Sat) / 0.8 (Sun).
* **Innovations** ``eps_t``: Student-t with 4.5 degrees of freedom scaled to unit variance (fat tails; kurtosis of
  the returns is far above 3).
* **The predictable component** (documented so that a demo result can be judged): the standardised return
  ``u_t = r_t / sigma_t`` follows ``u_t = 0.04 * (u_{t-1} + u_{t-2} + u_{t-3} + u_{t-4}) + eps_t``, i.e. weak
  **momentum in the volatility-normalised last 4-bar return** (roughly ``ret_4 / ATR``). The correlation of the next
  bar's ``u`` with the last four is about 0.08 (R^2 under 1%): invisible by eye, learnable from ~100k bars, and it
  makes a triple-barrier label in the direction of the last hour's move slightly more likely. Nothing else is
  predictable, except a very weak pull of the log price toward 30,000 (half-life one year, about 2e-5 of the
  deviation per bar, a thousand times below the noise) that keeps the level BTC-like over three years.
* **Bars**: ``log close`` = the returns summed with that pull around log 30,000; ``open`` = the previous close;
  high/low extend past max/min(open, close) by ``0.6 * sigma * |N(0,1)|``; prices are rounded to 0.01 (the point).
* **Activity**: ``tick_volume`` ~ 900 x (sigma ratio)^1.1 x (0.7 + 0.3 |eps|) x lognormal(0, 0.25);
  ``real_volume`` (base units) ~ tick_volume x 0.05 x lognormal(0, 0.3);
  ``spread`` (points) ~ ``cfg.costs.default_spread_points`` x (sigma ratio)^0.5 x lognormal(0, 0.1), at least 30% of
  it. Both rise with volatility, as they do at a broker.

The series ends at the fixed :data:`DEMO_END` (exclusive) so that a seed gives the same frame on every machine, every
day. 105,120 bars (three years) take about 0.1 s.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from core.config import Config
from market.data.sources import BAR, COLUMNS

DEMO_END = pd.Timestamp("2026-01-01 00:00", tz="UTC")
BASE_SIGMA = 0.0025
MOMENTUM = 0.04  # coefficient on each of the last four standardised returns
T_DOF = 4.5
START_PRICE = 30_000.0
LEVEL_PULL = np.log(2.0) / (96 * 365)  # log-price pull toward START_PRICE per bar: half-life one year

_BLOCK = 256


def _ar_filter(x: np.ndarray, coefs: tuple[float, ...]) -> np.ndarray:
    """``y_t = x_t + sum_k coefs[k] * y_{t-1-k}`` (zero history), vectorised in blocks.

    Why blocks: the recursion is linear, so inside a block of B steps the answer is a fixed lower-triangular matrix
    (the impulse response) times the inputs, plus a fixed B x p matrix times the p values carried in from the previous
    block. One matrix product for all blocks and a loop over n/B blocks replace a Python loop over n bars.
    """
    p = len(coefs)
    n = x.size
    g = np.zeros(_BLOCK)
    g[0] = 1.0
    for t in range(1, _BLOCK):
        g[t] = sum(coefs[k] * g[t - 1 - k] for k in range(p) if t - 1 - k >= 0)
    i, j = np.tril_indices(_BLOCK)
    lower = np.zeros((_BLOCK, _BLOCK))
    lower[i, j] = g[i - j]
    # carry[:, k]: response inside a block to a unit value of y_{-1-k} before it (zero input)
    carry = np.zeros((_BLOCK, p))
    for k in range(p):
        hist = np.zeros(p + _BLOCK)  # hist[p - 1 - m] = y_{-1-m}
        hist[p - 1 - k] = 1.0
        for t in range(_BLOCK):
            hist[p + t] = sum(coefs[m] * hist[p + t - 1 - m] for m in range(p))
        carry[:, k] = hist[p:]
    pad = (-n) % _BLOCK
    blocks = np.concatenate([x, np.zeros(pad)]).reshape(-1, _BLOCK) @ lower.T
    state = np.zeros(p)  # y_{-1}, y_{-2}, ...
    for b in range(blocks.shape[0]):
        blocks[b] += carry @ state
        state = blocks[b, ::-1][:p].copy()
    return blocks.ravel()[:n]


def _ar1_stationary(rng: np.random.Generator, n: int, phi: float, sd: float) -> np.ndarray:
    """AR(1) with stationary standard deviation ``sd``, started from its stationary distribution."""
    eta = rng.standard_normal(n) * sd * np.sqrt(1.0 - phi * phi)
    eta[0] = rng.standard_normal() * sd
    return _ar_filter(eta, (phi,))


def _season(index: pd.DatetimeIndex) -> np.ndarray:
    hour = index.hour.to_numpy() + index.minute.to_numpy() / 60.0
    intraday = 1.0 + 0.35 * np.cos(2 * np.pi * (hour - 15.0) / 24.0) + 0.12 * np.exp(-0.5 * ((hour - 8.0) / 0.75) ** 2)
    dow = index.day_of_week.to_numpy()
    weekday = np.select([dow == 5, dow == 6], [0.7, 0.8], 1.0)
    s = intraday * weekday
    return s / s.mean()


def generate(
    n_bars: int = 105_120, seed: int = 7, spread_points: float = 1500.0, end: pd.Timestamp = DEMO_END,
    momentum: float = MOMENTUM, level_pull: float = LEVEL_PULL,
) -> pd.DataFrame:
    """``n_bars`` M15 candles ending just before ``end``: the standard frame, ``attrs["demo"] = True``.

    ``momentum`` is the planted predictable component (module docstring; 0 = none, larger = a stronger edge for
    tests); ``level_pull`` the pull toward the start price (0 = a pure random walk in logs)."""
    if n_bars < 10:
        raise ValueError("n_bars must be >= 10")
    rng = np.random.default_rng(seed)
    index = pd.date_range(end=end - BAR, periods=n_bars, freq="15min", tz="UTC", name="time").as_unit("ns")

    logvol = _ar1_stationary(rng, n_bars, 0.98, 0.25) + _ar1_stationary(rng, n_bars, 0.998, 0.35)
    sigma = BASE_SIGMA * np.exp(logvol) * _season(index)
    sigma *= BASE_SIGMA / float(np.median(sigma))

    eps = rng.standard_t(T_DOF, n_bars) / np.sqrt(T_DOF / (T_DOF - 2.0))
    u = _ar_filter(eps, (float(momentum),) * 4) if momentum else eps
    r = sigma * u
    close = START_PRICE * np.exp(_ar_filter(r, (1.0 - level_pull,)) if level_pull else np.cumsum(r))
    open_ = np.r_[START_PRICE, close[:-1]]
    hi_ext = np.exp(0.6 * sigma * np.abs(rng.standard_normal(n_bars)))
    lo_ext = np.exp(-0.6 * sigma * np.abs(rng.standard_normal(n_bars)))
    high = np.maximum(open_, close) * hi_ext
    low = np.minimum(open_, close) * lo_ext

    ratio = sigma / BASE_SIGMA
    tick_volume = np.maximum(
        1.0, np.round(900.0 * ratio**1.1 * (0.7 + 0.3 * np.abs(eps)) * rng.lognormal(0.0, 0.25, n_bars))
    )
    real_volume = np.round(tick_volume * 0.05 * rng.lognormal(0.0, 0.3, n_bars), 4)
    spread = np.round(np.maximum(0.3 * spread_points, spread_points * np.sqrt(ratio) * rng.lognormal(0.0, 0.1, n_bars)))

    o, h, lo, c = (np.round(a, 2) for a in (open_, high, low, close))
    frame = pd.DataFrame(
        {
            "open": o,
            "high": h,
            "low": lo,
            "close": c,
            "tick_volume": tick_volume,
            "spread": spread,
            "real_volume": real_volume,
        },
        index=index,
    )[list(COLUMNS)].astype("float64")
    frame.attrs["demo"] = True
    kind = "" if momentum == MOMENTUM and level_pull == LEVEL_PULL else f", momentum {momentum:g}"
    frame.attrs["source"] = f"demo (synthetic BTC-like M15, seed {seed}, {n_bars} bars{kind})"
    return frame


def noise_candles(n_bars: int = 105_120, seed: int = 7, spread_points: float = 0.0,
                  end: pd.Timestamp = DEMO_END) -> pd.DataFrame:
    """Pure noise with the demo's realism: the same stochastic volatility (clustering), fat tails, seasonality and
    activity, but no predictable direction at all (no momentum, no pull toward a level: a random walk in logs).

    Why: a gate must be tested where the right answer is known. On these candles no model, setting or search can
    have an edge, so every commit is a commit of luck; ``spread_points = 0`` (with zero commission and slippage in
    the config) removes the trading costs that would otherwise make noise lose and hide a gate that rewards luck."""
    frame = generate(n_bars, seed, spread_points, end, momentum=0.0, level_pull=0.0)
    frame.attrs["source"] = f"noise (random walk with volatility clustering, seed {seed}, {n_bars} bars)"
    return frame


def demo_candles(cfg: Config) -> pd.DataFrame:
    """The demo series the config asks for (``data.demo_bars``, ``data.demo_seed``, the configured default spread)."""
    return generate(cfg.data.demo_bars, cfg.data.demo_seed, float(cfg.costs.default_spread_points))
