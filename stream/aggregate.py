"""The two stateful stages of the pipeline, as pure code (no Kafka).

``DedupState`` (one per partition of the routed-events topic) deduplicates,
attributes leads and orders to the clicked campaign, sets aside events older
than their dedup horizon, and turns events into per-minute cell deltas keyed by
(channel, campaign).
``SegmentStore`` (one for the whole deployment) sums those deltas into the
global, channel and campaign series, tracks the watermark, and evaluates the
windows and KPIs. Both are deterministic functions of their input, so a
restarted worker rebuilds them from their changelogs and input exactly.
"""

from __future__ import annotations

import bisect
import copy
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from xxhash import xxh3_64_intdigest

from stream.events import EVENT_TYPES
from stream.guard import Guard
from stream.windows import (
    CLICKS,
    IMPRESSIONS,
    LEADS,
    MEASURES,
    N_MEASURES,
    NEW_CUSTOMERS,
    ORDERS,
    REVENUE,
    SPEND,
    WINDOWS,
    Retention,
    SeriesBuckets,
    Totals,
    evaluation_minute,
    kpis,
    minute_of,
)

UNATTRIBUTED = "unattributed"
ATTRIBUTED = ("lead", "order")
"""Event types attributed to the clicked campaign when they carry none."""
OTHER = "__other__"

# A routed event, as a tuple for speed (see stream.codec): these are its fields.
(R_TYPE, R_KEY, R_TS, R_CAMPAIGN, R_CHANNEL, R_CLICK, R_SPEND, R_REVENUE, R_NEW, R_SOURCE_TS,
 R_ORIGIN) = range(11)  # fmt: skip
Routed = Sequence[object]
Cell = tuple[str, str, int]  # (channel, campaign, minute)


DEDUP_MINUTES = {"impression": 60, "click": 60, "lead": 1440, "order": 1440, "spend": 1440}
PENDING_LIMIT = 100_000
"""Leads and orders one partition keeps waiting for their click (~200 bytes each); beyond
it they stay unattributed, counted in ``BatchOutput.attribution_overflow``."""


@dataclass(frozen=True)
class Horizons:
    """Event-time horizons in minutes: dedup per type (also how late an event of that type
    may be and still be counted), click attribution; and the settle delay, which says
    which minutes the windows have already shown."""

    dedup_minutes: dict[str, int] = field(default_factory=lambda: dict(DEDUP_MINUTES))
    attribution_minutes: int = 1440
    settle_ms: int = 60_000
    max_pending: int = PENDING_LIMIT
    """Leads and orders kept per partition waiting for their click (:class:`_Pending`)."""


@dataclass
class BatchOutput:
    """What a batch of routed events changed: cell deltas, counters, and the events too
    late to count (for the dead-letter topic)."""

    cells: dict[Cell, list[int]] = field(default_factory=dict)
    applied: Counter[str] = field(default_factory=Counter)
    duplicates: Counter[str] = field(default_factory=Counter)
    late: Counter[str] = field(default_factory=Counter)
    out_of_order: Counter[str] = field(default_factory=Counter)
    too_late: list[TooLate] = field(default_factory=list)
    reattributed: Counter[str] = field(default_factory=Counter)
    """Leads and orders moved from ``unattributed`` to their click's campaign when the
    click came after them (a backlog read ahead of the clicks, a late click)."""
    counted: dict[Cell, list[int]] = field(default_factory=dict)
    """What the counters (``kpimon_measure_total``) take beside ``cells``, which the
    windows take: a lead or order waiting for its click is in the windows as
    ``unattributed`` at once, but enters the counters only where it ends (its click's
    campaign, or ``unattributed`` once no click can come), so no counter goes down."""
    attribution_overflow: Counter[str] = field(default_factory=Counter)
    """Leads and orders left unattributed, whatever click comes, because the partition's
    pending bound (``Horizons.max_pending``) was full."""
    source_hist: dict[int, int] = field(default_factory=dict)
    """Counted events by source timestamp rounded down to 100 ms (end-to-end latency)."""


@dataclass(frozen=True, slots=True)
class TooLate:
    """An event older than its type's dedup horizon, and the horizon clock it missed."""

    event: Routed
    clock_ms: int


def key_hash(kind: str, key: str) -> int:
    """A 64-bit hash of an event's (type, dedup key), stable across processes.

    The dedup state holds hours of keys (an hour of impressions at 1,000/s is 3.6M),
    so it keeps this 8-byte hash instead of the id string: about half the memory, and
    smaller changelog entries. Two live keys collide with probability ~N/2^64 per event
    (1e-13 at 3.6M keys): a collision would count one event as a duplicate.
    """
    return xxh3_64_intdigest(f"{kind[0]}{key}".encode())


