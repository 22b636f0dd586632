"""The command-line layer: one module per command, each a thin ``main`` over the layers below.

The installed commands (``pyproject.toml`` ``[project.scripts]``) and the seed's spellings (``scripts/*.py``,
``backtest/run.py``, ``ml/tune/*.py``, ``ml/shap_analysis.py``) all end here; shared options, logging, the
lock-and-recover preamble and the exit codes live in :mod:`cli.common`.
"""
