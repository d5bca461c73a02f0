"""Baselines: what a segment's measures are expected to be in one minute, and how sure that is.

The detectors (``alerts.detectors``) judge each settled minute against an expected value,
so the baseline is per minute, not per window, and says how much data stands behind it:

- The trailing level: the measures' mean per minute over the span just before the
  minutes under judgement. Volumes follow the day (traffic doubles from night to
  afternoon), so a long span would lag behind the level: theirs is an hour. Ratios
  (clicks per impression, orders per unit spend) hardly move with the level, so their
  span is three hours, for three times the evidence; six for CTR (``RATE_MINUTES``).
- The daily and weekly shape, once the history holds them: the same minutes yesterday
  and last week (half an hour around them), scaled to the recent level by the ratio of
  today's trailing span to the same span that day. So a Monday-morning ramp is expected
  on Monday morning, from the first minute of it, instead of being lagged behind. The
  factor is the segment's traffic's (its most numerous count), one for all measures: a
  small campaign's orders of half an hour yesterday are too few to shape anything
  (``_day_factor``), and a ratio's baseline is then unshaped (the factor cancels).
- How sure: each measure's expected value carries the counts it was estimated from
  (1 / its relative variance). A fresh deployment, with five minutes of history, is judged
  from then on, but a baseline from a few counts raises the detectors' thresholds
  (``alerts.detectors.inflated``): it cannot be told from a change by little data, and it
  is not taken as exact.

Pure: the sums come from a :class:`~stream.segments.SegmentView`, no clock, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from stream.aggregate import SeriesKey
from stream.kpis import LUMPY, MONEY, N_MEASURES
from stream.segments import SegmentView

DAY, WEEK = 1440, 7 * 1440
MIN_HISTORY = 5
"""Minutes of history before a segment is judged at all (a fresh deployment, a new
campaign): fewer hardly say anything about a level. From then on the baseline is used
with its uncertainty counted (the detectors discount evidence against a short one)."""
LEVEL_MINUTES = 60
"""Trailing span of volumes: an hour lags the day's shape by half an hour (~8% at the
steepest slope of the simulator's day) before the daily shape is known."""
RATIO_MINUTES = 180
"""Trailing span of ratios, which the day's level cancels out of."""
RATE_MINUTES = 360
"""Trailing span of proportions whose trials come in the same minute (CTR: clicks given
impressions). A small segment's detection is bound by its baseline's information: each
minute's evidence counts ``1 / (1 + h / (c(r) x counts))`` (``alerts.detectors.discount``),
so a campaign with ~1,300 clicks in 3 h weighs a 25% drop's evidence 0.74 (a 30% CTR drop
of the small shop took ~1.5x its bound, and one trial in four more than 2x), with 6 h of
clicks 0.85. Neither the day's level nor the lag of orders behind clicks is in them, so
they may look further back than conversions (which trail, and judge against maturing
clicks) and spend (its reporting blocks, fitted over RATIO_MINUTES)."""
SHAPE_MINUTES = 30
"""The span around the same minute yesterday / last week that gives the day's shape (its
information is counted: a small segment's shape is known roughly, and judged so). History
older than two days is kept in 5-minute buckets, so last week's spans are aligned to 5."""
MAX_SHAPE = 4.0
"""Bound of the daily shape's factor: within an hour, traffic hardly moves fourfold, and a
day whose history was thin (a campaign's first hours) must not multiply a baseline."""
FREEZE_MINUTES = 120
"""How far behind the judged minute a baseline may stay frozen at the start of an
excursion (``alerts.detectors``): a lasting change (a campaign paused on purpose) becomes
the new normal after two hours, and its alert resolves."""
TRIMMED = 3
"""Minutes of a reporting block whose spend is replaced by the block's median
(``block_sums``): a segment's report minutes (one per campaign, often sharing a minute) and
one more, a report that came with the wrong block."""
FREEZE_HISTORY = 60
"""Minutes of history a baseline needs before an excursion may freeze it."""

Floats = npt.NDArray[np.float64]
Totals = npt.NDArray[np.int64]
COUNTS = tuple(m for m in range(N_MEASURES) if m not in MONEY)
"""Measures that are counts (money is not: its sums say nothing of their precision)."""


