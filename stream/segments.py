"""A read-only view of a scope snapshot's segments: the one way alerts read window sums.

The alert engine judges every rule for every segment, and rules share windows and
baselines (ten KPIs over the same 15 minutes), so each sum is computed once for the
view's life: one tick. Built from the ``series`` of a snapshot nothing else changes,
the view never goes stale within its tick, and the engine never sees how the sums are
stored (minute blocks, folded hours), so storage can change without touching alerts.

Sums within a segment's recent minutes (``PREFIX_HOURS`` of minute blocks) come from
running totals built once a tick for the segment: one subtraction each. The detectors'
baselines read a different span for almost every moving detector (their excursions
start at different minutes), so most sums a tick asks for are asked once.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

from stream.aggregate import OTHER, SeriesKey
from stream.kpis import N_MEASURES
from stream.windows import SeriesBuckets, Totals

PREFIX_HOURS = 8
"""Hours of minute blocks, up to a segment's newest, that its running totals cover: the
baselines' spans (3 h), how far an excursion freezes them (2 h), a catch-up (1 h) and
the spend lags (1 h). Older sums (yesterday's shape) are summed from the buckets."""


class _Prefix:
    """Running totals of one segment over minutes [lo, hi): ``cum[m - lo]`` is the sum of
    the minutes before ``m``. No data lies at or after ``hi``; before ``lo`` there is
    data only if ``older``."""

    __slots__ = ("cum", "hi", "lo", "older")

    def __init__(self, buckets: SeriesBuckets) -> None:
        fine = buckets.blocks
        top = max(fine) if fine else None
        coarse = max(buckets.coarse, default=None)
        if top is None or (coarse is not None and coarse > top):
            bottom = top = coarse + 1 if coarse is not None else 0
            self.cum: Totals = np.zeros((1, N_MEASURES), dtype=np.int64)
        else:
            bottom = top - PREFIX_HOURS + 1
            if coarse is not None:
                bottom = max(bottom, coarse + 1)
            hours = [h for h in range(bottom, top + 1) if h in fine]
            bottom = hours[0]
            rows = np.zeros(((top + 1 - bottom) * 60 + 1, N_MEASURES), dtype=np.int64)
            for h in hours:
                at = (h - bottom) * 60 + 1
                rows[at : at + 60] = fine[h]
            self.cum = np.cumsum(rows, axis=0, out=rows)
            top += 1
        self.lo, self.hi = bottom * 60, top * 60
        self.older = any(h < bottom for h in fine) or coarse is not None


class SegmentView:
    """Segment keys, memoised window sums, history starts and children of one snapshot."""

    __slots__ = ("_by_channel", "_channels", "_firsts", "_prefix", "_series", "_starts",
                 "_sums")  # fmt: skip

    def __init__(self, series: Mapping[SeriesKey, SeriesBuckets]) -> None:
        self._series = series
        self._sums: dict[tuple[SeriesKey, int, int], Totals] = {}
        self._prefix: dict[SeriesKey, _Prefix] = {}
        self._starts: dict[SeriesKey, int | None] = {}
        self._firsts: dict[SeriesKey, int | None] = {}
        self._channels: list[SeriesKey] | None = None
        self._by_channel: dict[str, list[SeriesKey]] = {}

    def __iter__(self) -> Iterator[SeriesKey]:
        """Every segment (scope, channel, campaign), in a stable order."""
        return iter(self._series)

    def __len__(self) -> int:
        return len(self._series)

    def __contains__(self, key: object) -> bool:
        return key in self._series

    def sum(self, key: SeriesKey, start: int, end: int) -> Totals:
        """Measure sums of ``key`` over minutes [start, end); shared, do not change it."""
        totals = self._sums.get((key, start, end))
        if totals is None:
            totals = self._sums[(key, start, end)] = self._window(key, start, end)
        return totals

    def _window(self, key: SeriesKey, start: int, end: int) -> Totals:
        """What ``SeriesBuckets.sum`` gives: from the running totals where they cover it."""
        prefix = self._prefix.get(key)
        if prefix is None:
            prefix = self._prefix[key] = _Prefix(self._series[key])
        lo, hi = prefix.lo, prefix.hi
        if end <= start or (start < lo and prefix.older):
            return self._series[key].sum(start, end)
        cum = prefix.cum
        total: Totals = cum[min(max(end, lo), hi) - lo] - cum[min(max(start, lo), hi) - lo]
        return total

    def history_start(self, key: SeriesKey) -> int | None:
        """First minute of the first hour ``key`` holds data for; None if it holds none."""
        if key not in self._starts:
            self._starts[key] = self._series[key].history_start()
        return self._starts[key]

    def first_minute(self, key: SeriesKey) -> int | None:
        """First minute of ``key``'s steady data (not its hour, nor a trickle of strays before
        it): where its baselines may start."""
        if key not in self._firsts:
            self._firsts[key] = self._series[key].first_minute()
        return self._firsts[key]

    def children(self, key: SeriesKey) -> list[SeriesKey]:
        """The segments one level down: every channel of the global segment, the tracked
        campaigns of a channel (not ``__other__``: its members change), none of a campaign."""
        if self._channels is None:
            self._index()
        assert self._channels is not None
        scope, channel, _ = key
        if scope == "global":
            return list(self._channels)
        if scope == "channel":
            return list(self._by_channel.get(channel, ()))
        return []

    def _index(self) -> None:
        """Children of every parent in one pass, in segment order."""
        self._channels = []
        for key in self._series:
            scope, channel, campaign = key
            if scope == "channel":
                self._channels.append(key)
            elif scope == "campaign" and campaign != OTHER:
                self._by_channel.setdefault(channel, []).append(key)
