"""The worker's three stages as pure objects: records in, messages out.

Each stage takes the records of the partitions it owns and returns the messages to
send; its state changes leave as changelog messages, and it rebuilds itself from
changelog records. No Kafka client here: the runtime (``stream.worker``) consumes,
hands each partition's records to its stage through :class:`Stages`, and sends every
message of a :class:`Step` plus the consumed offsets in one transaction
(``stream.checkpoint``).

1. :class:`IngestStage` (source topics): parse, dead-letter, route valid events to the
   routed topic by click id / dedup key;
2. :class:`DedupStage` (one per routed partition): dedup, attribution, lateness,
   per-minute cell deltas to the partials topic, dedup state to its changelog;
3. :class:`SegmentStage` (the one partials partition, so exactly one worker): sums cells
   into global/channel/campaign series, with its state in the compacted scope changelog.

The alert stage (``alerts.stage``) runs beside the segment stage, on the evaluation timer.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from stream import codec
from stream.aggregate import (
    R_ORIGIN,
    BatchOutput,
    DedupState,
    Horizons,
    SegmentStore,
    StateKey,
    TooLate,
)
from stream.events import Event
from stream.gcpolicy import gc_paused
from stream.pipeline import (
    BatchResult,
    DeadLetter,
    PipelineStats,
    Record,
    RecordHandler,
    fit_for_dlq,
    too_late_letter,
)
from stream.settings import Settings

HEARTBEAT_MS = 1000
"""A routed partition with no new events still reports its progress this often."""
CARRY_MARGIN_MS = 5 * 60_000
DLQ_FALLBACK_LIMIT = 1 << 20
"""Kafka's default max.message.bytes, assumed until the DLQ topic's own is known."""

Partition = tuple[str, int]
"""(topic, partition); aiokafka's ``TopicPartition`` is one."""


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


@dataclass(frozen=True, slots=True)
class Message:
    """One record a stage wants sent, in the transaction of the step that made it."""

    topic: str
    value: bytes | None
    key: bytes | None = None
    partition: int | None = None
    headers: list[tuple[str, bytes]] | None = None


class DeadLetters:
    """Where dead letters go, and how big one may be (the topic's own limit, read by the
    runtime at start; a letter that cannot fit is cut to a marker, see ``fit_for_dlq``)."""

    def __init__(self, settings: Settings, limit: int = DLQ_FALLBACK_LIMIT) -> None:
        self.topic = settings.dlq_topic
        self.limit = limit
        self._horizon_minutes = settings.horizon_minutes
        self._currency = settings.reporting_currency

    def messages(self, letters: Iterable[DeadLetter]) -> Iterator[Message]:
        for letter in letters:
            fit = fit_for_dlq(letter, self.limit)
            yield Message(self.topic, fit.value, key=fit.key, headers=fit.headers)

    def too_late(
        self, late: Iterable[TooLate], originals: Mapping[Coordinates, Original] | None = None
    ) -> Iterator[Message]:
        """Letters of too-late events: their original bytes as carried, or as the runtime
        read them from their source (``originals``), else the event as parsed."""
        found = originals or {}
        minutes, currency = self._horizon_minutes, self._currency
        return self.messages(
            too_late_letter(one, minutes, currency, found.get(source_of(one))) for one in late
        )


Coordinates = tuple[str, int, int]
"""(topic, partition, offset) of a source record."""
Original = tuple[bytes | None, bytes]
"""A source record's (key, value)."""


def source_of(late: TooLate) -> Coordinates:
    """Where a too-late event was read from (its routed row's origin)."""
    where = late.event[R_ORIGIN] or ("", -1, -1)
    return (str(where[0]), int(where[1]), int(where[2]))  # type: ignore[index]


@dataclass
class Ingested:
    """What the ingest stage made of one step's source records."""

    result: BatchResult = field(default_factory=BatchResult)
    routed: dict[int, list[list[Any]]] = field(default_factory=dict)
    """Routed rows by routed partition, from every source partition of the step."""


