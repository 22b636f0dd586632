"""End-to-end: the weekly job as a real process on a small DEMO workload.

* a first run (no deployed models: floors only) commits: models/ + config.json switched, Hub (local registry) tag,
  report and notification files written;
* a run whose gate fails rolls back: models/ + config.json byte-identical to before;
* a second start while a run holds the lock exits 3 at once;
* the kill test: SIGKILL after every phase boundary and at points inside the commit, each time followed by
  ``--resume``; after every restart models/ + config.json are byte-identical to the old or the new set, and the run
  completes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.config import config_to_json, default_config, parse_config
from core.paths import Paths
from ops import deploy

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "weekly_optimize.py"


def small_config(min_trades: int = 1, max_dd: float = 100.0) -> str:
    """A config for a ~3-month demo workload with 2+2 trials: the whole job in well under a minute."""
    raw = default_config().model_dump(mode="json")
    raw["data"]["demo_bars"] = 14_000
    raw["data"]["history_days"] = 400
    raw["splits"]["oos_weeks"] = 3
    raw["tuning"]["signal_trials"] = 2
    raw["tuning"]["position_trials"] = 2
    raw["trading"]["confidence_threshold"] = 0.4  # enough simulated trades on a short history
    for prof in raw["profiles"].values():
        prof["min_trades"] = min_trades
        prof["max_drawdown_pct"] = max_dd
        prof["min_score"] = -1e9  # the tests exercise the machinery, not the demo's profitability
    raw["pipeline"]["gate"]["mode"] = "seed"  # ... and the seed's gate: the evidence is computed and reported
    return config_to_json(parse_config(raw))


def run_job(root: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 600, demo: bool = True
            ) -> subprocess.CompletedProcess[str]:
    e = {**os.environ, "PYTHONHASHSEED": "0", **(env or {})}
    for k in ("HF_TOKEN", "TELEGRAM_TOKEN", "TELEGRAM_CHAT_ID", "MT5_LOGIN", "WEEKLY_CRASH_AT",
              deploy.CRASH_ENV):
        if k not in (env or {}):
            e.pop(k, None)
    return subprocess.run([sys.executable, str(SCRIPT), "--root", str(root), *(["--demo"] if demo else []), *args],
                          env=e, capture_output=True, text=True, timeout=timeout)


def state(root: Path) -> dict[str, str]:
    return deploy.hash_state(Paths.of(root))


@pytest.fixture(scope="module")
def committed_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root after one complete first run that committed."""
    root = tmp_path_factory.mktemp("weekly") / "root"
    root.mkdir()
    (root / "config.json").write_text(small_config())
    r = run_job(root)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return root


def _copy(root: Path, dst: Path) -> Path:
    shutil.copytree(root, dst, symlinks=True, ignore=shutil.ignore_patterns(".weekly_optimize.lock"))
    return dst


def _last_report(root: Path) -> dict:
    runs = sorted((root / "results").glob("*/report.json"))
    return json.loads(runs[-1].read_text())


def test_first_run_commits_everything(committed_root: Path) -> None:
    root = committed_root
    rep = _last_report(root)
    assert rep["decision"]["action"] == "commit", rep["decision"]
    assert rep["demo"] is True
    assert [p["status"] for p in sorted(rep["phases"], key=lambda p: p["number"])] == ["ok"] * 13
    manifest = json.loads((root / "models" / "manifest.json").read_text())
    assert {"signal_rf", "signal_xgb", "signal_lgb", "position", "sl_tp", "risk"} <= set(manifest["models"])
    run_id = rep["run_id"]
    # the local registry plays the Hub's role: the run id is a tag holding the same files
    reg = root / "registry"
    assert reg.exists()
    assert run_id in json.loads((reg / "refs.json").read_text()).get("tags", {})
    # deployed config is the sweep's candidate, and it validates
    run_dir = root / "results" / run_id
    assert (root / "config.json").read_text() == (run_dir / "config.candidate.json").read_text()
    for f in ("report.md", "report.json", "notifications.md", "sweep.csv", "sweep_heatmap.png",
              "equity_baseline_vs_new.png", "shap/shap_importance.png", "optuna_study.pkl"):
        assert (run_dir / f).exists(), f
    md = (run_dir / "report.md").read_text()
    assert "DEMO" in md and "COMMIT" in md and "first run" in md
    # every run computes and shows the gate's evidence (a first run: no paired comparison, the reason says so)
    ev = json.loads((run_dir / "evidence.json").read_text())
    assert ev["paired_full"]["reason"].startswith("first run") and "dsr" in ev and "pbo" in ev
    assert ev["holdout"]["new"] == rep["evaluation"]["new_holdout"] and "long_vs_short" in ev["direction"]
    assert "## Why this decision" in md and "Gate mode **seed**" in md and rep["gate"]["mode"] == "seed"
    assert (run_dir / "sweep_returns.npz").exists()
    assert (root / "results" / "optuna_study.pkl").exists()


