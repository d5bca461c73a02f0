"""Events from an independent producer, librdkafka (confluent-kafka), counted exactly.

Producers in the field compress (gzip, snappy, lz4, zstd), are idempotent and
write in transactions, some of which they abort. For every codec, events come
from an idempotent producer and from a transactional one (a committed
transaction, an aborted one, a committed one); the worker's counters, measure
totals and window sums must equal a recomputation from the committed events.

Then a worker that lacks the snappy codec at run time: it pauses only the snappy
partition and says so (log, metric), counts and commits everything else, and
after a restart with the codec every event is counted exactly once.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from confluent_kafka import KafkaError, Message, Producer

from tests.helpers import WorkerProcess, run, sample, wait_for

pytestmark = pytest.mark.integration

MEASURES = ("impressions", "clicks", "leads", "orders", "new_customers", "revenue", "spend")
WINDOWS = {"5m": 5, "15m": 15, "1h": 60, "24h": 1440}
CODECS = ("none", "gzip", "snappy", "lz4", "zstd")
KINDS = ("impression", "click", "lead", "order", "spend")
TOPIC_ENV = {"impression": "KPIMON_TOPIC_IMPRESSIONS", "click": "KPIMON_TOPIC_CLICKS",
             "lead": "KPIMON_TOPIC_LEADS", "order": "KPIMON_TOPIC_ORDERS",
             "spend": "KPIMON_TOPIC_SPEND"}  # fmt: skip
CHANNELS = ("search", "social", "display")
PARTITIONS = 3  # KPIMON_TOPIC_PARTITIONS: the worker creates the topics
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@dataclass
class Expected:
    """The committed events, and what the contract says they add up to."""

    events: Counter[str] = field(default_factory=Counter)
    cells: dict[tuple[str, str, int], list[int]] = field(default_factory=dict)

    def add(self, kind: str, event: dict[str, Any]) -> None:
        self.events[kind] += 1
        key = (event["channel"], event["campaign_id"], event["ts"] // 60_000)
        row = self.cells.setdefault(key, [0] * 7)
        money = round(event.get("cost", event.get("amount", event.get("revenue", 0))) * 1e6)
        if kind in ("impression", "click", "lead", "order"):
            row[KINDS.index(kind)] += 1
        if kind == "order":
            row[4] += int(event["new_customer"])
            row[5] += money
        elif kind != "lead":
            row[6] += money

    def totals(self) -> dict[tuple[str, str], list[float]]:
        out: dict[tuple[str, str], list[int]] = {}
        for (channel, campaign, _), values in self.cells.items():
            row = out.setdefault((channel, campaign), [0] * 7)
            out[(channel, campaign)] = [a + b for a, b in zip(row, values, strict=True)]
        return {k: [value(x, i) for i, x in enumerate(v)] for k, v in out.items()}

    def windows(self, end_minute: int) -> dict[tuple[str, ...], float]:
        """(scope, channel, campaign, window, measure) -> sum over the window's minutes."""
        sums: dict[tuple[str, str, str, str], list[int]] = {}
        for (channel, campaign, minute), values in self.cells.items():
            for scope in (("campaign", channel, campaign), ("channel", channel, ""),
                          ("global", "", "")):  # fmt: skip
                for w, minutes in WINDOWS.items():
                    row = sums.setdefault((*scope, w), [0] * 7)
                    if end_minute - minutes <= minute < end_minute:
                        sums[(*scope, w)] = [a + b for a, b in zip(row, values, strict=True)]
        return {
            (*key, measure): value(row[i], i)
            for key, row in sums.items()
            for i, measure in enumerate(MEASURES)
        }


def value(raw: int, index: int) -> float:
    return raw / 1e6 if MEASURES[index] in ("revenue", "spend") else float(raw)


def make_event(rng: random.Random, kind: str, event_id: str, now_ms: int) -> dict[str, Any]:
    """An event of the last three minutes (not late, not in the future)."""
    n = rng.randrange(6)
    event: dict[str, Any] = {"event_id": event_id, "ts": now_ms - rng.randint(5_000, 180_000),
                             "campaign_id": f"c{n}", "channel": CHANNELS[n % 3]}  # fmt: skip
    if kind == "impression":
        event["cost"] = rng.randint(1, 50) / 1000
    elif kind == "click":
        event |= {"click_id": event_id, "cost": rng.randint(5, 300) / 100}
    elif kind == "lead":
        event["user_id"] = f"u{rng.randrange(1000)}"
    elif kind == "order":
        event |= {
            "order_id": event_id,
            "revenue": rng.randint(500, 40_000) / 100,
            "customer_id": f"u{rng.randrange(1000)}",
            "new_customer": rng.random() < 0.3,
        }
    else:
        event["amount"] = rng.randint(100, 10_000) / 100
    return event


Outgoing = list[tuple[str, str, dict[str, Any], int]]  # (kind, topic, event, partition)


