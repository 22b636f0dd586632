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
from _helpers import short_demo_raw

from core.config import config_to_json, parse_config
from core.io import sha256_file
from core.paths import Paths
from ops import deploy

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "weekly_optimize.py"


def small_config(min_trades: int = 1, max_dd: float = 100.0) -> str:
    """A config for a ~3-month demo workload with 2+2 trials: the whole job in well under a minute."""
    raw = short_demo_raw(14_000, oos_weeks=3, confidence_threshold=0.4)  # enough simulated trades on a short history
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
        hook = deploy.CRASH_ENV if point == "after_push" else "WEEKLY_CRASH_AT"  # after_push: inside deploy.apply
        r = run_job(root, *([] if i == 0 else ["--resume"]), env={hook: point})
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


def _script(root: Path, name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    e = {**os.environ, "PYTHONHASHSEED": "0", **(env or {})}
    for k in ("HF_TOKEN", "TELEGRAM_TOKEN", "TELEGRAM_CHAT_ID", deploy.CRASH_ENV):
        if k not in (env or {}):
            e.pop(k, None)
    return subprocess.run([sys.executable, str(REPO / "scripts" / name), "--root", str(root), *args], env=e,
                          capture_output=True, text=True, timeout=600)


def _version_hashes(root: Path, tag: str, dest: Path) -> dict[str, str]:
    """The complete set a deploy pushed to the (local) registry before switching: what "new" must be."""
    from ops.hub import LocalRegistry

    got = LocalRegistry(root / "registry").fetch(tag, dest)
    return {**deploy.hash_models_dir(got / "models"), "config.json": sha256_file(got / "config.json")}


def test_sigkill_during_sweep_apply_and_each_retrain(committed_root: Path, tmp_path: Path) -> None:
    """``sweep --apply`` and the four retrain scripts deploy through ops.deploy.apply: each is SIGKILLed at a
    different point of its deploy; after each kill the state is the whole old set or the whole new one (the version
    the registry got), and the next start (here ``sweep --apply``) recovers and deploys. Each leaves a backup, a
    registry tag and a deploy-history line; config.json keeps its file mode."""
    root = _copy(committed_root, tmp_path / "root")
    os.chmod(root / "config.json", 0o644)
    params = tmp_path / "signal_params.json"  # small forests and boosters: the kill test is about the deploy
    params.write_text(json.dumps({"model_params": {"rf": {"n_estimators": 20, "max_depth": 6},
                                                   "xgb": {"n_estimators": 40}, "lgb": {"n_estimators": 40}}}))
    # a swept folder that is not the deployed set is refused before anything is computed or changed
    other = tmp_path / "other_models"
    shutil.copytree(root / "models", other)
    (other / "manifest.json").write_text((other / "manifest.json").read_text().replace("{", "{ ", 1))
    before = state(root)
    r = _script(root, "sweep.py", "--demo", "--apply", "--models", str(other))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "not the deployed" in r.stderr, r.stderr
    assert state(root) == before

    runs = [  # (script, args, run id, kill point, which set recovery must leave)
        ("retrain_signal.py", ["--params", str(params)], "k-signal", "after_old_moved", "new"),
        ("retrain_position.py", [], "k-position", "after_push", "old"),
        ("retrain_sltp.py", [], "k-sltp", "after_config", "new"),
        ("sweep.py", ["--apply"], None, "after_new_moved", "new"),
        ("retrain_risk.py", [], "k-risk", "journal_tmp_written", "old"),
    ]
    for i, (script, args, run_id, point, want) in enumerate(runs):
        old = state(root)
        r = _script(root, script, "--demo", *args, *(["--run-id", run_id] if run_id else []),
                    env={deploy.CRASH_ENV: point})
        assert r.returncode == -signal.SIGKILL, (script, point, r.stdout[-2000:], r.stderr[-2000:])
        tags = json.loads((root / "registry" / "refs.json").read_text())["tags"]
        run_id = run_id or max(t for t in tags if t.startswith("sweep-"))
        new = _version_hashes(root, run_id, tmp_path / f"v{i}")
        assert new != old and (root / "backups" / run_id / "hashes.json").is_file(), script
        if i < len(runs) - 1:  # what every start does first; the last kill is left to the next real start
            deploy.recover(Paths.of(root))
            assert state(root) == (new if want == "new" else old), (script, point)
            assert not (root / ".deploy_journal.json").exists()
            assert (root / "config.json").stat().st_mode & 0o777 == 0o644
    r = _script(root, "sweep.py", "--demo", "--apply")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "removed leftovers" in r.stdout + r.stderr and "applied to" in r.stdout, r.stdout + r.stderr
    last = deploy.history(Paths.of(root))[-1]
    assert state(root) == last["hashes"] == _version_hashes(root, last["run_id"], tmp_path / "last")
    assert (root / "config.json").stat().st_mode & 0o777 == 0o644
    done = [h["run_id"] for h in deploy.history(Paths.of(root))]
    assert [d for d in done if d.startswith("k-")] == ["k-signal", "k-sltp"]  # the two killed after the switch


# ------------------------------------------------------------------------------ failed runs end in a known state
def _deployed_bytes(root: Path) -> dict[str, bytes]:
    files = [root / "config.json", *sorted((root / "models").rglob("*"))]
    return {f.relative_to(root).as_posix(): f.read_bytes() for f in files if f.is_file()}


def test_failing_phase_reports_and_exits_4_with_state_unchanged(committed_root: Path, tmp_path: Path) -> None:
    """Bad data in phase 2 of a root with a deployed set: exit 4, one line naming the phase and the reason, a failure
    report (report.md/json + the notifier's file), and models/ + config.json byte-identical."""
    root = _copy(committed_root, tmp_path / "root")
    before = _deployed_bytes(root)
    bad = tmp_path / "bad.csv"
    bad.write_text("timestamp_utc,open,high,low,close,volume\n2024-01-01 00:00:00,100,90,95,96,1\n")
    r = run_job(root, "--data", str(bad), demo=False)
    assert r.returncode == 4, r.stdout[-2000:] + r.stderr[-2000:]
    line = r.stderr.strip()
    assert len(line.splitlines()) == 1 and line.startswith("error: run ")
    assert "failed in phase 2 (data)" in line and "high < low" in line and "verified unchanged" in line
    assert _deployed_bytes(root) == before
    rep = _last_report(root)
    assert rep["decision"]["action"] == "failed"
    assert rep["failure"]["phase"] == 2 and rep["failure"]["state_verified"] is True
    run_dir = root / "results" / rep["run_id"]
    assert "FAILED" in (run_dir / "notifications.md").read_text().upper()
    assert "high < low" in (run_dir / "report.md").read_text()


def test_full_disk_is_one_line_and_state_unchanged(committed_root: Path, tmp_path: Path) -> None:
    """Writes beyond 64 KB fail with EFBIG (RLIMIT_FSIZE: a full disk for any user, root included) while phase 1
    backs up the deployed models: the run fails, reports (the report files are small) and changes nothing."""
    import resource

    root = _copy(committed_root, tmp_path / "root")
    before = _deployed_bytes(root)

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    e = {**os.environ, "PYTHONHASHSEED": "0"}
    r = subprocess.run([sys.executable, str(SCRIPT), "--root", str(root), "--demo"], env=e, capture_output=True,
                       text=True, timeout=600, preexec_fn=limit)
    assert r.returncode == 4, r.stdout[-2000:] + r.stderr[-2000:]
    line = r.stderr.strip()
    assert len(line.splitlines()) == 1 and "failed in phase 1" in line and "File too large" in line, line
    assert _deployed_bytes(root) == before
    rep = _last_report(root)
    assert rep["failure"]["expected"] is False and rep["failure"]["state_verified"] is True
    assert "Traceback" in (root / "results" / rep["run_id"] / "error.log").read_text()


def test_unwritable_root_is_one_line_exit_2(tmp_path: Path) -> None:
    """results/ that cannot be created (a file in its place: this blocks root too): one line, exit 2."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "config.json").write_text(small_config())
    (root / "results").write_text("not a folder")
    r = run_job(root)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [f"error: {root / 'results'}: File exists (errno 17)"]


@pytest.mark.skipif(os.geteuid() == 0, reason="running as root: the kernel ignores a folder's mode for root, so a "
                    "chmod-read-only results/ cannot be tested (test_unwritable_root_is_one_line_exit_2 covers it)")
def test_read_only_results_folder_is_one_line_exit_2(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "config.json").write_text(small_config())
    (root / "results").mkdir(mode=0o555)
    try:
        r = run_job(root)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "Permission denied" in r.stderr
    finally:
        (root / "results").chmod(0o755)


def test_too_few_trades_for_the_risk_model_degrades_instead_of_failing(committed_root: Path, tmp_path: Path) -> None:
    """Phase 10 on a week where the risk model's labelling backtest makes too few trades (the deployed models at
    the profile's highest entry threshold): the phase completes without a risk model (multiplier 1.0) and the
    report says so, where main failed the run with 'made only N trades (need 50)'."""
    from ops.pipeline import RunContext, RunOptions, phase_data, phase_dataset, phase_risk_model
    from ops.report import RunReport

    root = _copy(committed_root, tmp_path / "root")
    raw = json.loads(small_config())
    raw["trading"]["confidence_threshold"] = raw["profiles"]["moderate"]["confidence_threshold"]["max"]
    (root / "config.json").write_text(json.dumps(raw))
    paths = Paths.of(root)
    (paths.results / "t1").mkdir()
    from core.config import load_config

    ctx = RunContext(paths=paths, run_id="t1", options=RunOptions(demo=True),
                     report=RunReport(paths.results / "t1", "t1", demo=True), cfg=load_config(paths.config))
    phase_data(ctx, {})
    phase_dataset(ctx, {})
    shutil.copytree(root / "models", ctx.staging, dirs_exist_ok=True)  # staged signal, position and SL/TP models
    summary: dict = {}
    phase_risk_model(ctx, summary)
    assert "made only" in summary["skipped"] and "(need 50)" in summary["skipped"]
    assert summary["fallback"] == "risk multiplier 1.0"
    assert any(n.startswith("risk model not trained") for n in ctx.report.data["notes"])


def test_failed_run_can_be_resumed_once_the_cause_is_fixed(tmp_path: Path) -> None:
    """A failed phase leaves the run resumable: fix the data, --resume retries from the failed phase and finishes;
    the report no longer says failed (its notes keep the earlier failure)."""
    from test_data_validate import good_frame, write_csv

    root = tmp_path / "root"
    root.mkdir()
    (root / "config.json").write_text(small_config())
    data = tmp_path / "candles.csv"
    df = good_frame(3000)
    bad = df.copy()
    bad.loc[100, "high"] = bad.loc[100, "low"] - 1.0
    write_csv(bad, data)
    r = run_job(root, "--phases", "1-2", "--data", str(data), demo=False)
    assert r.returncode == 4 and "failed in phase 2 (data)" in r.stderr, r.stderr
    write_csv(df, data)
    r = run_job(root, "--resume", demo=False)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rep = _last_report(root)
    assert "failure" not in rep and [p["status"] for p in rep["phases"]] == ["ok", "ok"]
    assert any("run failed in phase 2" in n for n in rep["notes"])
    assert json.loads((root / "results" / rep["run_id"] / "state.json").read_text())["finished"] is True
