"""The ``kpimon`` command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from stream.events import EVENT_TYPES
from stream.settings import ConfigError, Settings, load_settings

if TYPE_CHECKING:
    from stream.simulate import Incident


def _settings() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(2) from None


def cmd_worker(args: argparse.Namespace) -> int:
    """Refuses to start (exit 2) on invalid settings, rules or targets file."""
    import time

    from alerts.rules import RulesError, load_rules
    from alerts.targets import TargetsError, TargetsWatcher
    from alerts.targets_export import TargetsExporter

    settings = _settings()
    try:
        rules = load_rules(settings.rules)
    except RulesError as exc:
        print(f"kpimon worker: invalid rules file (KPIMON_RULES)\n{exc}", file=sys.stderr)
        return 2
    try:
        watcher = TargetsWatcher.load(settings.targets, time.time())
    except TargetsError as exc:
        print(f"kpimon worker: invalid targets file (KPIMON_TARGETS)\n{exc}", file=sys.stderr)
        return 2
    from stream.worker import run_worker  # faust is slow to import: only here

    return run_worker(settings, rules, TargetsExporter(watcher, settings.tz))


def cmd_schema(args: argparse.Namespace) -> int:
    from stream.events import json_schemas

    schemas = json_schemas()
    if args.write:
        out = Path(args.write)
        out.mkdir(parents=True, exist_ok=True)
        for name, schema in schemas.items():
            (out / f"{name}.schema.json").write_text(json.dumps(schema, indent=2) + "\n")
        print(f"wrote {len(schemas)} schemas to {out}")
        return 0
    if args.type:
        print(json.dumps(schemas[args.type], indent=2))
    else:
        print(json.dumps(schemas, indent=2))
    return 0


def cmd_dev(args: argparse.Namespace) -> int:
    from stream.devstack import DevStack, DevStackError, ensure_kafka_jars

    settings = _settings()
    stack = DevStack(
        state_dir=settings.state_dir,
        kafka_port=settings.dev_kafka_port,
        kafka_controller_port=settings.dev_kafka_controller_port,
        prometheus_port=settings.dev_prometheus_port,
        alertmanager_port=settings.dev_alertmanager_port,
        metrics_port=settings.metrics_port,
    )
    try:
        if args.action == "fetch":
            libs = ensure_kafka_jars(stack.cache_dir)
            print(f"Kafka jars ready in {libs}")
        elif args.action == "up":
            for name, status in stack.up():
                print(f"{name:<13} {status:<16} {stack.addresses()[name]}")
            print(f"{'metrics':<13} {'(kpimon worker)':<16} {stack.addresses()['metrics']}")
        else:
            for name, status in stack.down():
                print(f"{name:<13} {status}")
    except DevStackError as exc:
        print(f"kpimon dev {args.action}: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    import asyncio
    import time

    from stream.durations import parse_duration
    from stream.simulate import (
        Incident,
        SimConfig,
        Simulator,
        load_scenario,
        produce_to_kafka,
        write_jsonl,
    )

    try:
        incidents = [Incident.parse(spec) for spec in args.incident]
        if args.scenario:
            incidents += load_scenario(Path(args.scenario))
        seconds = int(parse_duration(args.duration)) if args.duration else None
        ago = parse_duration(args.start_ago) if args.start_ago else None
    except (ValueError, OSError) as exc:  # IncidentError is a ValueError
        print(f"kpimon simulate: {exc}", file=sys.stderr)
        return 2
    config = SimConfig(
        seed=args.seed, campaigns=args.campaigns, rate=args.rate, incidents=incidents,
        duplicate_rate=args.duplicates, late_rate=args.late,
    )  # fmt: skip
    sim = Simulator(config)
    now = time.time()
    if args.out:
        if seconds is None:
            print("kpimon simulate: --out needs --duration", file=sys.stderr)
            return 2
        start = now - (ago if ago is not None else seconds)
        n = write_jsonl(sim, Path(args.out), start_s=start, seconds=seconds)
        print(f"wrote {n} events to {args.out}")
        return 0
    settings = _settings()
    start = now - ago if ago is not None else now
    realtime = ago is None
    n = asyncio.run(
        produce_to_kafka(
            sim, bootstrap=settings.kafka_bootstrap, topics=settings.type_topics,
            start_s=start, seconds=seconds, realtime=realtime,
            shared_topic=args.shared_topic,
        )
    )  # fmt: skip
    print(f"sent {n} events")
    return 0


DEMO_TARGETS = Path(__file__).resolve().parents[1] / "alerts" / "targets.demo.yml"
"""The demo's goals and budgets: about the simulator's usual spend at the demo's seed and rate."""
DEMO_HISTORY_MINUTES = (70, 130)
"""History the demo produces first: CTR rules judge a series once it covers 5m + 12 x 5m."""
DEMO_SETTLE_SECONDS = 30.0
"""The demo's settle delay (KPIMON_SETTLE_SECONDS, the product's default 60 s). The settle
waits for events that reach the worker after their minute: the worker's own lag is
already in its watermark (event time reached while it lags), so what is left is the
producers' delay. The demo's producer sends each second's events before their stamps;
its late events are a minute or more late (``SimConfig``: 60 s to 50 minutes), so a
minute judged 30 s after its end holds what it holds at 60 s but for about 0.1% of its
events (the few "slightly late" ones a 60 s settle still catches; tests/stream/test_demo),
and the demo's first alert comes 30 s sooner. Late events are counted exactly either
way (dedup horizons, restated windows): only when a minute is first judged changes."""


