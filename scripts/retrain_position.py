#!/usr/bin/env python
"""``retrain-position`` under its seed spelling: retrain the position model and deploy (cli.retrain; --help)."""

from cli.retrain import position_entry

if __name__ == "__main__":
    position_entry()
