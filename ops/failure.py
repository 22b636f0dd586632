"""How a failed run ends: like a rollback, with a report, in a known state, with an exit code that says so.

Why a separate ending: a phase that raises (bad data in phase 2, too little history in phase 7, a full disk, a bug)
used to print one line and exit, and a cron user heard nothing that Sunday. Whatever the reason, the end is the same
five steps, each guarded so that one failing step (e.g. the results folder is read-only) does not skip the others:

1. resolve an interrupted switch (:func:`ops.deploy.recover`), then compare the deployed ``models/`` +
   ``config.json`` with this run's backup and restore the backup when they differ (a run that failed after a
   completed switch keeps the new set: it is whole and was gated, see :func:`end_failed_run`);
2. record the failure (phase number and name, reason, exception type, deployed state) in ``report.json`` /
   ``report.md``; an unexpected exception's traceback goes to ``error.log`` beside them (redacted);
3. send the report through the notifier (``notifications.md`` always, Telegram when configured);
4. leave ``state.json`` unfinished, so ``--resume`` can retry from the failed phase (a transient outage);
5. raise :class:`RunFailed`: one line on stderr and exit code 4 when the deployed state was verified, 5 when it
   could not be verified (then a human must look: the line says so).
"""

from __future__ import annotations

import logging
import traceback
from typing import Any

from core.config import Config, redact
from core.errors import EXIT_RUN_FAILED, EXIT_STATE_UNVERIFIED, UserError
from core.paths import Paths
from ops import deploy
from ops.report import RunReport, telegram_text

log = logging.getLogger("weekly")


class RunFailed(UserError):
    """A phase failed; the run ended like a rollback and was reported (exit 4)."""

    exit_code = EXIT_RUN_FAILED


class RunFailedUnverified(RunFailed):
    """A phase failed and the deployed state could not be verified against the backup (exit 5)."""

    exit_code = EXIT_STATE_UNVERIFIED


def _one_line(text: str, limit: int = 400) -> str:
    text = " ".join(redact(str(text)).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _settle_state(paths: Paths, run_id: str, intent: dict[str, str] | None) -> tuple[bool, str]:
    """Bring the deployed state back to a known one; (verified, how) for the report."""
    try:
        recovered = deploy.recover(paths)
    except Exception as exc:  # a damaged journal: say so, do not guess
        return False, f"start-up recovery failed: {_one_line(exc)}"
    note = f" (an interrupted switch was resolved: {recovered})" if recovered else ""
    try:
        backup = deploy.load_backup(paths, run_id)
    except UserError:
        # No backup of this run: phase 1 did not get that far, and nothing touches models/ or config.json before
        # phase 13 (which needs the backup), so the deployed state is what it was.
        return True, "unchanged: the run failed before its backup, and nothing before phase 13 writes models/ or " \
                     "config.json" + note
    if deploy.verify(paths, backup.hashes):
        return True, f"verified unchanged against backups/{run_id}" + note
    if intent is not None and deploy.verify(paths, intent):
        return True, "the new set is deployed whole (the failure came after the completed switch)" + note
    try:
        deploy.restore(paths, backup)
    except Exception as exc:
        return False, f"NOT verified: restoring backups/{run_id} failed: {_one_line(exc)}"
    if deploy.verify(paths, backup.hashes):
        return True, f"restored from backups/{run_id} and verified" + note
    return False, f"NOT verified: the deployed state does not match backups/{run_id} after the restore"


def end_failed_run(paths: Paths, run_id: str, cfg: Config | None, report: RunReport, phase: tuple[int, str],
                   exc: BaseException, intent: dict[str, str] | None = None) -> RunFailed:
    """Do the five steps above and return the exception to raise (the caller raises it ``from None``).

    ``intent``: the hashes of the new set when phase 13 had recorded them (``deploy_intent.json``), so that a run
    failing *after* a completed switch is recognised as whole-new rather than rolled back under the Hub's tag."""
    number, name = phase
    expected = isinstance(exc, UserError)
    reason = _one_line(exc) or type(exc).__name__
    if not expected:
        reason = f"unexpected {type(exc).__name__}: {reason}"
    problems: list[str] = []
    if not expected:
        try:
            (report.run_dir / "error.log").write_text(redact("".join(traceback.format_exception(exc))))
        except OSError as err:
            problems.append(f"error.log not written ({err.strerror or err})")
    verified, how = _settle_state(paths, run_id, intent)
    failure: dict[str, Any] = {"phase": number, "name": name, "reason": reason, "type": type(exc).__name__,
                               "expected": expected, "state_verified": verified, "state": how}
    report.data["failure"] = failure
    report.data["decision"] = {"action": "failed",
                               "reason": f"phase {number} ({name}) failed: {reason}. Deployed state: {how}"}
    notes = report.data.setdefault("notes", [])
    notes.append(f"run failed in phase {number} ({name}); deployed state: {how}")
    notes.append(f"fix the cause, then `scripts/weekly_optimize.py --resume` retries from phase {number} "
                 "(or the next scheduled run starts afresh)")
    try:
        report.save()
    except OSError as err:
        problems.append(f"report not written ({err.strerror or err})")
    if cfg is not None:
        try:
            from ops.notify import make_notifier

            if not make_notifier(cfg, paths, report.run_dir).send(telegram_text(report.data)):
                problems.append("notification not sent")
        except Exception as err:  # never let the report of a failure fail the ending
            problems.append(f"notification not sent ({_one_line(err, 120)})")
    log.error("run %s FAILED in phase %d (%s): %s; deployed state: %s", run_id, number, name, reason, how)
    where = report.run_dir / "report.md"
    tail = f"; {'; '.join(problems)}" if problems else ""
    msg = f"run {run_id} failed in phase {number} ({name}): {reason}; deployed state {how}; report: {where}{tail}"
    return (RunFailed if verified else RunFailedUnverified)(msg)

