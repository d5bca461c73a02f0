"""The per-batch work of the worker, free of Kafka so it can be tested alone.

A batch of raw records becomes counted events and dead letters. Counts are
staged per batch in a :class:`BatchResult` and folded into the live
:class:`PipelineStats` only after the batch's Kafka transaction committed, so a
retried batch is never counted twice.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson

from stream import codec
from stream.aggregate import (
    ATTRIBUTED,
    R_CAMPAIGN,
    R_CHANNEL,
    R_CLICK,
    R_KEY,
    R_NEW,
    R_ORIGIN,
    R_REVENUE,
    R_SOURCE_TS,
    R_SPEND,
    R_TS,
    R_TYPE,
    TooLate,
)
from stream.events import EVENT_TYPES, Event, EventParser, Rejection, RejectReason
from stream.settings import Settings

DLQ_HEADER_REASON = "kpimon.reason"
DLQ_HEADER_ERROR = "kpimon.error"
DLQ_HEADER_TOPIC = "kpimon.source.topic"
DLQ_HEADER_PARTITION = "kpimon.source.partition"
DLQ_HEADER_OFFSET = "kpimon.source.offset"
DLQ_HEADER_TIMESTAMP = "kpimon.source.timestamp"
DLQ_HEADER_ORIGINAL = "kpimon.original"
"""Absent when the value is the original bytes; else ``reconstructed`` (a too-late event
whose bytes the routed hop did not carry) or ``truncated`` (a marker: see fit_for_dlq)."""
DLQ_HEADER_SIZE = "kpimon.original.size"
TOO_LATE = "too_late"
"""Dead-letter reason of an event older than its type's dedup horizon."""
MARKER_EDGE_BYTES = 1024


class Record(Protocol):
    """What the pipeline reads of a consumed Kafka record (aiokafka's ConsumerRecord)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def timestamp(self) -> int: ...
    @property
    def headers(self) -> Sequence[tuple[str, bytes]] | None: ...


@dataclass(frozen=True, slots=True)
class SourceRecord:
    """A :class:`Record` built by hand (tests, backtests)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int
    headers: Sequence[tuple[str, bytes]] | None = None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """The original bytes plus why and where from, for the dead-letter topic."""

    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]


def dead_letter(record: Record, rejection: Rejection) -> DeadLetter:
    headers = [
        (DLQ_HEADER_REASON, rejection.reason.value.encode()),
        (DLQ_HEADER_ERROR, rejection.detail.encode("utf-8", "replace")),
        (DLQ_HEADER_TOPIC, record.topic.encode()),
        (DLQ_HEADER_PARTITION, str(record.partition).encode()),
        (DLQ_HEADER_OFFSET, str(record.offset).encode()),
        (DLQ_HEADER_TIMESTAMP, str(record.timestamp).encode()),
    ]
    return DeadLetter(key=record.key, value=record.value, headers=headers)


def too_late_letter(
    late: TooLate,
    horizon_minutes: Mapping[str, int],
    currency: str,
    original: tuple[bytes | None, bytes] | None = None,
) -> DeadLetter:
    """The dead letter of an event beyond its dedup horizon: its original bytes and source
    coordinates when the routed row carries them (or the runtime read them back from the
    source: ``original``, its key and value), else the event as parsed."""
    ev = late.event
    kind = str(ev[R_TYPE])
    where: list[Any] = list(ev[R_ORIGIN] or ["", -1, -1])  # type: ignore[call-overload]
    if original is None:
        original = codec.original_of(where)
    headers = [
        (DLQ_HEADER_REASON, TOO_LATE.encode()),
        (DLQ_HEADER_ERROR, (
            f"{kind} at {_iso(int(ev[R_TS]))} is older than its {horizon_minutes[kind]} min "  # type: ignore[call-overload]
            f"dedup horizon (horizon clock {_iso(late.clock_ms)}): it could not be told "
            "from a copy already counted"
        ).encode()),
        (DLQ_HEADER_TOPIC, str(where[0]).encode()),
        (DLQ_HEADER_PARTITION, str(where[1]).encode()),
        (DLQ_HEADER_OFFSET, str(where[2]).encode()),
        (DLQ_HEADER_TIMESTAMP, str(ev[R_SOURCE_TS]).encode()),
    ]  # fmt: skip
    if original is not None:
        key, value = original
        return DeadLetter(key=key, value=value, headers=headers)
    headers.append((DLQ_HEADER_ORIGINAL, b"reconstructed"))
    return DeadLetter(key=None, value=_reconstruct(ev, currency), headers=headers)


