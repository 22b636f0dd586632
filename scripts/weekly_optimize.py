#!/usr/bin/env python
"""The weekly job: ``weekly-optimize`` under its seed spelling (see :mod:`cli.weekly_optimize`, or ``--help``)."""

from cli.weekly_optimize import entry

if __name__ == "__main__":
    entry()
