"""Phase 13 with the real clients against stand-in servers on 127.0.0.1.

A run is stopped (SIGKILL) right after phase 12 once; each test resumes a copy of it, so only phase 13 runs:

* Hub stand-in + Telegram stand-in: the run commits, the files arrive in the Hub repo under the run-id tag with the
  scores in the commit message, and Telegram receives getMe, the report (sendMessage) and the equity PNG
  (sendDocument); the deployed state is the new set;
* an unreachable Hub: the gate passes but the push fails, so nothing is switched (clean rollback, state byte-identical
  to before) and the failure is reported; a dead Telegram server does not break the run.
"""

from __future__ import annotations

import json
import signal
import socket
from pathlib import Path

import pytest

from core.config import parse_config
from tests.standins.hub_server import HubStandIn
from tests.standins.telegram_server import TelegramStandIn
from tests.test_pipeline import _copy, _last_report, run_job, small_config, state

REPO_ID = "trader/btcusd-bot"


@pytest.fixture(scope="module")
def after_phase_12(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("integr") / "root"
    root.mkdir()
    raw = json.loads(small_config())
    raw["hub"]["repo_id"] = REPO_ID
    raw["hub"]["retries"] = 1
    (root / "config.json").write_text(json.dumps(raw, indent=2))
    r = run_job(root, env={"WEEKLY_CRASH_AT": "after_phase_12"})
    assert r.returncode == -signal.SIGKILL, r.stdout[-2000:] + r.stderr[-2000:]
    return root


def _run_dir(root: Path) -> Path:
    return sorted(p for p in (root / "results").iterdir() if p.is_dir())[-1]


def _set_telegram(root: Path, base_url: str) -> None:
    """Point the run's frozen config (what phase 13 reads) at a Bot API server."""
    frozen = _run_dir(root) / "config.old.json"
    raw = json.loads(frozen.read_text())
    raw["telegram"]["base_url"] = base_url
    parse_config(raw)
    frozen.write_text(json.dumps(raw, indent=2))


def _dead_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_commit_pushes_to_hub_and_reports_to_telegram(after_phase_12: Path, tmp_path: Path) -> None:
    root = _copy(after_phase_12, tmp_path / "root")
    run_id = _run_dir(root).name
    with HubStandIn() as hub, TelegramStandIn() as tg:
        _set_telegram(root, tg.base_url)
        env = {"HF_TOKEN": hub.token, "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_TELEMETRY": "1",
               "TELEGRAM_TOKEN": tg.token, "TELEGRAM_CHAT_ID": "4242"}
        r = run_job(root, "--resume", env=env)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        rep = _last_report(root)
        assert rep["decision"]["action"] == "commit", rep["decision"]
        # Hub: the tag exists and holds exactly the deployed models + config + report
        files = hub.files_at(REPO_ID, run_id)
        deployed = root / "models"
        for f in deployed.iterdir():
            assert files[f"models/{f.name}"] == f.read_bytes(), f.name
        assert files["config.json"] == (root / "config.json").read_bytes()
        assert "report.md" in files and "manifest.json" in files
        head = hub.history(REPO_ID, run_id)[0]
        assert run_id in head.title and "score" in head.title
        # Telegram: getMe, the report text with the decision, the equity PNG
        assert tg.delivered("getMe")
        texts = [c.fields.get("text", "") for c in tg.delivered("sendMessage")]
        assert any("COMMIT" in t for t in texts), texts
        assert all(c.fields.get("chat_id") == "4242" for c in tg.delivered("sendMessage"))
        docs = tg.delivered("sendDocument")
        assert docs and docs[0].files["document"][1].startswith(b"\x89PNG")
    # the token never reaches the report or the logs
    assert hub.token not in (_run_dir(root) / "report.md").read_text()
    assert tg.token not in r.stdout + r.stderr


def test_unreachable_hub_rolls_back_cleanly_and_dead_telegram_is_harmless(after_phase_12: Path,
                                                                           tmp_path: Path) -> None:
    root = _copy(after_phase_12, tmp_path / "root")
    before = state(root)
    _set_telegram(root, f"http://127.0.0.1:{_dead_port()}/bot")
    env = {"HF_TOKEN": "hf_dummy_token_for_the_test", "HF_ENDPOINT": f"http://127.0.0.1:{_dead_port()}",
           "TELEGRAM_TOKEN": "123:dead", "TELEGRAM_CHAT_ID": "1"}
    r = run_job(root, "--resume", env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = _last_report(root)
    assert rep["decision"]["action"] == "rollback"
    assert "Hub push failed" in rep["decision"]["reason"]
    assert state(root) == before  # nothing switched: byte-identical
    assert not (root / ".deploy_journal.json").exists()
    notes = (_run_dir(root) / "notifications.md").read_text()
    assert "ROLLBACK" in notes.upper()
