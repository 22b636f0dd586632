"""The live bot: trades the deployed set (``models/`` + ``config.json``) on M15 bars, in shadow (default) or live mode.

``feed`` (where closed bars come from: MT5 or a recorded file, and what counts as a bad bar), ``broker`` (MetaTrader 5
orders for ``--live``), ``runner`` (the loop: state, journal, weekly swap, parity). Entry point: ``scripts/live.py``.
"""
