"""The stream worker: the runtime that runs kpimon's stages in a faust-streaming app.

Faust provides the worker's lifecycle, signal handling and logging; ``/metrics`` is
served from a thread of its own (``stream.metrics.MetricsServer``), so a scrape does not
wait for the batch on the event loop. The pipeline is a faust/mode ``Service`` with one
aiokafka consumer (one consumer group) and one transactional producer. The work itself
is done by pure stage objects (``stream.stages``: ingest, dedup, segments;
``alerts.stage``: alerts), each on the partitions the group gave it; this module only
moves records and messages between them and Kafka:

- consume a batch, hand each partition's records to its stage, and commit every message
  they return plus the consumed offsets in one transaction (``stream.checkpoint``), so a
  crash at any point keeps all of a step or none of it: nothing is lost or counted twice;
- on a rebalance, restore each new partition's stage from its changelog;
- on a failed transaction, rebuild every stage from the committed changelogs and offsets;
- on the evaluation timer, run the alert stage on a snapshot of the segment stage, off the
  event loop, and commit its decisions the same way.

Per-event faust agents cap near 50k events/s and faust's exactly-once mode has open bugs
(see ANCHORS.md), hence one consumer and one producer of our own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from typing import Any, TypeVar

import faust
from aiokafka import (
    AIOKafkaConsumer,
    AIOKafkaProducer,
    ConsumerRebalanceListener,
    ConsumerRecord,
    TopicPartition,
)
from aiokafka.errors import (
    ConsumerStoppedError,
    KafkaError,
    ProducerFenced,
)
from faust.app.base import BootStrategy
from mode import Service

from alerts.delivery import Delivery
from alerts.outbox import Outbox
from alerts.rules import RulesFile
from alerts.stage import AlertStage, Tick, compute_tick
from alerts.targets_export import TargetsExporter
from stream import checkpoint, clients, codec, gcpolicy, logs
from stream.gcpolicy import collect_due, gc_paused
from stream.metrics import MetricsServer, build_registry, render
from stream.pipeline import PipelineStats
from stream.settings import Settings
from stream.shutdown import Watchdog
from stream.stages import Stages, Topology, source_of
from stream.stalls import Stalls, locate, positions, rewind
from stream.windows import next_evaluation_in

log = logging.getLogger("kpimon.worker")
COMMIT_INTERVAL_S = 0.1
PARTIALS_HOLD_LAG = 50
"""Unapplied partials records beyond which the segment stage holds its watermark."""
STOP_GRACE_S = 2.0
"""On stop, how long the transaction in flight may take to commit before it is abandoned."""
STOP_RESERVE_S = 1.5
"""Of the stop budget, what is left for faust's own teardown after the pipeline's."""
STOP_CLOSE_S = 2.0
"""Longest wait for one Kafka client to close: with the broker up it takes milliseconds,
with the broker down it never ends (the producer's pending abort has nowhere to go)."""
DLQ_FALLBACK_LIMIT = 1 << 20
"""Kafka's default max.message.bytes, assumed when the DLQ topic's own cannot be read."""
DLQ_RECORD_OVERHEAD = 1024
"""Room for the record batch and record framing around a dead letter's key, value, headers."""
EXPIRE_SERIES_PER_TICK = 1000
"""Series whose old blocks one evaluation tick folds in the live scope state (~20 ms)."""
GIL_SWITCH_INTERVAL_S = 0.001
T = TypeVar("T")


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


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, service: PipelineService) -> None:
        self.service = service

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self.service.revoke(list(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self.service.assign(list(assigned))


class PipelineService(Service):
    """The runtime: Kafka clients, rebalances and recovery around the pure stages.

    Each loop iteration consumes a batch, hands each partition's records to its stage
    (``Stages.step``) and commits every message plus the consumed offsets in one
    transaction (``checkpoint.commit``). The evaluation timer runs the alert stage on a
    snapshot of the segment stage and commits its decisions the same way.
    """

    mundane_level = "debug"  # mode's "Starting..."/"Stopping..." lines

    def __init__(
        self,
        settings: Settings,
        stats: PipelineStats,
        rules: RulesFile,
        targets: TargetsExporter | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.rules = rules
        self.targets = targets
        self.stats = stats
        self.stalls = Stalls(stats)
        self.topology = Topology.of(settings)
        self.stages = Stages(settings, self.topology)
        self.stages.read_back = True  # too-late originals come from their source
        self._reader = clients.SourceReader(settings)
        self.alerting: AlertStage | None = None
        """The alert stage, beside the segment stage (None while this worker has none)."""
        self.delivery = Delivery(settings, self._outbox, self._count, self._firing)
        self.kpi_exposition = b""
        self._next_snapshot = 0.0
        self._lock = asyncio.Lock()
        self._closing = False
        self._recovering = False
        self._loops: list[asyncio.Future[Any]] = []
        self.stop_deadline: float | None = None
        """``time.monotonic()`` by which a stop must be done (set on SIGTERM)."""
        self.stopped_cleanly = True
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        registry = build_registry(stats)
        self.metrics: MetricsServer | None = None
        self._metrics_body = lambda: render(registry) + self.kpi_exposition

    def start_metrics(self) -> None:
        """Serve /metrics (its own thread: see ``MetricsServer``); fails fast when the port
        is taken."""
        s = self.settings
        try:
            self.metrics = MetricsServer(s.metrics_host, s.metrics_port, self._metrics_body)
        except OSError as exc:
            where = f"{s.metrics_host}:{s.metrics_port}"
            log.critical("cannot serve /metrics on %s (KPIMON_METRICS_HOST, "
                         "KPIMON_METRICS_PORT): %s", where, exc)  # fmt: skip
            raise
        self.metrics.start()

    # -- lifecycle ----------------------------------------------------------------
    def _new_producer(self) -> AIOKafkaProducer:
        return clients.new_producer(self.settings)

    async def _reset_producer(self) -> None:
        """A failed transaction can leave the producer unusable: start a fresh one
        (same transactional id, so the broker aborts whatever the old one left open)."""
        if self._producer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._producer.stop(), timeout=10)
        self._producer = self._new_producer()
        await self._producer.start()

    async def on_start(self) -> None:
        s, topo, ingest = self.settings, self.topology, self.stages.ingest
        # An evaluation tick computes in a thread: the event loop waits up to one
        # switch interval for the GIL at each wake-up (5 ms by default; a scrape wakes
        # it a dozen times). The computing thread barely notices the shorter slices.
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        topic_limit = await clients.ensure_topics(s, topo, ingest.topics)
        self._producer = self._new_producer()
        limit = min(topic_limit, clients.request_size(s))
        self.stages.dead_letters.limit = limit - DLQ_RECORD_OVERHEAD
        self._consumer = clients.new_consumer(s)
        await self._producer.start()
        self.delivery.start()
        for channel in ("kafka", *self._channels):
            self.stats.notified(channel, "sent", 0)
        ingest.routed_partitions = len(await self._producer.partitions_for(topo.routed))
        await self._consumer.start()
        self._consumer.subscribe(
            topics=[*ingest.topics, topo.routed, topo.partials], listener=_Rebalance(self)
        )
        if self.metrics is None:
            self.start_metrics()
        log.info(
            "worker %s in group %s: ingesting %s; dead letters to %s; metrics on %s:%d; "
            "%d alert rules from %s; notifications to %s",
            s.worker_id, s.group_id, ", ".join(ingest.topics), s.dlq_topic,
            s.metrics_host, s.metrics_port, len(self.rules.rules), s.rules,
            ", ".join([s.alerts_topic, *self._channels]),
        )  # fmt: skip

    @property
    def _channels(self) -> tuple[str, ...]:
        return self.delivery.channels

    def _outbox(self) -> Outbox | None:
        return self.alerting.outbox if self.alerting is not None else None

    def _count(self, channel: str, outcome: str) -> None:
        self.stats.notified(channel, outcome)
        self._outbox_changed()

    def _outbox_changed(self) -> None:
        outbox = self._outbox()
        self.stats.outbox_pending = outbox.counts() if outbox is not None else {}

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
        for task in self.delivery.tasks:
            task.cancel()
        await _cancel(self.delivery.tasks, until=deadline)
        clean = True
        steps: list[tuple[str, Any]] = [
            ("consumer", self._consumer.stop if self._consumer else None),
            ("producer", self._producer.stop if self._producer else None),
            ("source reader", self._reader.stop),
            ("http session", self.delivery.session.close if self.delivery.session else None),
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
        if self.metrics is not None:
            self.metrics.stop()
        self.stopped_cleanly = clean

    # -- rebalance: state follows partitions ----------------------------------------
    # -- rebalance: state follows partitions ----------------------------------------
    async def revoke(self, revoked: list[TopicPartition]) -> None:
        if self._closing:
            return  # on_stop holds the lock; the state goes with the process
        async with self._lock:  # waits for the transaction in flight
            for tp in revoked:
                self.stats.consumer_lag.pop((tp.topic, tp.partition), None)
                self.stages.revoke(tp)
                if tp.topic == self.topology.partials:
                    self.alerting = None
                    self.kpi_exposition = b""
                    self._outbox_changed()
            if revoked:
                log.info("partitions revoked: %s", clients.describe(revoked))

    async def assign(self, assigned: list[TopicPartition]) -> None:
        if self._closing:
            return
        async with self._lock:
            log.info("partitions assigned: %s", clients.describe(assigned))
            await self._restore(assigned)

    async def _restore(self, assigned: list[TopicPartition]) -> None:
        """Rebuild the state of newly assigned partitions; given up when the worker stops
        (nothing is processed after that, and the next owner restores it anew)."""
        started = time.monotonic()
        stages = self.stages
        for tp in assigned:
            if self.should_stop:
                log.info("stopping: state restore abandoned")
                return
            if tp.topic == self.topology.routed and tp.partition not in stages.dedup:
                stage = stages.new_dedup(tp.partition)
                n = 0
                async for record in self._read_log(self.topology.dedup_log, tp.partition):
                    stage.restore(record.value)
                    n += 1
                if self.should_stop:
                    continue  # half restored: never installed
                stages.dedup[tp.partition] = stage
                log.info("restored routed partition %d from %d changelog entries", tp.partition, n)
            elif tp.topic == self.topology.partials and stages.segments is None:
                await self._restore_segments(tp)
        if assigned:
            log.info("state ready in %.2f s", time.monotonic() - started)

    async def _restore_segments(self, tp: TopicPartition) -> None:
        """The scope and alert stages share one changelog: each takes its kinds of entry."""
        scope = self.stages.new_segments()
        alerting = AlertStage(self.rules, self.settings, self.topology, self._channels,
                              self.targets)  # fmt: skip
        n = 0
        async for record in self._read_log(self.topology.scope_log, 0):
            kind, key = codec.scope_log_entry(record.key)
            value = None if record.value is None else codec.scope_log_value(kind, record.value)
            if kind in ("meta", "state"):
                scope.restore(kind, key, value)
            else:
                alerting.restore(kind, key, value)
            n += 1
        if self.should_stop:
            return  # half restored: never installed
        alerting.restored()
        self.stages.segments, self.alerting = scope, alerting
        self._outbox_changed()
        self.delivery.wake()
        assert self._consumer is not None
        self._consumer.seek(tp, scope.position)
        log.info("restored scope state from %d changelog entries; replaying partials from %d",
                 n, scope.position)  # fmt: skip

    def _read_log(self, topic: str, partition: int) -> AsyncIterator[ConsumerRecord[Any, Any]]:
        return clients.read_log(self.settings, topic, partition, lambda: self.should_stop)

    # -- the loop -----------------------------------------------------------------
    async def on_started(self) -> None:
        self._loops = [self.add_future(self._consume()), self.add_future(self._evaluate())]

    async def _consume(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        with contextlib.suppress(ConsumerStoppedError):  # stopping: on_stop closed it
            while not self.should_stop:
                # The batch's records are young until it commits; collect once it is gone.
                with gc_paused(collect=True):
                    if await self._batch(consumer) == "stop":
                        return

    async def _batch(self, consumer: AIOKafkaConsumer) -> str | None:
        """Gather one batch and commit it; "stop" when the loop should end."""
        batches = await self._gather(consumer, self.settings.max_batch_records)
        async with self._lock:
            if self.should_stop:
                return "stop"  # no new transaction once stopping (nothing of it is committed)
            batches = await clients.still_current(consumer, batches)
            if await self._failed(self._transact(batches)) == "fenced":
                return "stop"
        return None

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
        if self.stages.segments is None:
            return {}
        return {TopicPartition(self.topology.partials, 0): self.stages.segments.position}

    async def _recover(self) -> None:
        """Fresh producer, committed offsets and state; retried until the broker answers
        (nothing is processed meanwhile, so nothing can be counted on a half-built state)."""
        delay = 1.0
        self._recovering = True
        try:
            while not self.should_stop:
                collect_due()  # the loop's pause lasts as long as this does (a broker outage)
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
        self.stages.clear()
        self.alerting = None
        for tp in assigned:
            if tp.topic != self.topology.partials:
                committed = await self._consumer.committed(tp)
                if committed is None:
                    await self._consumer.seek_to_beginning(tp)
                else:
                    self._consumer.seek(tp, committed)
        await self._restore(assigned)

    async def _transact(self, batches: dict[TopicPartition, list[Any]]) -> None:
        """One step of the stages, committed with its offsets in one transaction."""
        producer = self._producer
        assert producer is not None
        started = time.perf_counter()
        now_ms = int(time.time() * 1000)
        lags = await self._lags()
        snapshot = time.monotonic() >= self._next_snapshot
        alerting = self.alerting
        extra = alerting.outbox_changes() if alerting and alerting.outbox.changed else []
        step = self.stages.step(batches, now_ms, lags, snapshot=snapshot, extra=extra)
        if step is None:
            return
        if step.late:
            originals = await self._reader.read(map(source_of, step.late))
            step.messages += self.stages.late_letters(step, originals)
        processed = time.perf_counter()
        await checkpoint.commit(producer, step.messages, step.offsets, self.settings.group_id)
        if snapshot and self.stages.segments is not None:
            self._next_snapshot = time.monotonic() + self.settings.snapshot_interval_seconds
        self.stages.committed(step, self.stats)
        log.debug(
            "transaction: %d records in %.0f ms, committed in %.0f ms",
            sum(map(len, batches.values())), (processed - started) * 1000,
            (time.perf_counter() - processed) * 1000,
        )  # fmt: skip

    async def _lags(self) -> dict[TopicPartition, int | None]:
        """Records behind per assigned partition, but for stalled ones: a partition that
        cannot be read holds no one's watermark (the others go on; what it holds is
        counted, as late as it is, once it can be read: stream/stalls.py)."""
        lags = await clients.lags(self._consumer) if self._consumer else {}
        for tp, lag in lags.items():
            if lag is not None:  # kpimon_consumer_lag_records
                self.stats.consumer_lag[(tp.topic, tp.partition)] = lag
        return {tp: lag for tp, lag in lags.items() if tp not in self.stalls}

    def _partials_lag(self) -> int:
        """Partials records not yet applied to the scope state (large when unknown)."""
        assert self._consumer is not None and self.stages.segments is not None
        tp = TopicPartition(self.topology.partials, 0)
        return self.stages.segments.lag(self._consumer.highwater(tp))

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
    # -- evaluation ---------------------------------------------------------------
    async def _evaluate(self) -> None:
        while not self.should_stop:
            settings = self.settings
            await self.sleep(next_evaluation_in(time.time(), settings.eval_interval_seconds,
                                                settings.settle_seconds))  # fmt: skip
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
            scope, alerting = self.stages.segments, self.alerting
            if scope is None or alerting is None or self._closing or self.should_stop:
                return None
            engine = alerting.engine
            now_ms = int(time.time() * 1000)
            # Until the segment stage has applied its input, progress reports are
            # stale: windows would look partial (false drops), so hold the watermark.
            hold = self._partials_lag() > PARTIALS_HOLD_LAG
            if (hold or not scope.store.reporters) and scope.store.watermark_ms == 0:
                # Nothing shown yet rather than half-filled windows: until the first
                # progress report, the wall clock would pass for a watermark.
                return None
            started = time.perf_counter()
            scope.store.advance(now_ms, hold=hold)
            view = scope.store.snapshot()
            snapped = time.perf_counter()
        tick = await in_thread(compute_tick, view, engine, now_ms, hold, alerting.targets,
                               alerting.state)  # fmt: skip
        computed = time.perf_counter()
        async with self._lock:
            locked = time.perf_counter()
            if (
                self.stages.segments is not scope
                or self.alerting is not alerting
                or alerting.engine is not engine
                or self._closing
                or self.should_stop
            ):
                log.info("evaluation discarded: the scope state moved or was rebuilt meanwhile")
                return None
            failed = await self._failed(self._alert(alerting, tick))
            if failed:
                return failed
            self.kpi_exposition = tick.exposition
            scope.store.expire_blocks(EXPIRE_SERIES_PER_TICK)
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

    async def _alert(self, alerting: AlertStage, tick: Tick) -> None:
        """Commit a tick's alert decisions, the stepped engine's state and the outbox
        entries in one transaction; then its engine becomes the live one.

        A crash before the commit redoes the evaluation from the previous state (no
        notification was released yet); after it, the outbox holds what to deliver.
        """
        assert self._producer is not None
        messages = alerting.messages(tick)
        if messages:
            await checkpoint.commit(self._producer, messages)
            self.stats.notified("kafka", "sent", len(tick.records))
        alerting.committed(tick)
        self._outbox_changed()
        level = logging.DEBUG if self.settings.console_alerts else logging.INFO  # printed anyway
        for record in tick.records:
            log.log(level, "alert %s: %s", record["notification"], record["summary"])
        if tick.records:
            self.delivery.wake()

    def _firing(self, now_s: float) -> list[dict[str, Any]]:
        return self.alerting.firing_records(now_s) if self.alerting is not None else []


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


def create_app(settings: Settings) -> faust.App:
    """The faust app: lifecycle, signals and logging only; no agents, tables, Kafka
    clients or web server.

    The pipeline has its own consumer and transactional producer; faust's own
    (a consumer in a ``<group>-host`` group, a producer, the table recovery and the
    monitor sensor) did nothing here but join a group, create a topic, log, and
    take up to a minute to stop when the broker is unreachable. ``/metrics`` is served
    by the pipeline's own thread (``MetricsServer``): faust's aiohttp server runs on the
    event loop, so a scrape waited for the batch in progress.
    """
    app = faust.App(
        f"{settings.group_id}-host",
        broker=f"kafka://{settings.kafka_bootstrap}",
        store="memory://",
        web_enabled=False,
        datadir=str(settings.state_dir / "faust"),
        topic_replication_factor=settings.topic_replication_factor,
        autodiscover=False,
    )
    app.boot_strategy = BootStrategy(app, enable_kafka=False, enable_sensors=False)
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


def run_worker(settings: Settings, rules: RulesFile, targets: TargetsExporter | None = None) -> int:
    """Run until SIGTERM/SIGINT; returns the process exit code."""
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    # Each batch allocates ~10 containers per event and the dedup state holds
    # millions of objects: with the default thresholds the cyclic collector ran
    # full passes over all of it every few batches (half the CPU time). Nothing
    # here makes reference cycles worth collecting that often.
    gcpolicy.tune()
    stats = PipelineStats()
    pipeline = PipelineService(settings, stats, rules, targets)
    app = create_app(settings)
    KpimonWorker(app, pipeline, settings).execute_from_commandline()
    return 0
