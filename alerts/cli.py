"""``kpimon rules check FILE`` and ``kpimon targets check FILE``: validate before a worker loads.

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


def cmd_targets(args: argparse.Namespace) -> int:
    """Print ``FILE: OK`` with what it sets (exit 0) or every issue on stderr (exit 1)."""
    from alerts.targets import TargetsError, load_targets

    try:
        targets = load_targets(Path(args.file))
    except TargetsError as exc:
        print(exc, file=sys.stderr)
        return 1
    spec = targets.spec
    print(
        f"{args.file}: OK ({'global, ' if spec.global_ else ''}{len(spec.channels)} channels, "
        f"{len(spec.campaigns)} campaign ids or patterns)"
    )
    return 0


def add_targets_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``targets check FILE`` on the ``kpimon`` sub-command parser."""
    targets = sub.add_parser("targets", help="work with the targets file (goals, budgets)")
    actions = targets.add_subparsers(dest="targets_command", required=True)
    check = actions.add_parser(
        "check", help="validate a targets file; every problem is reported as FILE:LINE:COL"
    )
    check.add_argument("file", metavar="FILE", help="targets YAML, e.g. alerts/targets.yml")
    check.set_defaults(func=cmd_targets)


def cmd_backtest(args: argparse.Namespace) -> int:
    """Replay JSON-lines events through the live engine; print would-be alerts as JSON lines."""
    import time

    import orjson

    from alerts.backtest import BacktestStats, run_backtest
    from stream.settings import ConfigError, load_settings

    try:
        settings = load_settings()
        rules = load_rules(Path(args.rules))
    except (ConfigError, RulesError) as exc:
        print(exc, file=sys.stderr)
        return 2
    stats = BacktestStats()
    started = time.perf_counter()
    try:
        with open(args.events, "rb") as lines:
            for record in run_backtest(rules, lines, settings, eval_every_s=args.eval_every,
                                       stats=stats):  # fmt: skip
                sys.stdout.buffer.write(orjson.dumps(record) + b"\n")
    except OSError as exc:
        print(f"kpimon backtest: {exc}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - started
    print(
        f"backtest: {stats.events} events ({stats.rejected} rejected, {stats.too_late} too late "
        f"for their dedup horizon) in {elapsed:.1f} s "
        f"= {stats.events / max(elapsed, 1e-9):,.0f} events/s; {stats.evaluations} evaluations, "
        f"{stats.alerts} alert notifications",
        file=sys.stderr,
    )
    return 0


def add_backtest_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``backtest --rules FILE --events FILE.jsonl``."""
    backtest = sub.add_parser(
        "backtest", help="replay recorded events offline and print the alerts that would fire"
    )
    backtest.add_argument("--rules", default=str(Path(__file__).parent / "rules.yml"))
    backtest.add_argument("--events", required=True, help="JSON lines, each event with its type")
    backtest.add_argument(
        "--eval-every", type=float, default=60.0, help="seconds of event time between evaluations"
    )
    backtest.set_defaults(func=cmd_backtest)