_MONEY_FIELD = {"impression": "cost", "click": "cost", "spend": "amount"}


def _reconstruct(ev: Any, currency: str) -> bytes:
    kind = ev[R_TYPE]
    event: dict[str, Any] = {
        "type": kind,
        "order_id" if kind == "order" else "event_id": ev[R_KEY],
        "ts": ev[R_TS],
        "campaign_id": ev[R_CAMPAIGN],
        "channel": ev[R_CHANNEL],
        "click_id": ev[R_CLICK],
        "currency": currency,
    }
    if kind == "order":
        event.update(revenue=ev[R_REVENUE] / 1e6, new_customer=ev[R_NEW])
    elif kind in _MONEY_FIELD:
        event[_MONEY_FIELD[kind]] = ev[R_SPEND] / 1e6
    return orjson.dumps({k: v for k, v in event.items() if v is not None})


def _iso(ts_ms: int) -> str:
    return datetime.fromtimestamp(ts_ms / 1000, UTC).isoformat(timespec="milliseconds")


def fit_for_dlq(letter: DeadLetter, limit: int) -> DeadLetter:
    """``letter``, or when it cannot fit a dead-letter record of ``limit`` bytes, a marker:
    its headers, the original's size, and its first and last KiB, so an operator can find
    the original at its source offset. One oversized message must not stall the worker."""
    size = len(letter.value or b"") + len(letter.key or b"")
    size += sum(len(name) + len(value) for name, value in letter.headers)
    if size <= limit:
        return letter
    value = letter.value or b""
    key = letter.key if letter.key is None or len(letter.key) <= MARKER_EDGE_BYTES else None
    marker = {
        "kpimon_marker": "too large for the dead-letter topic",
        "size": len(value),
        "key_size": None if letter.key is None else len(letter.key),
        "head": _text(value[:MARKER_EDGE_BYTES]),
        "tail": _text(value[-MARKER_EDGE_BYTES:]) if len(value) > MARKER_EDGE_BYTES else "",
    }
    headers = [
        *letter.headers,
        (DLQ_HEADER_ORIGINAL, b"truncated"),
        (DLQ_HEADER_SIZE, str(len(value)).encode()),
    ]
    return DeadLetter(key=key, value=orjson.dumps(marker), headers=headers)


def _text(raw: bytes) -> str:
    """Readable and lossless for text; other bytes as backslash escapes."""
    return raw.decode("utf-8", "backslashreplace")


@dataclass(slots=True)
class BatchResult:
    """What one batch produced; applied to the stats once the batch is committed."""

    events: list[Event] = field(default_factory=list)
    event_sources: list[Record] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    rejected: dict[str, int] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    """Events by type (kept as they are added, so the stats need no pass over them)."""
    newest: dict[str, int] = field(default_factory=dict)
    """Newest event time by type."""

    def add(self, event: Event, source: Record) -> None:
        self.events.append(event)
        self.event_sources.append(source)
        kind = event.type
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if event.ts_ms > self.newest.get(kind, 0):
            self.newest[kind] = event.ts_ms

    def merge(self, other: BatchResult) -> None:
        self.events += other.events
        self.event_sources += other.event_sources
        self.dead_letters += other.dead_letters
        for reason, count in other.rejected.items():
            self.rejected[reason] = self.rejected.get(reason, 0) + count
        for kind, count in other.counts.items():
            self.counts[kind] = self.counts.get(kind, 0) + count
        for kind, ts in other.newest.items():
            if ts > self.newest.get(kind, 0):
                self.newest[kind] = ts