class IngestStage:
    """Stage 1: parse source records, dead-letter the bad ones, route the rest."""

    def __init__(self, settings: Settings, topology: Topology, dead_letters: DeadLetters) -> None:
        self.handler = RecordHandler(settings)
        self.topology = topology
        self.dead_letters = dead_letters
        self.routed_partitions = settings.topic_partitions
        self.newest: dict[Partition, int] = {}
        """Newest event time seen per source partition (the watermark of one that lags)."""
        # Events this much younger than their horizon can't be too late when they reach
        # their routed partition (its horizon clock trails this worker's wall clock by
        # less than a transaction), so only older ones carry their original bytes.
        self._carry_before = {
            kind: minutes * 60_000 - CARRY_MARGIN_MS
            for kind, minutes in settings.horizon_minutes.items()
        }
        self.carry = True
        """Whether old events carry their original bytes (off when the runtime reads the
        originals of too-late events back from their source: see ``Stages.read_back``)."""

    @property
    def topics(self) -> list[str]:
        return self.handler.topics

    def apply(self, tp: Partition, records: Sequence[Record], now_ms: int, into: Ingested) -> None:
        """Parse and route in one pass (``RecordHandler.handle``'s work, fused with routing:
        this is the per-event loop of the stage)."""
        topic, partition = tp
        parse, handler = self.handler.parser.parse, self.handler
        topic_type = handler.topic_types[topic]
        result = into.result
        counts = result.counts
        carry = self._carry_before if self.carry else None
        routed, n, route = into.routed, self.routed_partitions, codec.route
        newest = self.newest.get(tp, 0)
        for record in records:
            event = parse(record.value, topic_type=topic_type, now_ms=now_ms)
            if type(event) is not Event:
                handler.reject(result, record, event)  # type: ignore[arg-type]
                continue
            # Counted, not kept (``BatchResult.events`` stays empty here): the routed row
            # is all that goes on, and 50,000 events alive until the step commits only
            # made each garbage collection within it traverse them.
            kind, ts = event.type, event.ts_ms
            counts[kind] = counts.get(kind, 0) + 1
            if ts > newest:
                newest = ts
            if carry is not None and ts < now_ms - carry[kind]:
                where = codec.origin(topic, partition, record.offset, record.key, record.value)
            else:
                where = codec.origin(topic, partition, record.offset)
            route(routed, event, n, record.timestamp, where)
            if ts > result.newest.get(kind, 0):
                result.newest[kind] = ts
        if newest > self.newest.get(tp, 0):
            self.newest[tp] = newest

    def messages(self, ingested: Ingested, watermark_before: int) -> Iterator[Message]:
        """Routed rows (stamped with the event time this worker had reached before the
        step: the lateness reference of the dedup stage) and dead letters. Once a step:
        the rows are let go as they are encoded."""
        stamp = codec.watermark_header(watermark_before)
        routed, ingested.routed = ingested.routed, {}  # encoded: the rows can go
        for p, rows in routed.items():
            for value in codec.encode_routed(rows):
                yield Message(self.topology.routed, value, partition=p, headers=stamp)
        yield from self.dead_letters.messages(ingested.result.dead_letters)


class DedupStage:
    """Stage 2 for one routed partition: dedup, attribution and lateness, as cell deltas."""

    def __init__(self, partition: int, horizons: Horizons, topology: Topology) -> None:
        self.partition = partition
        self.state = DedupState(horizons)
        self.topology = topology
        self.last_report = 0
        self._output: BatchOutput | None = None

    def restore(self, value: bytes) -> None:
        """Re-apply one dedup changelog entry."""
        self.state.load_changes(codec.decode_json(value))

    def apply(self, records: Iterable[Record], now_ms: int) -> None:
        out = self._output = self._output or BatchOutput()
        for record in records:
            assert record.value is not None  # our own producer writes every routed message
            self.state.apply(codec.decode_rows(record.value), now_ms, out,
                             reached_ms=codec.watermark_of(record.headers))  # fmt: skip

    def due(self, now_ms: int) -> bool:
        """Something to report: new cells, or a heartbeat of progress."""
        return self._output is not None or now_ms - self.last_report >= HEARTBEAT_MS

    def flush(self, watermark: int, now_ms: int) -> tuple[list[Message], BatchOutput | None]:
        """The step's partials (cells and progress) and dedup changelog entries."""
        out, self._output = self._output, None
        cells = codec.cells_list(out.cells, out.counted) if out else []
        source_ts = [[ts, n] for ts, n in out.source_hist.items()] if out else []
        messages = []
        for i, chunk in enumerate(codec.chunks(cells) if cells else [[]]):
            partial = codec.Partial(
                partition=self.partition,
                watermark_ms=watermark,
                caught_up=watermark >= now_ms,
                cells=chunk,
                source_ts=source_ts if i == 0 else [],
            )
            messages.append(Message(self.topology.partials, partial.encode(), partition=0))
        if out is not None:
            key = codec.dedup_log_key(self.partition)
            for change in codec.split_changes(self.state.drain_changes()):
                messages.append(Message(self.topology.dedup_log, codec.encode_json(change),
                                        key=key, partition=self.partition))  # fmt: skip
        self.last_report = now_ms
        return messages, out