class _ExpiringMap:
    """A dict whose entries expire at an event-time minute; also logs additions."""

    __slots__ = ("by_minute", "entries", "log")

    def __init__(self) -> None:
        self.entries: dict[int, tuple[int, object]] = {}
        self.by_minute: dict[int, list[int]] = {}
        self.log: list[tuple[int, int, object]] = []

    def put(self, key: int, expires: int, value: object = None, *, record: bool = True) -> None:
        self.entries[key] = (expires, value)
        self.by_minute.setdefault(expires, []).append(key)
        if record:
            self.log.append((key, expires, value))

    def expire(self, now_minute: int) -> None:
        for minute in [m for m in self.by_minute if m < now_minute]:
            for key in self.by_minute.pop(minute):
                entry = self.entries.get(key)
                if entry is not None and entry[0] == minute:
                    del self.entries[key]


class _ExpiringKeys:
    """Key hashes, each until an event-time minute (the dedup state); logs additions.

    Leaner than :class:`_ExpiringMap` (no value, one shared int per minute), since it
    holds one entry per counted event.
    """

    __slots__ = ("by_minute", "entries", "log", "minutes")

    def __init__(self) -> None:
        self.entries: dict[int, int] = {}
        self.by_minute: dict[int, list[int]] = {}
        self.minutes: dict[int, int] = {}  # each minute's one int object
        self.log: list[tuple[int, int]] = []

    def put(self, key: int, expires: int, *, record: bool = True) -> None:
        expires = self.minutes.setdefault(expires, expires)
        keys = self.by_minute.get(expires)
        if keys is None:
            keys = self.by_minute[expires] = []
        self.entries[key] = expires
        keys.append(key)
        if record:
            self.log.append((key, expires))

    def expire(self, now_minute: int) -> None:
        for minute in [m for m in self.by_minute if m < now_minute]:
            del self.minutes[minute]
            for key in self.by_minute.pop(minute):
                if self.entries.get(key) == minute:
                    del self.entries[key]


_Conversion = tuple[int, str, str, int, int, int]
"""A pending lead or order: (expires, type, channel, minute, new customer, revenue)."""


class _Pending:
    """Leads and orders counted as ``unattributed`` because their click was not known yet,
    by the click's key hash: when the click comes, they move to its campaign.

    One is kept until its click could no longer be counted (its minute plus the click
    horizon, at most the attribution window): a click stamped before its order is then
    too late; or until its click comes too late (``DedupState.dead``). ``limit`` bounds
    the memory; logs additions (a click claiming them is in the clicks log, which removes
    them on restore).
    """

    __slots__ = ("by_minute", "entries", "limit", "log", "size")

    def __init__(self, limit: int) -> None:
        self.entries: dict[int, list[_Conversion]] = {}
        self.by_minute: dict[int, list[int]] = {}
        self.log: list[tuple[int, int, str, str, int, int, int]] = []  # (click, *item)
        self.limit = limit
        self.size = 0

    def put(self, click: int, item: _Conversion, *, record: bool = True) -> None:
        self.entries.setdefault(click, []).append(item)
        self.by_minute.setdefault(item[0], []).append(click)
        self.size += 1
        if record:
            self.log.append((click, *item))

    def pop(self, click: int) -> list[_Conversion]:
        items = self.entries.pop(click, [])
        self.size -= len(items)
        return items

    def expire(self, now_minute: int) -> list[_Conversion]:
        """Drop the entries no click can claim any more; they stay unattributed."""
        dropped: list[_Conversion] = []
        for minute in [m for m in self.by_minute if m < now_minute]:
            for click in self.by_minute.pop(minute):
                items = self.entries.get(click)
                if items is None:
                    continue
                keep = [item for item in items if item[0] >= now_minute]
                dropped += [item for item in items if item[0] < now_minute]
                self.size -= len(items) - len(keep)
                if keep:
                    self.entries[click] = keep
                else:
                    del self.entries[click]
        return dropped


def _add(cells: dict[Cell, list[int]], cell: Cell, values: Sequence[int], sign: int) -> None:
    row = cells.get(cell)
    if row is None:
        row = cells[cell] = [0] * N_MEASURES
    for i, v in enumerate(values):
        row[i] += sign * v
    if not any(row):  # added and taken back within this batch
        del cells[cell]


def _conversion_values(kind: str, new: int, revenue: int) -> list[int]:
    values = [0] * N_MEASURES
    if kind == "lead":
        values[LEADS] = 1
    else:
        values[ORDERS], values[NEW_CUSTOMERS], values[REVENUE] = 1, new, revenue
    return values


