"""The Optuna studies on SQLite: the real signal objective on a few thousand real BTC bars, 2-4 trials.

What is proved here (the PostgreSQL / several-workers case is in test_tune_postgres.py):

* the study runs and writes ``optuna_study.pkl``, ``best_params_signal.json`` and the history PNG;
* every index the objective receives lies before ``oos_start`` (recorded through the objective's index hook), and a
  fold that reaches the OOS window raises instead of being tuned on;
* it reports once per fold, and the pruner can stop a trial after a fold;
* it is resumable (a second call adds trials to the same study; ``top_up`` runs only the missing ones) and seeded
  (the same seed gives the same parameter sequence; a resumed study does not replay it);
* the out-of-fold signal probabilities cover only fold validation bars.
"""

from __future__ import annotations

import json

import joblib
import numpy as np
import optuna
import pytest
from _candles import real_btc as real_candles

from core.config import default_config, parse_config, with_trading
from core.errors import UserError
from market.dataset import Dataset, build_dataset
from ml.tune import common
from ml.tune.common import OOSLeakError, guard_indices

N_BARS = 4000  # 768 warm-up + ~2500 training + one OOS week: three walk-forward blocks of ~700 bars


def small_config():
    raw = default_config().model_dump(mode="json")
    raw["splits"].update({"oos_weeks": 1, "n_folds": 2})
    raw["tuning"].update({"seed": 7})
    return parse_config(raw, "test config")


@pytest.fixture(scope="module")
def cfg():
    return small_config()


@pytest.fixture(scope="module")
def ds(cfg) -> Dataset:
    return build_dataset(real_candles(N_BARS), cfg)


# ----------------------------------------------------------------------------------------------- plumbing
def test_guard_indices_refuses_oos_and_negative():
    assert guard_indices([0, 5, 9], 10).tolist() == [0, 5, 9]
    assert guard_indices(np.array([], dtype=np.int64), 10).size == 0
    with pytest.raises(OOSLeakError, match="position 10"):
        guard_indices([3, 10], 10, "x")
    with pytest.raises(OOSLeakError):
        guard_indices([-1], 10)


def test_storage_urls(tmp_path):
    assert common.resolve_storage(None, tmp_path) == f"sqlite:///{tmp_path.resolve()}/optuna.db"
    assert common.resolve_storage(str(tmp_path / "a.db"), tmp_path).startswith("sqlite:///")
    assert common.resolve_storage("postgresql+psycopg2://u:pw@h:5432/d", tmp_path).startswith("postgresql")
    assert "pw" not in common.redact_url("postgresql+psycopg2://u:pw@h:5432/d")
    with pytest.raises(UserError, match="database URL"):
        common.resolve_storage("not a url", tmp_path)
    with pytest.raises(UserError, match="cannot open"):
        common.open_storage("postgresql+psycopg2://u:pw@127.0.0.1:1/d")


def test_sqlite_storage_is_in_wal_mode_and_keeps_trials_across_opens(tmp_path):
    import sqlite3

    url = common.resolve_storage(None, tmp_path)
    study = common.create_or_load_study("wal", common.open_storage(url), seed=1)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    storage = common.open_storage(url)
    with storage.engine.connect() as conn:  # what every connection of the storage runs with
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
    with sqlite3.connect(tmp_path / "optuna.db") as raw:  # the mode is the file's: a plain reader sees it too
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    again = common.create_or_load_study("wal", common.open_storage(url), seed=1)
    assert [t.params for t in again.trials] == [t.params for t in study.trials] and len(again.trials) == 3


def test_run_folds_reports_every_fold_and_prunes():
    """A cheap objective through the same fold loop: each trial reports per fold, bad trials are pruned."""
    folds = [(np.arange(0, 10), np.arange(12, 20)), (np.arange(0, 20), np.arange(22, 30)),
             (np.arange(0, 30), np.arange(32, 40))]
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0))
    calls: list[int] = []

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 0.0, 1.0)
        return common.run_folds(trial, folds, lambda k, tr, va: (calls.append(k) or x, {"k": k}), oos_start=40)

    study.optimize(objective, n_trials=20)
    states = [t.state for t in study.trials]
    assert optuna.trial.TrialState.PRUNED in states
    for t in study.trials:
        if t.state == optuna.trial.TrialState.COMPLETE:
            assert sorted(t.intermediate_values) == [0, 1, 2]
            assert t.user_attrs["fold2"]["k"] == 2
        else:
            assert len(t.intermediate_values) < 3  # stopped before the last fold: its cost was saved
    assert len(calls) < 3 * len(study.trials)


