#!/usr/bin/env python
"""``retrain-sltp`` under its seed spelling: retrain the SL/TP models and deploy (cli.retrain; --help)."""

from cli.retrain import sltp_entry

if __name__ == "__main__":
    sltp_entry()