class DedupState:
    """Dedup, attribution and the lateness horizon for one partition of routed events.

    One clock decides both what the dedup state may forget and what is too late:
    the *horizon clock*, the least of this partition's newest event time, the event
    time its router had reached (``reached_ms``) and the wall clock, never moving
    back. An event's dedup key is kept until the clock passes its minute plus its
    type's horizon; an event whose key would already be forgotten cannot be told
    from a copy that was counted, so it is set aside as too late instead of counted.
    Every other event is counted exactly once, however late or out of order.

    Attribution does not depend on arrival order either: a lead or order whose click
    is not known yet counts as ``unattributed`` and waits (:class:`_Pending`); its click,
    when it comes, moves it to the click's campaign (a negative and a positive delta).
    A lead or order attributes to a click at most ``attribution_minutes`` after it.
    """

    def __init__(self, horizons: Horizons | None = None) -> None:
        self.horizons = horizons or Horizons()
        self.seen = _ExpiringKeys()
        self.clicks = _ExpiringMap()
        self.pending = _Pending(self.horizons.max_pending)
        self.dead = _ExpiringKeys()
        """Clicks dead-lettered as too late, by key hash, for the click horizon after the
        clock that judged them: no click with their id can be counted any more, so the
        leads and orders naming them need not wait (they are unattributed for good, and
        the counters take them at once)."""
        self.max_ts = 0
        self.clock_ms = 0
        self._expired_at = 0
        self._dedup = {t: self.horizons.dedup_minutes.get(t, 1440) for t in EVENT_TYPES}

    def apply(
        self,
        events: Iterable[Routed],
        now_ms: int,
        out: BatchOutput | None = None,
        *,
        reached_ms: int | None = None,
    ) -> BatchOutput:
        """Apply one message of routed events.

        The horizon clock moves once, before the message, so the outcome does not
        depend on the order of events within it (a shuffled batch counts the same).
        ``reached_ms`` is the event time the routing worker had reached in all of its
        sources before the batch (the watermark as it saw it): a replayed backlog is
        judged in its own event time, and one fast topic cannot make a slow one late.
        """
        out = out if out is not None else BatchOutput()
        reached = now_ms if reached_ms is None else reached_ms
        self.clock_ms = max(self.clock_ms, min(self.max_ts, reached, now_ms))
        self._expire(out)
        clock_minute = self.clock_ms // 60_000
        shown_before = evaluation_minute(self.clock_ms, self.horizons.settle_ms)
        cells, attribution, dedup = out.cells, self.horizons.attribution_minutes, self._dedup
        clicks = self.clicks.entries
        # The dedup keys' structures, written here directly (this is the per-event loop):
        # what _ExpiringKeys.put does, without a call per event.
        seen, by_minute, minutes, log = (self.seen.entries, self.seen.by_minute,
                                         self.seen.minutes, self.seen.log)  # fmt: skip
        max_ts = self.max_ts
        applied = dict.fromkeys(EVENT_TYPES, 0)
        hist = out.source_hist
        for ev in events:
            kind: str = ev[R_TYPE]  # type: ignore[assignment]
            ts: int = ev[R_TS]  # type: ignore[assignment]
            key = xxh3_64_intdigest(f"{kind[0]}{ev[R_KEY]}".encode())  # key_hash, inlined
            if key in seen:
                out.duplicates[kind] += 1
                continue
            minute = ts // 60_000
            expires = minute + dedup[kind]
            if expires < clock_minute:
                out.late[kind] += 1
                out.too_late.append(TooLate(ev, self.clock_ms))
                if kind == "click" and ev[R_CLICK] is not None:
                    self._dead_click(key_hash("click", str(ev[R_CLICK])), clock_minute, out)
                continue
            expires = minutes.setdefault(expires, expires)
            seen[key] = expires
            keys = by_minute.get(expires)
            if keys is None:
                by_minute[expires] = [key]
            else:
                keys.append(key)
            log.append((key, expires))
            if ts > max_ts:
                max_ts = ts
            if minute < shown_before:
                out.out_of_order[kind] += 1
            campaign: str | None = ev[R_CAMPAIGN]  # type: ignore[assignment]
            channel: str = ev[R_CHANNEL]  # type: ignore[assignment]
            click_id = ev[R_CLICK]
            if kind == "click" and click_id is not None:
                click = key_hash("click", str(click_id))
                self.clicks.put(click, minute + attribution, (campaign, channel))
                if click in self.pending.entries:  # leads/orders that came before it
                    self._claim(click, minute + attribution, campaign, channel, out)
            elif campaign is None:
                click = key_hash("click", str(click_id)) if click_id is not None else 0
                hit = clicks.get(click) if click_id is not None else None
                if hit is None or minute > hit[0]:  # unknown yet, or beyond the window
                    campaign = UNATTRIBUTED
                    if hit is None and click_id is not None:
                        self._wait(click, kind, channel, minute, ev, clock_minute, out)
                else:
                    clicked: tuple[str, str] = hit[1]  # type: ignore[assignment]
                    campaign = clicked[0]
                    if channel == "unknown":
                        channel = clicked[1]
            cell = (channel, campaign, minute)
            values = cells.get(cell)  # type: ignore[arg-type]  # campaign is set by now
            if values is None:
                values = cells[cell] = [0] * N_MEASURES  # type: ignore[index]
            if kind == "impression":
                values[IMPRESSIONS] += 1
                values[SPEND] += ev[R_SPEND]  # type: ignore[operator]
            elif kind == "click":
                values[CLICKS] += 1
                values[SPEND] += ev[R_SPEND]  # type: ignore[operator]
            elif kind == "lead":
                values[LEADS] += 1
            elif kind == "order":
                values[ORDERS] += 1
                values[NEW_CUSTOMERS] += 1 if ev[R_NEW] else 0
                values[REVENUE] += ev[R_REVENUE]  # type: ignore[operator]
            else:
                values[SPEND] += ev[R_SPEND]  # type: ignore[operator]
            applied[kind] += 1
            source: int = ev[R_SOURCE_TS]  # type: ignore[assignment]
            bucket = source - source % 100
            hist[bucket] = hist.get(bucket, 0) + 1
        self.max_ts = max_ts
        out.applied.update({kind: n for kind, n in applied.items() if n})
        return out

    def _wait(self, click: int, kind: str, channel: str, minute: int, ev: Routed,
              clock_minute: int, out: BatchOutput) -> None:  # fmt: skip
        """A lead or order counted as unattributed: keep it for its click, if one may come."""
        expires = minute + min(self._dedup["click"], self.horizons.attribution_minutes)
        if expires < clock_minute:
            return  # a click stamped before it would be too late
        if click in self.dead.entries:
            return  # its click came too late to count: unattributed for good
        if self.pending.size >= self.pending.limit:
            out.attribution_overflow[kind] += 1
            return
        new = int(bool(ev[R_NEW])) if kind == "order" else 0
        revenue: int = ev[R_REVENUE] if kind == "order" else 0  # type: ignore[assignment]
        self.pending.put(click, (expires, kind, channel, minute, new, revenue))
        # In the windows as unattributed now; in the counters only where it ends.
        _add(out.counted, (channel, UNATTRIBUTED, minute), _conversion_values(kind, new, revenue),
             -1)  # fmt: skip

    def _claim(self, click: int, window_end: int, campaign: str | None, channel: str,
               out: BatchOutput) -> None:  # fmt: skip
        """The click of pending leads/orders came: move them from their unattributed cell
        to (the click's channel if theirs was ``unknown``, the click's campaign)."""
        cells = out.cells
        for _, kind, own_channel, minute, new, revenue in self.pending.pop(click):
            values = _conversion_values(kind, new, revenue)
            source = (own_channel, UNATTRIBUTED, minute)
            if minute > window_end:  # beyond the attribution window: stays unattributed
                _add(out.counted, source, values, 1)
                continue
            target = (channel if own_channel == "unknown" else own_channel, str(campaign), minute)
            _add(cells, source, values, -1)
            _add(cells, target, values, 1)
            _add(out.counted, source, values, 1)  # the counters: only the target's +1
            out.reattributed[kind] += 1

    def _dead_click(self, click: int, clock_minute: int, out: BatchOutput) -> None:
        """A click too late to count: what waits for it ends its wait now, unattributed
        (the counters take it), and what names it later does not wait. Without this, an
        order whose click is dead-lettered would be missing from the counters for up to
        the click horizon (an hour of event time) while the windows show it."""
        for _, kind, channel, minute, new, revenue in self.pending.pop(click):
            _add(out.counted, (channel, UNATTRIBUTED, minute),
                 _conversion_values(kind, new, revenue), 1)  # fmt: skip
        if click not in self.dead.entries and len(self.dead.entries) < self.horizons.max_pending:
            self.dead.put(click, clock_minute + self._dedup["click"])

    def _expire(self, out: BatchOutput | None = None) -> None:
        """Forget what the clock has passed. Leads and orders no click can claim any more
        enter the counters as unattributed (``out``; on restore, the transaction that
        expired them live had counted them, and its clock says so)."""
        minute = self.clock_ms // 60_000
        if minute > self._expired_at:
            self._expired_at = minute
            self.seen.expire(minute)
            self.clicks.expire(minute)
            self.dead.expire(minute)
            for _, kind, channel, at, new, revenue in self.pending.expire(minute):
                if out is not None:
                    _add(out.counted, (channel, UNATTRIBUTED, at),
                         _conversion_values(kind, new, revenue), 1)  # fmt: skip

    # -- changelog --------------------------------------------------------------
    def drain_changes(self) -> dict[str, object]:
        """State added since the last drain, for the changelog (then forgotten)."""
        change = {
            "max_ts": self.max_ts,
            "clock": self.clock_ms,
            "seen": self.seen.log,  # (key, expires) tuples: JSON arrays, as written
            "clicks": self.clicks.log,
        }
        if self.pending.log:  # (click, expires, type, channel, minute, new, revenue)
            change["pending"] = self.pending.log
        if self.dead.log:  # (click, expires): too-late clicks
            change["dead"] = self.dead.log
        self.seen.log = []
        self.clicks.log = []
        self.pending.log = []
        self.dead.log = []
        return change

    def load_changes(self, change: dict[str, object]) -> None:
        """Re-apply one changelog entry (restore)."""
        self.max_ts = max(self.max_ts, int(change["max_ts"]))  # type: ignore[call-overload]
        clock = change.get("clock", 0)  # absent in entries written before the horizon clock
        self.clock_ms = max(self.clock_ms, int(clock))  # type: ignore[call-overload]
        self._expire()
        forgotten = self.clock_ms // 60_000  # keys the live state had expired by then
        for key, expires in change["seen"]:  # type: ignore[attr-defined]
            if expires >= forgotten:
                self.seen.put(_legacy_seen(key), expires, record=False)
        for click, *item in change.get("pending", ()):  # type: ignore[attr-defined]
            if item[0] < forgotten or click in self.clicks.entries or click in self.dead.entries:
                continue  # expired, claimed or ended live
            self.pending.put(click, tuple(item), record=False)
        for click, expires in change.get("dead", ()):  # type: ignore[attr-defined]
            self.pending.pop(click)  # ended its wait, live
            if expires >= forgotten:
                self.dead.put(click, expires, record=False)
        for key, expires, value in change["clicks"]:  # type: ignore[attr-defined]
            click = key_hash("click", key) if isinstance(key, str) else key
            self.pending.pop(click)  # claimed by it, live
            if expires >= forgotten:
                self.clicks.put(click, expires, tuple(value), record=False)


