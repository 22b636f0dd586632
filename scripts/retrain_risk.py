#!/usr/bin/env python
"""``retrain-risk`` under its seed spelling: retrain the risk model and deploy (cli.retrain; --help)."""

from cli.retrain import risk_entry

if __name__ == "__main__":
    risk_entry()
