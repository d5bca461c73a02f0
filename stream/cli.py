"""The ``kpimon`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from stream.settings import EVENT_TYPES, ConfigError, Settings, load_settings


def _settings() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(2) from None


def cmd_worker(args: argparse.Namespace) -> int:
    settings = _settings()
    from stream.worker import run_worker  # faust is slow to import: only here

    return run_worker(settings)


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
    dev = sub.add_parser("dev", help="local stack without Docker (Kafka, Prometheus, Alertmanager)")
    dev.add_argument("action", choices=["up", "down", "fetch"])
    dev.set_defaults(func=cmd_dev)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