def _legacy_seen(key: int | str) -> int:
    """Changelogs written before key hashes held ``<type initial><dedup key>``."""
    if isinstance(key, int):
        return key
    return xxh3_64_intdigest(key.encode())  # the same string key_hash hashes


SeriesKey = tuple[str, str, str]  # (scope, channel, campaign)
StateKey = tuple[str, str, str, str, int]  # ("B", scope, channel, campaign, hour) or ("T", ...)


def series_of(channel: str, campaign: str) -> tuple[SeriesKey, SeriesKey, SeriesKey]:
    return ("campaign", channel, campaign), ("channel", channel, ""), ("global", "", "")


@dataclass
class SeriesResult:
    """One series' window sums and KPIs at an evaluation."""

    windows: dict[str, Totals]
    kpis: dict[str, dict[str, float]]


@dataclass
class Evaluation:
    """Everything the exporter shows, computed once per evaluation tick."""

    watermark_ms: int
    end_minute: int
    series: dict[SeriesKey, SeriesResult]
    measure_totals: dict[tuple[str, str], list[int]]
    replaying: bool
    restating: bool = False
    folded: dict[tuple[str, str], int] = field(default_factory=dict)
    """Ids folded into ``__other__`` so far, by (kind, channel they came from)."""
    """A worker is applying a backlog of late events to minutes already shown: until it
    is through, some topics' share of those minutes may be in and others' not yet."""

    @property
    def hold_alerts(self) -> bool:
        """Windows may be incomplete or half-restated: no alert decision now."""
        return self.replaying or self.restating


