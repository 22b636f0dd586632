"""Warm start across weeks: a new study enqueues the best sets of last week's study in the same storage."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from ml.tune import common


def _study(url: str, name: str, fp: str, kind: str = "signal", space: str = "v1") -> optuna.Study:
    return common.create_or_load_study(name, url, seed=1, user_attrs={"kind": kind, "fingerprint": fp,
                                                                      "space_version": space})


def _objective(trial: optuna.Trial) -> float:
    x = trial.suggest_float("x", -3.0, 3.0)
    y = trial.suggest_int("y", 0, 5)
    return -(x - 1.0) ** 2 - (y - 2) ** 2


def test_new_week_enqueues_best_sets_of_predecessor_and_records_lineage(tmp_path: Path) -> None:
    url = common.resolve_storage(None, tmp_path)
    week1 = _study(url, "signal-week1", "aaa")
    week1.optimize(_objective, n_trials=12)
    _study(url, "position-week1", "ppp", kind="position").optimize(_objective, n_trials=3)  # other kind: ignored
    best3 = sorted((t for t in week1.trials if t.value is not None), key=lambda t: -t.value)[:3]

    week2 = _study(url, "signal-week2", "bbb")
    rec = common.warm_start(week2, 3)
    assert rec is not None and rec["predecessor"] == "signal-week1" and rec["enqueued"] == 3
    assert week2.user_attrs["predecessor"] == "signal-week1"
    week2.optimize(_objective, n_trials=4)
    first = sorted(week2.trials, key=lambda t: t.number)[:3]
    assert [t.params for t in first] == [t.params for t in best3]
    # evaluated afresh, not copied: same objective here, so the same values
    assert [t.value for t in first] == pytest.approx([t.value for t in best3])

    # a study that already has trials is not warm-started again (a resumed run)
    assert common.warm_start(week2, 3) is None
    # k = 0 is a cold start
    assert common.warm_start(_study(url, "signal-week3", "ccc"), 0) is None


def test_same_data_or_other_search_space_is_not_a_predecessor(tmp_path: Path) -> None:
    url = common.resolve_storage(None, tmp_path)
    _study(url, "signal-a", "same").optimize(_objective, n_trials=3)
    _study(url, "signal-b", "zzz", space="v0").optimize(_objective, n_trials=3)
    assert common.warm_start(_study(url, "signal-c", "same"), 5) is None


def test_wilcoxon_pruner_gets_per_fold_values_and_cannot_prune_three_folds() -> None:
    import numpy as np

    study = optuna.create_study(direction="maximize", pruner=common.make_pruner("wilcoxon"))
    folds = [(np.arange(10), np.arange(10, 20))] * 3
    scores = iter([0.9, 0.8, 0.7] * 10 + [0.0] * 3 * 10)

    def obj(trial: optuna.Trial) -> float:
        return common.run_folds(trial, folds, lambda k, tr, va: (next(scores), {}), oos_start=100)

    study.optimize(obj, n_trials=20)
    assert study.trials[0].intermediate_values == {0: 0.9, 1: 0.8, 2: 0.7}  # the folds' own values, not the mean
    assert study.trials[-1].value == 0.0  # far worse on every fold than the best trial, and still not pruned:
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)  # 2 paired folds: p >= 0.25
    assert isinstance(common.make_pruner("median", enabled=False), optuna.pruners.NopPruner)
