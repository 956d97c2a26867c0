"""python -m fedexits.export RUN_DIR --user USER --out DIR: one user's personalised model as ONNX.

A run made with `simulation.save_exits=true` keeps its global model (`RUN_DIR/exits/
global_model.pt`) and each user's personalised exits and calibration (`RUN_DIR/exits/<init>/
<user>.pt`). This turns them into the deployable artefact: one ONNX graph per segment, exit head,
classifier, truncated network and deployed stage, plus `manifest.json` (thresholds, active exits,
cost table), written into DIR atomically. Run it through ONNX Runtime with
`fedexits.engine.OnnxEarlyExit(DIR)`.

Exit codes: 0 exported; 2 bad input (a missing run, user or file, a file of another
architecture), one line on stderr and nothing written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .engine import ExportSettings, export_user
from .engine.saved_exits import EXITS_DIR, exits_file
from .errors import SettingsError, exits_2_on_bad_input
from .study.prepare import GLOBAL_MODEL_FILE


def default_init(run_dir: Path) -> str:
    """The run's only exit initialisation, or `global` when it compared several."""
    inits = sorted(p.name for p in (run_dir / EXITS_DIR).iterdir() if p.is_dir())
    return inits[0] if len(inits) == 1 else "global"


def export_run_user(
    run_dir: str | Path, user: str, out: str | Path, init: str | None = None, **settings
) -> Path:
    """Export `user` of a finished run; returns the manifest's path."""
    run_dir = Path(run_dir)
    if not (run_dir / EXITS_DIR).is_dir():
        raise SettingsError(
            f"{run_dir} has no {EXITS_DIR}/ folder: run the simulation with simulation.save_exits=true"
        )
    init = init or default_init(run_dir)
    return export_user(
        run_dir / EXITS_DIR / GLOBAL_MODEL_FILE,
        exits_file(run_dir, user, init),
        out,
        ExportSettings(**settings),
    )


@exits_2_on_bad_input
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedexits.export", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run directory made with simulation.save_exits=true")
    parser.add_argument("--user", required=True, help="the user id (as in per_user.csv)")
    parser.add_argument(
        "--out", type=Path, required=True, help="output directory (created; must not hold other files)"
    )
    parser.add_argument(
        "--init", default=None, help="exit initialisation (default: the run's only one, or global)"
    )
    parser.add_argument("--exporter", default=ExportSettings.exporter, help="torchscript (default) or dynamo")
    parser.add_argument("--no-fold-bn", action="store_true", help="keep BatchNorm as separate nodes")
    args = parser.parse_args(argv)
    manifest = export_run_user(
        args.run_dir, args.user, args.out, args.init, exporter=args.exporter, fold_bn=not args.no_fold_bn
    )
    print(f"exported {args.user} -> {manifest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