def test_failed_gate_rolls_back_byte_identical(committed_root: Path, tmp_path: Path) -> None:
    root = _copy(committed_root, tmp_path / "root")
    (root / "config.json").write_text(small_config(min_trades=100_000))  # impossible floor -> gate fails
    before = state(root)
    r = run_job(root)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = _last_report(root)
    assert rep["decision"]["action"] == "rollback"
    assert "min_trades" in rep["decision"]["reason"]
    assert state(root) == before
    assert "baseline_full" in rep["evaluation"], "the deployed set is scored on the same window"
    note = (root / "results" / rep["run_id"] / "notifications.md").read_text()
    assert "ROLLBACK" in note.upper()
    # with a deployed set, all five pieces of evidence: paired bootstrap (full + holdout), DSR, PBO, holdout, AUC
    ev = rep["evidence"]
    assert ev["paired_full"]["resamples"] == 5000 and ev["paired_full"]["n_days"] >= 20, ev["paired_full"]
    assert ev["paired_holdout"]["n_days"] < ev["paired_full"]["n_days"]
    assert ev["dsr"]["n_trials"] == ev["dsr"]["n_sweep_rows"] + ev["dsr"]["n_optuna_trials"] > 864
    assert ev["pbo"]["ok"] and ev["pbo"]["blocks"] % 2 == 0, ev["pbo"]
    assert ev["holdout"]["baseline"] == rep["evaluation"]["baseline_holdout"]
    assert "FAIL enough trades" in note and "Why (seed gate)" in note
    assert (root / "results" / rep["run_id"] / "gate_bootstrap.png").exists()
    assert (root / "results" / rep["run_id"] / "gate_cscv.png").exists()


def test_second_start_while_locked_exits_3(committed_root: Path, tmp_path: Path) -> None:
    root = _copy(committed_root, tmp_path / "root")
    code = ("import time\n"
            "from core.paths import Paths\nfrom ops.lock import run_lock\n"
            f"with run_lock(Paths.of({str(root)!r})):\n    print('locked', flush=True)\n    time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        t0 = time.perf_counter()
        r = run_job(root)
        assert r.returncode == 3, r.stderr
        assert time.perf_counter() - t0 < 30
        assert str(holder.pid) in r.stderr and len(r.stderr.strip().splitlines()) == 1
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def test_bad_config_exits_2_and_writes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    raw = json.loads(small_config())
    raw["trading"]["risk_percent"] = 9.0
    (root / "config.json").write_text(json.dumps(raw))
    before = (root / "config.json").read_bytes()
    r = run_job(root)
    assert r.returncode == 2
    assert "trading.risk_percent" in r.stderr and "[0.5, 1.5]" in r.stderr
    assert (root / "config.json").read_bytes() == before
    assert not (root / "models").exists()


def _check_whole(root: Path, run_id: str, old: dict[str, str], point: str) -> dict[str, str]:
    """What every restart does first (recover), then: the deployed state is the whole old or the whole new set."""
    deploy.recover(Paths.of(root))  # idempotent: the next run calls it again
    now = state(root)
    intent = root / "results" / run_id / "deploy_intent.json"
    new = json.loads(intent.read_text())["hashes"] if intent.exists() else None
    assert now in (old, new), point
    return now


def test_sigkill_at_every_boundary_then_resume(tmp_path: Path) -> None:
    """Kill after each phase, then (from the state killed just after the Hub push) at each point inside the atomic
    switch. After every kill the restart's recovery leaves the whole old or the whole new set; ``--resume`` then
    completes the run with the new set deployed."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "config.json").write_text(small_config())
    old = state(root)
    boundaries = [f"after_phase_{k}" for k in range(1, 13)] + ["after_push"]
    run_id = ""
    for i, point in enumerate(boundaries):
        r = run_job(root, *([] if i == 0 else ["--resume"]), env={"WEEKLY_CRASH_AT": point})
        assert r.returncode == -signal.SIGKILL, (point, r.returncode, r.stdout[-2000:], r.stderr[-2000:])
        run_id = run_id or sorted(p.name for p in (root / "results").iterdir() if p.is_dir())[-1]
        assert _check_whole(root, run_id, old, point) == old  # nothing is switched before the commit
    assert run_id in json.loads((root / "registry" / "refs.json").read_text()).get("tags", {})

    for point in ("before_journal", "after_journal", "after_old_moved", "after_new_moved", "after_config",
                  "after_done", "after_journal_removed"):
        case = _copy(root, tmp_path / f"case-{point}")
        r = run_job(case, "--resume", env={deploy.CRASH_ENV: point})
        assert r.returncode == -signal.SIGKILL, (point, r.returncode, r.stdout[-2000:], r.stderr[-2000:])
        _check_whole(case, run_id, old, point)
        r = run_job(case, "--resume")
        assert r.returncode == 0, (point, r.stdout[-3000:] + r.stderr[-3000:])
        rep = _last_report(case)
        assert rep["run_id"] == run_id and rep["decision"]["action"] == "commit", point
        assert [p["status"] for p in sorted(rep["phases"], key=lambda p: p["number"])] == ["ok"] * 13
        new = json.loads((case / "results" / run_id / "deploy_intent.json").read_text())["hashes"]
        assert state(case) == new != old, point
        assert not (case / ".deploy_journal.json").exists()
    # and a later run starts cleanly on the last case
    r = run_job(case, "--phases", "1-3")
    assert r.returncode == 0, r.stderr[-2000:]


def test_imported_real_history_is_used_when_no_live_source_is_configured(tmp_path: Path) -> None:
    """refresh_data.py --data FILE, then the weekly job without --data/--demo trains on that history, not the demo."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "config.json").write_text(small_config())
    real = REPO.parent / "shared" / "data" / "BTCUSDT_15m_2023_2024.csv"
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "refresh_data.py"), "--root", str(root), "--data",
                        str(real)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    r = run_job(root, "--phases", "1-3", demo=False)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rep = _last_report(root)
    assert rep["demo"] is False
    assert rep["data"]["source"].startswith("store BTCUSD_M15.parquet")
    assert rep["data"]["end"].startswith("2024-12-31 23:45")
