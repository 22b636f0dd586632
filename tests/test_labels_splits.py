"""Triple-barrier labels are correct on hand-made bars; splits never let a training label reach validation/OOS."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from core.config import default_config
from market.features import WARMUP_BARS, build_features
from market.labels import cusum_events, triple_barrier
from market.splits import make_splits
from tests._candles import real_btc


def _bars(rows: list[tuple[float, float, float, float]]) -> pd.DataFrame:
    idx = pd.date_range("2024-01-01", periods=len(rows), freq="15min", tz="UTC", name="time")
    df = pd.DataFrame(rows, columns=["open", "high", "low", "close"], index=idx, dtype=float)
    df["tick_volume"] = 1.0
    df["spread"] = 0.0
    df["real_volume"] = 1.0
    return df


def test_triple_barrier_rules() -> None:
    cfg = default_config()
    cfg.labels.horizon_bars = 3
    cfg.labels.pt_atr = 2.0
    cfg.labels.sl_atr = 1.0
    atr = np.full(8, 1.0)
    # bar0 decides; fill = open of bar1 = 100; long wins at +2 (102) unless 99 is touched first
    df = _bars([
        (100, 100, 100, 100),
        (100, 101, 99.5, 100.5),   # fill bar: neither barrier
        (100.5, 102.5, 100, 102),  # long target touched -> label 1, t1 = 2
        (102, 102, 102, 102),
        (102, 103, 98, 100),       # both sides touched in one bar -> stop first
        (100, 100, 100, 100),
        (100, 100, 100, 100),
        (100, 100, 100, 100),
    ])
    lab = triple_barrier(df, atr, cfg)
    assert lab["label"].iloc[0] == 1 and lab["t1"].iloc[0] == 2
    # bar3 decides, fill 102 at bar4 open; bar4 touches 101 (long stop) and 104? no: high 103 < 104; low 98 <= 100
    # short target (102-2=100) and short stop (103) both touched -> stop counts first -> short loses; long stopped
    assert lab["label"].iloc[3] == 0 and lab["t1"].iloc[3] == 4
    # the last `horizon` bars cannot be fully observed
    assert not lab["valid"].iloc[-3:].any()
    assert lab["valid"].iloc[:5].all()


def test_cusum_filter_is_causal_and_sparser() -> None:
    df = real_btc(8_000)
    atr = build_features(df)["atr"].to_numpy()
    ev = cusum_events(df, atr, 2.0)
    assert 0.02 < ev.mean() < 0.5
    ev_prefix = cusum_events(df.iloc[:5_000], atr[:5_000], 2.0)
    np.testing.assert_array_equal(ev_prefix, ev[:5_000])
    assert cusum_events(df, atr, 0.0).all()


@pytest.mark.parametrize("weeks", [4, 12])
def test_purging_no_training_label_reaches_validation_or_oos(weeks: int) -> None:
    cfg = default_config()
    cfg.splits.oos_weeks = weeks
    df = real_btc(30_000)
    feats = build_features(df, cfg)
    lab = triple_barrier(df, feats["atr"].to_numpy(), cfg)
    sp = make_splits(df.index, lab, cfg)
    t1 = lab["t1"].to_numpy()
    # OOS is exactly the last N weeks
    span = df.index[-1] + pd.Timedelta(minutes=15) - df.index[sp.oos_start]
    assert span <= pd.Timedelta(weeks=weeks)
    assert sp.oos[0] == sp.oos_start and sp.oos[-1] == len(df) - 1
    assert sp.sweep.size + sp.holdout.size == sp.oos.size and sp.sweep[-1] < sp.holdout[0]
    assert sp.sweep.size == int(sp.oos.size * cfg.splits.sweep_fraction)
    # purge + embargo against OOS
    assert t1[sp.train].max() < sp.oos_start
    assert sp.train.max() + sp.embargo < sp.oos_start
    assert sp.embargo >= cfg.labels.horizon_bars
    assert sp.train.min() >= WARMUP_BARS
    # calibration slice is later than, and purged from, the fit part
    assert t1[sp.fit].max() < sp.calib.min()
    assert sp.fit.max() + sp.embargo < sp.calib.min()
    # walk-forward folds
    assert len(sp.folds) == cfg.splits.n_folds
    for tr, va in sp.folds:
        assert t1[tr].max() < va.min()
        assert tr.max() + sp.embargo < va.min()
        assert va.max() < sp.calib.min() < sp.oos_start
    # naive split would leak: show the purge removed something real
    naive = np.flatnonzero(lab["valid"].to_numpy()[:sp.oos_start])
    assert (t1[naive] >= sp.oos_start).any()


def test_too_little_data_is_a_clear_error() -> None:
    from core.errors import UserError

    df = real_btc(3_000)
    cfg = default_config()
    lab = triple_barrier(df, build_features(df)["atr"].to_numpy(), cfg)
    with pytest.raises(UserError, match="oos_weeks"):
        make_splits(df.index, lab, cfg)
