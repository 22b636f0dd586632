#!/usr/bin/env python
"""The live bot: ``live`` under its seed spelling (see :mod:`cli.live`, or ``--help``)."""

from cli.live import entry

if __name__ == "__main__":
    entry()
