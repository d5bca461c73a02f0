"""Event-time buckets, windows and KPI maths: pure functions and one small store.

The measures and KPIs themselves are defined in the catalogue, :mod:`stream.kpis`.

Measures are kept as integers (counts, and money in millionths), so window
sums are exact and independent of arrival order. A window is a run of complete
minutes ending (exclusively) at the evaluation minute; KPIs are ratios of the
window's sums and are absent when the denominator is zero.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from stream.kpis import (
    CLICKS,
    IMPRESSIONS,
    LEADS,
    MEASURES,
    MICROS,
    MONEY,
    N_MEASURES,
    NEW_CUSTOMERS,
    ORDERS,
    RATIOS,
    REVENUE,
    SPEND,
    measure_value,
)

__all__ = [  # the measures are re-exported: the core has long read them from here
    "CLICKS",
    "IMPRESSIONS",
    "LEADS",
    "MEASURES",
    "MICROS",
    "MINUTE_MS",
    "MONEY",
    "NEW_CUSTOMERS",
    "N_MEASURES",
    "ORDERS",
    "REVENUE",
    "SPEND",
    "WINDOWS",
    "Retention",
    "SeriesBuckets",
    "Totals",
    "evaluation_minute",
    "kpis",
    "measure_value",
    "minute_of",
    "sum_minutes",
    "window_range",
]

WINDOWS: dict[str, int] = {"5m": 5, "15m": 15, "1h": 60, "24h": 1440}
MINUTE_MS = 60_000
MONEY_START = min(MONEY)  # the count measures come first in MEASURES

Totals = npt.NDArray[np.int64]
# (name, numerator index, denominator index, shift) of every ratio KPI, for the hot loop.
_TERMS = tuple((k.name, k.num, k.den, k.shift) for k in RATIOS)


def kpis(totals: Sequence[int] | Totals) -> dict[str, float]:
    """All ratio KPIs of the catalogue for one window's sums; absent on a 0 denominator."""
    values = [measure_value(i, int(v)) for i, v in enumerate(totals)]
    result: dict[str, float] = {}
    for name, num, den, shift in _TERMS:
        denominator = values[den]
        if denominator <= 0:
            continue
        numerator = values[num] + shift * denominator if shift else values[num]
        result[name] = numerator / denominator
    return result


def minute_of(ts_ms: int) -> int:
    return ts_ms // MINUTE_MS


def evaluation_minute(watermark_ms: int, settle_ms: int) -> int:
    """First minute *not* yet complete: windows end (exclusively) here."""
    return minute_of(watermark_ms - settle_ms)


SETTLED_MARGIN_S = 1.0
"""Evaluate this long after a minute settles: the events stamped at its last instant
are then through the pipeline's hops."""


def next_evaluation_in(now_s: float, interval_s: float, settle_s: float) -> float:
    """Seconds to the next evaluation: the last settling of a minute within the interval,
    else the interval.

    A settled minute is then judged about a second after it settles rather than up to
    an interval later (by ``bench/demo_alert``'s model, about 4 points more of the demo's
    CTR drops alerted within 3 minutes). With an interval that divides a minute the ticks
    stay on that phase, so this adds no tick. With an interval over a minute several
    minutes settle within it: the last one is taken, so the ticks come about once an
    interval (each on a settling), not once a minute.
    """
    phase = settle_s + SETTLED_MARGIN_S
    next_settled = (math.floor((now_s - phase) / 60) + 1) * 60 + phase
    if next_settled - now_s < 1e-3:  # on the settling itself (rounding): the next one
        next_settled += 60
    if next_settled - now_s > interval_s:
        return interval_s
    # (1 ms of slack: an interval of whole minutes lands on a settling despite rounding)
    spare = now_s + interval_s - next_settled + 1e-3
    last = next_settled + 60 * max(0, math.floor(spare / 60))
    return last - now_s


def window_range(end_minute: int, minutes: int) -> tuple[int, int]:
    """The minutes [start, end) of a window of ``minutes`` ending at ``end_minute``."""
    return end_minute - minutes, end_minute


