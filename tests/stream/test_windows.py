"""Buckets, windows and KPI maths against brute-force recomputation."""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream.windows import (
    CLICKS,
    IMPRESSIONS,
    MEASURES,
    MONEY_START,
    REVENUE,
    SETTLED_MARGIN_S,
    SPEND,
    Retention,
    SeriesBuckets,
    evaluation_minute,
    kpis,
    next_evaluation_in,
    sum_minutes,
    window_range,
)

N = len(MEASURES)
values_st = st.lists(st.integers(0, 10**9), min_size=N, max_size=N)


def test_kpis_are_ratios_of_sums_and_absent_on_zero_denominator() -> None:
    totals = [1000, 50, 5, 2, 1, 150_000_000, 100_000_000]  # revenue 150, spend 100
    result = kpis(totals)
    assert result["ctr"] == 0.05
    assert result["conversion_rate"] == 2 / 50
    assert result["lead_rate"] == 5 / 50
    assert result["cpc"] == 100 / 50
    assert result["cpl"] == 100 / 5
    assert result["cpa"] == 100 / 2
    assert result["cac"] == 100 / 1
    assert result["roas"] == 1.5
    assert result["roi"] == 0.5
    assert result["aov"] == 75
    assert kpis([0] * N) == {}
    only_impressions = kpis([10, 0, 0, 0, 0, 0, 0])
    assert only_impressions == {"ctr": 0.0}
    for value in result.values():
        assert math.isfinite(value)


def test_evaluation_minute_excludes_the_settle_period() -> None:
    # watermark 10:07:30, settle 60 s -> minutes up to 10:06 are complete -> end = 10:06
    watermark = (10 * 60 + 7) * 60_000 + 30_000
    assert evaluation_minute(watermark, 60_000) == 10 * 60 + 6
    assert window_range(606, 5) == (601, 606)


@settings(max_examples=200)
@given(
    writes=st.lists(st.tuples(st.integers(0, 4 * 1440), values_st), max_size=60),
    start=st.integers(0, 4 * 1440),
    length=st.integers(0, 2000),
)
def test_bucket_sums_match_brute_force(
    writes: list[tuple[int, list[int]]], start: int, length: int
) -> None:
    buckets = SeriesBuckets(Retention())
    reference: dict[int, list[int]] = {}
    for minute, values in writes:
        buckets.add(minute, values)
        row = reference.setdefault(minute, [0] * N)
        for i, v in enumerate(values):
            row[i] += v
    assert buckets.sum(start, start + length).tolist() == sum_minutes(
        reference, start, start + length
    )


def test_old_hours_fold_to_five_minutes_then_drop() -> None:
    retention = Retention(fine_hours=2, total_hours=5)
    buckets = SeriesBuckets(retention)
    for minute in range(0, 60):
        buckets.add(minute, [1] * N)
    buckets.expire(now_minute=4 * 60)  # hour 0 < 4 - 2: folded
    assert 0 in buckets.coarse and 0 not in buckets.blocks
    assert buckets.sum(0, 60).tolist() == [60] * N
    assert buckets.sum(0, 10).tolist() == [10] * N  # aligned 5-minute buckets stay exact
    buckets.add(3, [1] * N)  # very late write into a folded hour still counts
    assert buckets.sum(0, 5).tolist() == [6] * N
    assert buckets.expire(now_minute=6 * 60) == [0]
    assert buckets.empty()


def test_money_and_counts_stay_integers() -> None:
    buckets = SeriesBuckets(Retention())
    for _ in range(1000):
        buckets.add(5, [1, 1, 0, 0, 0, 100_001, 333_333])
    total = buckets.sum(0, 10)
    assert int(total[SPEND]) == 333_333_000
    assert int(total[REVENUE]) == 100_001_000
    assert int(total[IMPRESSIONS]) == int(total[CLICKS]) == 1000


@pytest.mark.parametrize("minute", [59, 60, 61, 1439, 1440])
def test_window_sums_across_hour_boundaries(minute: int) -> None:
    buckets = SeriesBuckets(Retention())
    buckets.add(minute, [1] * N)
    assert buckets.sum(minute, minute + 1).tolist() == [1] * N
    assert buckets.sum(minute - 5, minute).tolist() == [0] * N
    assert buckets.sum(minute + 1, minute + 6).tolist() == [0] * N


# --- snapshots (copy-on-write) ------------------------------------------------------

Table = tuple[dict[int, list[list[int]]], dict[int, list[list[int]]]]


def table(buckets: SeriesBuckets) -> Table:
    """Everything a series holds, as plain lists (the arrays may be shared)."""
    return (
        {h: b.tolist() for h, b in sorted(buckets.blocks.items())},
        {h: b.tolist() for h, b in sorted(buckets.coarse.items())},
    )


