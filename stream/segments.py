"""A read-only view of a scope snapshot's segments: the one way alerts read window sums.

The alert engine judges every rule for every segment, and rules share windows and
baselines (ten KPIs over the same 15 minutes), so each sum is computed once for the
view's life: one tick. Built from the ``series`` of a snapshot nothing else changes,
the view never goes stale within its tick, and the engine never sees how the sums are
stored (minute blocks, folded hours), so storage can change without touching alerts.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from stream.aggregate import OTHER, SeriesKey
from stream.windows import SeriesBuckets, Totals


class SegmentView:
    """Segment keys, memoised window sums, history starts and children of one snapshot."""

    __slots__ = ("_by_channel", "_channels", "_firsts", "_series", "_starts", "_sums")

    def __init__(self, series: Mapping[SeriesKey, SeriesBuckets]) -> None:
        self._series = series
        self._sums: dict[tuple[SeriesKey, int, int], Totals] = {}
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
            totals = self._sums[(key, start, end)] = self._series[key].sum(start, end)
        return totals

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
