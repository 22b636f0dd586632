#!/usr/bin/env python
"""``retrain-signal`` under its seed spelling: retrain the signal ensemble and deploy (cli.retrain; --help)."""

from cli.retrain import signal_entry

if __name__ == "__main__":
    signal_entry()