def window_sums(buckets: SeriesBuckets) -> list[list[int]]:
    """Sums of every hour and of a few windows across hour boundaries."""
    spans = [(h * 60, h * 60 + 60) for h in range(8)] + [(7, 68), (55, 65), (100, 400), (0, 480)]
    return [buckets.sum(start, end).tolist() for start, end in spans]


op_st = st.one_of(
    st.tuples(
        st.just("add"),
        st.integers(0, 8 * 60 - 1),
        st.lists(st.integers(0, 99), min_size=N, max_size=N),
    ),
    st.tuples(st.just("snapshot")),
    st.tuples(st.just("expire"), st.integers(0, 8 * 60)),
    st.tuples(st.just("expire_view"), st.integers(0, 8 * 60)),
)


@settings(max_examples=200, deadline=None)
@given(ops=st.lists(op_st, max_size=80))
def test_snapshots_keep_their_sums_while_the_series_moves_on(ops: list[tuple[Any, ...]]) -> None:
    """Writes (into minute blocks, new blocks and folded hours) and expiry of the live
    series never show in a snapshot taken before them, and the live series stays
    exactly what it would be had no snapshot been taken."""
    retention = Retention(fine_hours=2, total_hours=5)
    live, twin = SeriesBuckets(retention), SeriesBuckets(retention)
    views: list[tuple[SeriesBuckets, Table, list[list[int]]]] = []
    for op in ops:
        if op[0] == "add":
            live.add(op[1], op[2])
            twin.add(op[1], op[2])
        elif op[0] == "expire":
            assert live.expire(op[1]) == twin.expire(op[1])
        elif op[0] == "snapshot":
            view = live.snapshot()
            views.append((view, table(view), window_sums(view)))
        elif views:  # the evaluation folds its own snapshot: never the live series
            view, _, _ = views.pop()
            view.expire(op[1])
        assert table(live) == table(twin)
        assert live.dirty == twin.dirty
    assert window_sums(live) == window_sums(twin)
    for view, held, sums in views:
        assert table(view) == held
        assert window_sums(view) == sums


def test_a_block_is_copied_once_per_snapshot_and_only_when_written() -> None:
    live = SeriesBuckets(Retention())
    live.add(0, [1] * N)
    live.add(70, [1] * N)
    first, second = live.blocks[0], live.blocks[1]
    view = live.snapshot()
    live.add(1, [1] * N)
    copied = live.blocks[0]
    assert copied is not first and view.blocks[0] is first
    live.add(2, [1] * N)
    assert live.blocks[0] is copied, "written in place until the next snapshot"
    assert live.blocks[1] is second is view.blocks[1], "an unwritten block stays shared"
    assert view.sum(0, 60).tolist() == [1] * N and live.sum(0, 60).tolist() == [3] * N


def test_first_minute_skips_a_trickle_of_strays_but_not_a_sparse_series() -> None:
    """Out-of-order strays before a stream's start do not start its history (a baseline
    from them would be a fraction of the level); a series that is sparse all along starts
    at its first event; a folded hour counts by its 5-minute buckets."""
    series = SeriesBuckets(Retention())
    for minute in range(6000, 6050):
        series.add(minute, [1, 0, 0, 0, 0, 0, 0])
    for minute in range(6050, 6300):
        series.add(minute, [60, 2, 0, 0, 0, 0, 0])
    assert 6040 <= series.first_minute() <= 6050  # type: ignore[operator]
    sparse = SeriesBuckets(Retention())
    for minute in (6007, 6100, 6230):
        sparse.add(minute, [1, 0, 0, 0, 0, 0, 0])
    assert sparse.first_minute() == 6007
    assert SeriesBuckets(Retention()).first_minute() is None
    folded = SeriesBuckets(Retention(fine_hours=0))
    folded.add(6017, [3, 0, 0, 0, 0, 0, 0])
    folded.expire(6300)
    assert folded.first_minute() == 6015


def test_evaluation_comes_a_second_after_a_minute_settles() -> None:
    # 10:00:59 with a 60 s settle: minute 09:59 settles at 10:01:00, judged at 10:01:01
    now = 36_059.0
    assert next_evaluation_in(now, 10.0, 60.0) == pytest.approx(2.0)
    # far from a settling: the interval
    assert next_evaluation_in(36_030.0, 10.0, 60.0) == 10.0
    # just after one: the next settling is a minute away, so the interval
    assert next_evaluation_in(36_061.5, 10.0, 60.0) == 10.0


