#!/usr/bin/env python
"""Refresh the candle store: ``refresh-data`` under its seed spelling (see :mod:`cli.refresh_data`, or ``--help``)."""

from cli.refresh_data import entry

if __name__ == "__main__":
    entry()
