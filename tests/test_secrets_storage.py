"""A ``--storage`` database URL's password never reaches a file under the root or the job's output."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_pipeline import run_job, small_config

from core.config import redact, redact_url
from core.errors import UserError

PASSWORD = "Zq7-fake-PW-91x"
URL = f"postgresql+psycopg2://bot:{PASSWORD}@127.0.0.1:5/optuna"


def test_redact_url_hides_only_the_password() -> None:
    assert redact_url(URL) == "postgresql+psycopg2://bot:***@127.0.0.1:5/optuna"
    assert redact(f"storage {URL!r} failed") == "storage 'postgresql+psycopg2://bot:***@127.0.0.1:5/optuna' failed"
    assert redact_url("sqlite:///results/optuna.db") == "sqlite:///results/optuna.db"
    assert redact_url("https://huggingface.co/me/bot") == "https://huggingface.co/me/bot"


def test_storage_password_is_in_no_file_and_no_output(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "config.json").write_text(small_config())
    r = run_job(root, "--phases", "1-2", "--storage", URL, "--verbose")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert PASSWORD not in r.stdout + r.stderr
    files = [f for f in root.rglob("*") if f.is_file()]
    assert any(f.name == "state.json" for f in files) and any(f.name == "report.json" for f in files)
    leaked = [str(f.relative_to(root)) for f in files if PASSWORD.encode() in f.read_bytes()]
    assert leaked == []
    state = next(f for f in files if f.name == "state.json").read_text()
    assert "postgresql+psycopg2://bot:***@127.0.0.1:5/optuna" in state


def test_resume_needs_the_storage_url_again() -> None:
    from ops.pipeline import RunOptions

    stored = RunOptions(**RunOptions(storage=URL).to_dict())
    with pytest.raises(UserError, match="pass the same --storage URL again"):
        stored.resumed(RunOptions())
    assert RunOptions(**RunOptions(storage=URL).to_dict()).resumed(RunOptions(storage=URL)).storage == URL