def test_run_folds_guards_before_the_objective_sees_anything():
    study = optuna.create_study(direction="maximize")
    seen: list[int] = []

    def objective(trial: optuna.Trial) -> float:
        leaky = [(np.arange(0, 10), np.arange(12, 20)), (np.arange(0, 20), np.arange(22, 41))]
        return common.run_folds(trial, leaky, lambda k, tr, va: (seen.append(k) or 1.0, {}), oos_start=40)

    with pytest.raises(OOSLeakError, match="fold 1 validation"):
        study.optimize(objective, n_trials=1)
    assert seen == [0]


def test_fingerprint_mismatch_is_refused(tmp_path):
    url = common.resolve_storage(None, tmp_path)
    common.create_or_load_study("s", url, 1, user_attrs={"fingerprint": "aaa"})
    common.create_or_load_study("s", url, 1, user_attrs={"fingerprint": "aaa"})  # same data: loads
    with pytest.raises(UserError, match="other data"):
        common.create_or_load_study("s", url, 1, user_attrs={"fingerprint": "bbb"})


# ----------------------------------------------------------------------------------------------- the real study
def test_signal_study_real_objective(ds, cfg, tmp_path):
    from ml.tune.hyperparams import model_params_from_flat, run_signal_study

    seen: dict[str, list[np.ndarray]] = {}
    hook = lambda what, idx: seen.setdefault(what, []).append(np.asarray(idx).copy())  # noqa: E731
    res_dir = tmp_path / "results"
    res = run_signal_study(ds, cfg, res_dir, n_trials=3, index_hook=hook)

    # -- the OOS window is never touched: every index the objective received is < oos_start
    oos = ds.splits.oos_start
    assert set(seen) == {"train", "val", "bars"}
    assert len(seen["train"]) == 3 * len(ds.splits.folds)
    for what, arrays in seen.items():
        assert all(a.size > 0 and a.max() < oos and a.min() >= 0 for a in arrays), what
    fold_val_max = max(int(va.max()) for _, va in ds.splits.folds)
    assert max(int(a.max()) for a in seen["bars"]) == fold_val_max < oos

    # -- per-fold reports and attributes
    study = res.study
    assert len(study.trials) == 3 and res.n_trials == 3 and len(res.per_trial_seconds) == 3
    for t in study.trials:
        assert t.state == optuna.trial.TrialState.COMPLETE  # the median pruner waits for 5 finished trials
        assert sorted(t.intermediate_values) == list(range(len(ds.splits.folds)))
        f0 = t.user_attrs["fold0"]
        assert 0.0 <= f0["f1"] <= 1.0 and f0["max_dd_pct"] >= 0.0 and f0["trades"] >= 0
        assert t.value == pytest.approx(np.mean([t.user_attrs[f"fold{k}"]["value"]
                                                 for k in range(len(ds.splits.folds))]), abs=1e-5)
    assert res.best_value == max(t.value for t in study.trials)

    # -- artefacts
    pkl = joblib.load(res_dir / "optuna_study.pkl")
    assert isinstance(pkl, optuna.Study) and len(pkl.trials) == 3 and pkl.best_value == res.best_value
    doc = json.loads((res_dir / "best_params_signal.json").read_text())
    assert doc["best_params"] == res.best_params and doc["best_value"] == res.best_value
    assert set(doc["model_params"]) == {"rf", "xgb", "lgb"}
    assert doc["model_params"] == json.loads(json.dumps(model_params_from_flat(res.best_params)))
    assert common.load_best_params(res_dir, "signal") == doc["model_params"]
    assert (res_dir / "optuna_history_signal.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (res_dir / "optuna.db").exists()  # the default storage

    # -- resumable: a second call adds trials to the same study; top_up only fills up to n_trials
    first_params = [t.params for t in study.trials]
    again = run_signal_study(ds, cfg, res_dir, n_trials=1)
    assert again.study.study_name == study.study_name and len(again.study.trials) == 4
    assert again.study.trials[3].params not in first_params  # the resumed sampler does not replay trial 0
    topped = run_signal_study(ds, cfg, res_dir, n_trials=4, top_up=True)
    assert len(topped.study.trials) == 4 and topped.per_trial_seconds == []

    # -- seeded: a fresh study with the same seed proposes the same parameter sequence
    other = run_signal_study(ds, cfg, tmp_path / "other", n_trials=2)
    assert [t.params for t in other.study.trials] == first_params[:2]


def test_signal_study_refuses_a_leaky_fold(ds, cfg, tmp_path):
    from ml.tune.hyperparams import run_signal_study

    leaky = Dataset(candles=ds.candles, features=ds.features, labels=ds.labels, events=ds.events,
                    splits=_with_folds(ds, [(ds.splits.folds[0][0], np.append(ds.splits.folds[0][1],
                                                                            ds.splits.oos_start))]))
    with pytest.raises(OOSLeakError):
        run_signal_study(leaky, cfg, tmp_path, n_trials=1, study_name="leaky")


def _with_folds(ds: Dataset, folds):
    import dataclasses

    return dataclasses.replace(ds.splits, folds=folds)


def test_oof_signal_proba_covers_only_fold_validation_bars(ds, cfg):
    from ml.tune.hyperparams import oof_signal_proba

    oof = oof_signal_proba(ds, cfg, n_jobs=1)
    n = ds.splits.n_bars
    assert oof.proba.shape == (n, 3) and oof.p_long_short.shape == (n, 2)
    lo = min(int(va[0]) for _, va in ds.splits.folds)
    hi = max(int(va[-1]) for _, va in ds.splits.folds)
    assert oof.positions.min() == lo and oof.positions.max() == hi < ds.splits.oos_start
    inside = np.zeros(n, dtype=bool)
    inside[oof.positions] = True
    assert np.isfinite(oof.proba[inside]).all() and np.isnan(oof.proba[~inside]).all()
    assert np.allclose(oof.proba[inside].sum(axis=1), 1.0)
    assert np.array_equal(oof.p_long_short[inside], oof.proba[inside][:, [2, 0]])
    assert set(np.unique(oof.fold[inside]).tolist()) == set(range(len(ds.splits.folds)))


# ----------------------------------------------------------------------------------------------- position study
def test_position_folds_never_split_a_trade_and_are_purged():
    from ml.tune.position import position_folds

    # 90 trades of 3 rows each; trade t fills at bar 10t and exits at bar 10t + 4
    groups = np.repeat(np.arange(90), 3)
    fill = np.arange(90) * 10
    exit_ = fill + 4
    folds = position_folds(groups, fill, exit_, n_folds=2, embargo=8, min_trades=10)
    assert len(folds) == 2
    for tr, va in folds:
        assert not set(groups[tr]) & set(groups[va])
        first_val_fill = fill[groups[va]].min()
        assert (exit_[groups[tr]] + 8 < first_val_fill).all()  # purged: no train outcome near the val start
        assert groups[tr].max() < groups[va].min()  # walk-forward


def test_position_study_on_out_of_fold_signal(ds, cfg, tmp_path):
    from ml.tune.hyperparams import oof_signal_proba
    from ml.tune.position import run_position_study

    cfg = with_trading(cfg, confidence_threshold=0.4)  # the profile's lowest: more trades from 1400 bars
    oof = oof_signal_proba(ds, cfg, n_jobs=1)
    seen: list[np.ndarray] = []
    res_dir = tmp_path / "results"
    res = run_position_study(ds, cfg, res_dir, oof.p_long_short, n_trials=3, min_trades_per_fold=8,
                             index_hook=lambda what, idx: seen.append(np.asarray(idx).copy()))
    assert res.study.user_attrs["rows"]["n_trades"] >= 24
    assert seen and all(a.max() < ds.splits.oos_start for a in seen)
    assert max(int(a.max()) for a in seen) <= int(oof.positions.max()) + ds.splits.embargo
    assert len(res.study.trials) == 3
    for t in res.study.trials:
        assert sorted(t.intermediate_values) == list(range(res.study.user_attrs["n_folds"]))  # reported per fold
        f0 = t.user_attrs["fold0"]
        assert 0.0 <= f0["accuracy"] <= 1.0 and 0.0 <= f0["exit_precision"] <= 1.0
    doc = json.loads((res_dir / "best_params_position.json").read_text())
    assert doc["model_params"]["num_boost_round"] == 300 and "learning_rate" in doc["model_params"]
    assert common.load_best_params(res_dir, "position") == doc["model_params"]
    assert (res_dir / "optuna_study_position.pkl").exists()
    assert (res_dir / "optuna_history_position.png").exists()

    # probabilities that reach into the OOS window are refused before anything is simulated
    leaky = oof.p_long_short.copy()
    leaky[ds.splits.oos_start] = [0.9, 0.0]
    with pytest.raises(OOSLeakError):
        run_position_study(ds, cfg, res_dir, leaky, n_trials=1, study_name="leaky", min_trades_per_fold=8)


def test_fold_models_are_the_same_bits_in_processes_threads_and_one_after_the_other(ds, cfg):
    """The study fits a fold's three models side by side in worker processes (FoldModelPool; threads where
    processes cannot be started) and predicts the fold's whole bar range once: the raw and calibrated
    probabilities, and so the ensemble the fold is scored and backtested on, must be the same bits in processes, in
    threads and one model after the other, and as fitting the models here and calling ensemble_proba (what
    production does) on the scored rows and on the backtest range."""
    from ml.models.signal import combine_proba, default_params, ensemble_proba
    from ml.tune.folds import FoldModelPool, _fit_one, fold_rows, train_rows

    tr, va = ds.splits.folds[-1]
    tr = train_rows(ds, tr)
    s, e = int(va[0]), int(va[-1]) + 1
    params = default_params()
    head, tail = fold_rows(ds, tr)
    assert tail.size > 0
    ref = {name: _fit_one(ds.X, ds.y, head, tail, name, params[name], 3, 1, True) for name in params}
    scored = np.arange(s, e)[::3]  # a subset of the range, as the objective scores the label-valid bars only
    want_raw = ensemble_proba({n: m[0] for n, m in ref.items()}, ds.X[scored])
    want_cal = ensemble_proba({n: m[1] for n, m in ref.items()}, ds.X[s:e])
    assert not np.array_equal(want_raw, ensemble_proba({n: m[1] for n, m in ref.items()}, ds.X[scored]))
    for workers, processes in ((1, False), (3, False), (2, True)):
        with FoldModelPool(ds, workers=workers, processes=processes) as pool:
            assert pool.processes is processes
            raw, cal, info = pool.fit_predict(tr, params, (s, e), seed=3)
        assert list(raw) == list(cal) == ["rf", "xgb", "lgb"]
        assert info["calibrated"] and info["n_tail"] == tail.size and set(info["rounds"]) == {"xgb", "lgb"}
        assert np.array_equal(combine_proba({n: p[scored - s] for n, p in raw.items()}), want_raw), workers
        assert np.array_equal(combine_proba(cal), want_cal), workers


def test_buffered_study_runs_the_same_trials_and_writes_the_finished_ones_to_the_database(tmp_path):
    """The weekly run's studies run in memory and are written to SQLite when they end (common.run_study, buffered):
    the same seed must give the same trials as running against the database, every finished trial must be in the
    database afterwards (also when the study ends by an exception), and a resumed run tops the study up."""
    folds = [(np.arange(0, 10), np.arange(12, 20)), (np.arange(0, 20), np.arange(22, 30)),
             (np.arange(0, 30), np.arange(32, 40))]

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 0.0, 1.0)
        n = trial.suggest_int("n", 1, 9)
        return common.run_folds(trial, folds, lambda k, tr, va: (x * n / (k + 1), {"k": k}), oos_start=40)

    def reload(url: str, name: str) -> optuna.Study:
        return optuna.load_study(study_name=name, storage=common.open_storage(url))

    def shape(study: optuna.Study) -> list[tuple]:
        return [(t.number, t.state, t.params, t.value, t.intermediate_values, t.user_attrs) for t in study.trials]

    url_live, url_buf = (common.resolve_storage(None, tmp_path / d) for d in ("live", "buffered"))
    live = common.create_or_load_study("s", url_live, seed=5)
    common.run_study(live, objective, "signal", 14)
    buf = common.create_or_load_study("s", url_buf, seed=5)
    common.run_study(buf, objective, "signal", 14, buffered=True)
    assert len(reload(url_buf, "s").trials) == 14
    assert shape(reload(url_buf, "s")) == shape(reload(url_live, "s"))
    assert any(t.state == optuna.trial.TrialState.PRUNED for t in reload(url_buf, "s").trials)

    def boom(trial: optuna.Trial) -> float:
        if trial.number == 4:
            raise RuntimeError("killed mid-study")
        return objective(trial)

    crashed = common.create_or_load_study("c", url_buf, seed=5)
    with pytest.raises(RuntimeError, match="killed mid-study"):
        common.run_study(crashed, boom, "signal", 10, buffered=True)
    states = [t.state for t in reload(url_buf, "c").trials]
    assert states[:4] == [optuna.trial.TrialState.COMPLETE] * 4 and states[4] == optuna.trial.TrialState.FAIL
    resumed = common.create_or_load_study("c", url_buf, seed=5)
    common.run_study(resumed, objective, "signal", 10, top_up=True, buffered=True)
    assert common.n_finished(reload(url_buf, "c")) == 10