class SegmentStage:
    """Stage 3: the scope store fed by every partition's partials, and its changelog."""

    def __init__(self, store: SegmentStore, topology: Topology) -> None:
        self.store = store
        self.topology = topology
        self.position = 0
        """The next partials offset to apply (what a snapshot covers)."""

    def restore(self, kind: codec.ScopeLogKind, key: tuple[Any, ...], value: Any) -> None:
        """One scope changelog entry of the store's own kinds (``meta``, ``state``)."""
        if kind == "meta":
            self.position = int(value["offset"]) if value else 0
        elif kind == "state":
            state_key: StateKey = (key[0], key[1], key[2], key[3], int(key[4]))
            self.store.load(state_key, value)

    def apply(self, records: Sequence[Record], now_ms: int) -> None:
        store = self.store
        for record in records:
            assert record.value is not None
            partial = codec.Partial.decode(record.value)
            store.apply_cells((c[0], c[1], c[2], c[3:]) for c in partial.cells)
            store.report(partial.partition, partial.watermark_ms, caught_up=partial.caught_up,
                         now_ms=now_ms)  # fmt: skip
            for ts, n in partial.source_ts:
                store.observe_latency((ts,), now_ms, n)
        if records:
            self.position = records[-1].offset + 1

    def lag(self, highwater: int | None) -> int:
        """Partials records not yet applied (large when unknown)."""
        return 1 << 30 if highwater is None else highwater - self.position

    def changes(self) -> Iterator[Message]:
        """The store's changed entries since the last call, then the offset they cover."""
        topic = self.topology.scope_log
        for key, value in self.store.drain_dirty():
            encoded = None if value is None else codec.encode_json(value)
            yield Message(topic, encoded, key=codec.scope_log_key("state", key), partition=0)
        meta = codec.encode_json({"offset": self.position})
        yield Message(topic, meta, key=codec.scope_log_key("meta"), partition=0)


@dataclass
class Step:
    """One transaction's worth of work: the messages to send and the offsets to commit,
    plus what to count once it is committed (a retried step is never counted twice)."""

    messages: list[Message]
    offsets: dict[Any, int]
    """Consumed partition -> next offset (keys as the runtime gave them)."""
    watermark: int
    ingested: Ingested
    outputs: list[BatchOutput]
    late: list[TooLate] = field(default_factory=list)
    """Too-late events whose letters wait for their original bytes (``Stages.read_back``):
    the runtime reads them from the source and adds the letters with
    :meth:`Stages.late_letters` before it commits."""

    @property
    def records(self) -> int:
        result = self.ingested.result
        return sum(result.counts.values()) + len(result.dead_letters)


