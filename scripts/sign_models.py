#!/usr/bin/env python
"""Sign a model set with this machine's key: ``sign-models`` under its script spelling (see :mod:`cli.sign_models`)."""

from cli.sign_models import entry

if __name__ == "__main__":
    entry()