def test_out_of_fold_probabilities_reuse_the_signal_studys_best_trial_bit_for_bit(ds, cfg, tmp_path):
    """run_signal_study keeps its best trial's fold probabilities (results/oof_signal.npz); oof_signal_proba with
    that cache must return exactly what fitting the folds again gives, and must not use a cache made under other
    parameters or another seed."""
    from ml.tune.common import load_best_params
    from ml.tune.hyperparams import OOF_CACHE, oof_signal_proba, run_signal_study

    res_dir = tmp_path / "results"
    res = run_signal_study(ds, cfg, res_dir, n_trials=3)
    cache = res_dir / OOF_CACHE
    assert cache.exists()
    params = load_best_params(res_dir, "signal")
    fresh = oof_signal_proba(ds, cfg, params)
    cached = oof_signal_proba(ds, cfg, params, cache=cache)
    assert np.array_equal(cached.positions, fresh.positions) and np.array_equal(cached.fold, fresh.fold)
    assert np.array_equal(cached.proba, fresh.proba, equal_nan=True)
    assert np.array_equal(cached.p_long_short, fresh.p_long_short, equal_nan=True)
    assert cached.rounds == fresh.rounds
    assert res.study.best_trial.user_attrs["fold0"]["rounds"] == fresh.rounds[0]
    other = {**params, "xgb": {**params["xgb"], "learning_rate": params["xgb"]["learning_rate"] * 1.5}}
    assert not np.array_equal(oof_signal_proba(ds, cfg, other, cache=cache).proba, cached.proba, equal_nan=True)
    raw = cfg.model_dump(mode="json")
    raw["tuning"]["seed"] = cfg.tuning.seed + 1
    reseeded = oof_signal_proba(ds, parse_config(raw, "test"), params, cache=cache)
    assert not np.array_equal(reseeded.proba, cached.proba, equal_nan=True)


def test_a_killed_fold_model_worker_leaves_the_study_on_threads_with_the_same_numbers(ds, cfg):
    """A worker process of the fold-model pool that dies (SIGKILL here: the OOM killer, a crash) must not fail the
    study: the pool goes on in threads and returns exactly what the processes returned."""
    import os
    import signal

    from ml.models.signal import default_params
    from ml.tune.folds import FoldModelPool, train_rows

    tr, va = ds.splits.folds[-1]
    tr = train_rows(ds, tr)
    bars = (int(va[0]), int(va[-1]) + 1)
    with FoldModelPool(ds, workers=2, processes=True) as pool:
        want = pool.fit_predict(tr, default_params(), bars, seed=3)
        for pid in list(pool._pool._processes):
            os.kill(pid, signal.SIGKILL)
        got = pool.fit_predict(tr, default_params(), bars, seed=3)
        assert not pool.processes
    assert got[2] == want[2]
    for k in (0, 1):
        assert list(got[k]) == list(want[k]) and all(np.array_equal(got[k][n], want[k][n]) for n in want[k])

