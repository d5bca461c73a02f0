"""The per-batch work of the worker, free of Kafka so it can be tested alone.

A batch of raw records becomes counted events and dead letters. Counts are
staged per batch in a :class:`BatchResult` and folded into the live
:class:`PipelineStats` only after the batch's Kafka transaction committed, so a
retried batch is never counted twice.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from stream.events import EVENT_TYPES, Event, EventParser, Rejection, RejectReason
from stream.settings import Settings

DLQ_HEADER_REASON = "kpimon.reason"
DLQ_HEADER_ERROR = "kpimon.error"
DLQ_HEADER_TOPIC = "kpimon.source.topic"
DLQ_HEADER_PARTITION = "kpimon.source.partition"
DLQ_HEADER_OFFSET = "kpimon.source.offset"
DLQ_HEADER_TIMESTAMP = "kpimon.source.timestamp"


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


@dataclass(frozen=True, slots=True)
class SourceRecord:
    """A :class:`Record` built by hand (tests, backtests)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int


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


@dataclass(slots=True)
class BatchResult:
    """What one batch produced; applied to the stats once the batch is committed."""

    events: list[Event] = field(default_factory=list)
    event_sources: list[Record] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    rejected: dict[str, int] = field(default_factory=dict)

    def merge(self, other: BatchResult) -> None:
        self.events += other.events
        self.event_sources += other.event_sources
        self.dead_letters += other.dead_letters
        for reason, count in other.rejected.items():
            self.rejected[reason] = self.rejected.get(reason, 0) + count


@dataclass(slots=True)
class PipelineStats:
    """Live counters read by the metrics collector at scrape time."""

    events: dict[str, int] = field(default_factory=lambda: dict.fromkeys(EVENT_TYPES, 0))
    rejected: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RejectReason, 0))
    duplicates: dict[str, int] = field(default_factory=lambda: dict.fromkeys(EVENT_TYPES, 0))
    late: dict[str, int] = field(default_factory=lambda: dict.fromkeys(EVENT_TYPES, 0))
    last_event_ms: dict[str, int] = field(default_factory=dict)
    transactions: int = 0
    aborted: int = 0
    notifications: dict[tuple[str, str], int] = field(default_factory=dict)
    outbox_pending: dict[str, int] = field(default_factory=dict)
    consumer_lag: dict[tuple[str, int], int] = field(default_factory=dict)
    stalled: dict[tuple[str, int], str] = field(default_factory=dict)
    """(topic, partition) paused on a batch this worker cannot read -> reason."""
    unreadable: dict[tuple[str, str], int] = field(default_factory=dict)
    """(topic, reason) -> failed attempts to read a batch."""

    def notified(self, channel: str, outcome: str, n: int = 1) -> None:
        key = (channel, outcome)
        self.notifications[key] = self.notifications.get(key, 0) + n

    def apply(self, batch: BatchResult) -> None:
        events, last = self.events, self.last_event_ms
        for event in batch.events:
            kind = event.type
            events[kind] += 1
            if event.ts_ms > last.get(kind, 0):
                last[kind] = event.ts_ms
        for reason, count in batch.rejected.items():
            self.rejected[reason] = self.rejected.get(reason, 0) + count

    def apply_stateful(self, duplicates: Mapping[str, int], late: Mapping[str, int]) -> None:
        for kind, n in duplicates.items():
            self.duplicates[kind] += n
        for kind, n in late.items():
            self.late[kind] += n


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
                result.events.append(parsed)
                result.event_sources.append(record)
            else:
                result.dead_letters.append(dead_letter(record, parsed))
                reason = parsed.reason.value
                result.rejected[reason] = result.rejected.get(reason, 0) + 1
        return result
