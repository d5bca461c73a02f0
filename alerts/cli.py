"""``kpimon rules check FILE`` and ``kpimon targets check FILE``: validate before a worker loads.

Kept apart from ``stream.cli`` so it imports only the pure rules module and
answers instantly, e.g. in a pre-commit hook or CI step.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
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


def _add_check(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    noun: str,
    about: str,
    func: Callable[[argparse.Namespace], int],
) -> None:
    """Register ``<noun> check FILE`` (e.g. ``rules check alerts/rules.yml``)."""
    parser = sub.add_parser(noun, help=f"work with {about}")
    actions = parser.add_subparsers(dest=f"{noun}_command", required=True)
    check = actions.add_parser(
        "check", help=f"validate a {noun} file; every problem is reported as FILE:LINE:COL"
    )
    check.add_argument("file", metavar="FILE", help=f"{noun} YAML, e.g. alerts/{noun}.yml")
    check.set_defaults(func=func)


def add_rules_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    _add_check(sub, "rules", "alert rules files", cmd_rules)


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
    _add_check(sub, "targets", "the targets file (goals, budgets)", cmd_targets)


def cmd_backtest(args: argparse.Namespace) -> int:
    """Replay JSON-lines events through the live engine; print would-be alerts as JSON lines."""
    import time

    import orjson

    from alerts.backtest import BacktestStats, run_backtest
    from alerts.targets import TargetsError, load_targets
    from stream import gcpolicy
    from stream.settings import ConfigError, load_settings

    try:
        settings = load_settings()
        rules = load_rules(Path(args.rules))
        targets = load_targets(Path(args.targets) if args.targets else settings.targets)
    except (ConfigError, RulesError, TargetsError) as exc:
        print(exc, file=sys.stderr)
        return 2
    stats = BacktestStats()
    gcpolicy.tune()  # the worker's collector, and the replay's state frozen as it grows
    started = time.perf_counter()
    try:
        with open(args.events, "rb") as lines:
            for record in run_backtest(rules, lines, settings, eval_every_s=args.eval_every,
                                       stats=stats, targets=targets, freeze=True):  # fmt: skip
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
        "--targets", help="goals and budgets the goal and budget rules judge by "
        "(default: KPIMON_TARGETS)"
    )  # fmt: skip
    backtest.add_argument(
        "--eval-every", type=float, default=60.0, help="seconds of event time between evaluations"
    )
    backtest.set_defaults(func=cmd_backtest)


def cmd_silence(args: argparse.Namespace) -> int:
    """``silence add|list|expire`` against Alertmanager's API v2 (exit 1 if it fails)."""
    from alerts.silences import (
        SilenceError,
        add_silence,
        expire_silence,
        format_silences,
        list_silences,
        parse_duration,
        parse_matcher,
    )

    url = args.alertmanager_url
    if not url.startswith(("http://", "https://")):
        print("kpimon silence: KPIMON_ALERTMANAGER_URL (or --alertmanager-url) must be an "
              "http(s) URL", file=sys.stderr)  # fmt: skip
        return 2
    try:
        if args.silence_command == "add":
            try:
                matchers = [parse_matcher(m) for m in args.matchers]
                duration = parse_duration(args.duration)
            except ValueError as exc:
                print(f"kpimon silence add: {exc}", file=sys.stderr)
                return 2
            sid = add_silence(url, matchers, duration_s=duration, comment=args.comment,
                              author=args.author)  # fmt: skip
            print(sid)
        elif args.silence_command == "list":
            print(format_silences(list_silences(url)))
        else:
            expire_silence(url, args.id)
            print(f"expired {args.id}")
    except SilenceError as exc:
        print(f"kpimon silence {args.silence_command}: {exc}", file=sys.stderr)
        return 1
    return 0


def add_silence_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``silence add|list|expire`` (Alertmanager silences, for people without amtool)."""
    import getpass
    import os

    def author() -> str:
        try:
            return os.environ.get("USER") or getpass.getuser()
        except OSError:
            return "kpimon"

    silence = sub.add_parser("silence", help="Alertmanager silences (they also mute Slack)")
    silence.add_argument(
        "--alertmanager-url",
        default=os.environ.get("KPIMON_ALERTMANAGER_URL") or "http://127.0.0.1:9093",
        help="default: KPIMON_ALERTMANAGER_URL, else the dev stack's http://127.0.0.1:9093",
    )
    actions = silence.add_subparsers(dest="silence_command", required=True)
    add = actions.add_parser("add", help="silence the alerts all MATCHERS match; prints its id")
    add.add_argument("matchers", nargs="+", metavar="MATCHER",
                     help='e.g. rule=ctr_drop campaign=c1 channel=~"soc.*" kpi!=cpa')  # fmt: skip
    add.add_argument("--duration", default="2h", help="e.g. 30m, 2h, 1d (default 2h)")
    add.add_argument("--comment", default="silenced with kpimon silence add")
    add.add_argument("--author", default=author(), help="default: $USER")
    actions.add_parser("list", help="active and pending silences")
    expire = actions.add_parser("expire", help="end a silence now")
    expire.add_argument("id", metavar="ID")
    silence.set_defaults(func=cmd_silence)
