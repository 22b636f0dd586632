"""Two worker processes share one signal study through a throwaway PostgreSQL server (the multi-machine setup).

The cluster is made with ``initdb``/``pg_ctl`` on 127.0.0.1 and a free port (:mod:`pg_cluster`; as root the server
runs as ``nobody``). Each worker is the real CLI, ``python -m ml.tune.hyperparams``, on a few thousand real bars with
``--storage postgresql+psycopg2://...`` and the same ``--study-name``; the test then checks from the database that
both processes contributed trials and that the best trial reads back, and the cluster is stopped in teardown.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from _candles import real_btc as real_candles
from pg_cluster import PgUnavailable, find_bin, start_cluster

from core.config import config_to_json, default_config, parse_config

REPO = Path(__file__).resolve().parent.parent
TRIALS_PER_WORKER = 2


def postgres_required() -> bool:
    """CI=true (most CI services set it) or REQUIRE_POSTGRES=1 (.ci/run sets it): a missing server is a failure."""
    return any(os.environ.get(k, "").strip().lower() in {"1", "true", "yes"} for k in ("CI", "REQUIRE_POSTGRES"))


@pytest.fixture
def pg():
    try:
        cluster = start_cluster()
    except PgUnavailable as exc:
        if os.geteuid() == 0 and find_bin("initdb") and find_bin("pg_ctl"):
            raise  # as root the server can always run as 'nobody': a failure here is a real failure, not a skip
        if postgres_required():
            pytest.fail(f"PostgreSQL unavailable ({exc}) but CI/REQUIRE_POSTGRES says it must be here: "
                        "scripts/test.sh installs it with apt-get")
        pytest.skip(f"SKIPPED the several-workers PostgreSQL study test: PostgreSQL unavailable here ({exc}); "
                    "install postgresql (scripts/test.sh does with apt-get) or set REQUIRE_POSTGRES=1 to fail")
    try:
        yield cluster
    finally:
        cluster.stop()


def _root(tmp_path: Path) -> tuple[Path, Path]:
    raw = default_config().model_dump(mode="json")
    raw["splits"].update({"oos_weeks": 1, "n_folds": 2})
    cfg = parse_config(raw, "test config")
    root = tmp_path / "root"
    (root / "data").mkdir(parents=True)
    (root / "config.json").write_text(config_to_json(cfg), encoding="utf-8")
    data = tmp_path / "btc.csv"
    real_candles(3500).to_csv(data)
    return root, data


def test_two_workers_share_one_study_on_postgresql(pg, tmp_path):
    url = pg.create_database("optuna_test")
    root, data = _root(tmp_path)
    name = "pg-shared"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "ml.tune.hyperparams", "--root", str(root), "--data", str(data),
                               "--storage", url, "--study-name", name, "--n-trials", str(TRIALS_PER_WORKER),
                               "--worker", str(w), "--n-jobs", "1"],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for w in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        outs.append((p.pid, p.returncode, out, err))
    for pid, rc, out, err in outs:
        assert rc == 0, f"worker {pid} failed:\n{err[-3000:]}\n--- server log:\n{pg.log_tail()}"
        assert f"study={name} " in out

    study = optuna.load_study(study_name=name, storage=url)
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 2 * TRIALS_PER_WORKER
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    pids = {t.user_attrs["pid"] for t in trials}
    assert pids == {pid for pid, *_ in outs}  # both workers contributed, and nobody else did
    assert len({json.dumps(t.params, sort_keys=True) for t in trials}) == len(trials)  # worker seeds differ

    best = study.best_trial
    assert best.value == max(t.value for t in trials)
    assert sorted(best.intermediate_values) == [0, 1]  # reported per fold
    doc = json.loads((root / "results" / "best_params_signal.json").read_text())
    assert doc["study_name"] == name and doc["storage"].startswith("postgresql+psycopg2://")
    assert doc["best_value"] <= best.value  # written by the last worker to finish, from the shared study
    assert (root / "results" / "optuna_study.pkl").exists()