def sum_minutes(buckets: Mapping[int, Sequence[int]], start: int, end: int) -> list[int]:
    """Brute-force window sum over a minute -> measures mapping (reference for tests)."""
    total = [0] * N_MEASURES
    for minute, values in buckets.items():
        if start <= minute < end:
            for i, v in enumerate(values):
                total[i] += v
    return total


@dataclass(frozen=True)
class Retention:
    """How long buckets are kept: minutes for ``fine_hours``, 5-minute buckets after."""

    fine_hours: int = 48
    total_hours: int = 8 * 24 + 1


class SeriesBuckets:
    """Per-minute measure sums of one series, in hour blocks.

    Blocks of the last ``fine_hours`` hold 60 minutes; older blocks are folded
    into twelve 5-minute buckets (enough for week-over-week baselines); blocks
    older than ``total_hours`` are dropped. Dirty blocks are tracked so that
    only changed blocks are written to the changelog.

    :meth:`snapshot` shares the blocks copy-on-write, so the windows can be
    evaluated off the event loop while this series takes more cells: every
    in-place write goes through :meth:`writable`, which copies a block a
    snapshot still shares before its first write after that snapshot.
    """

    __slots__ = ("blocks", "coarse", "dirty", "owned", "retention")

    def __init__(self, retention: Retention) -> None:
        self.retention = retention
        self.blocks: dict[int, Totals] = {}  # hour -> (60, N) minute sums
        self.coarse: dict[int, Totals] = {}  # hour -> (12, N) 5-minute sums
        self.dirty: set[int] = set()
        self.owned: set[int] | None = None
        """Hours whose array no snapshot shares; None: no snapshot was ever taken."""

    def add(self, minute: int, values: Sequence[int]) -> None:
        hour, offset = divmod(minute, 60)
        block = self.blocks.get(hour)
        if block is None:
            if hour in self.coarse:  # a very late write into a folded hour
                self.writable(hour)[offset // 5] += np.asarray(values, dtype=np.int64)
                self.dirty.add(hour)
                return
            block = self.blocks[hour] = np.zeros((60, N_MEASURES), dtype=np.int64)
            self._own(hour)
        elif self.owned is not None and hour not in self.owned:
            block = self.writable(hour)
        block[offset] += np.asarray(values, dtype=np.int64)
        self.dirty.add(hour)

    def writable(self, hour: int) -> Totals:
        """The array of ``hour`` (minute block, else folded), safe to change in place."""
        table = self.blocks if hour in self.blocks else self.coarse
        block = table[hour]
        owned = self.owned
        if owned is not None and hour not in owned:
            block = table[hour] = block.copy()
            owned.add(hour)
        return block

    def _own(self, hour: int) -> None:
        """The array of ``hour`` was just created here: no snapshot shares it."""
        if self.owned is not None:
            self.owned.add(hour)

    def snapshot(self) -> SeriesBuckets:
        """A copy that no later change to this series alters, sharing the arrays.

        Costs two dict copies (~50 and ~150 entries at full retention); each block
        is then copied at most once, by the next write to it.
        """
        view = SeriesBuckets(self.retention)
        view.blocks = dict(self.blocks)
        view.coarse = dict(self.coarse)
        view.owned = set()  # the snapshot shares every array too
        self.owned = set()
        return view

    def sum(self, start: int, end: int) -> Totals:
        """Sums over minutes [start, end); folded hours count by 5-minute bucket."""
        total = np.zeros(N_MEASURES, dtype=np.int64)
        if end <= start:
            return total
        for hour in range(start // 60, (end - 1) // 60 + 1):
            lo = max(start - hour * 60, 0)
            hi = min(end - hour * 60, 60)
            block = self.blocks.get(hour)
            if block is not None:
                total += block[lo:hi].sum(axis=0)
                continue
            coarse = self.coarse.get(hour)
            if coarse is not None:
                total += coarse[lo // 5 : (hi + 4) // 5].sum(axis=0)
        return total

    def expire(self, now_minute: int) -> list[int]:
        """Fold and drop old blocks; returns hours that were dropped entirely."""
        now_hour = now_minute // 60
        for hour in [h for h in self.blocks if h < now_hour - self.retention.fine_hours]:
            self.coarse[hour] = _fold(self.blocks.pop(hour))
            self._own(hour)
            self.dirty.add(hour)
        dropped = [h for h in self.coarse if h < now_hour - self.retention.total_hours]
        for hour in dropped:
            del self.coarse[hour]
            self.dirty.discard(hour)
        return dropped

    def merge(self, other: SeriesBuckets) -> None:
        """Add another series' buckets into this one (a demoted id into ``__other__``)."""
        for hour, block in other.blocks.items():
            if hour in self.blocks:
                self.writable(hour)[:] += block
            elif hour in self.coarse:
                self.writable(hour)[:] += _fold(block)
            else:
                self.blocks[hour] = block.copy()
                self._own(hour)
            self.dirty.add(hour)
        for hour, coarse in other.coarse.items():
            if hour in self.blocks:
                self.coarse[hour] = _fold(self.blocks.pop(hour)) + coarse
                self._own(hour)
            elif hour in self.coarse:
                self.writable(hour)[:] += coarse
            else:
                self.coarse[hour] = coarse.copy()
                self._own(hour)
            self.dirty.add(hour)

    def history_start(self) -> int | None:
        """First minute of the first hour holding data (minute or folded); None if empty."""
        hours = [*self.blocks, *self.coarse]
        return min(hours) * 60 if hours else None

    def first_minute(self, steady: int = 10) -> int | None:
        """First minute of steady data: the first minute holding data whose next ``steady``
        minutes hold at least a quarter of what ``steady`` minutes usually hold (the
        median over the first hours). A trickle of stray events before the rest (out of
        order, from before a stream's start) does not start its history; a sparse series
        starts at its first event. Counts only (money would outweigh them); folded hours
        count by 5-minute bucket."""
        hours = sorted([*self.blocks, *self.coarse])
        if not hours:
            return None
        counts = slice(0, MONEY_START)
        first = range(hours[0], hours[0] + 6)  # steady data starts within hours
        fine = [self.blocks[hour] for hour in first if hour in self.blocks]
        minutes: npt.NDArray[np.float64]
        if len(fine) == len(first):  # the usual case, in one pass
            minutes = np.concatenate(fine)[:, counts].sum(axis=1).astype(np.float64)
        else:
            spans: list[npt.NDArray[np.float64]] = []
            for hour in first:
                rows = self.block(hour)
                if rows is None:
                    spans.append(np.zeros(60))
                else:
                    per = 60 // int(rows.shape[0])
                    spans.append(np.repeat(rows[:, counts].sum(axis=1) / per, per))
            minutes = np.concatenate(spans)
        ahead = np.convolve(minutes, np.ones(steady))[steady - 1 :]
        filled = np.sort(ahead[ahead > 0])
        if not filled.size:
            return None
        middle = filled.size // 2  # the median, as np.median computes it
        usual = float(
            filled[middle] if filled.size % 2 else (filled[middle - 1] + filled[middle]) / 2
        )
        steady_at = np.flatnonzero((minutes > 0) & (ahead * 4 >= usual))
        return hours[0] * 60 + int(steady_at[0])

    def block(self, hour: int) -> Totals | None:
        block = self.blocks.get(hour)
        return block if block is not None else self.coarse.get(hour)

    def load_block(self, hour: int, data: Totals) -> None:
        """Restore one block from the changelog (60 rows = minutes, 12 = folded)."""
        self.blocks.pop(hour, None)
        self.coarse.pop(hour, None)
        target = self.blocks if data.shape[0] == 60 else self.coarse
        target[hour] = data.astype(np.int64, copy=True)
        self._own(hour)

    def empty(self) -> bool:
        return not self.blocks and not self.coarse


def _fold(block: Totals) -> Totals:
    """An hour of minute sums (60 rows) as twelve 5-minute sums."""
    folded: Totals = block.reshape(12, 5, N_MEASURES).sum(axis=1)
    return folded
