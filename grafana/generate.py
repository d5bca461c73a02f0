"""Write the dashboards' JSON: ``python -m grafana.generate [--check] [--runbook-base URL]``.

The JSON under grafana/dashboards/ is committed (Grafana's file provisioning reads
it, and docker-compose's home dashboard is kpi-wall.json); a test checks it equals
a fresh generation, and ``--check`` does the same in one command.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard as dm

from grafana import campaign, pipeline, wall
from grafana.panels import RUNBOOK_BASE, Runbooks

OUT_DIR = Path(__file__).resolve().parent / "dashboards"
# File name -> builder. kpi-wall.json is GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH.
BUILDERS: dict[str, Callable[[Runbooks], dm.Dashboard]] = {
    "kpi-wall.json": wall.build,
    "campaign.json": campaign.build,
    "pipeline.json": pipeline.build,
}


def render(board: dm.Dashboard) -> str:
    """Stable JSON text: the SDK's key order, 2-space indent, a final newline."""
    return json.dumps(board, cls=JSONEncoder, indent=2, ensure_ascii=False) + "\n"


def generate(runbook_base: str = RUNBOOK_BASE) -> dict[str, str]:
    """Every dashboard's file name and JSON text."""
    runbooks = Runbooks(runbook_base)
    return {name: render(build(runbooks)) for name, build in BUILDERS.items()}


def stale_files(out_dir: Path, files: dict[str, str]) -> list[str]:
    """Files that are missing or differ, and JSON files nobody generates any more."""
    stale = [name for name, text in files.items() if _read(out_dir / name) != text]
    stale += sorted(p.name for p in out_dir.glob("*.json") if p.name not in files)
    return stale


def _read(path: Path) -> str | None:
    return path.read_text(encoding="utf-8") if path.is_file() else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m grafana.generate", description=__doc__)
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output directory")
    parser.add_argument("--check", action="store_true", help="exit 1 if the files are stale")
    parser.add_argument(
        "--runbook-base", default=RUNBOOK_BASE, help=f"prefix of runbook links ({RUNBOOK_BASE})"
    )
    args = parser.parse_args(argv)
    files = generate(args.runbook_base)
    if args.check:
        stale = stale_files(args.out, files)
        for name in stale:
            print(f"stale: {args.out / name} (run python -m grafana.generate)", file=sys.stderr)
        return 1 if stale else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (args.out / name).write_text(text, encoding="utf-8")
        print(f"wrote {args.out / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