@dataclass(frozen=True)
class Expected:
    """Expected measures per minute (money in micros) and the counts behind each."""

    rate: Floats
    counts: Floats
    """Information of each measure's expected value: 1 / relative variance (0: none)."""
    minutes: int
    """Length of the trailing span it was estimated from."""
    kind: str
    """How it was made, for alert texts: "previous 60 min", "... and daily shape"."""
    ratio_counts: Floats | None = None
    """Information of each measure's trailing level alone (None: ``counts``): what a ratio
    of two measures is known from, since the day's factor, common to all measures,
    cancels out of it."""


def _align(minute: int) -> int:
    return minute - minute % 5


def _information(*sums: Floats) -> Floats:
    """1 / the relative variance of a product or ratio of Poisson-like sums (0 where one
    of them is empty: nothing is known)."""
    known = np.ones(N_MEASURES, dtype=bool)
    variance = np.zeros(N_MEASURES)
    for s in sums:
        known &= s > 0
        variance += 1.0 / np.where(s > 0, s, 1.0)
    return np.where(known, 1.0 / variance, 0.0)


class Recent:
    """Baselines by the sums they were computed from, in this tick and the one before
    (:func:`expected`'s ``memo``): what a tick does not ask for again is forgotten."""

    __slots__ = ("before", "now")

    def __init__(self) -> None:
        self.now: dict[tuple[object, ...], Expected] = {}
        self.before: dict[tuple[object, ...], Expected] = {}

    def next_tick(self) -> None:
        self.before, self.now = self.now, {}

    def get(self, inputs: tuple[object, ...]) -> Expected | None:
        found = self.now.get(inputs)
        if found is None:
            found = self.before.get(inputs)
            if found is not None:
                self.now[inputs] = found
        return found

    def put(self, inputs: tuple[object, ...], value: Expected) -> Expected:
        self.now[inputs] = value
        return value


def _day_factor(before: Floats, at: Floats, span: int) -> tuple[float, float] | None:
    """The day's factor from one earlier day: its traffic ``at`` the judged minute's
    SHAPE_MINUTES over its ``before`` span's (``span`` minutes; sums of every measure), and
    its relative variance. None where that day holds no traffic in both.

    One factor for all measures, from the count measured most precisely there (traffic:
    impressions, where the segment has them): the day moves traffic, and orders, leads
    and clicks with it (a ratio of two measures hardly follows the day). A count's own
    shape would be the ratio of two thin sums in a small segment (a campaign's orders of
    half an hour yesterday: a few), skewed upwards by chance well beyond what its variance
    says, which the detectors' discount for an uncertain baseline does not cover: in
    simulated campaigns of 0.05-0.3 orders a minute, 1% of such shaped expectations were
    3-6x the truth (``tests/alerts/test_day_shape.py``), and a volume-drop CUSUM judged
    against them gathers evidence of a drop that is not there.
    """
    usable = [m for m in COUNTS if before[m] > 0 and at[m] > 0]
    if not usable:
        return None
    traffic = max(usable, key=lambda m: float(before[m] + at[m]))
    factor = float(at[traffic] / SHAPE_MINUTES) / float(before[traffic] / span)
    variance = 1.0 / float(before[traffic]) + 1.0 / float(at[traffic])
    return min(MAX_SHAPE, max(1 / MAX_SHAPE, factor)), variance


