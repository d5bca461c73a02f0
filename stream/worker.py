"""The stream worker: a faust-streaming app hosting kpimon's transactional pipeline.

Faust provides the worker's lifecycle, web server (``/metrics``), signal
handling and logging. The pipeline is a faust/mode ``Service`` with one aiokafka
consumer (one consumer group) and one transactional producer, running three
stages in the same loop, each stage on the partitions the group gave it:

1. *ingest* (source topics): parse, dead-letter, route valid events to the
   ``<group>.routed`` topic by click id / dedup key (one message per batch);
2. *partition* (``<group>.routed``): dedup, attribution, lateness, per-minute
   cell deltas to ``<group>.partials``; its state's changes go to
   ``<group>.changelog.dedup`` in the same transaction;
3. *scope* (``<group>.partials``, one partition, so exactly one worker): sums
   cells into global/channel/campaign series and serves them; its state is
   snapshotted to the compacted ``<group>.changelog.scopes`` with the partials
   offset it covers.

Each loop iteration is one Kafka transaction holding every output and every
consumed offset, so a crash at any point either keeps all of an iteration or
none of it: nothing is lost or counted twice. Per-event faust agents cap near
50k events/s and faust's exactly-once mode has open bugs (see ANCHORS.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import faust
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    ConsumerStoppedError,
    KafkaError,
    ProducerFenced,
    TopicAlreadyExistsError,
)
from mode import Service
from prometheus_client import CONTENT_TYPE_LATEST

from stream import codec
from stream.aggregate import BatchOutput, Horizons, PartitionState, ScopeStore
from stream.metrics import build_registry, render, render_evaluation
from stream.pipeline import BatchResult, PipelineStats, RecordHandler
from stream.settings import Settings

log = logging.getLogger("kpimon.worker")
HEARTBEAT_MS = 1000
COMMIT_INTERVAL_S = 0.1


@dataclass(frozen=True)
class Topology:
    """Names of the internal topics, namespaced by consumer group."""

    routed: str
    partials: str
    dedup_log: str
    scope_log: str

    @classmethod
    def of(cls, settings: Settings) -> Topology:
        g = settings.group_id
        return cls(f"{g}.routed", f"{g}.partials", f"{g}.changelog.dedup", f"{g}.changelog.scopes")


def _names(partitions: Any) -> str:
    return ", ".join(sorted(f"{tp.topic}:{tp.partition}" for tp in partitions)) or "none"


async def ensure_topics(settings: Settings, topology: Topology, sources: list[str]) -> None:
    """Create missing topics with the layout the pipeline relies on."""
    n, rf = settings.topic_partitions, settings.topic_replication_factor
    wanted = [NewTopic(t, n, rf) for t in dict.fromkeys(sources)]
    big = {"max.message.bytes": str(4 << 20)}  # room for a DLQ'd message plus headers
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
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):  # another worker was first
                await admin.create_topics(missing)
            log.info("created topics %s", ", ".join(t.name for t in missing))
    finally:
        await admin.close()


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, service: PipelineService) -> None:
        self.service = service

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self.service.revoke(list(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self.service.assign(list(assigned))


class PipelineService(Service):
    """Ingest, partition and scope stages, one Kafka transaction per iteration."""

    def __init__(self, settings: Settings, stats: PipelineStats, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.stats = stats
        self.topology = Topology.of(settings)
        self.handler = RecordHandler(settings)
        self.horizons = Horizons(allowed_lateness_ms=int(settings.allowed_lateness_seconds * 1000))
        self.partitions: dict[int, PartitionState] = {}
        self.scope: ScopeStore | None = None
        self.kpi_exposition = b""
        self._partials_position = 0
        self._last_report: dict[int, int] = {}
        self._next_snapshot = 0.0
        self._routed_partitions = settings.topic_partitions
        self._lock = asyncio.Lock()
        self._closing = False
        self._sent: list[asyncio.Future[Any]] = []
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None

    # -- lifecycle ----------------------------------------------------------------
    def _new_producer(self) -> AIOKafkaProducer:
        s = self.settings
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
            max_request_size=max(4 << 20, 2 * s.max_message_bytes),
            transaction_timeout_ms=30_000,
        )

    async def _reset_producer(self) -> None:
        """A failed transaction can leave the producer unusable: start a fresh one
        (same transactional id, so the broker aborts whatever the old one left open)."""
        if self._producer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._producer.stop(), timeout=10)
        self._producer = self._new_producer()
        await self._producer.start()

    async def on_start(self) -> None:
        s, topo = self.settings, self.topology
        await ensure_topics(s, topo, self.handler.topics)
        self._producer = self._new_producer()
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=s.kafka_bootstrap,
            client_id=f"kpimon-{s.worker_id}",
            group_id=s.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            max_partition_fetch_bytes=4 << 20,
        )
        await self._producer.start()
        self._routed_partitions = len(await self._producer.partitions_for(topo.routed))
        await self._consumer.start()
        self._consumer.subscribe(
            topics=[*self.handler.topics, topo.routed, topo.partials], listener=_Rebalance(self)
        )
        log.info(
            "worker %s in group %s: ingesting %s; dead letters to %s; metrics on %s:%d",
            s.worker_id, s.group_id, ", ".join(self.handler.topics), s.dlq_topic,
            s.metrics_host, s.metrics_port,
        )  # fmt: skip

    async def on_stop(self) -> None:
        # Let the transaction in flight finish (or give up on it: it is then
        # aborted by the broker and redone by whoever owns the partitions next).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._lock.acquire(), timeout=15)
        self._closing = True  # the lock stays held: no transaction starts any more
        if self._consumer is not None:
            await self._consumer.stop()
        if self._producer is not None:
            await self._producer.stop()

    # -- rebalance: state follows partitions ----------------------------------------
    async def revoke(self, revoked: list[TopicPartition]) -> None:
        if self._closing:
            return  # on_stop holds the lock; the state goes with the process
        async with self._lock:  # waits for the transaction in flight
            for tp in revoked:
                if tp.topic == self.topology.routed:
                    self.partitions.pop(tp.partition, None)
                    self._last_report.pop(tp.partition, None)
                elif tp.topic == self.topology.partials:
                    self.scope = None
                    self.kpi_exposition = b""
            if revoked:
                log.info("partitions revoked: %s", _names(revoked))

    async def assign(self, assigned: list[TopicPartition]) -> None:
        async with self._lock:
            log.info("partitions assigned: %s", _names(assigned))
            await self._restore(assigned)

    async def _restore(self, assigned: list[TopicPartition]) -> None:
        started = time.monotonic()
        for tp in assigned:
            if tp.topic == self.topology.routed and tp.partition not in self.partitions:
                state = PartitionState(self.horizons)
                n = 0
                async for record in self._read_log(self.topology.dedup_log, tp.partition):
                    state.load_changes(codec.decode_json(record.value))
                    n += 1
                self.partitions[tp.partition] = state
                log.info("restored routed partition %d from %d changelog entries", tp.partition, n)
            elif tp.topic == self.topology.partials and self.scope is None:
                await self._restore_scope(tp)
        if assigned:
            log.info("state ready in %.2f s", time.monotonic() - started)

    async def _restore_scope(self, tp: TopicPartition) -> None:
        s = self.settings
        scope = ScopeStore(settle_ms=int(s.settle_seconds * 1000), max_campaigns=s.max_campaigns)
        position, n = 0, 0
        async for record in self._read_log(self.topology.scope_log, 0):
            key = codec.decode_json(record.key)
            value = None if record.value is None else codec.decode_json(record.value)
            if key == "meta":
                position = int(value["offset"]) if value else 0
            else:
                scope.load(tuple(key), value)
            n += 1
        self.scope = scope
        self._partials_position = position
        assert self._consumer is not None
        self._consumer.seek(tp, position)
        log.info("restored scope state from %d changelog entries; replaying partials from %d",
                 n, position)  # fmt: skip

    async def _read_log(self, topic: str, partition: int) -> Any:
        """Every committed record of one changelog partition, oldest first."""
        reader = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka_bootstrap,
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
            while await reader.position(tp) < end:
                batch = await reader.getmany(tp, timeout_ms=500)
                for record in batch.get(tp, []):
                    yield record
        finally:
            await reader.stop()

    # -- the loop -----------------------------------------------------------------
    @Service.task
    async def _consume(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        with contextlib.suppress(ConsumerStoppedError):  # stopping: on_stop closed it
            while not self.should_stop:
                batches = await self._gather(consumer, self.settings.max_batch_records)
                async with self._lock:
                    try:
                        await self._transact(batches)
                    except ProducerFenced:
                        log.critical("worker id %r is in use by another worker: stopping",
                                     self.settings.worker_id)  # fmt: skip
                        await self.crash(RuntimeError("producer fenced"))
                        return
                    except KafkaError as exc:
                        self.stats.aborted += 1
                        log.warning("transaction failed (%r): rebuilding state, retrying", exc)
                        await self._recover()

    @staticmethod
    async def _gather(consumer: AIOKafkaConsumer, limit: int) -> dict[TopicPartition, list[Any]]:
        """One batch; while a backlog is there, more of it for the same transaction
        (each commit costs a few broker round trips whatever its size)."""
        batches: dict[TopicPartition, list[Any]] = await consumer.getmany(
            timeout_ms=200, max_records=limit
        )
        count = sum(map(len, batches.values()))
        deadline = time.monotonic() + COMMIT_INTERVAL_S
        while batches and count < limit and time.monotonic() < deadline:
            more = await consumer.getmany(timeout_ms=0, max_records=limit - count)
            if not more:
                break
            for tp, records in more.items():
                batches.setdefault(tp, []).extend(records)
                count += len(records)
        return batches

    async def _recover(self) -> None:
        """Fresh producer, committed offsets and state; retried until the broker answers
        (nothing is processed meanwhile, so nothing can be counted on a half-built state)."""
        delay = 1.0
        while not self.should_stop:
            try:
                await self._reset_producer()
                await self._rewind()
                return
            except KafkaError as exc:
                log.warning("recovery failed (%r); retrying in %.0f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    async def _rewind(self) -> None:
        """After an aborted transaction: back to committed offsets and state."""
        assert self._consumer is not None
        assigned = list(self._consumer.assignment())
        self.partitions.clear()
        self.scope = None
        for tp in assigned:
            if tp.topic != self.topology.partials:
                committed = await self._consumer.committed(tp)
                if committed is None:
                    await self._consumer.seek_to_beginning(tp)
                else:
                    self._consumer.seek(tp, committed)
        await self._restore(assigned)

    async def _transact(self, batches: dict[TopicPartition, list[Any]]) -> None:
        producer, topo, s = self._producer, self.topology, self.settings
        assert producer is not None
        started = time.perf_counter()
        now_ms = int(time.time() * 1000)
        ingest = BatchResult()
        routed: dict[int, list[list[Any]]] = {}
        outputs: dict[int, BatchOutput] = {}
        for tp, records in batches.items():
            if tp.topic == topo.routed:
                state = self.partitions[tp.partition]
                out = outputs.setdefault(tp.partition, BatchOutput())
                for record in records:
                    state.apply(codec.decode_rows(record.value), now_ms, out)
            elif tp.topic == topo.partials:
                self._apply_partials(records, now_ms)
            else:
                result = self.handler.handle(records, now_ms)
                for event, source in zip(result.events, result.event_sources, strict=True):
                    p = codec.route_partition(event, self._routed_partitions)
                    routed.setdefault(p, []).append(codec.routed_row(event, source.timestamp))
                ingest.merge(result)
        caught_up = await self._caught_up()
        due = [
            p for p in self.partitions
            if p not in outputs and now_ms - self._last_report.get(p, 0) >= HEARTBEAT_MS
        ]  # fmt: skip
        snapshot = self.scope is not None and time.monotonic() >= self._next_snapshot
        if not batches and not due and not snapshot:
            return
        self._sent = []
        processed = time.perf_counter()
        async with producer.transaction():
            for p, rows in routed.items():
                for chunk in codec.chunks(rows):
                    await self._send(topo.routed, codec.encode_rows(chunk), partition=p)
            for letter in ingest.dead_letters:
                await self._send(s.dlq_topic, letter.value, key=letter.key, headers=letter.headers)
            for p in [*outputs, *due]:
                await self._send_partial(p, outputs.get(p), caught_up, now_ms)
            if snapshot and self.scope is not None:
                await self._send_snapshot(self.scope)
            # Every send must have succeeded before the commit: a failed one raises
            # here, the transaction is aborted and the batch is redone.
            await asyncio.gather(*self._sent)
            offsets = {tp: records[-1].offset + 1 for tp, records in batches.items() if records}
            if offsets:
                await producer.send_offsets_to_transaction(offsets, s.group_id)
        self.stats.transactions += 1
        log.debug(
            "transaction: %d records in %.0f ms, committed in %.0f ms",
            sum(map(len, batches.values())), (processed - started) * 1000,
            (time.perf_counter() - processed) * 1000,
        )  # fmt: skip
        self.stats.apply(ingest)
        dups: Counter[str] = Counter()
        late: Counter[str] = Counter()
        for out in outputs.values():
            dups.update(out.duplicates)
            late.update(out.late)
        self.stats.apply_stateful(dups, late)

    def _apply_partials(self, records: list[Any], now_ms: int) -> None:
        scope = self.scope
        assert scope is not None
        for record in records:
            partial = codec.Partial.decode(record.value)
            scope.apply_cells((c[0], c[1], c[2], c[3:]) for c in partial.cells)
            scope.report(partial.partition, partial.max_ts, partial.worker, partial.caught_up,
                         now_ms)  # fmt: skip
            for ts, n in partial.source_ts:
                scope.observe_latency([ts] * n, now_ms)
        self._partials_position = records[-1].offset + 1

    async def _send(
        self,
        topic: str,
        value: bytes | None,
        *,
        key: bytes | None = None,
        partition: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        assert self._producer is not None
        future = await self._producer.send(
            topic, value, key=key, partition=partition, headers=headers
        )
        self._sent.append(future)

    async def _send_partial(
        self, p: int, out: BatchOutput | None, caught_up: bool, now_ms: int
    ) -> None:
        assert self._producer is not None
        state = self.partitions[p]
        cells = codec.cells_list(out.cells) if out else []
        source_ts = codec.source_histogram(out.source_ts) if out else []
        for i, chunk in enumerate(codec.chunks(cells) if cells else [[]]):
            partial = codec.Partial(
                partition=p,
                worker=self.settings.worker_id,
                max_ts=state.max_ts,
                caught_up=caught_up,
                cells=chunk,
                source_ts=source_ts if i == 0 else [],
            )
            await self._send(self.topology.partials, partial.encode(), partition=0)
        if out is not None:
            for change in codec.split_changes(state.drain_changes()):
                key = f"p{p}".encode()
                await self._send(
                    self.topology.dedup_log, codec.encode_json(change), key=key, partition=p
                )
        self._last_report[p] = now_ms

    async def _send_snapshot(self, scope: ScopeStore) -> None:
        assert self._producer is not None
        topic = self.topology.scope_log
        for key, value in scope.drain_dirty():
            encoded = None if value is None else codec.encode_json(value)
            await self._send(topic, encoded, key=codec.encode_json(list(key)), partition=0)
        meta = codec.encode_json({"offset": self._partials_position})
        await self._send(topic, meta, key=codec.META_KEY, partition=0)
        self._next_snapshot = time.monotonic() + self.settings.snapshot_interval_seconds

    async def _caught_up(self) -> bool:
        """True when every assigned source and routed partition is within a batch of its end."""
        consumer = self._consumer
        assert consumer is not None
        for tp in consumer.assignment():
            if tp.topic == self.topology.partials:
                continue
            highwater = consumer.highwater(tp)
            if highwater is None:
                return False
            lag = highwater - await consumer.position(tp)
            if tp.topic == self.topology.routed:
                lag *= codec.ROWS_PER_MESSAGE  # a routed record packs up to that many events
            if lag > self.settings.caught_up_lag:
                return False
        return True

    # -- evaluation ---------------------------------------------------------------
    @Service.task
    async def _evaluate(self) -> None:
        while not self.should_stop:
            await self.sleep(self.settings.eval_interval_seconds)
            async with self._lock:
                if self.scope is None:
                    continue
                now_ms = int(time.time() * 1000)
                evaluation = self.scope.evaluate(now_ms)
                self.kpi_exposition = render_evaluation(evaluation, self.scope, now_ms)


def create_app(settings: Settings, stats: PipelineStats, pipeline: PipelineService) -> faust.App:
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
        body = render(registry) + pipeline.kpi_exposition
        return web.bytes(body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    return app


def run_worker(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT; returns the process exit code."""
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    # Each batch allocates ~10 containers per event and the dedup state holds
    # millions of objects: with the default thresholds the cyclic collector ran
    # full passes over all of it every few batches (half the CPU time). Nothing
    # here makes reference cycles worth collecting that often.
    gc.set_threshold(200_000, 50, 1000)
    gc.freeze()
    stats = PipelineStats()
    pipeline = PipelineService(settings, stats)
    app = create_app(settings, stats, pipeline)
    worker = faust.Worker(app, pipeline, loglevel=settings.log_level.lower(), quiet=True)
    worker.execute_from_commandline()
    return 0
