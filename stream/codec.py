"""Wire formats of kpimon's internal topics (compact JSON, one message per batch)."""

from __future__ import annotations

import base64
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from stream.events import Event


def route_partition(event: Event, partitions: int) -> int:
    """Partition of the routed-events topic for an event.

    Keyed by click id when there is one, so that a click and the leads and
    orders it led to meet in one partition (attribution), else by the dedup key,
    so that copies of one event always meet (deduplication).
    """
    key = event.click_id or event.dedup_key
    return zlib.crc32(key.encode()) % partitions


Origin = list[Any]
"""Where a routed event came from: ``[topic, partition, offset]``, plus ``[key, value]``
(key base64, value text) when the router thought it might be too late: a too-late event
goes to the dead-letter topic as its original bytes, which the routed hop does not
otherwise carry."""


def origin(
    topic: str, partition: int, offset: int, key: bytes | None = None, value: bytes | None = None
) -> Origin:
    if value is None:
        return [topic, partition, offset]
    # A parsed event's value is valid UTF-8 (JSON); its key may be any bytes.
    encoded_key = None if key is None else base64.b64encode(key).decode()
    return [topic, partition, offset, encoded_key, value.decode()]


def original_of(where: Origin) -> tuple[bytes | None, bytes] | None:
    """The (key, value) an :func:`origin` carries, if it carries them."""
    if len(where) < 5:
        return None
    key = None if where[3] is None else base64.b64decode(where[3])
    return key, str(where[4]).encode()


def routed_row(event: Event, source_ts_ms: int, where: Origin | None = None) -> list[Any]:
    """Field order is ``stream.aggregate.R_*``."""
    return [
        event.type, event.dedup_key, event.ts_ms, event.campaign_id, event.channel,
        event.click_id, event.spend_micros, event.revenue_micros, event.new_customer,
        source_ts_ms, where,
    ]  # fmt: skip


def route(
    routed: dict[int, list[list[Any]]],
    event: Event,
    partitions: int,
    source_ts_ms: int,
    where: Origin | None = None,
) -> None:
    """:func:`routed_row` appended to its :func:`route_partition`'s rows in ``routed``: the
    same two, in one call (the ingest stage makes one an event)."""
    key = event.click_id or event.dedup_key
    row = [
        event.type, event.dedup_key, event.ts_ms, event.campaign_id, event.channel,
        event.click_id, event.spend_micros, event.revenue_micros, event.new_customer,
        source_ts_ms, where,
    ]  # fmt: skip
    rows = routed.get(p := zlib.crc32(key.encode()) % partitions)
    if rows is None:
        routed[p] = [row]
    else:
        rows.append(row)


# Keeps every internal message below Kafka's 1 MB default even with 128-character ids
# (internal topics also allow 4 MB, as a margin).
ROWS_PER_MESSAGE = 1000


def chunks(items: list[Any], size: int = ROWS_PER_MESSAGE) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def split_changes(
    change: dict[str, Any], size: int = 2 * ROWS_PER_MESSAGE
) -> Iterator[dict[str, Any]]:
    """The dedup-changelog entry of one batch as entries of at most ``size`` keys, clicks,
    pending leads/orders or too-late clicks (each restores in any order of the parts)."""
    names = [name for name in ("seen", "pending", "clicks", "dead") if name in change]
    yielded = False
    for name in names:
        for part in chunks(change[name], size):
            yield {**change, **{other: [] for other in names}, name: part}
            yielded = True
    if not yielded:
        yield change


def encode_rows(rows: Sequence[Sequence[Any]]) -> bytes:
    return orjson.dumps(rows)


ROUTED_MESSAGE_BYTES = 1_000_000
"""A routed message of several rows stays below this (Kafka's default ``max.message.bytes``,
so it fits even a routed topic that predates the worker's 4 MiB)."""
INTERNAL_MESSAGE_BYTES = 4 << 20
"""``max.message.bytes`` of the internal topics the worker creates (``stream.clients``)."""
MESSAGE_OVERHEAD = 1024
"""Room for a record's headers and framing within a topic's limit."""


def encode_routed(
    rows: list[list[Any]],
    budget: int = ROUTED_MESSAGE_BYTES,
    limit: int = INTERNAL_MESSAGE_BYTES - MESSAGE_OVERHEAD,
) -> Iterator[bytes]:
    """Routed rows as messages of at most :data:`ROWS_PER_MESSAGE` rows and ``budget``
    bytes each.

    Rows are small but for the original bytes an old event carries (up to the largest
    accepted input, 64 KiB by default, 10 MiB at most), so 1,000 of them could make one
    message far beyond any topic's limit: its send would fail and the transaction be
    retried forever. A message over ``budget`` is split in halves until each fits; a single
    row over ``limit`` goes without its original bytes (should it be too late, its dead
    letter is then the event as parsed, flagged ``reconstructed``). The common case costs
    one encoding per message, as before.
    """
    for chunk in chunks(rows):
        yield from _fit(chunk, budget, limit)


def _fit(rows: list[list[Any]], budget: int, limit: int) -> Iterator[bytes]:
    encoded = orjson.dumps(rows)
    if len(encoded) <= budget or (len(rows) == 1 and len(encoded) <= limit):
        yield encoded
    elif len(rows) > 1:
        half = len(rows) // 2
        yield from _fit(rows[:half], budget, limit)
        yield from _fit(rows[half:], budget, limit)
    else:
        row = list(rows[0])
        row[-1] = row[-1][:3]  # the origin's coordinates, without the original (key, value)
        yield orjson.dumps([row])


