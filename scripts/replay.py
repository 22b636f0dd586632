#!/usr/bin/env python
"""The walk-forward replay: ``replay`` under its script spelling (see :mod:`cli.replay`, or ``--help``)."""

from cli.replay import entry

if __name__ == "__main__":
    entry()
