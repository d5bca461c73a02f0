"""Kafka clients of the worker's runtime: topic layout, the consumer and the
transactional producer as the pipeline configures them, changelog reads, and what the
consumer knows of its partitions (lags, positions). Only the runtime imports this."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from stream import codec
from stream.settings import Settings
from stream.stages import Topology

log = logging.getLogger("kpimon.worker")
DLQ_FALLBACK_LIMIT = 1 << 20
"""Kafka's default max.message.bytes, assumed when the DLQ topic's own cannot be read."""


def describe(partitions: Any) -> str:
    """``events.clicks[0-2], g.partials[0]``: one entry per topic, partition ranges."""
    by_topic: dict[str, list[int]] = {}
    for tp in partitions:
        by_topic.setdefault(tp.topic, []).append(tp.partition)
    parts = []
    for topic, numbers in sorted(by_topic.items()):
        numbers.sort()
        runs: list[list[int]] = []
        for n in numbers:
            if runs and n == runs[-1][1] + 1:
                runs[-1][1] = n
            else:
                runs.append([n, n])
        spans = ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
        parts.append(f"{topic}[{spans}]")
    return ", ".join(parts) or "none"


async def ensure_topics(settings: Settings, topology: Topology, sources: list[str]) -> int:
    """Create missing topics with the layout the pipeline relies on; returns the largest
    record the dead-letter topic takes (it may predate us, with a smaller limit)."""
    n, rf = settings.topic_partitions, settings.topic_replication_factor
    wanted = [NewTopic(t, n, rf) for t in dict.fromkeys(sources)]
    # Room for a DLQ'd message plus headers; routed messages are cut to fit it.
    big = {"max.message.bytes": str(codec.INTERNAL_MESSAGE_BYTES)}
    wanted += [
        NewTopic(settings.dlq_topic, n, rf, topic_configs=big),
        NewTopic(settings.alerts_topic, 1, rf),
        NewTopic(topology.routed, n, rf, topic_configs=big),
        NewTopic(topology.partials, 1, rf, topic_configs=big),
        NewTopic(topology.dedup_log, n, rf,
                 topic_configs={**big, "retention.ms": str(26 * 3600_000)}),
        NewTopic(topology.scope_log, 1, rf, topic_configs={**big, "cleanup.policy": "compact"}),
    ]  # fmt: skip
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in wanted if t.name not in existing]
        created = False
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):  # another worker was first
                await admin.create_topics(missing)
                created = True
            log.info("created topics %s", ", ".join(t.name for t in missing))
        if created and any(t.name == settings.dlq_topic for t in missing):
            # Ours, with our limit: read back at once, a topic just created may not be
            # known to the broker that answers yet (and would read as the fallback).
            return codec.INTERNAL_MESSAGE_BYTES
        return await max_message_bytes(admin, settings.dlq_topic)
    finally:
        await admin.close()


async def max_message_bytes(admin: AIOKafkaAdminClient, topic: str) -> int:
    try:
        resource = ConfigResource(ConfigResourceType.TOPIC, topic, {"max.message.bytes": None})
        for response in await admin.describe_configs([resource]):
            for _code, _msg, _type, _name, entries, *_ in response.resources:
                for name, value, *_ in entries:
                    if name == "max.message.bytes":
                        return int(value)
    except (KafkaError, ValueError, TypeError) as exc:
        log.warning("could not read the max.message.bytes of %s (%r): assuming %d",
                    topic, exc, DLQ_FALLBACK_LIMIT)  # fmt: skip
    return DLQ_FALLBACK_LIMIT


def request_size(settings: Settings) -> int:
    """The producer's request limit: room for a batch of internal messages, or an input
    of the largest accepted size re-sent as a dead letter with its headers."""
    return max(4 << 20, 2 * settings.max_message_bytes)


def new_producer(settings: Settings) -> AIOKafkaProducer:
    """The worker's transactional producer (its id fences an older process of the same
    worker id)."""
    s = settings
    return AIOKafkaProducer(
        bootstrap_servers=s.kafka_bootstrap,
        client_id=f"kpimon-{s.worker_id}",
        transactional_id=f"{s.group_id}-{s.worker_id}",
        enable_idempotence=True,
        acks="all",
        linger_ms=5,
        # Several internal messages per produce request: with the default 16 kB
        # every ~100 kB message was its own batch, each awaiting the previous ack.
        max_batch_size=900_000,
        max_request_size=request_size(s),
        transaction_timeout_ms=30_000,
    )


def new_consumer(settings: Settings) -> AIOKafkaConsumer:
    """The worker's one consumer: every topic of every stage, committed records only;
    offsets are committed only through the producer's transactions."""
    return AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        client_id=f"kpimon-{settings.worker_id}",
        group_id=settings.group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        max_partition_fetch_bytes=4 << 20,
    )


async def read_log(
    settings: Settings, topic: str, partition: int, stopping: Callable[[], bool]
) -> AsyncIterator[ConsumerRecord[Any, Any]]:
    """Every committed record of one changelog partition, oldest first (until ``stopping``)."""
    reader = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        enable_auto_commit=False,
        isolation_level="read_committed",
        max_partition_fetch_bytes=8 << 20,
    )
    await reader.start()
    try:
        tp = TopicPartition(topic, partition)
        reader.assign([tp])
        await reader.seek_to_beginning(tp)
        end = (await reader.end_offsets([tp]))[tp]
        while not stopping() and await reader.position(tp) < end:
            batch = await reader.getmany(tp, timeout_ms=500)
            for record in batch.get(tp, []):
                yield record
    finally:
        await reader.stop()