@dataclass(slots=True)
class PipelineStats:
    """Live counters read by the metrics collector at scrape time."""

    events: dict[str, int] = field(default_factory=lambda: dict.fromkeys(EVENT_TYPES, 0))
    rejected: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RejectReason, 0))
    duplicates: dict[str, int] = field(default_factory=lambda: dict.fromkeys(EVENT_TYPES, 0))
    late: dict[str, int] = field(default_factory=lambda: dict.fromkeys(EVENT_TYPES, 0))
    out_of_order: dict[str, int] = field(default_factory=lambda: dict.fromkeys(EVENT_TYPES, 0))
    reattributed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ATTRIBUTED, 0))
    attribution_overflow: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(ATTRIBUTED, 0)
    )
    last_event_ms: dict[str, int] = field(default_factory=dict)
    transactions: int = 0
    aborted: int = 0
    notifications: dict[tuple[str, str], int] = field(default_factory=dict)
    outbox_pending: dict[str, int] = field(default_factory=dict)
    consumer_lag: dict[tuple[str, int], int] = field(default_factory=dict)
    loop_stall_max_s: float = 0.0
    stalled: dict[tuple[str, int], str] = field(default_factory=dict)
    """(topic, partition) paused on a batch this worker cannot read -> reason."""
    unreadable: dict[tuple[str, str], int] = field(default_factory=dict)
    """(topic, reason) -> failed attempts to read a batch."""

    def notified(self, channel: str, outcome: str, n: int = 1) -> None:
        key = (channel, outcome)
        self.notifications[key] = self.notifications.get(key, 0) + n

    def apply(self, batch: BatchResult) -> None:
        last = self.last_event_ms
        for kind, count in batch.counts.items():
            self.events[kind] += count
        for kind, ts in batch.newest.items():
            if ts > last.get(kind, 0):
                last[kind] = ts
        for reason, count in batch.rejected.items():
            self.rejected[reason] = self.rejected.get(reason, 0) + count

    def apply_stateful(
        self,
        duplicates: Mapping[str, int],
        late: Mapping[str, int],
        out_of_order: Mapping[str, int],
    ) -> None:
        for target, counts in (
            (self.duplicates, duplicates), (self.late, late), (self.out_of_order, out_of_order)
        ):  # fmt: skip
            for kind, n in counts.items():
                target[kind] += n

    def apply_attribution(
        self, reattributed: Mapping[str, int], attribution_overflow: Mapping[str, int]
    ) -> None:
        """Leads and orders moved to their click's campaign when it came after them, and
        those left unattributed by the bound on waiting ones (``stream.aggregate``)."""
        for target, counts in (
            (self.reattributed, reattributed),
            (self.attribution_overflow, attribution_overflow),
        ):
            for kind, n in counts.items():
                target[kind] = target.get(kind, 0) + n


class RecordHandler:
    """Parses records of the configured topics into a :class:`BatchResult`."""

    def __init__(self, settings: Settings) -> None:
        self.parser = EventParser(
            rates=settings.rates,
            reporting_currency=settings.reporting_currency,
            max_bytes=settings.max_message_bytes,
            max_future_skew_ms=int(settings.max_future_skew_seconds * 1000),
        )
        self.topic_types: dict[str, str | None] = {
            topic: kind for kind, topic in settings.type_topics.items()
        }
        self.topic_types.update(dict.fromkeys(settings.shared_topics))

    @property
    def topics(self) -> list[str]:
        return list(self.topic_types)

    def handle(self, records: Iterable[Record], now_ms: int) -> BatchResult:
        result = BatchResult()
        parse, topic_types = self.parser.parse, self.topic_types
        for record in records:
            parsed = parse(record.value, topic_type=topic_types[record.topic], now_ms=now_ms)
            if isinstance(parsed, Event):
                result.add(parsed, record)
            else:
                self.reject(result, record, parsed)
        return result

    @staticmethod
    def reject(result: BatchResult, record: Record, rejection: Rejection) -> None:
        result.dead_letters.append(dead_letter(record, rejection))
        reason = rejection.reason.value
        result.rejected[reason] = result.rejected.get(reason, 0) + 1
