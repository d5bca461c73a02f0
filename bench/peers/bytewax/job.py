"""The benchmark's windowed job in Bytewax, written as its documentation shows.

Kafka input (``bytewax.connectors.kafka``, ``tail=False``: the dataflow ends at the
partitions' end offsets), keyed by ``campaign_id``, and a ``fold_window`` that
counts events and sums ``cost`` per 1-minute ``TumblingWindower`` on an
``EventClock`` over the event's ``ts`` (epoch ms or ISO 8601). Events without a
``campaign_id`` (leads and orders tied to a campaign by click id only) are
filtered out. The clock waits 48 h, which covers the input's lateness (up to
~24.5 h), so no event is late; the fold is order-insensitive, hence
``ordered=False``. Every window closes, and is written, at the end of input.

Runs in its own virtualenv (bench/peers/runner.py) as ``python -m bytewax.run``
would (``cli_main``, one worker, 10 s epochs). Prints one JSON line: events,
seconds and events/s from the first record to the write of the last window
(process start and dataflow build excluded), and the checksum over all windows.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import UTC, datetime, timedelta
from importlib.metadata import version
from typing import Any

import bytewax.connectors.kafka.operators as kop
import bytewax.operators as op
import bytewax.operators.windowing as win
import orjson
from bytewax.connectors.kafka import KafkaSourceMessage
from bytewax.dataflow import Dataflow
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from bytewax.run import cli_main

Progress = dict[str, Any]


def event_time(ts: int | str) -> datetime:
    """Event time from the event's ``ts``, as the simulator writes it (ms or ISO 8601)."""
    if isinstance(ts, str):
        return datetime.fromisoformat(ts)
    return datetime.fromtimestamp(ts / 1000, UTC)


class _TotalsPartition(StatelessSinkPartition[Any]):
    def __init__(self, progress: Progress, kind: str) -> None:
        self.progress, self.kind = progress, kind

    def write_batch(self, items: list[Any]) -> None:
        p = self.progress
        if self.kind == "late":
            p["late"] += len(items)
            return
        for _key, (_window_id, (count, cost)) in items:
            p["windows"] += 1
            p["count"] += count
            p["cost"] += cost
        p["last"], p["cpu1"] = time.perf_counter(), time.process_time()


class Totals(DynamicSink[Any]):
    """Sums closed windows (or counts late items) into ``progress``."""

    def __init__(self, progress: Progress, kind: str) -> None:
        self.progress, self.kind = progress, kind

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _TotalsPartition:
        return _TotalsPartition(self.progress, self.kind)


def build_flow(bootstrap: str, topic: str, progress: Progress) -> Dataflow:
    def parse(msg: KafkaSourceMessage[Any, Any]) -> tuple[str, tuple[datetime, float]] | None:
        progress["seen"] += 1
        if progress["seen"] == 1:
            progress["first"] = time.perf_counter()
            progress["cpu0"] = time.process_time()
        event = orjson.loads(msg.value)
        campaign = event.get("campaign_id")
        if campaign is None:
            return None
        return campaign, (event_time(event["ts"]), event.get("cost", 0.0))

    def fail(err: Any) -> None:
        raise RuntimeError(f"Kafka error: {err.err}")

    def add(acc: tuple[int, float], item: tuple[datetime, float]) -> tuple[int, float]:
        return acc[0] + 1, acc[1] + item[1]

    def merge(a: tuple[int, float], b: tuple[int, float]) -> tuple[int, float]:
        return a[0] + b[0], a[1] + b[1]

    flow = Dataflow("kpimon_bench")
    kafka = kop.input("kafka_in", flow, brokers=[bootstrap], topics=[topic], tail=False)
    op.inspect("errors", kafka.errs, lambda _step, err: fail(err))
    keyed = op.filter_map("parse", kafka.oks, parse)
    clock = win.EventClock(lambda item: item[0], wait_for_system_duration=timedelta(hours=48))
    minutes = win.TumblingWindower(timedelta(minutes=1), align_to=datetime(2020, 1, 1, tzinfo=UTC))
    windows = win.fold_window(
        "per_minute",
        keyed,
        clock,
        minutes,
        builder=lambda: (0, 0.0),
        folder=add,
        merger=merge,
        ordered=False,
    )
    op.output("totals", windows.down, Totals(progress, "windows"))
    op.output("late", windows.late, Totals(progress, "late"))
    return flow


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--events", type=int, required=True)
    parser.add_argument("--workdir", required=True)  # unused: no recovery store
    args = parser.parse_args()

    progress: Progress = dict(
        seen=0, first=0.0, last=0.0, cpu0=0.0, cpu1=0.0, windows=0, count=0, cost=0.0, late=0
    )
    flow = build_flow(args.bootstrap, args.topic, progress)
    cli_main(flow, workers_per_process=1, epoch_interval=timedelta(seconds=10))

    seconds = progress["last"] - progress["first"]
    print(json.dumps({
        "peer": "bytewax", "version": version("bytewax"), "events": progress["seen"],
        "seconds": round(seconds, 3), "cpu_seconds": round(progress["cpu1"] - progress["cpu0"], 3),
        "events_per_s": (progress["seen"] - 1) / seconds if seconds > 0 else 0.0,
        "windows": progress["windows"], "count": progress["count"],
        "cost": progress["cost"], "late": progress["late"],
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
