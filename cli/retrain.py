"""The four retrain commands: retrain one row of the model table on its own and deploy it (see :mod:`ops.retrain`).

    retrain-signal --data ../shared/data/BTCUSDT_15m_2023_2024.csv
    python scripts/retrain_position.py --demo --root /tmp/run1 --params results/best_params_position.json
    retrain-sltp --demo --root /tmp/run1 --stage-only
"""

from __future__ import annotations

from collections.abc import Callable

from cli.common import build_parser, config_of, default_run_id, locked_and_recovered, run, start
from ml.models.specs import SPECS


def main_for(name: str) -> Callable[[list[str] | None], int]:
    """The ``main`` of the retrain command of model-table row ``name`` (all four share it)."""
    spec = SPECS[name]
    short = spec.script.removeprefix("retrain_").removesuffix(".py")

    def main(argv: list[str] | None = None) -> int:
        needs = f" (needs: {', '.join(spec.prerequisites)})" if spec.prerequisites else ""
        options = ["root", "data", "demo", "params", "run_id", "stage_only", *(["n_jobs"] if spec.nested_params
                                                                                 else [])]
        ap = build_parser(f"Retrain the {spec.label} and deploy atomically{needs}.\n\n{__doc__}", options,
                          prog=f"retrain-{short}",
                          overrides={"n_jobs": {"help": "threads for every model (default: the forest on all "
                                                        "cores, the boosters on one)"}} if spec.nested_params else None)
        args = ap.parse_args(argv)
        paths = start(args)
        cfg = config_of(args, paths)
        run_id = args.run_id or default_run_id(f"retrain-{short}")

        from ops.retrain import retrain

        with locked_and_recovered(paths):
            retrain(spec, paths, cfg, args.data, args.demo, args.params, run_id, args.stage_only,
                    getattr(args, "n_jobs", None))
        return 0

    return main


def entry_for(name: str) -> Callable[[], None]:
    return lambda: run(main_for(name))


signal_entry = entry_for("signal")
position_entry = entry_for("position")
sltp_entry = entry_for("sl_tp")
risk_entry = entry_for("risk")
