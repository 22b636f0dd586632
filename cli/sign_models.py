"""``sign-models`` (``python scripts/sign_models.py``): sign a model set with this machine's key, on explicit request.

When: a set of the current format that every loader refuses as "not signed" or "signed with another key" (copied
from another machine, pulled from a registry written elsewhere, or after a key rotation), and that YOU trust: signing
tells every loader these files are yours. Before signing it checks what can be checked without the key: every file's
sha256 against the manifest and every file's types against the trusted list (nothing is loaded). A set from before
model signing (pickle files) is refused: pickles are never loaded, retrain instead. Runs under the run lock after
start-up recovery, so no deploy can switch the set meanwhile.

The key: ``MODEL_SIGNING_KEY`` (environment or ``<root>/.env``), else ``<root>/.model_signing_key`` (created with mode
0600 on first use). Exit codes: 0 signed, 2 refused (one line), 3 another run holds the lock.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cli.common import build_parser, locked_and_recovered, run, start


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = build_parser(__doc__.split("\n\n")[0], ["root", "models"], prog="sign-models")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    paths = start(args)
    folder = Path(args.models) if args.models else paths.models
    from ml.models.manifest import sign_set, signing_key

    with locked_and_recovered(paths):
        res = sign_set(folder, signing=signing_key(paths.root, create=True))
    print(f"signed {len(res['files'])} model files in {folder} with key {res['key_id']}")
    return 0


def entry() -> None:
    """``sign-models`` (installed command) and ``python scripts/sign_models.py``."""
    run(main)
