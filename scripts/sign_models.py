#!/usr/bin/env python
"""Sign a model set with this machine's key, on explicit request: ``python scripts/sign_models.py [--root R]``.

When: a set of the current format that every loader refuses as "not signed" or "signed with another key" (copied
from another machine, pulled from a registry written elsewhere, or after a key rotation), and that YOU trust: signing
tells every loader these files are yours. Before signing it checks what can be checked without the key: every file's
sha256 against the manifest and every file's types against the trusted list (nothing is loaded). A set from before
model signing (pickle files) is refused: pickles are never loaded, retrain instead. Takes the run lock (no deploy
can switch the set meanwhile) and finishes an interrupted switch first.

The key: ``MODEL_SIGNING_KEY`` (environment or ``<root>/.env``), else ``<root>/.model_signing_key`` (created with mode
0600 on first use). Exit codes: 0 signed, 2 refused (one line), 3 another run holds the lock.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.errors import cli_main  # noqa: E402
from core.paths import Paths  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=None, help="run root (default: the repository)")
    ap.add_argument("--models", default=None, help="model folder to sign (default: <root>/models)")
    args = ap.parse_args()
    paths = Paths.of(args.root)
    folder = Path(args.models) if args.models else paths.models

    from ml.models.manifest import sign_set, signing_key
    from ops.deploy import recover
    from ops.lock import run_lock

    with run_lock(paths):
        note = recover(paths)
        if note:
            print(f"recovered: {note}")
        res = sign_set(folder, signing=signing_key(paths.root, create=True))
    print(f"signed {len(res['files'])} model files in {folder} with key {res['key_id']}")
    return 0


if __name__ == "__main__":
    cli_main(main)