async def lags(consumer: AIOKafkaConsumer) -> dict[TopicPartition, int | None]:
    """Records behind per assigned partition (None when not known yet)."""
    behind: dict[TopicPartition, int | None] = {}
    for tp in consumer.assignment():
        highwater = consumer.highwater(tp)
        behind[tp] = None if highwater is None else highwater - await consumer.position(tp)
    return behind


async def still_current(
    consumer: AIOKafkaConsumer, batches: dict[TopicPartition, list[Any]]
) -> dict[TopicPartition, list[Any]]:
    """The records of a batch whose partition has not moved since they were fetched.

    aiokafka applies a new assignment before it runs the rebalance listener, so a
    batch fetched while ``assign`` restores state can hold records the restore made
    stale: the segment stage seeks back to its snapshot's offset (applying the
    batch too would count those partials twice), a partition may be revoked
    meanwhile, and a kept one restarts from its committed offset. Such records are
    dropped; the consumer delivers them again from the partition's new position.
    """
    assigned = consumer.assignment()
    current: dict[TopicPartition, list[Any]] = {}
    for tp, records in batches.items():
        if records and tp in assigned and await consumer.position(tp) > records[-1].offset:
            current[tp] = records
    return current


READ_BACK_TIMEOUT_S = 10.0
"""How long reading back the originals of too-late events may take before those not found
are dead-lettered as parsed (``reconstructed``) instead."""
READ_BACK_GAP = 200
"""Offsets closer than this are read in one pass; farther ones are sought."""
READ_BACK_FETCH_BYTES = 32 << 10
"""A read-back fetch per partition: each wanted record costs about one such fetch (they
cost the broker and the worker by the byte: 4 MiB ones made read-back cost more than the
carrying it replaces)."""


class SourceReader:
    """Reads source records back by their coordinates: the original bytes of too-late
    events, so that routed rows need not carry them (``Stages.read_back``).

    Its own consumer, outside the group, reading committed records only, started on first
    use (most workers never meet a too-late event).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._consumer: AIOKafkaConsumer | None = None

    async def read(
        self, wanted: Iterable[tuple[str, int, int]], timeout_s: float = READ_BACK_TIMEOUT_S
    ) -> dict[tuple[str, int, int], tuple[bytes | None, bytes]]:
        """(key, value) of each wanted record still in its partition. A record removed by
        retention, or not reached within ``timeout_s``, is left out (logged); a broker
        error raises (the transaction is then retried)."""
        by_partition: dict[tuple[str, int], list[int]] = {}
        for topic, partition, offset in wanted:
            if offset >= 0:
                by_partition.setdefault((topic, partition), []).append(offset)
        found: dict[tuple[str, int, int], tuple[bytes | None, bytes]] = {}
        if not by_partition:
            return found
        consumer = await self._started()
        started = time.monotonic()
        deadline = started + timeout_s
        runs = 0
        for (topic, partition), offsets in sorted(by_partition.items()):
            tp = TopicPartition(topic, partition)
            consumer.assign([tp])
            for run in _runs(sorted(set(offsets))):
                runs += 1
                await self._read_run(consumer, tp, run, found, deadline)
            consumer.pause(tp)  # no prefetching meanwhile
        log.debug("read back %d source records in %d runs, %.0f ms", len(found), runs,
                  (time.monotonic() - started) * 1000)  # fmt: skip
        missing = sum(len(set(o)) for o in by_partition.values()) - len(found)
        if missing:
            log.warning("%d too-late events could not be read back from their source "
                        "(removed, or too slow): dead-lettered as parsed", missing)  # fmt: skip
        return found

    async def _read_run(
        self,
        consumer: AIOKafkaConsumer,
        tp: TopicPartition,
        run: list[int],
        found: dict[tuple[str, int, int], tuple[bytes | None, bytes]],
        deadline: float,
    ) -> None:
        wanted = set(run)
        consumer.seek(tp, run[0])
        while time.monotonic() < deadline:
            batch = await consumer.getmany(tp, timeout_ms=200, max_records=len(run) + 100)
            for record in batch.get(tp, []):
                if record.offset in wanted:
                    found[(tp.topic, tp.partition, record.offset)] = (record.key, record.value)
            # Past the run (a record removed by retention resets to the earliest: past too).
            if await consumer.position(tp) > run[-1]:
                return

    async def _started(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            consumer = AIOKafkaConsumer(
                bootstrap_servers=self.settings.kafka_bootstrap,
                client_id=f"kpimon-{self.settings.worker_id}-read-back",
                enable_auto_commit=False,
                isolation_level="read_committed",
                auto_offset_reset="earliest",
                # Small fetches: a few records are wanted at a time, often one (the
                # broker still returns a larger first batch whole).
                max_partition_fetch_bytes=READ_BACK_FETCH_BYTES,
            )
            await consumer.start()
            self._consumer = consumer
        return self._consumer

    async def stop(self) -> None:
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            await consumer.stop()


def _runs(offsets: list[int], gap: int = READ_BACK_GAP) -> Iterator[list[int]]:
    """Sorted offsets as runs read in one pass each."""
    run: list[int] = []
    for offset in offsets:
        if run and offset - run[-1] > gap:
            yield run
            run = []
        run.append(offset)
    if run:
        yield run
