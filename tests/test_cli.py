"""cli/: every documented spelling of every command starts from the installed package (no sys.path edits), the
shared options behave the same everywhere, logs are redacted, and errors are one line with the promised exit code."""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from cli.common import OPTIONS, build_parser, setup_logging, start
from core.config import config_to_json, default_config, parse_config
from core.errors import UserError

REPO = Path(__file__).resolve().parent.parent

# (file spelling, installed command name): the seed's spellings and the [project.scripts] names of the same main
SPELLINGS = [
    ("scripts/weekly_optimize.py", "weekly-optimize"),
    ("scripts/refresh_data.py", "refresh-data"),
    ("scripts/sweep.py", "sweep"),
    ("scripts/retrain_signal.py", "retrain-signal"),
    ("scripts/retrain_position.py", "retrain-position"),
    ("scripts/retrain_sltp.py", "retrain-sltp"),
    ("scripts/retrain_risk.py", "retrain-risk"),
    ("backtest/run.py", "backtest"),
    ("ml/tune/hyperparams.py", "tune-signal"),
    ("ml/tune/position.py", "tune-position"),
    ("ml/shap_analysis.py", "shap-report"),
]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=180)


@pytest.mark.parametrize(("path", "command"), SPELLINGS)
def test_seed_spelling_runs_as_a_file_and_is_the_installed_command(path: str, command: str) -> None:
    """Run as a file, sys.path[0] is the file's folder, not the repository: only the installed package (or
    PYTHONPATH) makes `cli` importable. The help names the installed command: both spellings are one main."""
    res = _run(path, "--help")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"usage: {command} ")
    assert "--root DIR" in res.stdout and "--log-level" in res.stdout


def test_shap_analysis_runs_on_its_own_and_names_the_missing_models(tmp_root: Path) -> None:
    """The seed's `python ml/shap_analysis.py --root R` failed with ModuleNotFoundError; now it is the shap-report
    command: without deployed signal models, one line naming the missing file and exit 2."""
    res = _run("ml/shap_analysis.py", "--root", str(tmp_root))
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "signal_rf" in lines[0] and "missing" in lines[0], res.stderr
    assert not (tmp_root / "results").exists()  # nothing written


def test_shared_options_are_declared_once_and_checked_the_same_way(tmp_path: Path) -> None:
    ap = build_parser("x", ["root", "data", "demo", "n_trials"], overrides={"n_trials": {"default": 3}})
    args = ap.parse_args(["--root", str(tmp_path), "--n-trials", "5"])
    assert (args.root, args.data, args.demo, args.n_trials, args.log_level) == (str(tmp_path), None, False, 5,
                                                                                  "WARNING")
    assert ap.parse_args([]).n_trials == 3
    assert ap.parse_args(["--log-level", "debug"]).log_level == "DEBUG"
    with pytest.raises(ValueError, match="models"):
        build_parser("x", ["root"], overrides={"models": {}})  # an override of an option the command lacks
    for bad, message in ((["--data", "f.csv", "--demo"], "--data and --demo exclude each other"),
                         (["--n-trials", "0"], "--n-trials must be >= 1")):
        with pytest.raises(UserError, match=message):
            start(ap.parse_args(["--root", str(tmp_path), *bad]))
    assert set(OPTIONS) >= {"root", "data", "demo", "quick", "config", "log_level"}


def test_logging_redacts_secrets(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("TELEGRAM_TOKEN", "123456:SECRET-token-value")
    setup_logging("INFO")
    try:
        logging.getLogger("cli.test").warning("posting with 123456:SECRET-token-value failed")
        err = capsys.readouterr().err
    finally:
        setup_logging("WARNING")
    assert "posting with *** failed" in err and "SECRET" not in err


def test_locked_root_exits_3_with_one_line(tmp_root: Path, lock_holder) -> None:
    """The one error wrapper: another run holding the lock -> exit 3 and one stderr line naming the holder."""
    holder = lock_holder(tmp_root)
    res = _run("scripts/sweep.py", "--root", str(tmp_root), "--demo", "--apply")
    assert res.returncode == 3, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and str(holder.pid) in res.stderr


def test_config_option_reads_another_file(tmp_root: Path) -> None:
    from cli.common import config_of

    other = tmp_root / "other.json"
    raw = default_config().model_dump(mode="json")
    raw["symbol"] = "ETHUSD"
    other.write_text(config_to_json(parse_config(raw, "test")))
    ap = build_parser("x", ["root", "config"])
    paths = start(ap.parse_args(["--root", str(tmp_root)]))
    assert config_of(ap.parse_args(["--root", str(tmp_root)]), paths).symbol == "BTCUSD"
    assert config_of(argparse.Namespace(config=str(other)), paths).symbol == "ETHUSD"