def demo_onset(now_s: float, after_s: float) -> float:
    """The demo's CTR drop starts at the first whole minute at least ``after_s`` from
    ``now_s``: the detectors judge whole minutes, so the first minute judged after the
    onset is then wholly changed, and its evidence suffices alone in most runs (the
    spread of an onset inside a minute is in ``bench/demo_alert``'s model)."""
    return math.ceil((now_s + after_s) / 60) * 60.0


def demo_day(now_s: float, minutes: tuple[int, int] = DEMO_HISTORY_MINUTES) -> tuple[str, float]:
    """A fixed-offset zone whose local midnight lies ``minutes`` ago, and that midnight.

    Pacing sums spend from local midnight: the demo's history starts there, so "today"
    holds all of the demo's spend and pacing reads about 1 from the first minutes on,
    instead of a day that began hours before the demo had any traffic.
    """
    lo, hi = minutes
    if hi - lo < 60:
        raise ValueError("the range must span an hour: zones are whole hours apart")
    minute = int(now_s // 60) % 1440
    for hours in range(-12, 12):
        since = (minute + 60 * hours) % 1440
        if lo <= since < hi:
            name = "UTC" if hours == 0 else f"Etc/GMT{-hours:+d}"  # POSIX signs: GMT-3 is UTC+3
            midnight = (int(now_s // 60) - since) * 60.0
            return name, midnight
    raise AssertionError("unreachable: 24 zones cover every minute of the day")


def demo_incidents(
    campaign: str, *, start_s: float, onset_s: float, overrun_s: float | None
) -> list[Incident]:
    """The demo's incidents at wall-clock instants: a 60% CTR drop of ``campaign`` from
    ``onset_s`` for 30 minutes, then (``overrun_s``) it buys 150% of its usual traffic.

    The simulator counts an incident's ``at`` from its first event, ``start_s`` (the
    history's start), so the instants are turned into offsets from there.
    """
    from stream.simulate import Incident

    drop = Incident.parse(f"ctr_drop:campaign={campaign}:by=60%:for=30m")
    incidents = [dataclasses.replace(drop, at=onset_s - start_s)]
    if overrun_s is not None:
        overrun = Incident.parse(f"budget_overrun:campaign={campaign}:by=50%")
        incidents.append(dataclasses.replace(overrun, at=overrun_s - start_s))
    return incidents


def cmd_demo(args: argparse.Namespace) -> int:
    """Worker plus simulated traffic with a CTR drop a few minutes in, then a budget overrun,
    on the local stack, with the demo's targets file (goals and budgets).

    Each run gets its own topics and consumer group, so a second run starts clean.
    """
    import asyncio
    import os
    import subprocess
    import time
    import urllib.request

    from aiokafka.errors import KafkaConnectionError

    from stream.durations import parse_duration
    from stream.simulate import SimConfig, Simulator, produce_to_kafka

    base = _settings()
    run_id = time.strftime("%Y%m%d-%H%M%S")
    env = {"KPIMON_GROUP_ID": f"kpimon-demo-{run_id}"}
    for name in ("impressions", "clicks", "leads", "orders", "spend"):
        env[f"KPIMON_TOPIC_{name.upper()}"] = f"demo-{run_id}.{name}"
    if base.slack_webhook_url is None:
        env["KPIMON_CONSOLE_ALERTS"] = "true"  # printed readably below instead
    alertmanager = base.alertmanager_url or f"http://127.0.0.1:{base.dev_alertmanager_port}"
    try:
        urllib.request.urlopen(f"{alertmanager}/-/ready", timeout=2).close()
        env["KPIMON_ALERTMANAGER_URL"] = alertmanager
    except OSError:
        alertmanager = ""
    now = time.time()
    # The user's own targets file and time zone win; else the demo's, with a day that
    # starts when the demo's history does (see demo_day).
    if not os.environ.get("KPIMON_TARGETS"):
        env["KPIMON_TARGETS"] = str(DEMO_TARGETS)
    if not os.environ.get("KPIMON_SETTLE_SECONDS"):
        env["KPIMON_SETTLE_SECONDS"] = f"{DEMO_SETTLE_SECONDS:g}"
    if os.environ.get("KPIMON_TIMEZONE"):
        history = DEMO_HISTORY_MINUTES[0] * 60
    else:
        env["KPIMON_TIMEZONE"], midnight = demo_day(now)
        history = int(now - midnight)
    os.environ.update(env)
    settings = _settings()
    try:
        after = parse_duration(args.incident_after)
        overrun_after = parse_duration(args.overrun_after) if args.overrun_after else None
    except ValueError as exc:
        print(f"kpimon demo: {exc}", file=sys.stderr)
        return 2
    # Flat traffic: the budgets are the simulator's mean daily spend, and with no past
    # week to learn the curve from, the budgets' intraday curve is flat too.
    config = SimConfig(seed=args.seed, rate=args.rate, diurnal=False)
    sim = Simulator(config)
    biggest = max(sim.campaigns, key=lambda c: c.weight)
    topics = settings.type_topics
    try:
        asyncio.run(_create_topics(settings))
    except KafkaConnectionError:
        print(f"kpimon demo: cannot reach Kafka at {settings.kafka_bootstrap} "
              "(`kpimon dev up` starts it)", file=sys.stderr)  # fmt: skip
        return 1
    print(f"kpimon demo: producing {history // 60} minutes of history to demo-{run_id}.*")
    backfill = produce_to_kafka(sim, bootstrap=settings.kafka_bootstrap, topics=topics,
                                start_s=now - history, seconds=history, realtime=False)  # fmt: skip
    asyncio.run(backfill)
    worker = subprocess.Popen([sys.executable, "-m", "stream.cli", "worker"], env=os.environ)
    # The incidents count from the banner, not from `now`: the history took a minute or
    # two to produce, and the live traffic catches up on that gap at full speed.
    banner = time.time()
    onset = demo_onset(banner, after)
    config.incidents = demo_incidents(
        biggest.id, start_s=now - history, onset_s=onset,
        overrun_s=banner + overrun_after if overrun_after is not None else None,
    )  # fmt: skip
    metrics = f"http://127.0.0.1:{settings.metrics_port}/metrics"
    onset_utc = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(onset))
    overrun = (
        f"from {args.overrun_after} from now campaign {biggest.id} buys 150% of its usual\n"
        "                 traffic: its pacing and its channel's climb past 1; the projection\n"
        "                 leaves the +20% band within about an hour or two"
        if overrun_after is not None else "off (--overrun-after)"
    )  # fmt: skip
    print(f"""
kpimon demo: worker pid {worker.pid}, live traffic at {args.rate:g} events/s
  KPIs:          curl -s {metrics} | grep '^kpimon_kpi{{kpi="ctr",scope="global"'
  pacing:        curl -s {metrics} | grep '^kpimon_spend_pacing_ratio'
  alerts firing: curl -s {metrics} | grep '^kpimon_alerts_firing'
  Prometheus:    http://127.0.0.1:{settings.dev_prometheus_port} (e.g. scope:kpimon_kpi:ratio)
  Alertmanager:  {alertmanager or "not running (kpimon dev up starts it when installed)"}
  alerts topic:  .venv/bin/python -m stream.ops tail {settings.alerts_topic}
  Slack:         {"KPIMON_SLACK_WEBHOOK_URL" if settings.slack_webhook_url else
                  "not configured: alerts are printed here as [kpimon] lines"}
  targets:       {settings.targets} (goals and daily budgets); days in
                 KPIMON_TIMEZONE={settings.timezone}, whose midnight is where the history starts
  the incident:  CTR of campaign {biggest.id} ({biggest.channel}) drops 60% at {onset_utc}
                 (in {onset - banner:.0f} s); the default rules alert within minutes,
                 then resolve after it ends
  settle:        minutes are judged {settings.settle_seconds:g} s after they end
                 (KPIMON_SETTLE_SECONDS; the demo's traffic is on time, the default is 60 s)
  the overrun:   {overrun}
  Ctrl-C stops the worker and the simulator; `kpimon dev down` stops the stack
""", flush=True)  # fmt: skip
    try:
        asyncio.run(produce_to_kafka(sim, bootstrap=settings.kafka_bootstrap, topics=topics,
                                     start_s=now, seconds=None, realtime=True,
                                     progress=False))  # fmt: skip
    except KeyboardInterrupt:
        pass
    finally:
        worker.terminate()  # a Ctrl-C reached it already; a second signal changes nothing
        try:
            worker.wait(settings.shutdown_timeout_seconds + 5)
        except subprocess.TimeoutExpired:
            worker.kill()
    return 0


async def _create_topics(settings: Settings) -> None:
    """The worker's topic layout, before the history is produced (auto-created topics
    would have one partition)."""
    from stream.clients import ensure_topics
    from stream.stages import Topology

    await ensure_topics(settings, Topology.of(settings), list(settings.type_topics.values()))
    await _group_coordinator(settings)


async def _group_coordinator(settings: Settings, timeout_s: float = 30.0) -> None:
    """Wait until the broker names the group's coordinator.

    A fresh broker creates its offsets topic on the first lookup and answers
    "coordinator not available" until then: found here, the worker's first join does
    not print that as an ERROR in the demo's terminal. Past the deadline the worker
    retries on its own, as it always does.
    """
    import asyncio
    import time

    from aiokafka import AIOKafkaClient
    from aiokafka.client import CoordinationType
    from aiokafka.errors import KafkaError

    client = AIOKafkaClient(bootstrap_servers=settings.kafka_bootstrap)
    deadline = time.monotonic() + timeout_s
    try:
        await client.bootstrap()
        while True:
            try:
                await client.coordinator_lookup(CoordinationType.GROUP, settings.group_id)
                return
            except KafkaError:
                if time.monotonic() > deadline:
                    return
                await asyncio.sleep(0.2)
    finally:
        await client.close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kpimon", description="Real-time marketing KPI monitor (configure with KPIMON_*)."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    worker = sub.add_parser("worker", help="run the stream worker (metrics on /metrics)")
    worker.set_defaults(func=cmd_worker)
    schema = sub.add_parser("schema", help="print the JSON Schemas of the event contract")
    schema.add_argument("type", nargs="?", choices=EVENT_TYPES)
    schema.add_argument("--write", metavar="DIR", help="write one <type>.schema.json per type")
    schema.set_defaults(func=cmd_schema)
    sim = sub.add_parser("simulate", help="produce realistic traffic (or write it as JSON lines)")
    sim.add_argument("--rate", type=float, default=200.0, help="mean events/s (default 200)")
    sim.add_argument("--campaigns", type=int, default=20)
    sim.add_argument("--seed", type=int, default=1)
    sim.add_argument("--duration", help="how long, e.g. 10m, 2h (default: until stopped)")
    sim.add_argument(
        "--start-ago", help="simulate from this long ago as fast as possible (backfill)"
    )
    sim.add_argument(
        "--incident", action="append", default=[],
        help="e.g. ctr_drop:campaign=c7:at=+10m:by=40%%:for=20m (repeatable)",
    )  # fmt: skip
    sim.add_argument("--scenario", help="YAML list of incidents")
    sim.add_argument("--duplicates", type=float, default=0.01, help="share sent twice")
    sim.add_argument("--late", type=float, default=0.002, help="share too late to count")
    sim.add_argument("--out", help="write JSON lines (with type) instead of producing to Kafka")
    sim.add_argument("--shared-topic", help="send every type to this topic with a type field")
    sim.set_defaults(func=cmd_simulate)
    demo = sub.add_parser("demo", help="run the worker with simulated traffic and an incident")
    demo.add_argument("--rate", type=float, default=300.0)
    demo.add_argument("--seed", type=int, default=7)
    demo.add_argument("--incident-after", default="1m",
                      help="the CTR drop starts on the first whole minute this long after "
                      "the banner")  # fmt: skip
    demo.add_argument(
        "--overrun-after", default="35m",
        help="when the budget overrun starts (default 35m: after the CTR drop); '' for none",
    )  # fmt: skip
    demo.set_defaults(func=cmd_demo)
    from alerts.cli import (
        add_backtest_parser,
        add_rules_parser,
        add_silence_parser,
        add_targets_parser,
    )

    add_rules_parser(sub)
    add_targets_parser(sub)
    add_backtest_parser(sub)
    add_silence_parser(sub)
    dev = sub.add_parser("dev", help="local stack without Docker (Kafka, Prometheus, Alertmanager)")
    dev.add_argument("action", choices=["up", "down", "fetch"])
    dev.set_defaults(func=cmd_dev)
    return parser


def main(argv: list[str] | None = None) -> int:
    from stream import logs

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logs.configure("INFO")
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
