#!/usr/bin/env python
"""``python backtest/run.py``: the seed's spelling of the ``backtest`` command (:mod:`cli.backtest`; ``--help``).

A file, not an import: the command lives in the command-line layer above this package (the one upward import, listed
in pyproject.toml's import-linter ``ignore_imports``).
"""

if __name__ == "__main__":
    from cli.backtest import entry

    entry()
