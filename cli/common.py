"""What every command line shares, declared once: options, logging, the lock-and-recover preamble, the exit codes.

Why: eight entry points used to declare ``--root/--data/--demo``, set up logging and take the run lock each in their
own words, and the copies drifted (different help, one without redaction, one without start-up recovery). Here:

* :data:`OPTIONS`: every shared option, freqtrade-style: one declaration per option, each command picks the ones it
  takes with :func:`build_parser` (and may change a default, e.g. ``n_jobs`` for the sweep);
* :func:`start`: the checks every command makes on the shared options, ``.env`` loading, logging with secrets
  redacted (:func:`core.config.redact`), and the run root's :class:`~core.paths.Paths`;
* :func:`locked_and_recovered`: the run lock plus :func:`ops.deploy.recover`, for every command that changes the
  deployed state or must see a consistent one;
* :func:`run`: the one error wrapper (:func:`core.errors.cli_main`): :class:`~core.errors.UserError` -> one line on
  stderr and exit 2; another run holding the lock -> exit 3.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from core.config import Config, load_config, load_dotenv_file, redact
from core.errors import UserError, cli_main
from core.paths import Paths

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
NOISY_LOGGERS = ("httpx", "httpcore", "numba", "matplotlib", "PIL", "urllib3", "filelock")


@dataclass(frozen=True)
class Arg:
    """One option: its flags and ``argparse.add_argument`` keywords."""

    flags: tuple[str, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)


OPTIONS: dict[str, Arg] = {
    "root": Arg(("--root",), {"metavar": "DIR", "help": "run root holding config.json, data/, models/, results/, "
                                                         "backups/ (default: the repository)"}),
    "config": Arg(("--config",), {"metavar": "FILE", "help": "config file (default: <root>/config.json)"}),
    "data": Arg(("--data",), {"metavar": "FILE", "help": "candle file (MT5 export, CSV or Parquet) to use instead "
                                                         "of the store / MT5"}),
    "demo": Arg(("--demo",), {"action": "store_true", "help": "use the seeded demo candles (labelled DEMO "
                                                              "everywhere, stored apart from real history)"}),
    "quick": Arg(("--quick",), {"action": "store_true", "help": "about a year of data and few trials: a first "
                                                                "look in a few minutes"}),
    "models": Arg(("--models",), {"metavar": "DIR", "help": "models folder (default: <root>/models)"}),
    "out": Arg(("--out",), {"metavar": "DIR", "help": "output folder"}),
    "n_trials": Arg(("--n-trials",), {"type": int, "metavar": "N", "help": "Optuna trials"}),
    "storage": Arg(("--storage",), {"metavar": "URL", "help": "Optuna storage URL (default sqlite:///<root>/results/"
                                                              "optuna.db; e.g. postgresql+psycopg2://user:pw@host:"
                                                              "5432/db for several workers)"}),
    "n_jobs": Arg(("--n-jobs",), {"type": int, "metavar": "N", "help": "parallel workers"}),
    "params": Arg(("--params",), {"metavar": "FILE", "help": "JSON of tuned parameters (default: results/"
                                                             "best_params_<model>.json if present, else the "
                                                             "built-in defaults)"}),
    "run_id": Arg(("--run-id",), {"metavar": "ID", "help": "run id: staging folder, deploy journal entry, backup "
                                                           "and registry tag (default: <command>-<UTC time>)"}),
    "stage_only": Arg(("--stage-only",), {"action": "store_true", "help": "write staging/<run-id>/models but do not "
                                                                          "deploy"}),
    "log_level": Arg(("--log-level",), {"type": str.upper, "choices": LEVELS, "help": "log level (default: "
                                                                                      "%(default)s)"}),
    "verbose": Arg(("-v", "--verbose"), {"dest": "log_level", "action": "store_const", "const": "DEBUG",
                                         "help": "same as --log-level DEBUG"}),
    "quiet": Arg(("-q", "--quiet"), {"dest": "log_level", "action": "store_const", "const": "WARNING",
                                     "help": "same as --log-level WARNING (only warnings)"}),
}


def build_parser(description: str, options: Sequence[str], *, log_level: str = "WARNING",
                 overrides: Mapping[str, Mapping[str, Any]] | None = None, prog: str | None = None
                 ) -> argparse.ArgumentParser:
    """A parser with the shared ``options`` (keys of :data:`OPTIONS`, in that order) and ``--log-level``.

    ``overrides`` changes keywords of a shared option for this command (``{"n_jobs": {"default": 2}}``); the
    command adds its own options to the returned parser. ``log_level`` is the command's default level.
    """
    ap = argparse.ArgumentParser(prog=prog, description=description,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    overrides = overrides or {}
    unknown = set(options) - set(OPTIONS) | set(overrides) - set(options)
    if unknown:
        raise ValueError(f"unknown or unused shared options: {sorted(unknown)}")
    for name in options:
        arg = OPTIONS[name]
        ap.add_argument(*arg.flags, **{**arg.kwargs, **overrides.get(name, {})})
    if "log_level" not in options:
        ap.add_argument(*OPTIONS["log_level"].flags, **OPTIONS["log_level"].kwargs)
    ap.set_defaults(log_level=log_level)
    return ap


class RedactingFormatter(logging.Formatter):
    """Every log line passes :func:`core.config.redact`: a token in an exception text never reaches a log file."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def setup_logging(level: str = "INFO", stream: TextIO | None = None) -> None:
    """Timestamped lines (stderr by default) with secrets redacted; chatty libraries only from WARNING up."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h.formatter, RedactingFormatter)]:
        root.removeHandler(old)  # a second command in the same process (tests) replaces ours, keeps the others
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(getattr(logging, level))
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def start(args: argparse.Namespace, *, log_stream: TextIO | None = None) -> Paths:
    """The preamble of every command: option checks, logging, ``.env`` of the root; returns the root's paths."""
    if getattr(args, "data", None) and getattr(args, "demo", False):
        raise UserError("--data and --demo exclude each other")
    for name in ("n_trials", "n_jobs"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    setup_logging(args.log_level, log_stream)
    paths = Paths.of(getattr(args, "root", None))
    load_dotenv_file(paths.root)
    return paths


def config_of(args: argparse.Namespace, paths: Paths) -> Config:
    """The validated config: ``--config`` when the command takes it and it is given, else ``<root>/config.json``."""
    path = Path(args.config) if getattr(args, "config", None) else paths.config
    return load_config(path)


def default_run_id(command: str) -> str:
    """``<command>-<UTC time>``: unique per second, sorts by time, valid as a deploy run id and a registry tag."""
    return f"{command}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}"


@contextmanager
def locked_and_recovered(paths: Paths) -> Iterator[str | None]:
    """Hold the root's run lock and resolve an interrupted deploy first; yields the recovery note (or None).

    Every command that changes ``models/`` or ``config.json``, or must read them consistently, runs inside this:
    a second run exits with code 3 (:class:`ops.lock.LockedError`), and a switch that a kill interrupted is rolled
    forward or back before anything else looks at the deployed state.
    """
    from ops.deploy import recover
    from ops.lock import run_lock

    with run_lock(paths):
        note = recover(paths)
        if note:
            logging.getLogger("cli").warning("start-up recovery: %s", note)
        yield note


def run(main: Callable[[], int | None]) -> None:
    """Run a command's ``main`` with the one error wrapper (exit 0, 2 on bad input, 3 when the root is locked)."""
    cli_main(main)