def decode_rows(value: bytes) -> list[list[Any]]:
    rows: list[list[Any]] = orjson.loads(value)
    return rows


@dataclass(frozen=True, slots=True)
class Partial:
    """Cell deltas of one routed partition for one transaction, plus its progress."""

    partition: int
    watermark_ms: int
    """The event time its worker had passed on everything up to (``"wm"`` on the wire)."""
    caught_up: bool
    cells: list[list[Any]]  # [channel, campaign, minute, *measures, *counted] (cells_list)
    source_ts: list[list[int]]  # [ts rounded to 100 ms, count]

    def encode(self) -> bytes:
        return orjson.dumps(
            {
                "p": self.partition,
                "wm": self.watermark_ms,
                "cu": self.caught_up,
                "c": self.cells,
                "s": self.source_ts,
            }
        )

    @staticmethod
    def decode(value: bytes) -> Partial:
        data = orjson.loads(value)
        return Partial(data["p"], data["wm"], data["cu"], data["c"], data["s"])


def cells_list(
    cells: Mapping[tuple[str, str, int], Sequence[int]],
    counted: Mapping[tuple[str, str, int], Sequence[int]] | None = None,
) -> list[list[Any]]:
    """Partials' cell rows: ``[channel, campaign, minute, *values]``, where ``values`` go to
    the windows and the counters; a cell whose counters take more or less than its windows
    (``BatchOutput.counted``) carries that after its values, in the same row, so one
    message moves both and no counter goes down between two messages."""
    rows = [[*cell, *values, *(counted or {}).get(cell, ())] for cell, values in cells.items()]
    if counted:
        zero = [0] * len(next(iter(counted.values())))
        rows += [[*cell, *zero, *extra] for cell, extra in counted.items() if cell not in cells]
    return rows


def encode_json(value: Any) -> bytes:
    return orjson.dumps(value)


def decode_json(value: bytes) -> Any:
    return orjson.loads(value)


WATERMARK_HEADER = "reached"
"""Header of a routed message: the watermark its worker had reached (the dedup stage's
lateness reference); named "reached" on the wire since before the rename."""


def watermark_header(watermark_ms: int) -> list[tuple[str, bytes]]:
    return [(WATERMARK_HEADER, str(watermark_ms).encode())]


def watermark_of(headers: Sequence[tuple[str, bytes]] | None) -> int | None:
    for name, value in headers or ():
        if name == WATERMARK_HEADER:
            return int(value)
    return None


# -- changelog keys -------------------------------------------------------------
# The scope changelog (one compacted partition) holds five kinds of entry; this is
# the one place that spells their keys. The dedup changelog is keyed by partition.

ScopeLogKind = Literal["meta", "alerts", "detectors", "outbox", "state"]
"""``meta``: the partials offset the scope state covers; ``alerts``: the alert engine's
state (without its detectors since they have entries of their own); ``detectors``: one
rule's detector statistics, ``("detectors", rule)``; ``outbox``: one undelivered
notification, ``("outbox", channel, id)``; ``state``: one entry of the scope store
(``stream.aggregate.StateKey``)."""

META_KEY = b'"meta"'
ALERTS_KEY = b'"alerts"'


def scope_log_key(kind: ScopeLogKind, key: Sequence[Any] = ()) -> bytes:
    """The changelog key of an entry: ``meta`` and ``alerts`` are single entries; an
    outbox key or store key is a list (its first item tells them apart)."""
    if kind == "meta":
        return META_KEY
    if kind == "alerts":
        return ALERTS_KEY
    return orjson.dumps(list(key))


def scope_log_entry(raw_key: bytes) -> tuple[ScopeLogKind, tuple[Any, ...]]:
    """The kind of a scope changelog entry and its key (empty for ``meta``/``alerts``)."""
    key = orjson.loads(raw_key)
    if key == "meta":
        return "meta", ()
    if key == "alerts":
        return "alerts", ()
    if key[0] == "outbox":
        return "outbox", tuple(key)
    if key[0] == "detectors":
        return "detectors", tuple(key)
    return "state", tuple(key)


DETECTORS_LEVEL = 1
"""zlib level of a ``detectors`` entry: its JSON is mostly floats' digits and repeated
segment keys; level 1 takes it to about a quarter, higher levels gain a few percent at
three times the CPU."""


def encode_detectors(state: bytes) -> bytes:
    """A ``detectors`` entry's value from its JSON: compressed (it is rewritten every
    minute, one entry per rule, and is most of the alert state's bytes)."""
    return zlib.compress(state, DETECTORS_LEVEL)


def scope_log_value(kind: ScopeLogKind, value: bytes) -> Any:
    """The decoded value of a scope changelog entry of ``kind`` (JSON, compressed JSON
    for ``detectors``)."""
    if kind == "detectors":
        return orjson.loads(zlib.decompress(value))
    return orjson.loads(value)


def dedup_log_key(partition: int) -> bytes:
    """Key of a routed partition's dedup changelog entries (its partition is the same)."""
    return f"p{partition}".encode()


def alert_key(record: Mapping[str, Any]) -> bytes:
    """Key of an alert record on the alerts topic: one alert's records stay in order."""
    return "|".join(record[k] for k in ("rule", "scope", "channel", "campaign")).encode()
