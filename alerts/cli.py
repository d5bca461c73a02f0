"""``kpimon rules check FILE``: validate a rules file before a worker loads it.

Kept apart from ``stream.cli`` so it imports only the pure rules module and
answers instantly, e.g. in a pre-commit hook or CI step.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from alerts.rules import RulesError, load_rules


def cmd_rules(args: argparse.Namespace) -> int:
    """Print ``FILE: N rules OK`` (exit 0) or every issue on stderr (exit 1)."""
    path = Path(args.file)
    try:
        rules = load_rules(path)
    except RulesError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"{args.file}: {len(rules.rules)} rules OK")
    return 0


def add_rules_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``rules check FILE`` on the ``kpimon`` sub-command parser."""
    rules = sub.add_parser("rules", help="work with alert rules files")
    actions = rules.add_subparsers(dest="rules_command", required=True)
    check = actions.add_parser(
        "check", help="validate a rules file; every problem is reported as FILE:LINE:COL"
    )
    check.add_argument("file", metavar="FILE", help="rules YAML, e.g. alerts/rules.yml")
    check.set_defaults(func=cmd_rules)
