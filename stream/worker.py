"""The stream worker: a faust-streaming app hosting kpimon's batch ingest service.

Faust provides the worker's lifecycle, web server (``/metrics``), signal
handling and logging. The ingest path itself is a faust/mode ``Service`` that
consumes with aiokafka's batch API and commits each batch's dead letters and
source offsets in one Kafka transaction: per-event faust agents cap near 50k
events/s and faust's exactly-once mode has open bugs (see ANCHORS.md), while
this path is exact and several times faster.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import faust
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, ProducerFenced, TopicAlreadyExistsError
from mode import Service
from prometheus_client import CONTENT_TYPE_LATEST

from stream.metrics import build_registry, render
from stream.pipeline import PipelineStats, RecordHandler, SourceRecord
from stream.settings import Settings

log = logging.getLogger("kpimon.worker")


class _HoldDuringRebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    """Revocation waits for the batch in flight, so no batch spans two owners."""

    def __init__(self, lock: asyncio.Lock) -> None:
        self._lock = lock

    async def on_partitions_revoked(self, revoked: Any) -> None:
        async with self._lock:
            log.info("partitions revoked: %s", _names(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        log.info("partitions assigned: %s", _names(assigned))


def _names(partitions: Any) -> str:
    return ", ".join(sorted(f"{tp.topic}:{tp.partition}" for tp in partitions)) or "none"


async def ensure_topics(settings: Settings, topics: list[str]) -> None:
    """Create missing topics (events, dead letters, alerts) with the configured layout."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in dict.fromkeys(topics) if t not in existing]
        if missing:
            new = [
                NewTopic(t, settings.topic_partitions, settings.topic_replication_factor)
                for t in missing
            ]
            with contextlib.suppress(TopicAlreadyExistsError):  # another worker was first
                await admin.create_topics(new)
            log.info("created topics %s", ", ".join(missing))
    finally:
        await admin.close()


class IngestService(Service):
    """Consume, parse, dead-letter and count, one transaction per batch."""

    def __init__(self, settings: Settings, stats: PipelineStats, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.stats = stats
        self.handler = RecordHandler(settings)
        self._lock = asyncio.Lock()
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None

    async def on_start(self) -> None:
        s = self.settings
        await ensure_topics(s, [*self.handler.topics, s.dlq_topic, s.alerts_topic])
        self._producer = AIOKafkaProducer(
            bootstrap_servers=s.kafka_bootstrap,
            client_id=f"kpimon-{s.worker_id}",
            transactional_id=f"{s.group_id}-ingest-{s.worker_id}",
            enable_idempotence=True,
            acks="all",
            linger_ms=5,
            max_request_size=max(2 * 1024 * 1024, 2 * s.max_message_bytes),
        )
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=s.kafka_bootstrap,
            client_id=f"kpimon-{s.worker_id}",
            group_id=s.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
        )
        await self._producer.start()
        await self._consumer.start()
        self._consumer.subscribe(
            topics=self.handler.topics, listener=_HoldDuringRebalance(self._lock)
        )
        log.info(
            "ingesting %s as %s in group %s; dead letters to %s",
            ", ".join(self.handler.topics), s.worker_id, s.group_id, s.dlq_topic,
        )  # fmt: skip

    async def on_stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
        if self._producer is not None:
            await self._producer.stop()

    @Service.task
    async def _consume(self) -> None:
        assert self._consumer is not None
        while not self.should_stop:
            batches = await self._consumer.getmany(timeout_ms=500, max_records=5000)
            if not batches:
                continue
            async with self._lock:
                try:
                    await self._process(batches)
                except ProducerFenced:
                    log.critical(
                        "another worker uses worker id %r: stopping", self.settings.worker_id
                    )
                    await self.crash(
                        RuntimeError(f"producer fenced: worker id {self.settings.worker_id}")
                    )
                    return
                except KafkaError as exc:
                    log.warning("batch not committed (%s); it will be retried", exc)
                    for tp, records in batches.items():
                        self._consumer.seek(tp, records[0].offset)

    async def _process(self, batches: dict[TopicPartition, list[Any]]) -> None:
        assert self._producer is not None
        records = [
            SourceRecord(r.topic, r.partition, r.offset, r.key, r.value, r.timestamp)
            for batch in batches.values()
            for r in batch
        ]
        result = self.handler.handle(records, now_ms=int(time.time() * 1000))
        producer, dlq = self._producer, self.settings.dlq_topic
        async with producer.transaction():
            for letter in result.dead_letters:
                await producer.send(dlq, value=letter.value, key=letter.key, headers=letter.headers)
            offsets = {tp: recs[-1].offset + 1 for tp, recs in batches.items()}
            await producer.send_offsets_to_transaction(offsets, self.settings.group_id)
        self.stats.apply(result)


def create_app(settings: Settings, stats: PipelineStats) -> faust.App:
    """The faust app: web server with ``/metrics``; no faust agents of its own."""
    app = faust.App(
        f"{settings.group_id}-host",
        broker=f"kafka://{settings.kafka_bootstrap}",
        store="memory://",
        web_host=settings.metrics_host,
        web_port=settings.metrics_port,
        web_in_thread=False,
        datadir=str(settings.state_dir / "faust"),
        topic_replication_factor=settings.topic_replication_factor,
        autodiscover=False,
    )
    registry = build_registry(stats)

    @app.page("/metrics")
    async def metrics(web: Any, request: Any) -> Any:
        return web.bytes(render(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    return app


def run_worker(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT; returns the process exit code."""
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    stats = PipelineStats()
    app = create_app(settings, stats)
    ingest = IngestService(settings, stats)
    worker = faust.Worker(app, ingest, loglevel=settings.log_level.lower(), quiet=True)
    worker.execute_from_commandline()
    return 0
