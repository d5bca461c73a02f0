"""Benchmark baseline (b): the naive faust design, one agent step per event.

Per event it does the same work as kpimon: parse and validate with kpimon's
parser, deduplicate with a dict, and add the event to a per-(campaign, minute)
tumbling table. Prints ``events=N seconds=S`` once it has seen ``N`` events.
Usage: python bench/naive_faust.py BOOTSTRAP TOPIC N PORT DATADIR
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta

import faust

from stream.events import Event, EventParser

bootstrap, topic_name, target, port, datadir = sys.argv[1:6]
app = faust.App(
    f"bench-naive-{int(time.time())}",
    broker=f"kafka://{bootstrap}",
    store="memory://",
    web_port=int(port),
    web_host="127.0.0.1",
    datadir=datadir,
    topic_replication_factor=1,
    topic_partitions=3,
    consumer_auto_offset_reset="earliest",
    autodiscover=False,
)
topic = app.topic(topic_name, value_serializer="raw", key_serializer="raw")
counts = app.Table("counts", default=int, partitions=3).tumbling(
    timedelta(minutes=1), expires=timedelta(hours=1)
)
parser = EventParser(rates={"EUR": 1.1}, reporting_currency="USD", max_bytes=65536,
                     max_future_skew_ms=300_000)  # fmt: skip
seen: set[str] = set()
state = {"n": 0, "t0": 0.0}


@app.agent(topic)
async def aggregate(stream: faust.StreamT[bytes]) -> None:
    async for value in stream:
        if state["n"] == 0:
            state["t0"] = time.perf_counter()
        state["n"] += 1
        event = parser.parse(value, topic_type=None, now_ms=int(time.time() * 1000))
        if isinstance(event, Event) and event.dedup_key not in seen:
            seen.add(event.dedup_key)
            counts[f"{event.campaign_id}|{event.ts_ms // 60_000}"] += 1
        if state["n"] >= int(target):
            print(f"events={state['n']} seconds={time.perf_counter() - state['t0']:.3f}",
                  flush=True)  # fmt: skip
            sys.stdout.flush()
            import os

            os._exit(0)


if __name__ == "__main__":
    sys.argv = [sys.argv[0], "worker", "-l", "warn"]
    app.main()
