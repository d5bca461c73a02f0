"""The alerts' read seam: sums as the buckets give them, memoised; children; history start."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from stream.aggregate import OTHER, SeriesKey
from stream.kpis import N_MEASURES
from stream.segments import SegmentView
from stream.windows import Retention, SeriesBuckets

names = st.sampled_from(["search", "social", OTHER])
keys_st = st.one_of(
    st.just(("global", "", "")),
    st.tuples(st.just("channel"), names, st.just("")),
    st.tuples(st.just("campaign"), names, st.sampled_from(["c1", "c2", OTHER])),
)


def _series(minutes: dict[SeriesKey, list[int]]) -> dict[SeriesKey, SeriesBuckets]:
    series = {}
    for key, at in minutes.items():
        buckets = series[key] = SeriesBuckets(Retention(fine_hours=2, total_hours=10))
        for i, minute in enumerate(at):
            buckets.add(minute, [i + 1] * N_MEASURES)
    return series


@settings(max_examples=100)
@given(
    minutes=st.dictionaries(keys_st, st.lists(st.integers(0, 600), max_size=20), max_size=8),
    spans=st.lists(st.tuples(st.integers(-60, 700), st.integers(0, 120)), min_size=1, max_size=5),
)
def test_sums_are_the_buckets_sums_computed_once(
    minutes: dict[SeriesKey, list[int]], spans: list[tuple[int, int]]
) -> None:
    series = _series(minutes)
    view = SegmentView(series)
    assert list(view) == list(series) and len(view) == len(series)
    for key, buckets in series.items():
        assert key in view
        for start, length in spans:
            total = view.sum(key, start, start + length)
            assert total.tolist() == buckets.sum(start, start + length).tolist()
            assert view.sum(key, start, start + length) is total  # memoised for the tick


@given(minutes=st.dictionaries(keys_st, st.just([5]), max_size=12))
def test_children_one_level_down_without_folded_campaigns(
    minutes: dict[SeriesKey, list[int]],
) -> None:
    view = SegmentView(_series(minutes))
    for key in minutes:
        scope, channel, _ = key
        children = view.children(key)
        if scope == "global":
            assert children == [k for k in minutes if k[0] == "channel"]
        elif scope == "channel":
            expected = [k for k in minutes if k[0] == "campaign" and k[1] == channel]
            assert children == [k for k in expected if k[2] != OTHER]
        else:
            assert children == []


def test_history_start_is_the_first_hour_with_data_folded_or_not() -> None:
    series = _series({("global", "", ""): [], ("channel", "search", ""): [130, 70]})
    view = SegmentView(series)
    assert view.history_start(("global", "", "")) is None
    assert view.history_start(("channel", "search", "")) == 60
    buckets = series[("channel", "search", "")]
    buckets.expire(5 * 60)  # hour 1 and 2 fold into 5-minute buckets
    assert not buckets.blocks and buckets.history_start() == 60


@settings(max_examples=150)
@given(
    at=st.lists(st.integers(0, 900), max_size=30),
    expire_at=st.one_of(st.none(), st.integers(0, 1200)),
    late=st.lists(st.integers(0, 900), max_size=4),
    spans=st.lists(st.tuples(st.integers(-60, 1000), st.integers(-3, 600)), min_size=1,
                   max_size=8),
)  # fmt: skip
def test_sums_from_running_totals_are_the_buckets_sums_with_folded_hours(
    at: list[int], expire_at: int | None, late: list[int], spans: list[tuple[int, int]]
) -> None:
    """Running totals cover the recent minute blocks only: sums reaching folded hours,
    older blocks, late writes into folded hours, or beyond the data are still exact."""
    key = ("global", "", "")
    buckets = _series({key: at})[key]
    if expire_at is not None:
        buckets.expire(expire_at)
    for i, minute in enumerate(late):  # after the fold: into folded hours or new blocks
        buckets.add(minute, [100 + i] * N_MEASURES)
    view = SegmentView({key: buckets})
    for start, length in spans:
        assert view.sum(key, start, start + length).tolist() == (
            buckets.sum(start, start + length).tolist()
        )
