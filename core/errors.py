"""One exception type for problems the user must fix, and one way to turn it into a one-line exit.

Why: every script promises "a clear one-line error naming the file and field, exit code 2, nothing written".
Raising :class:`UserError` anywhere and wrapping ``main`` with :func:`cli_main` keeps that promise in one place.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

EXIT_USER_ERROR = 2
EXIT_LOCKED = 3


class UserError(Exception):
    """Bad input (config, candles, missing models, unreachable service): one line for the user, exit 2."""

    exit_code = EXIT_USER_ERROR

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


def cli_main(main: Callable[[], int | None]) -> None:
    """Run ``main`` and convert :class:`UserError` into ``error: <one line>`` on stderr and its exit code."""
    try:
        code = main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    sys.exit(code or 0)
