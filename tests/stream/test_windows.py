"""Buckets, windows and KPI maths against brute-force recomputation."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream.windows import (
    CLICKS,
    IMPRESSIONS,
    MEASURES,
    REVENUE,
    SPEND,
    Retention,
    SeriesBuckets,
    evaluation_minute,
    kpis,
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