def batch_of(env: dict[str, str], rng: random.Random, prefix: str, n: int) -> Outgoing:
    """``n`` events over every type and every partition (type and partition round robin,
    so a later batch of 15 or more reaches every partition an earlier one did)."""
    now_ms = int(time.time() * 1000)
    out: Outgoing = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        event = make_event(rng, kind, f"{prefix}-{i}", now_ms)
        out.append((kind, env[TOPIC_ENV[kind]], event, (i // len(KINDS)) % PARTITIONS))
    return out


def produce(producer: Producer, batch: Outgoing) -> None:
    """Queue ``batch``; delivery failures fail the test."""

    def report(err: KafkaError | None, msg: Message) -> None:
        assert err is None, f"delivery failed: {err}"

    for _, topic, event, partition in batch:
        key = event["campaign_id"].encode()
        producer.produce(topic, json.dumps(event).encode(), key, partition=partition,
                         on_delivery=report)  # fmt: skip
        producer.poll(0)


def flush(producer: Producer) -> None:
    assert producer.flush(30) == 0, "messages left unsent"


def idempotent(bootstrap: str, codec: str) -> Producer:
    return Producer({"bootstrap.servers": bootstrap, "compression.type": codec,
                     "enable.idempotence": True, "acks": "all", "linger.ms": 20})  # fmt: skip


def transactional(bootstrap: str, codec: str) -> Producer:
    producer = Producer({"bootstrap.servers": bootstrap, "compression.type": codec,
                         "transactional.id": f"kpimon-test-{codec}-{uuid.uuid4().hex[:8]}",
                         "linger.ms": 20})  # fmt: skip
    producer.init_transactions(30)
    return producer


def counted(samples: Samples | None, name: str = "kpimon_events_total") -> dict[str, float]:
    """Label value -> sample for a one-label metric (type, reason) of one scrape."""
    return {next(iter(labels))[1]: v for (n, labels), v in (samples or {}).items() if n == name}


def measure_totals(samples: Samples) -> dict[tuple[str, str], list[float]]:
    out: dict[tuple[str, str], list[float]] = {}
    for (name, labels), v in samples.items():
        if name == "kpimon_measure_total":
            lab = dict(labels)
            out.setdefault((lab["channel"], lab["campaign"]), [0.0] * 7)[
                MEASURES.index(lab["measure"])
            ] = v
    return out


def window_sums(samples: Samples) -> dict[tuple[str, ...], float]:
    return {
        (lab["scope"], lab["channel"], lab["campaign"], lab["window"], lab["measure"]): v
        for (name, labels), v in samples.items()
        if name == "kpimon_window_measure"
        for lab in [dict(labels)]
    }


def stalled(samples: Samples | None) -> dict[tuple[str, str, str], float]:
    return {
        (lab["topic"], lab["partition"], lab["reason"]): v
        for (name, labels), v in (samples or {}).items()
        if name == "kpimon_partition_stalled"
        for lab in [dict(labels)]
    }


async def lag_by_partition(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    """Records of ``topic`` not yet committed by ``group``, per partition."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await admin.start()
    await consumer.start()
    try:
        committed = await admin.list_consumer_group_offsets(group)
        ends = await consumer.end_offsets([TopicPartition(topic, p) for p in range(PARTITIONS)])
        return {
            tp.partition: end - (committed[tp].offset if tp in committed else 0)
            for tp, end in ends.items()
        }
    finally:
        await consumer.stop()
        await admin.close()


def check_exact(worker: WorkerProcess, expected: Expected) -> None:
    """Measure totals, then every window sum of that same scrape, equal the recomputation."""
    totals = expected.totals()

    def settled() -> Samples | None:
        samples = worker.scrape()
        return samples if samples and measure_totals(samples) == totals else None

    def shown() -> Samples | None:
        """Exact totals, and windows past the minutes of the events: they move a settle
        delay after the worker says it has caught up (the last events are in flight)."""
        samples = settled()
        clicks = window_sums(samples).get(("global", "", "", "5m", "clicks"), 0) if samples else 0
        return samples if clicks > 0 else None

    try:
        wait_for(settled, timeout=60, what="exact measure totals")
    except AssertionError:
        got = measure_totals(worker.scrape() or {})
        diff = {k: (got.get(k), v) for k, v in totals.items() if got.get(k) != v}
        raise AssertionError(f"measure totals differ (got, expected): {diff}") from None
    samples = wait_for(shown, timeout=120, what="the events in the windows, totals exact")
    end_minute = int(samples[("kpimon_window_end_timestamp_seconds", frozenset())]) // 60
    windows = expected.windows(end_minute)
    assert window_sums(samples) == windows
    assert windows[("global", "", "", "5m", "clicks")] > 0, "no event in the windows yet"


def test_every_codec_idempotent_and_transactional_exact(
    start_worker: Callable[..., WorkerProcess], worker_env: dict[str, str]
) -> None:
    bootstrap = worker_env["KPIMON_KAFKA_BOOTSTRAP"]
    worker = start_worker(KPIMON_EVAL_INTERVAL_SECONDS="1", KPIMON_SNAPSHOT_INTERVAL_SECONDS="1")
    worker.wait_ready()
    rng = random.Random(41)
    expected, aborted = Expected(), 0
    for codec in CODECS:
        batch = batch_of(worker_env, rng, f"{codec}-idem", 150)
        producer = idempotent(bootstrap, codec)
        produce(producer, batch)
        flush(producer)
        for kind, _, event, _ in batch:
            expected.add(kind, event)

        producer = transactional(bootstrap, codec)
        for name, n, commit in (("t1", 100, True), ("t2", 60, False), ("t3", 50, True)):
            batch = batch_of(worker_env, rng, f"{codec}-{name}", n)
            producer.begin_transaction()
            produce(producer, batch)
            if commit:
                producer.commit_transaction(30)
                for kind, _, event, _ in batch:
                    expected.add(kind, event)
            else:  # written to the log first (flush), then aborted
                flush(producer)
                producer.abort_transaction(30)
                aborted += n
    total = sum(expected.events.values())
    assert (total, aborted) == (1500, 300)

    # The last committed transaction of each codec reaches every partition its
    # aborted one did: once all committed events are counted, the aborted ones
    # were read past.
    wait_for(lambda: sum(counted(worker.scrape()).values()) >= total, timeout=90,
             what=f"{total} committed events counted")  # fmt: skip
    check_exact(worker, expected)
    samples = worker.scrape()
    assert counted(samples) == {kind: float(n) for kind, n in expected.events.items()}
    assert sum(counted(samples, "kpimon_events_rejected_total").values()) == 0
    assert stalled(samples) == {}


def test_missing_codec_stalls_one_partition_loses_nothing(
    start_worker: Callable[..., WorkerProcess], worker_env: dict[str, str]
) -> None:
    bootstrap, group = worker_env["KPIMON_KAFKA_BOOTSTRAP"], worker_env["KPIMON_GROUP_ID"]
    clicks = worker_env["KPIMON_TOPIC_CLICKS"]
    fast = {"KPIMON_EVAL_INTERVAL_SECONDS": "1", "KPIMON_SNAPSHOT_INTERVAL_SECONDS": "1"}
    lame = start_worker("w1", module="tests.integration.no_snappy_worker", **fast)
    lame.wait_ready()
    rng = random.Random(42)
    expected, readable_only = Expected(), Expected()
    # Clicks partition 1 in snappy; everything else uncompressed or lz4.
    snappy = [m for m in batch_of(worker_env, rng, "s", 300) if m[0] == "click" and m[3] == 1]
    plain = [m for m in batch_of(worker_env, rng, "p", 150) if m[3] != 1 or m[0] != "click"]
    lz4 = [m for m in batch_of(worker_env, rng, "z", 100) if m[3] != 1 or m[0] != "click"]
    for codec, batch in (("none", plain), ("snappy", snappy), ("lz4", lz4)):
        producer = idempotent(bootstrap, codec)
        produce(producer, batch)
        flush(producer)
        for kind, _, event, _ in batch:
            expected.add(kind, event)
            if codec != "snappy":
                readable_only.add(kind, event)
    readable = len(plain) + len(lz4)

    def stall_seen() -> Samples | None:
        samples = lame.scrape()
        assert lame.alive(), lame.log_tail()
        done = sum(counted(samples).values()) >= readable and stalled(samples)
        return samples if done else None

    samples = wait_for(stall_seen, timeout=60, what="the readable events and the stall")
    assert stalled(samples) == {(clicks, "1", "unsupported_codec"): 1.0}
    assert sum(counted(samples).values()) == readable
    unreadable = sample(samples, "kpimon_batches_unreadable_total", topic=clicks,
                        reason="unsupported_codec")  # fmt: skip
    assert unreadable is not None and unreadable >= 1

    # Everything but the snappy clicks is committed; those wait, uncommitted.
    def uncommitted() -> dict[int, int]:
        return {p: n for p, n in run(lag_by_partition(bootstrap, group, clicks)).items() if n}

    wait_for(lambda: uncommitted() == {1: len(snappy)}, timeout=30,
             what="only the snappy clicks uncommitted")  # fmt: skip
    errors = [
        line for line in lame.log_path.read_text().splitlines() if "partition stalled" in line
    ]
    assert len(errors) == 1, errors
    assert "ERROR" in errors[0] and f"{clicks}[1] at offset 0 (batch 0-" in errors[0]
    assert "snappy" in errors[0] and "codec not found" in errors[0]
    check_exact(lame, readable_only)  # the other partitions go on, exactly
    assert lame.alive(), lame.log_tail()
    lame.stop()

    fixed = start_worker("w1", **fast)
    fixed.wait_ready()
    wait_for(lambda: counted(fixed.scrape()).get("click", 0) >= len(snappy), timeout=60,
             what="the snappy clicks counted after the restart")  # fmt: skip
    check_exact(fixed, expected)
    after = fixed.scrape()
    assert counted(after) == {**dict.fromkeys(KINDS, 0.0), "click": float(len(snappy))}
    assert stalled(after) == {}
