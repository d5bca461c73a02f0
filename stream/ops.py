"""Operator checks against Kafka, for the runbooks: consumer-group lag and topic tails.

    python -m stream.ops lag                 # records the group has not consumed, per partition
    python -m stream.ops tail kpimon.dlq     # the newest records of a topic, as JSON lines

The broker is ``KPIMON_KAFKA_BOOTSTRAP`` (default 127.0.0.1:9092) and the group
``KPIMON_GROUP_ID`` (default kpimon). The Kafka jars ``kpimon dev`` resolves do
not include Kafka's command-line tools (``kafka-consumer-groups.sh``, the
console consumer); the ``apache/kafka`` image of docker compose has them under
``/opt/kafka/bin``. Offsets are read as committed (``read_committed``), the way
the transactional worker sees them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from stream.settings import ConfigError, load_settings


@dataclass(frozen=True)
class PartitionLag:
    topic: str
    partition: int
    committed: int
    end: int

    @property
    def lag(self) -> int:
        return max(0, self.end - self.committed)


async def group_lag(bootstrap: str, group: str) -> list[PartitionLag]:
    """Committed offset, end offset and lag of every partition ``group`` has committed."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, isolation_level="read_committed")
    await admin.start()
    await consumer.start()
    try:
        committed = await admin.list_consumer_group_offsets(group)
        tps = sorted(committed, key=lambda tp: (tp.topic, tp.partition))
        ends = await consumer.end_offsets(tps) if tps else {}
        return [PartitionLag(tp.topic, tp.partition, committed[tp].offset, ends[tp]) for tp in tps]
    finally:
        await consumer.stop()
        await admin.close()


# Deeper JSON is shown as its text: encoding it again would recurse that deep
# (a 60 KB ``[[[...]]]`` dead letter is ~30,000 levels) and no event nests so.
MAX_JSON_DEPTH = 100


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _depth_exceeds(value: Any, limit: int) -> bool:
    """Whether ``value`` nests deeper than ``limit`` (iterative: any depth is safe)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return False


def _decode(raw: bytes | None) -> Any:
    """JSON when the bytes are strict JSON of sane depth, else their text (invalid UTF-8
    replaced), else None. Never raises: the topics this reads hold whatever was rejected."""
    if raw is None:
        return None
    text = raw.decode("utf-8", errors="replace")
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return text
    return text if _depth_exceeds(value, MAX_JSON_DEPTH) else value


def json_line(record: dict[str, Any]) -> bytes:
    """One UTF-8 JSON line; strings that UTF-8 cannot carry (lone surrogates, from
    ``"\\ud800"`` escapes) are written as JSON escapes instead."""
    text = json.dumps(record, ensure_ascii=False)
    try:
        return text.encode() + b"\n"
    except UnicodeEncodeError:
        return json.dumps(record).encode() + b"\n"


async def tail(
    bootstrap: str, topic: str, count: int, *, within_s: float = 30.0
) -> list[dict[str, Any]]:
    """The newest ``count`` committed records of ``topic`` across its partitions, oldest first."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        isolation_level="read_committed",
        enable_auto_commit=False,
        max_partition_fetch_bytes=4 << 20,
    )
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            await consumer._client.force_metadata_update()
            partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            raise LookupError(f"topic {topic} does not exist")
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        starts = await consumer.beginning_offsets(tps)
        ends = await consumer.end_offsets(tps)
        for tp in tps:
            consumer.seek(tp, max(starts[tp], ends[tp] - count))
        records: list[Any] = []
        pending = {tp for tp in tps if ends[tp] > starts[tp]}
        deadline = time.monotonic() + within_s
        while pending and time.monotonic() < deadline:
            batch = await consumer.getmany(*pending, timeout_ms=1000)
            for tp, recs in batch.items():
                records.extend(r for r in recs if r.offset < ends[tp])
            # Transaction markers occupy offsets too: done once the position reaches the end.
            for tp in list(pending):
                if await consumer.position(tp) >= ends[tp]:
                    pending.discard(tp)
        records.sort(key=lambda r: (r.timestamp, r.partition, r.offset))
        return [
            {
                "partition": r.partition,
                "offset": r.offset,
                "timestamp": datetime.fromtimestamp(r.timestamp / 1000, UTC).isoformat(),
                "key": _decode(r.key),
                "headers": {k: v.decode("utf-8", errors="replace") for k, v in r.headers},
                "value": _decode(r.value),
            }
            for r in records[-count:]
        ]
    finally:
        await consumer.stop()


def _lag_table(rows: Sequence[PartitionLag]) -> str:
    lines = [f"{'topic':<40} {'partition':>9} {'committed':>12} {'end':>12} {'lag':>10}"]
    totals: dict[str, int] = {}
    for row in rows:
        lines.append(
            f"{row.topic:<40} {row.partition:>9} {row.committed:>12} {row.end:>12} {row.lag:>10}"
        )
        totals[row.topic] = totals.get(row.topic, 0) + row.lag
    lines.extend(f"{'total ' + topic:<63} {lag:>23}" for topic, lag in totals.items())
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m stream.ops", description="Kafka checks for the kpimon runbooks."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    lag = sub.add_parser("lag", help="lag of the consumer group per topic partition")
    lag.add_argument("--group", help="consumer group (default KPIMON_GROUP_ID)")
    peek = sub.add_parser("tail", help="print the newest records of a topic as JSON lines")
    peek.add_argument("topic", help="e.g. kpimon.dlq or kpimon.alerts")
    peek.add_argument("-n", "--count", type=int, default=10, help="how many (default 10)")
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    bootstrap = settings.kafka_bootstrap
    if args.command == "lag":
        group = args.group or settings.group_id
        rows = asyncio.run(group_lag(bootstrap, group))
        if not rows:
            print(f"consumer group {group} has no committed offsets", file=sys.stderr)
            return 1
        print(_lag_table(rows))
        return 0
    try:
        records = asyncio.run(tail(bootstrap, args.topic, max(1, args.count)))
    except LookupError as exc:
        print(exc, file=sys.stderr)
        return 1
    sys.stdout.flush()
    for record in records:
        sys.stdout.buffer.write(json_line(record))
    sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
