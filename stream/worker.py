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
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import faust
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import (
    ConsumerStoppedError,
    KafkaError,
    ProducerFenced,
    TopicAlreadyExistsError,
)
from faust.app.base import BootStrategy
from mode import Service
from prometheus_client import CONTENT_TYPE_LATEST

from alerts.engine import AlertEngine
from alerts.exposition import render_alerts
from alerts.outbox import Outbox
from alerts.rules import RulesFile
from alerts.sinks import AlertmanagerSink, ConsoleSink, Sender, Sink, SlackSink
from stream import codec, logs
from stream.aggregate import BatchOutput, Horizons, PartitionState, ScopeStore
from stream.metrics import build_registry, render, render_evaluation
from stream.pipeline import (
    BatchResult,
    DeadLetter,
    PipelineStats,
    RecordHandler,
    fit_for_dlq,
    too_late_letter,
)
from stream.segments import SegmentView
from stream.settings import Settings
from stream.shutdown import Watchdog
from stream.stalls import Stalls, locate, positions, rewind

log = logging.getLogger("kpimon.worker")
HEARTBEAT_MS = 1000
COMMIT_INTERVAL_S = 0.1
PARTIALS_HOLD_LAG = 50
"""Unapplied partials records beyond which the scope stage holds its watermark."""
STOP_GRACE_S = 2.0
"""On stop, how long the transaction in flight may take to commit before it is abandoned."""
STOP_RESERVE_S = 1.5
"""Of the stop budget, what is left for faust's own teardown after the pipeline's."""
STOP_CLOSE_S = 2.0
"""Longest wait for one Kafka client to close: with the broker up it takes milliseconds,
with the broker down it never ends (the producer's pending abort has nowhere to go)."""
ALERTS_STATE_KEY = codec.encode_json("alerts")
CARRY_MARGIN_MS = 5 * 60_000
DLQ_FALLBACK_LIMIT = 1 << 20
"""Kafka's default max.message.bytes, assumed when the DLQ topic's own cannot be read."""
DLQ_RECORD_OVERHEAD = 1024
"""Room for the record batch and record framing around a dead letter's key, value, headers."""
EXPIRE_SERIES_PER_TICK = 1000
"""Series whose old blocks one evaluation tick folds in the live scope state (~20 ms)."""
GIL_SWITCH_INTERVAL_S = 0.001
T = TypeVar("T")


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


@dataclass(frozen=True)
class Tick:
    """One evaluation computed off the event loop, waiting to be committed on it."""

    engine: AlertEngine
    """A clone of the live engine, stepped by this tick."""
    records: list[dict[str, Any]]
    state: bytes
    """The stepped engine's state, as the scope changelog holds it."""
    exposition: bytes
    evaluate_s: float
    alert_s: float
    render_s: float


def compute_tick(view: ScopeStore, engine: AlertEngine, now_ms: int, hold: bool) -> Tick:
    """Windows and KPIs of a scope snapshot, alert decisions on a clone of ``engine`` and
    the exposition: everything of a tick that takes time, touching no live state (it runs
    in a thread while the event loop goes on)."""
    started = time.perf_counter()
    evaluation = view.evaluate(now_ms, hold=hold)
    evaluated = time.perf_counter()
    stepped = engine.clone()
    segments = SegmentView(view.series)
    records = stepped.evaluate(segments, evaluation.end_minute, evaluation.watermark_ms / 1000,
                               replaying=evaluation.hold_alerts)  # fmt: skip
    state = codec.encode_json(stepped.to_dict())
    alerted = time.perf_counter()
    exposition = render_evaluation(evaluation, view, now_ms) + render_alerts(
        stepped.firing_labels(), stepped.baselines, evaluation
    )
    return Tick(stepped, records, state, exposition, evaluated - started, alerted - evaluated,
                time.perf_counter() - alerted)  # fmt: skip


