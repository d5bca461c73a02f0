"""The benchmark's windowed job in Quix Streams, written as its documentation shows.

Per campaign (the message key, which the producer set to ``campaign_id``), a
1-minute tumbling window in event time (the event's ``ts``: epoch ms or ISO 8601)
that counts events and sums ``cost``. Events without a ``campaign_id`` (leads and
orders tied to a campaign by click id only) are filtered out, as Quix would skip
their None key anyway. The grace period (48 h) covers the input's lateness (up to
~24.5 h: spend reported past kpimon's horizon), so no event is dropped as late.

Runs in its own virtualenv (bench/peers/runner.py). Stops once N messages are
processed; prints one JSON line: events, seconds and events/s from the first
processed message to the last (process start, topic creation and the consumer
group's join excluded), and the checksum over the latest value of every window.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from datetime import datetime, timedelta
from typing import Any

import quixstreams
from quixstreams import Application
from quixstreams.dataframe.windows import aggregations as agg


def event_time_ms(value: Any, headers: Any, timestamp: int, timestamp_type: Any) -> int:
    """Event time from the event's ``ts``, as the simulator writes it (ms or ISO 8601)."""
    ts = value["ts"]
    if isinstance(ts, str):
        return int(datetime.fromisoformat(ts).timestamp() * 1000)
    return int(ts)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--events", type=int, required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--idle-timeout", type=float, default=120.0)
    args = parser.parse_args()

    n = args.events
    progress = {"seen": 0, "first": 0.0, "last": 0.0, "cpu0": 0.0, "cpu1": 0.0, "late": 0}
    latest: dict[tuple[Any, int], tuple[int, float]] = {}

    def processed(topic: str, partition: int, offset: int) -> None:
        # Application's per-message hook: the clock starts and stops on processed messages.
        progress["seen"] += 1
        if progress["seen"] == 1:
            progress["first"] = time.perf_counter()
            progress["cpu0"] = time.process_time()
        if progress["seen"] >= n:
            progress["last"], progress["cpu1"] = time.perf_counter(), time.process_time()
            app.stop()

    def late(value: Any, key: Any, timestamp_ms: int, late_by_ms: int, start: int, end: int,
             store_name: str, topic: str, partition: int, offset: int) -> bool:  # fmt: skip
        progress["late"] += 1
        return False  # counted here, not logged

    def record(value: dict[str, Any], key: Any, timestamp: int, headers: Any) -> None:
        latest[(key, value["start"])] = (value["count"], value["cost"])

    app = Application(
        broker_address=args.bootstrap,
        consumer_group=f"bench-quix-{int(time.time() * 1000)}",
        auto_offset_reset="earliest",
        state_dir=f"{args.workdir}/quix-state",
        on_message_processed=processed,
        loglevel=logging.WARNING,
    )
    topic = app.topic(args.topic, value_deserializer="json", timestamp_extractor=event_time_ms)
    sdf = app.dataframe(topic)
    sdf = sdf[sdf.contains("campaign_id")]
    sdf = (
        sdf.tumbling_window(timedelta(minutes=1), grace_ms=timedelta(hours=48), on_late=late)
        .agg(count=agg.Count(), cost=agg.Sum("cost"))
        .current()
    )
    sdf.update(record, metadata=True)
    app.run(timeout=args.idle_timeout, collect=False)
    if not progress["last"]:  # stopped idle before N: the checksum will say so
        progress["last"], progress["cpu1"] = time.perf_counter(), time.process_time()

    seconds = progress["last"] - progress["first"]
    print(json.dumps({
        "peer": "quix", "version": quixstreams.__version__, "events": progress["seen"],
        "seconds": round(seconds, 3), "cpu_seconds": round(progress["cpu1"] - progress["cpu0"], 3),
        "events_per_s": (progress["seen"] - 1) / seconds if seconds > 0 else 0.0,
        "windows": len(latest), "count": sum(c for c, _ in latest.values()),
        "cost": sum(s for _, s in latest.values()), "late": progress["late"],
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