class Stages:
    """The stages one worker runs, for the partitions its group gave it."""

    def __init__(self, settings: Settings, topology: Topology) -> None:
        self.settings = settings
        self.topology = topology
        self.horizons = Horizons(
            dedup_minutes=settings.horizon_minutes, settle_ms=int(settings.settle_seconds * 1000)
        )
        self.dead_letters = DeadLetters(settings)
        self.ingest = IngestStage(settings, topology, self.dead_letters)
        self.dedup: dict[int, DedupStage] = {}
        """Routed partition -> its dedup stage."""
        self.segments: SegmentStage | None = None
        """The segment stage, on the worker that owns the partials partition."""
        self.watermark_before = 0
        """The watermark this worker had reached as of its last committed step."""

    def new_dedup(self, partition: int) -> DedupStage:
        return DedupStage(partition, self.horizons, self.topology)

    def new_segments(self) -> SegmentStage:
        s = self.settings
        store = SegmentStore(
            settle_ms=int(s.settle_seconds * 1000),
            max_campaigns=s.max_campaigns,
            max_channels=s.max_channels,
            replay_lag_ms=int(s.replay_lag_seconds * 1000),
        )
        return SegmentStage(store, self.topology)

    def revoke(self, tp: Partition) -> None:
        topic, partition = tp
        self.ingest.newest.pop(tp, None)
        if topic == self.topology.routed:
            self.dedup.pop(partition, None)
        elif topic == self.topology.partials:
            self.segments = None

    def clear(self) -> None:
        """Forget every partition's state (to be restored from the changelogs)."""
        self.dedup.clear()
        self.segments = None

    def watermark(self, lags: Mapping[Partition, int | None], now_ms: int) -> int:
        """Event time up to which this worker has passed on everything: ``now_ms`` when
        every assigned source and routed partition is consumed to its end (``lags``:
        records behind, None when unknown), else the least event time reached among those
        that are not.

        Per partition, because topics are consumed at different speeds: counting a
        lagging clicks partition as caught up would show its missing clicks as a CTR drop.
        """
        reached, routed = now_ms, self.topology.routed
        for tp, lag in lags.items():
            topic, partition = tp
            if topic == self.topology.partials:
                continue
            # A routed partition ends with a transaction marker the position may not pass.
            if lag is None or lag > (1 if topic == routed else 0):
                if topic == routed:
                    stage = self.dedup.get(partition)
                    reached = min(reached, stage.state.max_ts if stage else 0)
                else:
                    reached = min(reached, self.ingest.newest.get(tp, 0))
        return reached

    def step(
        self,
        batches: Mapping[Any, Sequence[Record]],
        now_ms: int,
        lags: Mapping[Partition, int | None],
        *,
        snapshot: bool = False,
        extra: Iterable[Message] = (),
    ) -> Step | None:
        """Hand each partition's records to its stage; the step to commit, or None when
        there is nothing to send (no records, no heartbeat due, no snapshot, no extra).

        ``lags``: records behind per assigned partition, for :meth:`watermark`;
        ``snapshot`` asks for the segment store's changes; ``extra`` is sent too (the alert
        stage's outbox changes).
        """
        with gc_paused():
            return self._step(batches, now_ms, lags, snapshot, extra)

    def _step(
        self,
        batches: Mapping[Any, Sequence[Record]],
        now_ms: int,
        lags: Mapping[Partition, int | None],
        snapshot: bool,
        extra: Iterable[Message],
    ) -> Step | None:
        topo = self.topology
        # The stages in their order. Within one step they are independent: what a stage
        # sends is read by the next one in a later step, after this one has committed.
        ingested = Ingested()
        for tp, records in batches.items():
            if tp[0] not in (topo.routed, topo.partials):
                self.ingest.apply(tp, records, now_ms, ingested)
        for tp, records in batches.items():
            if tp[0] == topo.routed:
                self.dedup[tp[1]].apply(records, now_ms)
        for tp, records in batches.items():
            if tp[0] == topo.partials:
                assert self.segments is not None
                self.segments.apply(records, now_ms)
        due = [stage for stage in self.dedup.values() if stage.due(now_ms)]
        extra = list(extra)
        snapshot = snapshot and self.segments is not None
        if not batches and not due and not snapshot and not extra:
            return None
        watermark = self.watermark(lags, now_ms)
        messages = list(self.ingest.messages(ingested, self.watermark_before))
        outputs = []
        partials = []
        late: list[TooLate] = []
        for stage in due:
            sent, out = stage.flush(watermark, now_ms)
            partials += sent
            if out is not None:
                outputs.append(out)
                if self.read_back:
                    late += out.too_late
                else:
                    messages += self.dead_letters.too_late(out.too_late)
        messages += partials
        if snapshot and self.segments is not None:
            messages += self.segments.changes()
        messages += extra
        offsets = {tp: records[-1].offset + 1 for tp, records in batches.items() if records}
        return Step(messages, offsets, watermark, ingested, outputs, late)

    @property
    def read_back(self) -> bool:
        """Whether the runtime reads the originals of too-late events back from their
        source, so that no routed row carries them.

        Carrying is the fallback: any event within 5 minutes of its horizon by the wall
        clock carries its bytes through the routed hop, and in a backlog (events hours
        old) that is every impression and click: it doubled the routed bytes, and cost
        the worker a quarter of its CPU and the broker a third of its own. Too-late events
        are rare; reading each back from its source partition costs a fetch instead.
        """
        return not self.ingest.carry

    @read_back.setter
    def read_back(self, on: bool) -> None:
        self.ingest.carry = not on

    def late_letters(self, step: Step, originals: Mapping[Coordinates, Original]) -> list[Message]:
        """The letters of ``step.late``, with the originals the runtime read back (an event
        whose source record is gone is dead-lettered as parsed, flagged ``reconstructed``)."""
        return list(self.dead_letters.too_late(step.late, originals))

    def committed(self, step: Step, stats: PipelineStats) -> None:
        """The step's transaction committed: count it."""
        self.watermark_before = step.watermark
        stats.transactions += 1
        stats.apply(step.ingested.result)
        dups: Counter[str] = Counter()
        late: Counter[str] = Counter()
        out_of_order: Counter[str] = Counter()
        for out in step.outputs:
            dups.update(out.duplicates)
            late.update(out.late)
            out_of_order.update(out.out_of_order)
            stats.apply_attribution(out.reattributed, out.attribution_overflow)
        stats.apply_stateful(dups, late, out_of_order)