def in_thread(fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
    """``fn(*args)`` in a new daemon thread, as a future of the running loop.

    Not ``asyncio.to_thread``: the default executor's threads are joined at exit, so a
    worker told to stop would first wait for an evaluation it no longer needs.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():  # cancelled: the worker is stopping
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def run() -> None:
        result, error = None, None
        try:
            result = fn(*args)
        except BaseException as exc:  # handed to the awaiting task, which raises it
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name=f"kpimon-{fn.__name__}", daemon=True).start()
    return future


def _names(partitions: Any) -> str:
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
        return await _max_message_bytes(admin, settings.dlq_topic)
    finally:
        await admin.close()


async def _max_message_bytes(admin: AIOKafkaAdminClient, topic: str) -> int:
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


def _request_size(settings: Settings) -> int:
    """The producer's request limit: room for a batch of internal messages, or an input
    of the largest accepted size re-sent as a dead letter with its headers."""
    return max(4 << 20, 2 * settings.max_message_bytes)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, service: PipelineService) -> None:
        self.service = service

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self.service.revoke(list(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self.service.assign(list(assigned))


class PipelineService(Service):
    """Ingest, partition and scope stages, one Kafka transaction per iteration."""

    mundane_level = "debug"  # mode's "Starting..."/"Stopping..." lines

    def __init__(
        self, settings: Settings, stats: PipelineStats, rules: RulesFile, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.rules = rules
        self.stats = stats
        self.stalls = Stalls(stats)
        self.topology = Topology.of(settings)
        self.handler = RecordHandler(settings)
        self.horizons = Horizons(
            dedup_minutes=settings.horizon_minutes, settle_ms=int(settings.settle_seconds * 1000)
        )
        # Events this much younger than their horizon can't be too late when they reach
        # their routed partition (its horizon clock trails this worker's wall clock by
        # less than a transaction), so only older ones carry their original bytes.
        self._carry_before = {
            kind: minutes * 60_000 - CARRY_MARGIN_MS
            for kind, minutes in settings.horizon_minutes.items()
        }
        self._dlq_limit = DLQ_FALLBACK_LIMIT
        self.partitions: dict[int, PartitionState] = {}
        self.scope: ScopeStore | None = None
        self.engine: AlertEngine | None = None
        self.outbox: Outbox | None = None
        self._engine_state = b""
        self._session: aiohttp.ClientSession | None = None
        self._alertmanager: AlertmanagerSink | None = None
        self._senders: list[Sender] = []
        self._sender_tasks: list[asyncio.Task[None]] = []
        self.kpi_exposition = b""
        self._partials_position = 0
        self._last_report: dict[int, int] = {}
        self._source_reached: dict[TopicPartition, int] = {}
        self._reached_before = 0  # as of the end of the previous transaction
        self._next_snapshot = 0.0
        self._routed_partitions = settings.topic_partitions
        self._lock = asyncio.Lock()
        self._closing = False
        self._recovering = False
        self._loops: list[asyncio.Future[Any]] = []
        self.stop_deadline: float | None = None
        """``time.monotonic()`` by which a stop must be done (set on SIGTERM)."""
        self.stopped_cleanly = True
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
            max_request_size=_request_size(s),
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
        # An evaluation tick computes in a thread: the event loop waits up to one
        # switch interval for the GIL at each wake-up (5 ms by default; a scrape wakes
        # it a dozen times). The computing thread barely notices the shorter slices.
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        topic_limit = await ensure_topics(s, topo, self.handler.topics)
        self._producer = self._new_producer()
        self._dlq_limit = min(topic_limit, _request_size(s)) - DLQ_RECORD_OVERHEAD
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
        self._start_senders()
        self._routed_partitions = len(await self._producer.partitions_for(topo.routed))
        await self._consumer.start()
        self._consumer.subscribe(
            topics=[*self.handler.topics, topo.routed, topo.partials], listener=_Rebalance(self)
        )
        log.info(
            "worker %s in group %s: ingesting %s; dead letters to %s; metrics on %s:%d; "
            "%d alert rules from %s; notifications to %s",
            s.worker_id, s.group_id, ", ".join(self.handler.topics), s.dlq_topic,
            s.metrics_host, s.metrics_port, len(self.rules.rules), s.rules,
            ", ".join([s.alerts_topic, *self._channels]),
        )  # fmt: skip

    def _start_senders(self) -> None:
        """One sender per configured sink, each draining its channel of the outbox."""
        s = self.settings
        self._session = aiohttp.ClientSession()
        sinks: list[Sink] = []
        if s.slack_webhook_url is not None:
            sinks.append(SlackSink(self._session, s.slack_webhook_url.get_secret_value()))
        if s.alertmanager_url:
            self._alertmanager = AlertmanagerSink(self._session, s.alertmanager_url)
            sinks.append(self._alertmanager)
        if s.console_alerts:
            sinks.append(ConsoleSink())
        self._senders = [
            Sender(sink, lambda: self.outbox, self._count,
                   min_interval=s.notify_min_interval_seconds,
                   max_backoff=s.notify_max_backoff_seconds,
                   resend=self._resend_firing if sink is self._alertmanager else None,
                   resend_every=s.alertmanager_resend_seconds)
            for sink in sinks
        ]  # fmt: skip
        for channel in ("kafka", *self._channels):
            self.stats.notified(channel, "sent", 0)
        self._sender_tasks = [asyncio.create_task(sender.run()) for sender in self._senders]

    @property
    def _channels(self) -> tuple[str, ...]:
        return tuple(sender.sink.channel for sender in self._senders)

    def _count(self, channel: str, outcome: str) -> None:
        self.stats.notified(channel, outcome)
        self._outbox_changed()

    def _outbox_changed(self) -> None:
        self.stats.outbox_pending = self.outbox.counts() if self.outbox is not None else {}

    async def on_stop(self) -> None:
        """Stop within the bound (``stop_deadline``), in every state.

        The loops end after their current iteration (``should_stop`` is set), so an
        idle or busy worker commits what it is doing and stops. Work that does not end
        within a short grace (a transaction the broker does not answer, a recovery
        retrying, a rebalance restoring state) is cancelled: its open transaction is
        aborted, or left for the broker to abort, as after ``kill -9``, and whoever owns
        the partitions next redoes it from the committed offsets. Then the consumer
        leaves the group (the other workers take over at once) and the clients close,
        each step bounded by what is left of the budget.
        """
        bound = self.settings.shutdown_timeout_seconds
        reserve = min(STOP_RESERVE_S, bound / 5)
        deadline = (self.stop_deadline or time.monotonic() + bound) - reserve
        self._closing = True
        loops = [task for task in self._loops if not task.done()]
        grace = 0.0 if self._recovering else min(STOP_GRACE_S, (deadline - time.monotonic()) / 3)
        if loops:
            _, pending = await asyncio.wait(loops, timeout=max(grace, 0))
            if pending:
                log.warning(
                    "stopping: abandoning the transaction in flight (the broker "
                    "aborts it; its records are processed again after a restart)"
                )
            await _cancel(pending, until=min(deadline, time.monotonic() + 1.0))
        for task in self._sender_tasks:
            task.cancel()
        await _cancel(self._sender_tasks, until=deadline)
        clean = True
        steps: list[tuple[str, Any]] = [
            ("consumer", self._consumer.stop if self._consumer else None),
            ("producer", self._producer.stop if self._producer else None),
            ("http session", self._session.close if self._session else None),
        ]
        for name, stop in steps:
            if stop is None:
                continue
            try:
                left = min(deadline - time.monotonic(), STOP_CLOSE_S)
                await asyncio.wait_for(stop(), timeout=max(left, 0.01))
            except TimeoutError:
                clean = False
                log.warning("stopping: closing the %s timed out (is the broker reachable?)", name)
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise  # this stop itself is cancelled
                # aiokafka's fetcher re-raises the cancellation of its own retrying fetch
                # on close (broker unreachable): that consumer is as closed as it gets.
                clean = False
            except Exception as exc:  # a failing close must not keep the process alive
                log.warning("stopping: closing the %s failed: %r", name, exc)
        self.stopped_cleanly = clean

    # -- rebalance: state follows partitions ----------------------------------------
    async def revoke(self, revoked: list[TopicPartition]) -> None:
        if self._closing:
            return  # on_stop holds the lock; the state goes with the process
        async with self._lock:  # waits for the transaction in flight
            for tp in revoked:
                self.stats.consumer_lag.pop((tp.topic, tp.partition), None)
                self._source_reached.pop(tp, None)
                if tp.topic == self.topology.routed:
                    self.partitions.pop(tp.partition, None)
                    self._last_report.pop(tp.partition, None)
                elif tp.topic == self.topology.partials:
                    self.scope, self.engine, self.outbox = None, None, None
                    self.kpi_exposition = b""
                    self._outbox_changed()
            if revoked:
                log.info("partitions revoked: %s", _names(revoked))

    async def assign(self, assigned: list[TopicPartition]) -> None:
        if self._closing:
            return
        async with self._lock:
            log.info("partitions assigned: %s", _names(assigned))
            await self._restore(assigned)

    async def _restore(self, assigned: list[TopicPartition]) -> None:
        """Rebuild the state of newly assigned partitions; given up when the worker stops
        (nothing is processed after that, and the next owner restores it anew)."""
        started = time.monotonic()
        for tp in assigned:
            if self.should_stop:
                log.info("stopping: state restore abandoned")
                return
            if tp.topic == self.topology.routed and tp.partition not in self.partitions:
                state = PartitionState(self.horizons)
                n = 0
                async for record in self._read_log(self.topology.dedup_log, tp.partition):
                    state.load_changes(codec.decode_json(record.value))
                    n += 1
                if self.should_stop:
                    continue  # half restored: never installed
                self.partitions[tp.partition] = state
                log.info("restored routed partition %d from %d changelog entries", tp.partition, n)
            elif tp.topic == self.topology.partials and self.scope is None:
                await self._restore_scope(tp)
        if assigned:
            log.info("state ready in %.2f s", time.monotonic() - started)

    async def _restore_scope(self, tp: TopicPartition) -> None:
        s = self.settings
        scope = ScopeStore(
            settle_ms=int(s.settle_seconds * 1000),
            max_campaigns=s.max_campaigns,
            max_channels=s.max_channels,
            replay_lag_ms=int(s.replay_lag_seconds * 1000),
        )
        engine = AlertEngine(
            self.rules, grafana_url=s.grafana_url, runbook_base_url=s.runbook_base_url
        )
        outbox = Outbox(self._channels)
        position, n, alerts = 0, 0, None
        async for record in self._read_log(self.topology.scope_log, 0):
            key = codec.decode_json(record.key)
            value = None if record.value is None else codec.decode_json(record.value)
            if key == "meta":
                position = int(value["offset"]) if value else 0
            elif key == "alerts":
                alerts = value
            elif key[0] == "outbox":
                outbox.load(key, value)
            else:
                scope.load(tuple(key), value)
            n += 1
        if self.should_stop:
            return  # half restored: never installed
        if alerts:
            try:
                engine.load(alerts)
            except ValueError as exc:  # e.g. a rule changed meaning: start its alerts afresh
                log.error("alert state not restored (%s): alerts start inactive", exc)
        outbox.loaded()
        self.scope, self.engine, self.outbox = scope, engine, outbox
        self._engine_state = codec.encode_json(engine.to_dict())
        self._outbox_changed()
        for sender in self._senders:
            sender.wake()
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
            while not self.should_stop and await reader.position(tp) < end:
                batch = await reader.getmany(tp, timeout_ms=500)
                for record in batch.get(tp, []):
                    yield record
        finally:
            await reader.stop()

    # -- the loop -----------------------------------------------------------------
    async def on_started(self) -> None:
        self._loops = [self.add_future(self._consume()), self.add_future(self._evaluate())]

    async def _consume(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        with contextlib.suppress(ConsumerStoppedError):  # stopping: on_stop closed it
            while not self.should_stop:
                batches = await self._gather(consumer, self.settings.max_batch_records)
                async with self._lock:
                    if self.should_stop:
                        return  # no new transaction once stopping (nothing of it is committed)
                    batches = await self._still_current(consumer, batches)
                    if await self._failed(self._transact(batches)) == "fenced":
                        return

    @staticmethod
    async def _still_current(
        consumer: AIOKafkaConsumer, batches: dict[TopicPartition, list[Any]]
    ) -> dict[TopicPartition, list[Any]]:
        """The records of a batch whose partition has not moved since they were fetched.

        aiokafka applies a new assignment before it runs the rebalance listener, so a
        batch fetched while ``assign`` restores state can hold records the restore made
        stale: the scope stage seeks back to its snapshot's offset (applying the
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

    async def _failed(self, transaction: Coroutine[Any, Any, None]) -> str | None:
        """Run one transaction: None when it committed; "aborted" after a Kafka error
        (state rebuilt from the committed changelogs, the work is redone); "fenced"
        when another process took this worker id (the worker then stops)."""
        try:
            await transaction
        except ProducerFenced:
            log.critical("worker id %r is in use by another worker: stopping",
                         self.settings.worker_id)  # fmt: skip
            await self.crash(RuntimeError("producer fenced"))
            return "fenced"
        except KafkaError as exc:
            self.stats.aborted += 1
            log.warning("transaction failed (%r): rebuilding state, retrying", exc)
            await self._recover()
            return "aborted"
        return None

    async def _gather(
        self, consumer: AIOKafkaConsumer, limit: int
    ) -> dict[TopicPartition, list[Any]]:
        """One batch; while a backlog is there, more of it for the same transaction
        (each commit costs a few broker round trips whatever its size).

        A batch that cannot be read (codec missing, corrupt) pauses only its
        partition, with what was fetched so far put back (see stream/stalls.py).
        """
        self.stalls.due(consumer)
        before = await positions(consumer)
        batches: dict[TopicPartition, list[Any]] = {}
        count, timeout_ms, deadline = 0, 200, 0.0
        while count < limit:
            try:
                more = await consumer.getmany(timeout_ms=timeout_ms, max_records=limit - count)
            except Exception as exc:
                where = locate(exc)
                if where is None:
                    raise
                async with self._lock:  # no rebalance moves positions meanwhile
                    await rewind(consumer, batches, self._held_positions(), before)
                    self.stalls.stalled(consumer, where)
                break
            if not more:
                break
            for tp, records in more.items():
                batches.setdefault(tp, []).extend(records)
                count += len(records)
            if timeout_ms:
                timeout_ms, deadline = 0, time.monotonic() + COMMIT_INTERVAL_S
            if time.monotonic() >= deadline:
                break
        self.stalls.read(consumer, batches)
        return batches

    def _held_positions(self) -> dict[TopicPartition, int]:
        """Where the scope state stands (a restore during the failed fetch moves it)."""
        if self.scope is None:
            return {}
        return {TopicPartition(self.topology.partials, 0): self._partials_position}

    async def _recover(self) -> None:
        """Fresh producer, committed offsets and state; retried until the broker answers
        (nothing is processed meanwhile, so nothing can be counted on a half-built state)."""
        delay = 1.0
        self._recovering = True
        try:
            while not self.should_stop:
                try:
                    await self._reset_producer()
                    await self._rewind()
                    return
                except KafkaError as exc:
                    log.warning("recovery failed (%r); retrying in %.0f s", exc, delay)
                    await self.sleep(delay)
                    delay = min(delay * 2, 30.0)
        finally:
            self._recovering = False

    async def _rewind(self) -> None:
        """After an aborted transaction: back to committed offsets and state."""
        assert self._consumer is not None
        assigned = list(self._consumer.assignment())
        self.partitions.clear()
        self.scope, self.engine, self.outbox = None, None, None
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
                    state.apply(codec.decode_rows(record.value), now_ms, out,
                                reached_ms=codec.reached_of(record.headers))  # fmt: skip
            elif tp.topic == topo.partials:
                self._apply_partials(records, now_ms)
            else:
                result = self.handler.handle(records, now_ms)
                if result.events:
                    newest = max(event.ts_ms for event in result.events)
                    if newest > self._source_reached.get(tp, 0):
                        self._source_reached[tp] = newest
                carry = self._carry_before
                for event, source in zip(result.events, result.event_sources, strict=True):
                    p = codec.route_partition(event, self._routed_partitions)
                    if event.ts_ms < now_ms - carry[event.type]:
                        where = codec.origin(tp.topic, tp.partition, source.offset,
                                             source.key, source.value)  # fmt: skip
                    else:
                        where = codec.origin(tp.topic, tp.partition, source.offset)
                    routed.setdefault(p, []).append(
                        codec.routed_row(event, source.timestamp, where)
                    )
                ingest.merge(result)
        reached = await self._reached(now_ms)
        due = [
            p for p in self.partitions
            if p not in outputs and now_ms - self._last_report.get(p, 0) >= HEARTBEAT_MS
        ]  # fmt: skip
        snapshot = self.scope is not None and time.monotonic() >= self._next_snapshot
        delivered = self.outbox is not None and self.outbox.changed
        if not batches and not due and not snapshot and not delivered:
            return
        self._sent = []
        processed = time.perf_counter()
        async with producer.transaction():
            stamp = codec.reached_header(self._reached_before)
            for p, rows in routed.items():
                for chunk in codec.chunks(rows):
                    await self._send(topo.routed, codec.encode_rows(chunk), partition=p,
                                     headers=stamp)  # fmt: skip
            for letter in self._dead_letters(ingest, outputs.values()):
                await self._send(s.dlq_topic, letter.value, key=letter.key, headers=letter.headers)
            for p in [*outputs, *due]:
                await self._send_partial(p, outputs.get(p), reached, now_ms)
            if snapshot and self.scope is not None:
                await self._send_snapshot(self.scope)
            if delivered:
                await self._send_outbox_changes()
            # Every send must have succeeded before the commit: a failed one raises
            # here, the transaction is aborted and the batch is redone.
            await asyncio.gather(*self._sent)
            offsets = {tp: records[-1].offset + 1 for tp, records in batches.items() if records}
            if offsets:
                await producer.send_offsets_to_transaction(offsets, s.group_id)
        self.stats.transactions += 1
        self._reached_before = reached
        log.debug(
            "transaction: %d records in %.0f ms, committed in %.0f ms",
            sum(map(len, batches.values())), (processed - started) * 1000,
            (time.perf_counter() - processed) * 1000,
        )  # fmt: skip
        self.stats.apply(ingest)
        dups: Counter[str] = Counter()
        late: Counter[str] = Counter()
        out_of_order: Counter[str] = Counter()
        for out in outputs.values():
            dups.update(out.duplicates)
            late.update(out.late)
            out_of_order.update(out.out_of_order)
        self.stats.apply_stateful(dups, late, out_of_order)

    def _dead_letters(
        self, ingest: BatchResult, outputs: Iterable[BatchOutput]
    ) -> Iterator[DeadLetter]:
        """Rejected inputs and too-late events, each cut to a marker if it cannot fit."""
        s, limit = self.settings, self._dlq_limit
        for letter in ingest.dead_letters:
            yield fit_for_dlq(letter, limit)
        for out in outputs:
            for late in out.too_late:
                letter = too_late_letter(late, s.horizon_minutes, s.reporting_currency)
                yield fit_for_dlq(letter, limit)

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
        self, p: int, out: BatchOutput | None, reached: int, now_ms: int
    ) -> None:
        assert self._producer is not None
        state = self.partitions[p]
        cells = codec.cells_list(out.cells) if out else []
        source_ts = codec.source_histogram(out.source_ts) if out else []
        for i, chunk in enumerate(codec.chunks(cells) if cells else [[]]):
            partial = codec.Partial(
                partition=p,
                worker=self.settings.worker_id,
                max_ts=reached,
                caught_up=reached >= now_ms,
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

    async def _send_outbox_changes(self) -> None:
        assert self.outbox is not None
        for key, value in self.outbox.drain_changes():
            encoded = None if value is None else codec.encode_json(value)
            await self._send(self.topology.scope_log, encoded, key=codec.encode_json(list(key)),
                             partition=0)  # fmt: skip

    async def _reached(self, now_ms: int) -> int:
        """Event time up to which this worker has passed on everything: ``now_ms`` when
        every assigned source and routed partition is consumed to its end, else the
        least event time reached among those that are not.

        Per partition, because topics are consumed at different speeds: counting a
        lagging clicks partition as caught up would show its missing clicks as a CTR
        drop. Also records every partition's lag for ``kpimon_consumer_lag_records``.
        """
        consumer = self._consumer
        assert consumer is not None
        reached = now_ms
        for tp in consumer.assignment():
            highwater = consumer.highwater(tp)
            lag = None if highwater is None else highwater - await consumer.position(tp)
            if lag is not None:
                self.stats.consumer_lag[(tp.topic, tp.partition)] = lag
            if tp.topic == self.topology.partials:
                continue
            # A routed partition ends with a transaction marker the position may not pass.
            if lag is None or lag > (1 if tp.topic == self.topology.routed else 0):
                if tp.topic == self.topology.routed:
                    state = self.partitions.get(tp.partition)
                    reached = min(reached, state.max_ts if state else 0)
                else:
                    reached = min(reached, self._source_reached.get(tp, 0))
        return reached

    def _partials_lag(self) -> int:
        """Partials records not yet applied to the scope state (large when unknown)."""
        assert self._consumer is not None
        highwater = self._consumer.highwater(TopicPartition(self.topology.partials, 0))
        return 1 << 30 if highwater is None else highwater - self._partials_position

    @Service.task
    async def _probe_loop(self) -> None:
        """How long the loop is blocked at worst: a short sleep that wakes late measures it."""
        period = 0.05
        while not self.should_stop:
            started = time.perf_counter()
            await asyncio.sleep(period)
            stall = time.perf_counter() - started - period
            if stall > self.stats.loop_stall_max_s:
                self.stats.loop_stall_max_s = stall
                if stall > 1.0:
                    log.warning("event loop blocked for %.1f s", stall)

    # -- evaluation ---------------------------------------------------------------
    async def _evaluate(self) -> None:
        while not self.should_stop:
            await self.sleep(self.settings.eval_interval_seconds)
            if await self._tick() == "fenced":
                return

    async def _tick(self) -> str | None:
        """One evaluation: windows, KPIs, alert decisions and the exposition.

        The lock (which every transaction and rebalance takes) is held only to take a
        copy-on-write snapshot of the scope state and to commit the result; evaluation,
        the alert engine and rendering run in a thread meanwhile, on the snapshot and on
        a clone of the engine, so heartbeats, transactions and scrapes go on (the GIL
        passes to the event loop every switch interval, 5 ms). A tick whose scope state
        moved or was rebuilt meanwhile (rebalance, aborted transaction) is discarded:
        its decisions were taken from a state that is not the committed one.
        Returns "fenced" when the worker must stop.
        """
        async with self._lock:
            scope, engine = self.scope, self.engine
            if scope is None or engine is None or self._closing or self.should_stop:
                return None
            now_ms = int(time.time() * 1000)
            # Until the scope stage has applied its input, progress reports are
            # stale: windows would look partial (false drops), so hold the watermark.
            hold = self._partials_lag() > PARTIALS_HOLD_LAG
            if hold and scope.watermark_ms == 0:
                return None  # nothing shown yet rather than half-filled windows
            started = time.perf_counter()
            scope.advance(now_ms, hold=hold)
            view = scope.snapshot()
            snapped = time.perf_counter()
        tick = await in_thread(compute_tick, view, engine, now_ms, hold)
        computed = time.perf_counter()
        async with self._lock:
            locked = time.perf_counter()
            if (
                self.scope is not scope
                or self.engine is not engine
                or self._closing
                or (self.should_stop)
            ):
                log.info("evaluation discarded: the scope state moved or was rebuilt meanwhile")
                return None
            failed = await self._failed(self._alert(tick))
            if failed:
                return failed
            self.kpi_exposition = tick.exposition
            scope.expire_blocks(EXPIRE_SERIES_PER_TICK)
            done = time.perf_counter()
        log.debug(
            "evaluation tick: snapshot %.1f ms (%d series), then off the loop for %.0f ms "
            "(evaluation %.0f ms, alert engine %.0f ms, render %.0f ms), lock wait %.0f ms, "
            "commit %.0f ms",
            (snapped - started) * 1000, len(view.series), (computed - snapped) * 1000,
            tick.evaluate_s * 1000, tick.alert_s * 1000, tick.render_s * 1000,
            (locked - computed) * 1000, (done - locked) * 1000,
        )  # fmt: skip
        return None

    async def _alert(self, tick: Tick) -> None:
        """Commit a tick's alert decisions: its records, the stepped engine's state and the
        outbox entries in one transaction; then its engine becomes the live one.

        A crash before the commit redoes the evaluation from the previous state (no
        notification was released yet); after it, the outbox holds what to deliver.
        """
        outbox, producer = self.outbox, self._producer
        assert outbox is not None and producer is not None
        records, state = tick.records, tick.state
        if records or state != self._engine_state:
            outbox.add(records)
            self._sent = []
            async with producer.transaction():
                for record in records:
                    key = "|".join(record[k] for k in ("rule", "scope", "channel", "campaign"))
                    await self._send(self.settings.alerts_topic, codec.encode_json(record),
                                     key=key.encode())  # fmt: skip
                await self._send(self.topology.scope_log, state, key=ALERTS_STATE_KEY,
                                 partition=0)  # fmt: skip
                await self._send_outbox_changes()
                await asyncio.gather(*self._sent)
            self._engine_state = state
            outbox.commit()
            self.stats.notified("kafka", "sent", len(records))
            self._outbox_changed()
        self.engine = tick.engine
        level = logging.DEBUG if self.settings.console_alerts else logging.INFO  # printed anyway
        for record in records:
            log.log(level, "alert %s: %s", record["notification"], record["summary"])
        if records:
            for sender in self._senders:
                sender.wake()

    async def _resend_firing(self) -> int:
        """Alertmanager forgets an alert not re-sent within its resolve timeout."""
        sink, engine = self._alertmanager, self.engine
        if sink is None or engine is None:
            return 0
        records = engine.firing_records(time.time())
        await sink.deliver_many(records)
        return len(records)


async def _cancel(tasks: Iterable[asyncio.Future[Any]], *, until: float) -> None:
    """Cancel until done, giving up at ``until`` (``time.monotonic()``).

    Cancelled again and again: a task may take one cancellation on the way out and
    then await something else (a transaction aborting on exit awaits the broker).
    """
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        left = until - time.monotonic()
        if left <= 0:
            return
        _, pending = await asyncio.wait(pending, timeout=min(left, 0.2))


def create_app(settings: Settings, stats: PipelineStats, pipeline: PipelineService) -> faust.App:
    """The faust app: web server with ``/metrics``; no faust agents, tables or Kafka clients.

    The pipeline has its own consumer and transactional producer; faust's own
    (a consumer in a ``<group>-host`` group, a producer, the table recovery and the
    monitor sensor) did nothing here but join a group, create a topic, log, and
    take up to a minute to stop when the broker is unreachable.
    """
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
    app.boot_strategy = BootStrategy(app, enable_kafka=False, enable_sensors=False)
    registry = build_registry(stats)

    @app.page("/metrics")
    async def metrics(web: Any, request: Any) -> Any:
        body = render(registry) + pipeline.kpi_exposition
        return web.bytes(body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    return app


class KpimonWorker(faust.Worker):
    """faust's worker with a bounded stop and kpimon's log policy (stream/logs.py).

    SIGTERM/SIGINT arm a :class:`Watchdog` for ``KPIMON_SHUTDOWN_TIMEOUT_SECONDS`` and
    give the pipeline its deadline; the pipeline stops first (it holds the group
    membership and the open transaction; faust would stop it last, after its web
    server).
    """

    def __init__(self, app: faust.App, pipeline: PipelineService, settings: Settings) -> None:
        # stdout stays stdout (the console alert sink prints there), not a log record.
        super().__init__(app, pipeline, loglevel=settings.log_level.lower(), quiet=True,
                         redirect_stdouts=False)  # fmt: skip
        self.pipeline = pipeline
        self.settings = settings
        self.watchdog = Watchdog(settings.shutdown_timeout_seconds)

    def on_setup_root_logger(self, logger: logging.Logger, level: int) -> None:
        super().on_setup_root_logger(logger, level)
        logs.configure(self.settings.log_level)

    def _on_sigterm(self) -> None:
        self._stop_requested("SIGTERM")
        super()._on_sigterm()

    def _on_sigint(self) -> None:
        self._stop_requested("SIGINT")
        super()._on_sigint()

    def _stop_requested(self, signal_name: str) -> None:
        if self.watchdog.armed:
            return
        self.watchdog.arm(signal_name)
        self.pipeline.stop_deadline = self.watchdog.deadline()
        log.info("%s: stopping within %g s", signal_name, self.watchdog.bound)

    async def on_stop(self) -> None:
        await self.pipeline.stop()

    def stop_and_shutdown(self) -> None:
        super().stop_and_shutdown()  # raises the crash reason after a crash
        if not self.watchdog.armed:
            return
        taken = self.watchdog.bound - (self.watchdog.deadline() - time.monotonic())
        if self.pipeline.stopped_cleanly:
            log.info("stopped in %.1f s", taken)
        else:
            log.warning(
                "stopped in %.1f s; Kafka clients not closed cleanly (broker unreachable?): "
                "the broker aborts what was left open",
                taken,
            )
        # Everything is closed; what is left is the interpreter freeing the state object
        # by object (seconds for millions of dedup keys), outside any bound: skip it.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    async def _sentinel_task(self) -> None:
        """mode sleeps a second here before closing the loop, for nothing we run."""
        await asyncio.sleep(0)


def run_worker(settings: Settings, rules: RulesFile) -> int:
    """Run until SIGTERM/SIGINT; returns the process exit code."""
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    # Each batch allocates ~10 containers per event and the dedup state holds
    # millions of objects: with the default thresholds the cyclic collector ran
    # full passes over all of it every few batches (half the CPU time). Nothing
    # here makes reference cycles worth collecting that often.
    gc.set_threshold(200_000, 50, 1000)
    gc.freeze()
    stats = PipelineStats()
    pipeline = PipelineService(settings, stats, rules)
    app = create_app(settings, stats, pipeline)
    KpimonWorker(app, pipeline, settings).execute_from_commandline()
    return 0