@given(st.floats(0, 1e9), st.sampled_from([1.0, 5.0, 10.0, 15.0, 30.0]), st.floats(0, 3600))
def test_ticks_keep_the_settling_phase(start: float, interval: float, settle: float) -> None:
    """Ticks never wait longer than the interval, and one falls within a second of every
    minute's settling once the first has come (no extra ticks when it divides a minute)."""
    now, ticks = start, []
    for _ in range(200):
        wait = next_evaluation_in(now, interval, settle)
        assert 0 <= wait <= interval
        now += wait
        ticks.append(now)
    phase = settle + SETTLED_MARGIN_S
    settled = [t for t in ticks if abs((t - phase) / 60 - round((t - phase) / 60)) * 60 < 1e-3]
    assert len(settled) >= int((ticks[-1] - ticks[0]) / 60) - 1
    per_minute = 60 / interval
    assert len(ticks) <= (ticks[-1] - start) / 60 * per_minute + per_minute + 2


def test_an_interval_over_a_minute_evaluates_at_the_last_settling_within_it() -> None:
    # 10:00:30, every 5 minutes, 60 s settle: minutes settle (+1 s) at 10:01:01, 10:02:01,
    # ... 10:05:01; the last within 10:05:30 is taken, not the first (once a minute)
    assert next_evaluation_in(36_030.0, 300.0, 60.0) == pytest.approx(271.0)
    # on a settling, the next tick is the settling 5 minutes on
    assert next_evaluation_in(36_061.0, 300.0, 60.0) == pytest.approx(300.0)
    # 90 s: one settling within it from a settling, so every minute (whole minutes only)
    assert next_evaluation_in(36_061.0, 90.0, 60.0) == pytest.approx(60.0)


@given(st.floats(0, 1e9), st.floats(60.0, 3600.0), st.floats(0, 3600))
def test_intervals_over_a_minute_tick_once_an_interval(
    start: float, interval: float, settle: float
) -> None:
    """Over a minute: never longer than the interval, every tick after the first on a
    settling, and the ticks a whole number of minutes apart, as many as fit the interval."""
    now, ticks = start, []
    for _ in range(50):
        wait = next_evaluation_in(now, interval, settle)
        assert 0 < wait <= interval + 1e-3
        now += wait
        ticks.append(now)
    phase = settle + SETTLED_MARGIN_S
    for t in ticks:  # within a millisecond of a settling (floats at 1e9 s: microseconds)
        assert abs((t - phase) / 60 - round((t - phase) / 60)) * 60 < 1e-3
    spacing = 60 * math.floor(interval / 60 + 1e-9)
    for a, b in itertools.pairwise(ticks[1:]):
        assert b - a == pytest.approx(spacing, abs=1e-3)


def _first_minute_reference(series: SeriesBuckets, steady: int = 10) -> int | None:
    """``first_minute`` as it was first written (one hour at a time, ``np.median``)."""
    hours = sorted([*series.blocks, *series.coarse])
    if not hours:
        return None
    spans = []
    for hour in range(hours[0], hours[0] + 6):
        rows = series.block(hour)
        if rows is None:
            spans.append(np.zeros(60))
        else:
            per = 60 // int(rows.shape[0])
            spans.append(np.repeat(rows[:, :MONEY_START].sum(axis=1) / per, per))
    minutes = np.concatenate(spans)
    ahead = np.convolve(minutes, np.ones(steady))[steady - 1 :]
    filled = ahead[ahead > 0]
    if not filled.size:
        return None
    usual = float(np.median(filled))
    return hours[0] * 60 + int(np.flatnonzero((minutes > 0) & (ahead * 4 >= usual))[0])


@settings(max_examples=300)
@given(
    cells=st.lists(st.tuples(st.integers(0, 500), st.integers(0, 7), st.integers(0, 40)),
                   max_size=60),
    dense_from=st.one_of(st.none(), st.integers(0, 480)),
    fold_at=st.one_of(st.none(), st.integers(0, 900)),
)  # fmt: skip
def test_first_minute_is_the_reference_computation(
    cells: list[tuple[int, int, int]], dense_from: int | None, fold_at: int | None
) -> None:
    """The one-pass first minute (whole minute blocks) is the hour-by-hour one exactly,
    medians of even counts (halves) included; folded hours go the hour-by-hour way."""
    series = SeriesBuckets(Retention(fine_hours=2, total_hours=48))
    if dense_from is not None:
        for minute in range(dense_from, dense_from + 420):  # 7 hours: whole blocks
            series.add(minute, [3 + minute % 7, minute % 3, 0, 0, 0, 5, 9])
    for minute, measure, count in cells:
        values = [0] * N
        values[measure % N] = count
        series.add(minute, values)
    if fold_at is not None:
        series.expire(fold_at)
    assert series.first_minute() == _first_minute_reference(series)