RESTATING_HOLD_MS = 10 * 60_000
"""Longest hold of alert decisions while a backlog of late events is applied."""
LATENCY_BUCKETS: tuple[float, ...] = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300)


@dataclass
class _Reporter:
    watermark_ms: int = 0
    caught_up: bool = False
    seen_ms: int = 0


class SegmentStore:
    """Global, channel and campaign series built from cell deltas of all partitions."""

    def __init__(
        self,
        *,
        settle_ms: int = 60_000,
        max_campaigns: int = 500,
        max_channels: int = 50,
        retention: Retention | None = None,
        worker_timeout_ms: int = 30_000,
        replay_lag_ms: int = 120_000,
    ) -> None:
        self.settle_ms = settle_ms
        self.campaign_guard: Guard[tuple[str, str]] = Guard(max_campaigns, lambda k: k[0])
        self.channel_guard: Guard[str] = Guard(max_channels)
        self.retention = retention or Retention()
        self.worker_timeout_ms = worker_timeout_ms
        self.replay_lag_ms = replay_lag_ms
        self.series: dict[SeriesKey, SeriesBuckets] = {}
        self.totals: dict[tuple[str, str], list[int]] = {}
        self.reporters: dict[int, _Reporter] = {}
        self.watermark_ms = 0
        self.latency_counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self.dirty_totals: set[tuple[str, str]] = set()
        self.shown_end = 0  # the end minute of the last evaluation
        self.restated = 0  # cells applied to shown minutes since the last evaluation
        self._restating_since: int | None = None
        self._progress: deque[tuple[int, int | None]] = deque()
        """(wall clock, the least event time reached by a live worker not caught up, or
        None) at each change of the reports: what had been passed on by when."""
        self._deleted: list[tuple[SeriesKey, list[int]]] = []  # series whose blocks went
        self._frozen: dict[tuple[str, str], int] = {}  # totals of demoted ids -> hour frozen
        self._newest_minute = 0
        self._guards_dirty = False
        self._expiry_hour = 0
        self._expiry_queue: list[SeriesKey] = []

    def apply_cells(self, cells: Iterable[tuple[str, str, int, Sequence[int]]]) -> None:
        """Add cell deltas; ids beyond the cardinality guards fold into ``__other__``.

        ``values`` may carry a second set of measures after the first: what the counters
        take beside them (``BatchOutput.counted``); a row of zeros and that set touches
        the counters only."""
        shown_end = self.shown_end
        channels, campaigns = self.channel_guard, self.campaign_guard
        self._guards_dirty = True
        for channel, campaign, minute, row in cells:
            values, counted = row[:N_MEASURES], row[N_MEASURES:]
            windows = not counted or any(values)
            if windows and minute < shown_end:
                self.restated += 1
            if minute > self._newest_minute:
                self._newest_minute = minute
                self._review(minute)
            weight = int(values[SPEND]) + sum(values[:NEW_CUSTOMERS])
            if not channels.admit(channel, weight):
                channel = OTHER
            if not campaigns.admit((channel, campaign), weight):
                campaign = OTHER
            if windows:
                for key in series_of(channel, campaign):
                    buckets = self.series.get(key)
                    if buckets is None:
                        buckets = self.series[key] = SeriesBuckets(self.retention)
                    buckets.add(minute, values)
            total = self.totals.get((channel, campaign))
            if total is None:
                total = self.totals[(channel, campaign)] = [0] * N_MEASURES
            for i, v in enumerate(values):
                total[i] += v
            for i, v in enumerate(counted):
                total[i] += v
            self.dirty_totals.add((channel, campaign))

    def _review(self, minute: int) -> None:
        """At each hour of event time: swap kept and folded ids (``stream.guard``) and move
        a demoted id's history into its ``__other__`` series, so sums stay exact."""
        for swap in self.channel_guard.tick(minute):
            demoted = swap.demoted
            self._move(("channel", demoted, ""), ("channel", OTHER, ""))
            for pair in [p for p in self.campaign_guard.kept if p[0] == demoted]:
                del self.campaign_guard.kept[pair]
                self._move(("campaign", *pair), ("campaign", OTHER, OTHER))
            self.campaign_guard.candidates = {
                p: v for p, v in self.campaign_guard.candidates.items() if p[0] != demoted
            }
            self._move(("campaign", demoted, OTHER), ("campaign", OTHER, OTHER))
            self._freeze(demoted, None, minute)
        for pair_swap in self.campaign_guard.tick(minute):
            channel, campaign = pair_swap.demoted
            self._move(("campaign", channel, campaign), ("campaign", channel, OTHER))
            self._freeze(channel, campaign, minute)
        hour = minute // 60
        for pair in [p for p, frozen in self._frozen.items() if frozen + 2 <= hour]:
            del self._frozen[pair]
            if pair in self.totals and pair[1] not in self._kept_campaigns(pair[0]):
                del self.totals[pair]
                self.dirty_totals.add(pair)

    def _kept_campaigns(self, channel: str) -> set[str]:
        return {c for ch, c in self.campaign_guard.kept if ch == channel} | {OTHER}

    def _freeze(self, channel: str, campaign: str | None, minute: int) -> None:
        """A demoted id's counter stops growing (its events count in ``__other__`` now)
        and is dropped two hours later: moving it would show as a jump in ``rate()``."""
        for pair in self.totals:
            if pair[0] == channel and campaign in (None, pair[1]):
                self._frozen[pair] = minute // 60

    def _move(self, source: SeriesKey, target: SeriesKey) -> None:
        buckets = self.series.pop(source, None)
        if buckets is None:
            return
        into = self.series.get(target)
        if into is None:
            into = self.series[target] = SeriesBuckets(self.retention)
        into.merge(buckets)
        self._deleted.append((source, sorted({*buckets.blocks, *buckets.coarse})))

    def report(self, partition: int, watermark_ms: int, *, caught_up: bool, now_ms: int) -> None:
        """Progress of one routed-events partition, as its owner last reported it."""
        self.reporters[partition] = _Reporter(watermark_ms, caught_up, now_ms)
        self._note_progress(now_ms, self._behind(now_ms))

    def _behind(self, now_ms: int) -> list[int]:
        """Event times reached by the live workers that are not caught up."""
        return [
            r.watermark_ms
            for r in self.reporters.values()
            if not r.caught_up and now_ms - r.seen_ms <= self.worker_timeout_ms
        ]

    def _note_progress(self, now_ms: int, behind: list[int]) -> None:
        """Record what the reports say has been passed on at ``now_ms`` (``behind``: see
        :meth:`_behind`; a change only), keeping the newest record a settle old and every
        one after it."""
        reached = min(behind) if behind else None
        progress = self._progress
        if not progress or progress[-1][1] != reached:
            progress.append((now_ms, reached))
        cutoff = now_ms - self.settle_ms
        while len(progress) > 1 and progress[1][0] <= cutoff:
            progress.popleft()

    def _passed_on(self, at_ms: int) -> int | None:
        """The event time every event before which had been passed on at wall time
        ``at_ms``, as the reports then said (None: no report that old)."""
        reached: int | None = None
        for seen_ms, behind in self._progress:
            if seen_ms > at_ms:
                break
            reached = at_ms if behind is None else behind
        return reached

    def observe_latency(self, source_ts: Iterable[int], now_ms: int, n: int = 1) -> None:
        """Events that reached the state at ``now_ms``, ``n`` for each source timestamp."""
        counts, bounds = self.latency_counts, LATENCY_BUCKETS
        for ts in source_ts:
            seconds = max(0.0, (now_ms - ts) / 1000)
            counts[bisect.bisect_left(bounds, seconds)] += n
            self.latency_sum += seconds * n

    def replaying(self, now_ms: int) -> bool:
        """True while the watermark lags the wall clock by more than a short hiccup:
        the workers are working through a backlog, so alerts wait for them."""
        return now_ms - self.watermark_ms > self.replay_lag_ms

    def advance_watermark(self, now_ms: int, *, hold: bool = False) -> int:
        """Wall clock when every live worker is caught up, else the event time they reached;
        and no further than what the reports said a settle delay ago, plus that delay.

        A report tells what its worker has *passed on*: the events before its watermark
        are routed, not yet counted here (two hops later). For live traffic the settle
        delay covers those hops, since the watermark is about the wall clock. A backlog's
        end makes the watermark jump by minutes or hours in one report, with its last
        events still in flight: so a claim is believed a settle delay after it was made
        (for live traffic this changes nothing). With no report that old (a store that
        just started: the worker shows nothing before its first report) or none at all
        (the backtest), the reports and the wall clock as they stand.

        ``hold``: the store's own input lags (progress reports not yet applied), so
        neither the reports nor the wall clock say how far the sums are complete.
        """
        if hold:
            return self.watermark_ms
        behind = self._behind(now_ms)
        candidate = min(min(behind), now_ms) if behind else now_ms
        if self._progress:
            self._note_progress(now_ms, behind)
            then = self._passed_on(now_ms - self.settle_ms)
            if then is not None:
                candidate = min(candidate, then + self.settle_ms)
        self.watermark_ms = max(self.watermark_ms, candidate)
        return self.watermark_ms

    def restating(self, now_ms: int) -> bool:
        """True from when late events restate shown minutes while a worker still has a
        backlog, until every worker is through it: at most ``RESTATING_HOLD_MS``, so late
        events trickling into a worker that always lags a little never hold alerts for good."""
        lagging = bool(self._behind(now_ms))
        if not lagging:
            self._restating_since = None
        elif self.restated and self._restating_since is None:
            self._restating_since = now_ms
        self.restated = 0
        since = self._restating_since
        return since is not None and now_ms - since <= RESTATING_HOLD_MS

    def advance(self, now_ms: int, *, hold: bool = False) -> tuple[int, int, bool]:
        """Move the evaluation clock to ``now_ms``: (watermark, end minute of the windows,
        restating). A second call with the same ``now_ms`` changes nothing and returns the
        same, so the worker advances the live store, then evaluates a :meth:`snapshot` of it
        off the event loop; cells applied meanwhile to minutes it shows count as restated,
        as if the evaluation had taken no time."""
        watermark = self.advance_watermark(now_ms, hold=hold)
        end = evaluation_minute(watermark, self.settle_ms)
        restating = self.restating(now_ms)
        self.shown_end = max(self.shown_end, end)
        return watermark, end, restating

    def evaluate(self, now_ms: int, *, hold: bool = False) -> Evaluation:
        watermark, end, restating = self.advance(now_ms, hold=hold)
        for buckets in self.series.values():
            buckets.expire(minute_of(watermark))
        series: dict[SeriesKey, SeriesResult] = {}
        for key, b in self.series.items():
            windows = {w: b.sum(end - minutes, end) for w, minutes in WINDOWS.items()}
            series[key] = SeriesResult(windows, {w: kpis(v) for w, v in windows.items()})
        totals = {pair: list(counts) for pair, counts in self.totals.items()}
        folded = {("channel", ""): sum(self.channel_guard.folded.values())}
        # Every channel campaigns can come from is shown from 0, so that increase() sees
        # a channel's first folds too (a series that appears at N counts no increase).
        others = [OTHER] if self.channel_guard.folded else []
        folded.update((("campaign", ch), 0) for ch in [*self.channel_guard.kept, *others])
        folded.update((("campaign", ch), n) for ch, n in self.campaign_guard.folded.items())
        return Evaluation(
            watermark, end, series, totals, hold or self.replaying(now_ms), restating, folded
        )

    # -- evaluating off the event loop -------------------------------------------
    def snapshot(self) -> SegmentStore:
        """A copy to evaluate (and judge alerts on) in another thread while this store
        takes more cells: its sums never change after this call. Call :meth:`advance`
        first, with the ``now_ms`` the copy is evaluated at.

        Bucket blocks are shared copy-on-write (:meth:`SeriesBuckets.snapshot`), so
        this costs a few dict copies per series, not the data: ~2 ms at 500 series,
        ~30 ms at 5,000 (``bench/throughput --only-render``). What ``evaluate`` reads
        and ``apply_cells``, ``report`` or ``observe_latency`` change in place must be
        copied here.
        """
        view = copy.copy(self)
        view.series = {key: buckets.snapshot() for key, buckets in self.series.items()}
        view.totals = {key: list(counts) for key, counts in self.totals.items()}
        view.reporters = dict(self.reporters)  # report() replaces entries, never mutates one
        view._progress = deque(self._progress)
        view.latency_counts = list(self.latency_counts)
        view.campaign_guard = self.campaign_guard.view()  # evaluate reads their counts
        view.channel_guard = self.channel_guard.view()
        view.dirty_totals = set()
        view._expiry_queue = []
        return view

    def expire_blocks(self, limit: int) -> bool:
        """Fold and drop old blocks (as of the watermark's hour) in at most ``limit`` series
        per call, resuming where the last call stopped; True once every series is done.

        ``evaluate`` expires the blocks it reads, but in the worker it reads a snapshot:
        this keeps the live store's memory and changelog in step, in slices short enough
        not to hold the event loop (folding 5,000 series takes ~100 ms, once an hour).
        """
        hour = minute_of(self.watermark_ms) // 60
        if hour > self._expiry_hour:
            self._expiry_hour = hour
            self._expiry_queue = list(self.series)
        queue = self._expiry_queue
        for _ in range(min(limit, len(queue))):
            buckets = self.series.get(queue.pop())
            if buckets is not None:
                buckets.expire(hour * 60)
        return not queue

    # -- changelog --------------------------------------------------------------
    def drain_dirty(self) -> Iterator[tuple[StateKey, object]]:
        """(key, value) pairs of changed state; value None deletes (compaction)."""
        for (scope, channel, campaign), hours in self._deleted:
            if (scope, channel, campaign) not in self.series:  # not re-created since
                for hour in hours:
                    yield ("B", scope, channel, campaign, hour), None
        self._deleted.clear()
        if self._guards_dirty:
            self._guards_dirty = False
            guards = {
                "campaigns": self.campaign_guard.to_dict(),
                "channels": self.channel_guard.to_dict(),
                "frozen": [[*pair, hour] for pair, hour in self._frozen.items()],
                "newest": self._newest_minute,
            }
            yield ("G", "", "", "", 0), guards
        for (scope, channel, campaign), buckets in self.series.items():
            for hour in sorted(buckets.dirty):
                block = buckets.block(hour)
                value = None if block is None else block.tolist()
                yield ("B", scope, channel, campaign, hour), value
            buckets.dirty.clear()
        for channel, campaign in sorted(self.dirty_totals):
            yield ("T", "", channel, campaign, 0), self.totals.get((channel, campaign))
        self.dirty_totals.clear()

    def load(self, key: StateKey, value: Any) -> None:
        """Restore one changelog entry."""
        kind, scope, channel, campaign, hour = key
        if kind == "T":
            if value is None:
                self.totals.pop((channel, campaign), None)
            else:
                self.totals[(channel, campaign)] = list(value)
            return
        if kind == "G":
            self.campaign_guard.load(value["campaigns"])
            self.channel_guard.load(value["channels"])
            self._frozen = {(ch, c): int(h) for ch, c, h in value["frozen"]}
            self._newest_minute = int(value["newest"])
            return
        series_key = (scope, channel, campaign)
        buckets = self.series.setdefault(series_key, SeriesBuckets(self.retention))
        if value is None:
            buckets.blocks.pop(hour, None)
            buckets.coarse.pop(hour, None)
            if buckets.empty():
                del self.series[series_key]
        else:
            buckets.load_block(hour, np.asarray(value, dtype=np.int64))


__all__ = ["MEASURES", "BatchOutput", "DedupState", "Horizons", "SegmentStore", "TooLate"]
