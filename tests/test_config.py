"""config.json: one schema, one-line errors naming the key and the allowed range, exit 2 with nothing written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_data_validate import run_refresh

from core.config import (
    Bounds,
    config_to_json,
    default_config,
    load_config,
    load_dotenv_file,
    parse_config,
    redact,
    secrets,
    with_trading,
)
from core.errors import UserError
from core.paths import Paths
from market.data import refresh

REPO = Path(__file__).resolve().parent.parent


def raw_default() -> dict:
    return json.loads(config_to_json(default_config()))


@pytest.fixture
def stored_root(tmp_root: Path) -> Path:
    """A root with a demo store in data/, so 'nothing written' is checked against real files."""
    refresh(default_config(), Paths.of(tmp_root), demo=True)
    return tmp_root


def _reject(root: Path, raw: dict, snapshot, expected: str) -> None:
    (root / "config.json").write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
    before = snapshot(root)
    res = run_refresh(root, "--demo")
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stderr.strip() == f"error: {root / 'config.json'}: {expected}"
    assert res.stdout == ""
    assert snapshot(root) == before


def test_unknown_key_stops_the_script(stored_root: Path, snapshot) -> None:
    raw = raw_default()
    raw["data"]["max_gap_minuts"] = 60
    _reject(stored_root, raw, snapshot, "data.max_gap_minuts: unknown key")


def test_value_outside_the_profile_bounds_stops_the_script(stored_root: Path, snapshot) -> None:
    raw = raw_default()
    raw["trading"]["risk_percent"] = 2.5
    _reject(
        stored_root, raw, snapshot, "trading.risk_percent=2.5 is outside the 'moderate' profile's bounds [0.5, 1.5]"
    )


def test_valid_config_runs(stored_root: Path) -> None:
    res = run_refresh(stored_root, "--demo")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("DEMO DATA: synthetic")
    assert "DEMO rows: 105120" in res.stdout and "DEMO gaps: none" in res.stdout


# --------------------------------------------------------------------------------------------- in-process
def test_defaults_round_trip_and_repo_config_is_valid() -> None:
    cfg = default_config()
    assert parse_config(json.loads(config_to_json(cfg))) == cfg
    repo = load_config(REPO / "config.json")
    assert repo.symbol == "BTCUSD" and repo.timeframe == "M15"
    assert cfg.data.max_gap_minutes == 120 and cfg.data.market_closures == "none"
    assert cfg.data.max_closure_gap_minutes == 1440 and cfg.data.server_timezone == "Europe/Athens"
    assert cfg.splits.oos_weeks == 12 and cfg.splits.sweep_fraction == 0.7


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("data", "max_gap_minutes"), 5, "data.max_gap_minutes: value 5 out of range: must be >= 15"),
        (("data", "max_closure_gap_minutes"), 20_000, "value 20000 out of range: must be <= 10080"),
        (("data", "market_closures"), "holidays", "value 'holidays' not allowed: expected 'none' or 'weekends'"),
        (("data", "history_days"), "long", 'data.history_days: expected an integer, got a string "long"'),
        (("risk_profile",), "yolo", "risk_profile: value 'yolo' not allowed"),
        (("trading", "sessions"), ["asia"], "is not one of the 'moderate' profile's session_sets"),
    ],
)  # fmt: skip
def test_bad_values_name_key_and_range(path: tuple[str, ...], value: object, message: str) -> None:
    raw = raw_default()
    node = raw
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(UserError) as err:
        parse_config(raw, "cfg.json")
    assert str(err.value).startswith("cfg.json: ") and message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "config.json")
    (tmp_path / "config.json").write_text('{"symbol": "BTCUSD",\n  "x": }')
    with pytest.raises(UserError, match=r"invalid JSON at line 2 column 8"):
        load_config(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="top level must be a JSON object"):
        load_config(tmp_path / "config.json")


def test_with_trading_revalidates_against_the_profile() -> None:
    cfg = with_trading(default_config(), risk_percent=1.5)
    assert cfg.trading.risk_percent == 1.5
    with pytest.raises(UserError, match="outside the 'moderate' profile's bounds"):
        with_trading(default_config(), risk_percent=2.0)


def test_bounds_grid() -> None:
    assert Bounds(min=0.4, max=0.65, step=0.05).grid() == [0.4, 0.45, 0.5, 0.55, 0.6, 0.65]
    assert Bounds(min=1, max=1, step=0.5).grid() == [1.0]


def test_secrets_come_from_environment_and_are_redacted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MT5_LOGIN", "MT5_PASSWORD", "HF_TOKEN"):
        monkeypatch.delenv(name, raising=False)  # also makes teardown remove what the .env adds
    monkeypatch.setenv("MT5_PASSWORD", "from-env-wins")
    (tmp_path / ".env").write_text("MT5_PASSWORD=from-dotenv\nHF_TOKEN=hf_abcdef123\n")
    load_dotenv_file(tmp_path)
    got = secrets()
    assert got["MT5_PASSWORD"] == "from-env-wins" and got["HF_TOKEN"] == "hf_abcdef123"
    assert "MT5_LOGIN" not in got
    assert redact("token hf_abcdef123 and from-env-wins") == "token *** and ***"


# ------------------------------------------------------------------------------------------------- strictness
@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("trading", "risk_percent", "1.0", 'trading.risk_percent: expected a number, got a string "1.0"'),
        ("splits", "oos_weeks", True, "splits.oos_weeks: expected an integer, got a boolean true"),
        ("splits", "oos_weeks", 2.0, "splits.oos_weeks: expected an integer, got a number 2.0"),
        ("trading", "risk_percent", False, "trading.risk_percent: expected a number, got a boolean false"),
        ("trading", "initial_equity", float("inf"), "trading.initial_equity: value inf is not a finite number"),
        ("profiles", "moderate", None, "profiles.moderate: expected an object, got null"),
        ("tuning", "pruning", 1, "tuning.pruning: expected true or false, got an integer 1"),
    ],
)  # fmt: skip
def test_no_coercion_and_finite_numbers_only(tmp_path: Path, section: str, key: str, value: object,
                                             message: str) -> None:
    raw = raw_default()
    raw[section][key] = value
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))  # json writes inf as Infinity, which Python's json accepts by default
    with pytest.raises(UserError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: {message}"), str(err.value)


def test_an_integer_is_a_valid_float_setting() -> None:
    raw = raw_default()
    raw["trading"]["risk_percent"] = 1
    assert parse_config(raw).trading.risk_percent == 1.0


def test_duplicate_key_is_refused(tmp_path: Path) -> None:
    text = config_to_json(default_config()).replace('"risk_profile": "moderate",',
                                                   '"risk_profile": "moderate",\n  "risk_profile": "aggressive",')
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(UserError, match=r"key 'risk_profile' is given twice"):
        load_config(path)


def _garbage(root: Path) -> None:
    (root / "config.json").write_bytes(bytes(range(256)) * 4)


def _folder(root: Path) -> None:
    (root / "config.json").unlink()
    (root / "config.json").mkdir()


def _infinity(root: Path) -> None:
    raw = raw_default()
    raw["trading"]["initial_equity"] = "INF"
    (root / "config.json").write_text(json.dumps(raw).replace('"INF"', "Infinity"))


@pytest.mark.parametrize(
    ("make", "message"),
    [(_garbage, "not a text file"), (_folder, "is a folder, expected a JSON config file"),
     (_infinity, "trading.initial_equity: value inf is not a finite number")],
)  # fmt: skip
def test_unreadable_config_is_one_line_exit_2_for_every_script(tmp_root: Path, make, message: str) -> None:
    make(tmp_root)
    res = run_refresh(tmp_root, "--demo")
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.startswith(f"error: {tmp_root / 'config.json'}: ") and message in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_weekly_job_stops_on_an_unreadable_config_before_any_run_starts(tmp_root: Path) -> None:
    _garbage(tmp_root)
    weekly = subprocess.run([sys.executable, str(REPO / "scripts" / "weekly_optimize.py"), "--root", str(tmp_root),
                             "--demo"], capture_output=True, text=True, timeout=120)
    assert weekly.returncode == 2, weekly.stderr
    assert weekly.stderr.startswith(f"error: {tmp_root / 'config.json'}: not a text file")
    assert len(weekly.stderr.strip().splitlines()) == 1
    assert not list((tmp_root / "results").glob("*/state.json")), "no run starts on an unreadable config"
