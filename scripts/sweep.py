#!/usr/bin/env python
"""Phase 11 on its own: ``sweep`` under its seed spelling (see :mod:`cli.sweep`, or ``--help``)."""

from cli.sweep import entry

if __name__ == "__main__":
    entry()
