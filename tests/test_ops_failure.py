"""How a failed run ends (ops/failure.py), on a real root with a real backup: a deployed state changed before the
failure is restored and verified (exit 4); a state that cannot be restored is said to be unverified (exit 5); the
failure report names the phase and the reason, and the notifier's file gets it."""

from __future__ import annotations

import json
from pathlib import Path

from core.config import config_to_json, default_config
from core.errors import EXIT_RUN_FAILED, EXIT_STATE_UNVERIFIED, UserError
from core.paths import Paths
from ops import deploy
from ops.failure import end_failed_run
from ops.report import RunReport

RUN = "20260101T000000Z"


def _root(tmp_path: Path) -> tuple[Paths, dict[str, bytes], RunReport]:
    root = tmp_path / "root"
    (root / "models").mkdir(parents=True)
    (root / "models" / "manifest.json").write_text('{"models": {}}\n')
    (root / "models" / "risk.txt").write_bytes(b"tree 1\n")
    (root / "config.json").write_text(config_to_json(default_config()))
    paths = Paths.of(root)
    deploy.backup(paths, RUN)
    before = {p.relative_to(root).as_posix(): p.read_bytes() for p in [root / "config.json",
                                                                        *(root / "models").iterdir()]}
    (paths.results / RUN).mkdir(parents=True)
    return paths, before, RunReport(paths.results / RUN, RUN, demo=True)


def _now(paths: Paths) -> dict[str, bytes]:
    return {p.relative_to(paths.root).as_posix(): p.read_bytes() for p in [paths.config, *paths.models.iterdir()]}


def test_changed_state_is_restored_and_the_failure_reported(tmp_path: Path) -> None:
    paths, before, report = _root(tmp_path)
    (paths.models / "risk.txt").write_bytes(b"half written")  # a run that died half-way through a change
    paths.config.write_text("{}")
    err = end_failed_run(paths, RUN, default_config(), report, (9, "sl/tp models"), UserError("too little data"))
    assert err.exit_code == EXIT_RUN_FAILED == 4
    assert _now(paths) == before
    assert str(err).startswith(f"run {RUN} failed in phase 9 (sl/tp models): too little data; deployed state "
                               f"restored from backups/{RUN} and verified")
    rep = json.loads((paths.results / RUN / "report.json").read_text())
    assert rep["decision"]["action"] == "failed" and rep["failure"]["phase"] == 9
    assert rep["failure"]["state_verified"] is True and rep["failure"]["expected"] is True
    assert "FAILED" in (paths.results / RUN / "notifications.md").read_text()


def test_unexpected_error_keeps_its_traceback_and_an_unchanged_state_is_only_verified(tmp_path: Path) -> None:
    paths, before, report = _root(tmp_path)
    try:
        {}["missing"]
    except KeyError as exc:
        err = end_failed_run(paths, RUN, default_config(), report, (11, "config sweep"), exc)
    assert err.exit_code == 4 and "unexpected KeyError: 'missing'" in str(err)
    assert f"verified unchanged against backups/{RUN}" in str(err)
    assert _now(paths) == before
    assert "Traceback" in (paths.results / RUN / "error.log").read_text()


def test_state_that_cannot_be_restored_is_exit_5(tmp_path: Path) -> None:
    paths, _, report = _root(tmp_path)
    (paths.models / "risk.txt").write_bytes(b"changed")
    (paths.backups / RUN / "models" / "risk.txt").write_bytes(b"the backup is damaged too")
    err = end_failed_run(paths, RUN, default_config(), report, (13, "commit or rollback"), UserError("boom"))
    assert err.exit_code == EXIT_STATE_UNVERIFIED == 5
    assert "NOT verified" in str(err)
    assert json.loads((paths.results / RUN / "report.json").read_text())["failure"]["state_verified"] is False
