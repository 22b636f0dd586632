"""One exception type for problems the user must fix, and one way to turn it into a one-line exit.

Why: every script promises "a clear one-line error naming the file and field, exit code 2, nothing written".
Raising :class:`UserError` anywhere and wrapping ``main`` with :func:`cli_main` keeps that promise in one place.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

EXIT_USER_ERROR = 2  # bad input (config, data file, options, unwritable root) found before any phase runs
EXIT_LOCKED = 3  # another run holds the root's lock
EXIT_RUN_FAILED = 4  # a phase failed: reported, deployed state verified unchanged (or restored)
EXIT_STATE_UNVERIFIED = 5  # a phase failed and the deployed state could NOT be verified: look by hand


class UserError(Exception):
    """Bad input (config, candles, missing models, unreachable service): one line for the user, exit 2."""

    exit_code = EXIT_USER_ERROR

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class TooFewTrades(UserError):
    """A model cannot be trained because this week's data gives too few simulated trades to learn from.

    Why its own type: for the optional models (position, SL/TP, risk) that is a property of the week's data, not a
    broken run: the weekly job then goes on without that model (no exit model, SL/TP from ``trading.fixed_*_atr``,
    risk multiplier 1.0) and says so in the report, as it already does for a skipped position study."""


def os_error_line(exc: OSError) -> str:
    """One line for an environment failure: the path and what the OS said (read-only, no space, permission)."""
    where = f"{exc.filename}: " if exc.filename else ""
    what = exc.strerror or str(exc) or type(exc).__name__
    return " ".join(f"{where}{what} (errno {exc.errno})".split()) if exc.errno else " ".join(f"{where}{what}".split())


def cli_main(main: Callable[[], int | None]) -> None:
    """Run ``main`` and convert :class:`UserError` into ``error: <one line>`` on stderr and its exit code.

    An :class:`OSError` that reaches here (a read-only folder, a full disk, a missing permission while setting up)
    is the environment, not a bug: one line naming the path, exit 2, like any other bad input."""
    try:
        code = main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except OSError as exc:
        print(f"error: {os_error_line(exc)}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    sys.exit(code or 0)