def expected(
    segments: SegmentView, key: SeriesKey, minute: int, end: int, span: int,
    memo: Recent | None = None,
) -> Expected | None:  # fmt: skip
    """The baseline of ``key`` at ``minute`` from its history before minute ``end``.

    ``span``: the trailing span (LEVEL_MINUTES, RATIO_MINUTES or RATE_MINUTES). None
    until the segment has MIN_HISTORY minutes of history before ``end``. ``memo``: baselines by the
    sums they are computed from, kept by the caller across ticks: a detector in an
    excursion judges every minute against the same span (its baseline stops where the
    excursion began), so its sums, and its baseline, are those of the tick before unless
    late events restated them.
    """
    first = segments.first_minute(key)
    if first is None:
        return None
    start = max(first, end - span)
    if end - start < MIN_HISTORY:
        return None
    trailing = segments.sum(key, start, end)
    days: list[tuple[str, Totals, Totals]] = []
    for lag, name in ((DAY, "yesterday"), (WEEK, "last week")):
        align = _align if lag > DAY else int
        then = align(end - span - lag)
        around = align(minute - lag - SHAPE_MINUTES // 2)
        if end - start < span or first > min(then, around):
            continue  # the history does not hold that day's span yet
        before = segments.sum(key, then, then + span)
        at = segments.sum(key, around, around + SHAPE_MINUTES)
        days.append((name, before, at))
    if memo is None:
        return _expected(trailing, end - start, span, days)
    inputs = (end - start, span, trailing.tobytes(),
              *((n, b.tobytes(), a.tobytes()) for n, b, a in days))  # fmt: skip
    found = memo.get(inputs)
    if found is None:
        found = memo.put(inputs, _expected(trailing, end - start, span, days))
    return found


def _expected(
    totals: Totals, minutes: int, span: int, days: list[tuple[str, Totals, Totals]]
) -> Expected:
    """:func:`expected` from its sums: the trailing ``minutes``' ``totals``, and per day
    whose shape the history holds, its name, its sums over the trailing span and around
    the minute."""
    trailing = totals.astype(np.float64)
    level = trailing / minutes
    factors: list[float] = []
    variances: list[float] = []
    names = []
    for name, before_sums, at_sums in days:
        day = _day_factor(before_sums.astype(np.float64), at_sums.astype(np.float64), span)
        if day is None:
            continue
        factors.append(day[0])
        variances.append(day[1])
        names.append(name)
    counts = _information(trailing)
    ratio_counts = counts
    kind = f"previous {minutes} min"
    if factors:
        level = level * (sum(factors) / len(factors))
        extra = sum(variances) / len(factors) ** 2
        with np.errstate(divide="ignore"):
            total = np.where(counts > 0, 1.0 / np.maximum(counts, 1e-300), np.inf) + extra
        counts = np.where(np.isfinite(total), 1.0 / total, 0.0)
        kind += f" shaped like {' and '.join(names)}"
    return Expected(level, counts, minutes, kind, ratio_counts)


def block_sums(segments: SegmentView, key: SeriesKey, start: int, block: int) -> Floats:
    """Sums of ``key`` over the ``block`` minutes from ``start``, with each lumpy measure
    (spend) *trimmed*: its ``TRIMMED`` largest minutes counted as the block's median minute.

    A report lands in one minute: trimming drops the reports' minutes from the block, the
    same way in every block, so a block that holds a report too many (one that came late,
    or early) looks like any other, while a price rise, which raises every minute, shows
    whole. Blocks judged and blocks a dispersion is fitted to are trimmed alike."""
    minutes = np.array([segments.sum(key, m, m + 1) for m in range(start, start + block)],
                       dtype=np.float64).reshape(block, N_MEASURES)  # fmt: skip
    sums: Floats = minutes.sum(axis=0)
    for m in LUMPY:
        top = np.sort(minutes[:, m])[-TRIMMED:]
        sums[m] += float(np.median(minutes[:, m])) * len(top) - float(top.sum())
    return sums


def blocks(
    segments: SegmentView, key: SeriesKey, until: int, span: int, block: int,
    memo: dict[tuple[SeriesKey, int, int], Floats] | None = None,
) -> Floats:  # fmt: skip
    """:func:`block_sums` of ``key``'s whole clock-aligned blocks of ``block`` minutes
    within the ``span`` minutes of history before ``until`` (one row per block, oldest
    first): what a reporting block is judged against (``alerts.detectors.unit``). Empty
    before the segment's first whole block. ``memo``: block sums by (key, start, block),
    for one view (the histories of successive blocks overlap but for one block)."""
    starts = block_starts(segments.first_minute(key), until, span, block)
    if memo is None:
        rows = [block_sums(segments, key, b, block) for b in starts]
    else:
        rows = []
        for b in starts:
            sums = memo.get((key, b, block))
            if sums is None:
                sums = memo[(key, b, block)] = block_sums(segments, key, b, block)
            rows.append(sums)
    return np.array(rows, dtype=np.float64).reshape(len(rows), N_MEASURES)


def block_starts(first: int | None, until: int, span: int, block: int) -> range:
    """First minutes of the whole clock-aligned blocks of ``block`` minutes within the
    ``span`` minutes before ``until``, from minute ``first`` of the history (None: none)."""
    if first is None:
        return range(0)
    start = max(first, until - span)
    start += -start % block
    return range(start, until - block + 1, block)
