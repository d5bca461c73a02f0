"""Dedup, attribution, lateness and scope sums against a brute-force model of the raw events."""

from __future__ import annotations

import copy
import itertools
from collections import Counter
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream import codec
from stream.aggregate import (
    OTHER,
    UNATTRIBUTED,
    BatchOutput,
    DedupState,
    Horizons,
    SegmentStore,
    key_hash,
)
from stream.windows import MEASURES, SPEND, WINDOWS, kpis

N = len(MEASURES)
T0 = 1_795_000_000_000 - 1_795_000_000_000 % 3_600_000  # an hour boundary
MIN = 60_000


def routed(
    kind: str, key: str, ts: int, campaign: str | None = "c1", channel: str = "search",
    click: str | None = None, spend: int = 0, revenue: int = 0, new: bool = False,
) -> list[Any]:  # fmt: skip
    return [kind, key, ts, campaign, channel, click, spend, revenue, new, ts, None]


Model = tuple[dict[Any, list[int]], Counter[str], Counter[str]]
HORIZON = {"impression": 60, "click": 60, "lead": 1440, "order": 1440, "spend": 1440}


def reference(batches: list[list[list[Any]]], now_ms: int) -> Model:
    """The contract in its plainest form: an event counts once unless its type's dedup
    horizon, measured against the clock (the newest event time before its batch, at most
    ``now_ms``), no longer covers it; then it is late. A lead or order goes to its click's
    campaign, whichever came first, as long as the click can count (its horizon, from
    the lead's or order's minute, covers the clock)."""
    counted: dict[tuple[str, str], int] = {}  # key -> minute its dedup entry expires
    clicks: dict[str, tuple[str, str]] = {}
    waiting: dict[str, list[tuple[str, int, list[int]]]] = {}  # click -> (channel, minute, row)
    cells: dict[Any, list[int]] = {}
    dups: Counter[str] = Counter()
    late: Counter[str] = Counter()
    max_ts = clock = 0

    def add(cell: Any, values: list[int], sign: int = 1) -> None:
        row = cells.setdefault(cell, [0] * N)
        cells[cell] = [a + sign * b for a, b in zip(row, values, strict=True)]

    for batch in batches:
        clock = max(clock, min(max_ts, now_ms))
        for kind, key, ts, campaign, channel, click, spend, revenue, new, _, _ in batch:
            expires = ts // MIN + HORIZON[kind]
            if counted.get((kind, key), -1) >= clock // MIN:
                dups[kind] += 1
                continue
            if expires < clock // MIN:
                late[kind] += 1
                continue
            counted[(kind, key)] = expires
            max_ts = max(max_ts, ts)
            values = [0] * N
            index = {"impression": 0, "click": 1, "lead": 2, "order": 3}.get(kind)
            if index is not None:
                values[index] += 1
            if kind == "order":
                values[4] += int(new)
                values[5] += revenue
            elif kind != "lead":
                values[6] += spend
            if kind == "click" and click is not None:
                clicks[click] = (campaign, channel)
                for own, minute, moved in waiting.pop(click, []):
                    if minute + HORIZON["click"] >= clock // MIN:
                        add((own, UNATTRIBUTED, minute), moved, -1)
                        add((channel if own == "unknown" else own, campaign, minute), moved)
            elif campaign is None:
                if click in clicks:
                    campaign = clicks[click][0]
                    channel = clicks[click][1] if channel == "unknown" else channel
                else:
                    campaign = UNATTRIBUTED
                    if click is not None:
                        waiting.setdefault(click, []).append((channel, ts // MIN, values))
            add((channel, campaign, ts // MIN), values)
    return cells, dups, late


event_st = st.builds(
    routed,
    kind=st.sampled_from(["impression", "click", "lead", "order", "spend"]),
    key=st.sampled_from([f"e{i}" for i in range(30)]),
    ts=st.integers(T0, T0 + 150 * MIN),
    campaign=st.sampled_from(["c1", "c2", None]),
    channel=st.sampled_from(["search", "social", "unknown"]),
    click=st.sampled_from([None, "k1", "k2", "k3"]),
    spend=st.integers(0, 5_000_000),
    revenue=st.integers(0, 90_000_000),
    new=st.booleans(),
).map(
    lambda ev: ev if ev[3] is not None or ev[0] in ("lead", "order") else [*ev[:3], "c1", *ev[4:]]
)


@settings(max_examples=300)
@given(
    events=st.lists(event_st, max_size=80),
    cuts=st.lists(st.integers(0, 80), max_size=4),
    shuffle=st.randoms(use_true_random=False),
)
def test_partition_state_matches_the_plain_model(
    events: list[list[Any]], cuts: list[int], shuffle: Any
) -> None:
    """Batches over 2.5 h of event time, in any order: every event is counted, a duplicate
    or late, and the counted ones sum exactly as the model says."""
    now = T0 + 160 * MIN
    bounds = [0, *sorted(cuts), len(events)]
    batches = [events[a:b] for a, b in itertools.pairwise(bounds)]
    state = DedupState()
    out = BatchOutput()
    for batch in batches:
        state.apply(batch, now, out)
    cells, dups, late = reference(batches, now)
    assert {k: v for k, v in out.cells.items() if any(v)} == {
        k: v for k, v in cells.items() if any(v)
    }
    assert out.duplicates == dups
    assert out.late == late
    assert [t.event for t in out.too_late] == [
        ev for ev in events if any(ev is t.event for t in out.too_late)
    ]
    assert sum(out.applied.values()) + dups.total() + late.total() == len(events)
    # Within one batch the order does not matter: the clock moves between batches only.
    # (Copies of one event are alike, as real duplicates are.)
    first: dict[tuple[str, str], list[Any]] = {}
    for ev in events:
        first.setdefault((ev[0], ev[1]), ev)
    batches = [[first[(ev[0], ev[1])] for ev in batch] for batch in batches]
    out = BatchOutput()
    state = DedupState()
    for batch in batches:
        state.apply(batch, now, out)
    again, reordered = DedupState(), BatchOutput()
    for batch in batches:
        shuffled = list(batch)
        shuffle.shuffle(shuffled)
        again.apply(shuffled, now, reordered)
    assert reordered.applied == out.applied and reordered.late == out.late
    assert reordered.duplicates == out.duplicates

    def by_minute(cells: dict[Any, list[int]]) -> dict[int, list[int]]:
        """Attribution may differ (an order before its click), the minute sums may not."""
        sums: dict[int, list[int]] = {}
        for (_, _, minute), values in cells.items():
            row = sums.setdefault(minute, [0] * N)
            sums[minute] = [a + b for a, b in zip(row, values, strict=True)]
        return sums

    assert by_minute(reordered.cells) == by_minute(out.cells)


def test_attribution_by_click_id_and_unattributed() -> None:
    state = DedupState()
    out = state.apply(
        [
            routed("click", "k-ev", T0, campaign="c7", channel="social", click="k9"),
            routed(
                "order",
                "o1",
                T0 + MIN,
                campaign=None,
                channel="unknown",
                click="k9",
                revenue=5_000_000,
                new=True,
            ),
            routed("lead", "l1", T0 + MIN, campaign=None, channel="email", click="k9"),
            routed("order", "o2", T0 + MIN, campaign=None, click="nope", revenue=1),
            routed("lead", "l2", T0 + MIN, campaign=None, click=None),
        ],
        now_ms=T0 + 2 * MIN,
    )
    minute = (T0 + MIN) // MIN
    assert out.cells[("social", "c7", minute)][3:6] == [1, 1, 5_000_000]
    assert out.cells[("email", "c7", minute)][2] == 1  # the lead keeps its own channel
    assert out.cells[("search", UNATTRIBUTED, minute)][2:4] == [1, 1]


def test_dedup_horizon_expires_by_event_time() -> None:
    state = DedupState()
    state.apply([routed("click", "a", T0)], now_ms=T0)
    assert (
        state.apply([routed("click", "a", T0 + 30 * MIN)], T0 + 30 * MIN).duplicates["click"] == 1
    )
    state.apply([routed("impression", "x", T0 + 62 * MIN)], T0 + 62 * MIN)  # advances time
    again = state.apply([routed("click", "a", T0 + 62 * MIN)], T0 + 62 * MIN)
    assert again.applied["click"] == 1 and not again.duplicates
    order = state.apply([routed("order", "o", T0 + 62 * MIN)], T0 + 62 * MIN)
    assert order.applied["order"] == 1
    later = state.apply([routed("order", "o", T0 + 23 * 60 * MIN)], T0 + 23 * 60 * MIN)
    assert later.duplicates["order"] == 1  # 24 h for orders


def test_late_events_count_while_their_horizon_covers_them() -> None:
    """A shuffled re-send of the last 50 minutes counts in full and is marked out of order;
    a click 62 minutes old or an order 25 hours old cannot be deduplicated: too late."""
    now = T0 + 30 * 60 * MIN
    state = DedupState()
    state.apply([routed("impression", "live", now - 1000)], now)
    backlog = [routed("click", f"b{i}", now - (50 - i) * MIN) for i in range(50)]
    backlog.reverse()
    out = state.apply(backlog, now)
    assert out.applied["click"] == 50 and not out.late
    assert out.out_of_order["click"] == 48, "all but the two minutes not yet settled"
    stale = state.apply(
        [
            routed("click", "old", now - 62 * MIN),
            routed("order", "o-old", now - 25 * 60 * MIN),
            routed("order", "o-ok", now - 23 * 60 * MIN),
        ],
        now,
    )
    assert stale.late == Counter({"click": 1, "order": 1})
    assert stale.applied == Counter({"order": 1})
    assert [t.event[1] for t in stale.too_late] == ["old", "o-old"]
    assert all(t.clock_ms == now - 1000 for t in stale.too_late)


def test_lateness_is_measured_against_event_time_reached_during_replay() -> None:
    """A backlog of hours-old events is not late; an old straggler after it is."""
    now = T0 + 5 * 60 * MIN
    state = DedupState()
    backlog = [routed("click", f"b{i}", T0 + i * MIN) for i in range(120)]
    out = state.apply(backlog, now)
    assert out.applied["click"] == 120 and not out.late
    state.apply([routed("impression", "i", T0 + 121 * MIN)], now)
    straggler = state.apply([routed("click", "s", T0 + 30 * MIN)], now)
    assert straggler.late["click"] == 1


def test_changelog_round_trip_restores_behaviour() -> None:
    first = DedupState()
    first.apply([routed("click", "a", T0, click="k1", campaign="c3"), routed("order", "o", T0)], T0)
    restored = DedupState()
    restored.load_changes(first.drain_changes())
    assert first.drain_changes() == {"max_ts": T0, "clock": 0, "seen": [], "clicks": []}
    follow = [
        routed("click", "a", T0 + MIN),
        routed("lead", "l", T0 + MIN, campaign=None, click="k1"),
    ]
    a, b = first.apply(follow, T0 + MIN), restored.apply(follow, T0 + MIN)
    assert a.cells == b.cells and a.duplicates == b.duplicates == Counter({"click": 1})
    assert ("search", "c3", (T0 + MIN) // MIN) in b.cells


@settings(max_examples=100)
@given(
    events=st.lists(event_st, max_size=60),
    cut=st.integers(0, 60),
    follow=st.lists(event_st, max_size=30),
)
def test_restore_from_changelog_decides_as_the_live_state(
    events: list[list[Any]], cut: int, follow: list[list[Any]]
) -> None:
    """Duplicate, late or counted: a state rebuilt from its changelog (in chunks, as the
    worker writes it) decides every following event as the live one does."""
    now = T0 + 160 * MIN
    live = DedupState()
    restored = DedupState()
    for batch in (events[:cut], events[cut:]):
        live.apply(batch, now)
        for chunk in codec.split_changes(live.drain_changes(), size=3):
            restored.load_changes(chunk)
    a, b = live.apply(follow, now), restored.apply(follow, now)
    assert (a.cells, a.duplicates, a.late) == (b.cells, b.duplicates, b.late)


# --- attribution whichever comes first: the click or its leads and orders ---------------


def net(out: BatchOutput) -> dict[Any, list[int]]:
    return {cell: values for cell, values in out.cells.items() if any(values)}


def test_an_order_before_its_click_moves_to_the_clicked_campaign() -> None:
    """In one message or across messages, the order and lead that came before their click
    end in the click's campaign, as if the click had come first; a lead keeps its own
    channel, an order of channel ``unknown`` takes the click's."""
    minute = (T0 + MIN) // MIN
    click = routed("click", "k-ev", T0, campaign="c7", channel="social", click="k9")
    order = routed("order", "o1", T0 + MIN, campaign=None, channel="unknown", click="k9",
                   revenue=5_000_000, new=True)  # fmt: skip
    lead = routed("lead", "l1", T0 + MIN, campaign=None, channel="email", click="k9")
    expected = net(DedupState().apply([click, order, lead], T0 + 2 * MIN))
    assert expected == {
        ("social", "c7", T0 // MIN): [0, 1, 0, 0, 0, 0, 0],
        ("social", "c7", minute): [0, 0, 0, 1, 1, 5_000_000, 0],
        ("email", "c7", minute): [0, 0, 1, 0, 0, 0, 0],
    }
    same = DedupState().apply([order, lead, click], T0 + 2 * MIN)
    assert net(same) == expected, "moved within the message: no unattributed cell at all"
    assert not any(cell[1] == UNATTRIBUTED for cell in same.cells)
    assert same.reattributed == Counter({"order": 1, "lead": 1})
    state = DedupState()
    first = state.apply([order, lead], T0 + 2 * MIN)
    assert net(first) == {("unknown", UNATTRIBUTED, minute): [0, 0, 0, 1, 1, 5_000_000, 0],
                          ("email", UNATTRIBUTED, minute): [0, 0, 1, 0, 0, 0, 0]}  # fmt: skip
    then = state.apply([click], T0 + 2 * MIN)
    assert then.cells[("unknown", UNATTRIBUTED, minute)] == [0, 0, 0, -1, -1, -5_000_000, 0]
    total = BatchOutput()
    for out in (first, then):
        for cell, values in out.cells.items():
            row = total.cells.setdefault(cell, [0] * N)
            total.cells[cell] = [a + b for a, b in zip(row, values, strict=True)]
    assert net(total) == expected
    assert then.reattributed == Counter({"order": 1, "lead": 1}) and state.pending.size == 0


def test_a_duplicate_order_before_its_click_moves_once() -> None:
    state = DedupState()
    order = routed("order", "o1", T0 + MIN, campaign=None, click="k1", revenue=7)
    first = state.apply([order, order], T0 + 2 * MIN)
    again = state.apply([order], T0 + 2 * MIN)
    assert first.duplicates["order"] == 1 and again.duplicates["order"] == 1
    assert state.pending.size == 1
    moved = state.apply([routed("click", "k", T0, campaign="c2", click="k1")], T0 + 2 * MIN)
    assert moved.reattributed == Counter({"order": 1})
    assert moved.cells[("search", "c2", (T0 + MIN) // MIN)][3:6] == [1, 0, 7]
    assert moved.cells[("search", UNATTRIBUTED, (T0 + MIN) // MIN)][3:6] == [-1, 0, -7]


def test_an_order_whose_click_never_comes_stays_unattributed() -> None:
    """It waits while a click stamped before it could still count (the click horizon past
    its minute), then is forgotten: memory does not grow with such orders."""
    state = DedupState()
    out = state.apply([routed("order", "o1", T0, campaign=None, click="gone")], T0 + MIN)
    assert net(out) == {("search", UNATTRIBUTED, T0 // MIN): [0, 0, 0, 1, 0, 0, 0]}
    assert state.pending.size == 1
    state.apply([routed("impression", "i", T0 + 60 * MIN)], T0 + 61 * MIN)
    state.apply([], T0 + 61 * MIN)  # the clock reaches the order's minute + 60
    assert state.pending.size == 1, "a click of the order's minute still counts"
    state.apply([routed("impression", "j", T0 + 61 * MIN)], T0 + 62 * MIN)
    state.apply([], T0 + 62 * MIN)
    assert state.pending.size == 0 and not state.pending.entries
    late_click = state.apply([routed("click", "k", T0, campaign="c2", click="gone")], T0 + 62 * MIN)
    assert late_click.late["click"] == 1 and not late_click.reattributed


def test_attribution_window_holds_whichever_comes_first() -> None:
    horizons = Horizons(attribution_minutes=10)
    click = routed("click", "k", T0, campaign="c2", click="k1")
    within = routed("order", "o1", T0 + 10 * MIN, campaign=None, click="k1")
    beyond = routed("order", "o2", T0 + 11 * MIN, campaign=None, click="k1")
    first = net(DedupState(horizons).apply([click, within, beyond], T0 + 12 * MIN))
    assert first[("search", "c2", T0 // MIN + 10)][3] == 1
    assert first[("search", UNATTRIBUTED, T0 // MIN + 11)][3] == 1
    assert net(DedupState(horizons).apply([within, beyond, click], T0 + 12 * MIN)) == first


def test_waiting_orders_are_bounded_and_the_overflow_counted() -> None:
    state = DedupState(Horizons(max_pending=2))
    orders = [routed("order", f"o{i}", T0, campaign=None, click=f"k{i}") for i in range(3)]
    out = state.apply(orders, T0 + MIN)
    assert state.pending.size == 2 and out.attribution_overflow == Counter({"order": 1})
    clicks = [routed("click", f"c{i}", T0, campaign="c2", click=f"k{i}") for i in range(3)]
    moved = state.apply(clicks, T0 + MIN)
    assert moved.reattributed == Counter({"order": 2}) and state.pending.size == 0
    assert moved.cells[("search", UNATTRIBUTED, T0 // MIN)][3] == -2, "one stays unattributed"


def test_a_restore_between_an_order_and_its_click_moves_it_as_the_live_state() -> None:
    """Waiting orders go to the dedup changelog: a worker restored after the orders and
    before their clicks moves them exactly as the live one; a click already known when
    its order waited (same entry, parts in any order) leaves nothing waiting."""
    orders = [routed("order", f"o{i}", T0 + i * MIN, campaign=None, channel="unknown",
                     click=f"k{i % 3}", revenue=i) for i in range(6)]  # fmt: skip
    clicks = [routed("click", f"c{i}", T0, campaign=f"c{i}", channel="social", click=f"k{i}")
              for i in range(3)]  # fmt: skip
    live = DedupState()
    live.apply([*orders, clicks[0]], T0 + 7 * MIN)  # k0 claims its orders in the message
    change = live.drain_changes()
    assert len(change["pending"]) == 6  # type: ignore[arg-type]
    restored, reversed_parts = DedupState(), DedupState()
    for part in codec.split_changes(change, size=2):
        restored.load_changes(part)
    for part in reversed(list(codec.split_changes(change, size=2))):
        reversed_parts.load_changes(part)
    for state in (restored, reversed_parts):
        assert state.pending.size == live.pending.size == 4
        assert {k: sorted(v) for k, v in state.pending.entries.items()} == {
            k: sorted(v) for k, v in live.pending.entries.items()
        }
    a = live.apply(clicks[1:], T0 + 7 * MIN)
    b = restored.apply(clicks[1:], T0 + 7 * MIN)
    assert a.cells == b.cells and a.reattributed == b.reattributed == Counter({"order": 4})


def test_a_move_into_shown_minutes_restates_them() -> None:
    """Moving an order rewrites a minute the windows have shown in two series: the scope
    store counts both cells as restated (alerts hold while a worker still lags), and the
    unattributed series' minute sums to zero."""
    state, store = DedupState(), SegmentStore()
    order = routed("order", "o1", T0, campaign=None, channel="unknown", click="k1", revenue=9)
    cells = state.apply([order], T0 + MIN).cells
    store.apply_cells([(*cell, values) for cell, values in cells.items()])
    store.evaluate(T0 + 5 * MIN)  # shows the order's minute
    store.restated = 0
    moved = state.apply([routed("click", "k", T0 + 4 * MIN, campaign="c2", click="k1")],
                        T0 + 5 * MIN).cells  # fmt: skip
    store.apply_cells([(*cell, values) for cell, values in moved.items()])
    assert store.restated == 2, "the order's minute in two series (the click's is not shown)"
    minute = T0 // MIN
    assert store.series[("campaign", "unknown", UNATTRIBUTED)].sum(minute, minute + 1)[3] == 0
    assert store.series[("campaign", "search", "c2")].sum(minute, minute + 1)[3] == 1
    assert store.series[("channel", "search", "")].sum(minute, minute + 1)[5] == 9


ids_st = st.integers(0, 7)


@settings(max_examples=200)
@given(
    clicks=st.lists(st.tuples(ids_st, st.integers(0, 50), st.sampled_from(["search", "social"]),
                              st.sampled_from(["c1", "c2", "c3"])),
                    max_size=8, unique_by=lambda c: c[0]),
    conversions=st.lists(st.tuples(st.sampled_from(["lead", "order"]), st.integers(0, 11),
                                   ids_st, st.integers(0, 50),
                                   st.sampled_from(["unknown", "email"]),
                                   st.integers(0, 10**6), st.booleans()), max_size=20),
    copies=st.lists(st.integers(0, 40), max_size=5),
    cuts=st.lists(st.integers(0, 40), max_size=5),
    order=st.randoms(use_true_random=False),
    dead=st.lists(ids_st, max_size=3, unique=True),
    restore=st.integers(0, 12),
)  # fmt: skip
def test_attribution_does_not_depend_on_arrival_order(
    clicks: list[Any], conversions: list[Any], copies: list[int], cuts: list[int], order: Any,
    dead: list[int], restore: int,
) -> None:  # fmt: skip
    """Clicks and the leads/orders naming them (some naming no counted click, some sent
    twice) within the horizons: any order and any split into messages gives the same
    per-(channel, campaign, minute) sums as applying them one by one in event-time order."""
    now = T0 + 60 * MIN
    events = [routed("click", f"c{cid}", T0 + m * MIN, campaign=campaign, channel=channel,
                     click=f"k{cid}") for cid, m, channel, campaign in clicks]  # fmt: skip
    events += [routed(kind, f"{kind[0]}{key}", T0 + m * MIN, campaign=None, channel=channel,
                      click=f"k{cid}", revenue=revenue, new=new)
               for kind, key, cid, m, channel, revenue, new in conversions]  # fmt: skip
    events += [list(events[i]) for i in copies if i < len(events)]

    def sums(batches: list[list[list[Any]]]) -> dict[Any, list[int]]:
        state, out = DedupState(), BatchOutput()
        for batch in batches:
            state.apply(batch, now, out)
        return net(out)

    first: dict[tuple[str, str], list[Any]] = {}
    for ev in events:  # copies of one event are alike, as real duplicates are
        first.setdefault((ev[0], ev[1]), ev)
    events = [first[(ev[0], ev[1])] for ev in events]
    in_order = sums([[ev] for ev in sorted(events, key=lambda ev: (ev[2], ev[0] != "click"))])
    shuffled = list(events)
    order.shuffle(shuffled)
    bounds = [0, *sorted(c for c in cuts if c <= len(shuffled)), len(shuffled)]
    batches = [shuffled[a:b] for a, b in itertools.pairwise(bounds)]
    assert sums(batches) == in_order
    counters_never_go_down_and_end_as_the_windows(batches, now, dead=dead, restore=restore)


def counters_never_go_down_and_end_as_the_windows(
    batches: list[Any], now: int, *, dead: list[int], restore: int
) -> None:
    """Through partials, as the worker sends them: no (channel, campaign) counter ever
    goes down (a lead or order waiting for its click is in the windows as unattributed,
    in the counters only where it ends), a click dead-lettered as too late ends the wait
    of what names it at once, and once no click can come the counters hold what the
    windows hold. Before message ``restore`` the dedup state is rebuilt from its
    changelog (as a restarted worker does; the scope store keeps what its snapshot
    covers): nothing is counted twice or lost."""
    state, store = DedupState(), SegmentStore()
    log: list[dict[str, object]] = []
    before: dict[tuple[str, str], list[int]] = {}
    tick = routed("impression", "tick", now, campaign="c9")  # the clock reaches ``now``
    too_late = [routed("click", f"late{cid}", now - 3 * 60 * MIN, campaign="c8", click=f"k{cid}")
                for cid in dead]  # fmt: skip
    flush = routed("impression", "late-enough", now + 3 * 60 * MIN, campaign="c9")
    later = now + 3 * 60 * MIN  # the clock moves before a message: the flush, then one more
    plan = [*((b, now) for b in batches), ([tick], now), (too_late, now), ([flush], later),
            ([], later)]  # fmt: skip
    for index, (batch, at) in enumerate(plan):
        if index == restore:
            state = DedupState()
            for change in log:
                state.load_changes(change)
        out = state.apply(batch, at)
        log += codec.split_changes(state.drain_changes(), size=3)
        store.apply_cells(
            (c[0], c[1], c[2], c[3:]) for c in codec.cells_list(out.cells, out.counted)
        )
        for pair, total in store.totals.items():
            old = before.get(pair, [0] * N)
            assert all(a >= b for a, b in zip(total, old, strict=True)), pair
            before[pair] = list(total)
        if batch is too_late:
            assert out.late["click"] == len(dead)
            assert not {key_hash("click", f"k{cid}") for cid in dead} & state.pending.entries.keys()
    assert state.pending.size == 0
    span = (T0 // MIN - 1, (now + 3 * 60 * MIN) // MIN + 1)
    windows = {pair: list(store.series[("campaign", *pair)].sum(*span))
               for pair in store.totals if ("campaign", *pair) in store.series}  # fmt: skip
    assert {p: t for p, t in store.totals.items() if any(t)} == {
        p: w for p, w in windows.items() if any(w)
    }


# --- SegmentStore ------------------------------------------------------------------

cell_st = st.tuples(
    st.sampled_from(["search", "social", "email", "video"]),
    st.sampled_from([f"c{i}" for i in range(8)]),
    st.integers(T0 // MIN, T0 // MIN + 1500),
    st.lists(st.integers(0, 1000), min_size=N, max_size=N),
)


def brute(cells: list[Any], pred: Any, start: int, end: int) -> list[int]:
    total = [0] * N
    for channel, campaign, minute, values in cells:
        if pred(channel, campaign) and start <= minute < end:
            total = [a + b for a, b in zip(total, values, strict=True)]
    return total


@settings(max_examples=150, deadline=None)
@given(
    cells=st.lists(cell_st, max_size=60),
    max_campaigns=st.integers(1, 10),
    max_channels=st.integers(1, 5),
)
def test_scope_sums_are_exact_at_every_scope(
    cells: list[Any], max_campaigns: int, max_channels: int
) -> None:
    """Whatever the guards fold, promote or demote (cells span 25 hours: reviews happen),
    global sums are exact, each channel is the sum of its campaigns and ``__other__``,
    and the global series the sum of the channels."""
    store = SegmentStore(max_campaigns=max_campaigns, max_channels=max_channels, settle_ms=MIN)
    for i in range(0, len(cells), 7):  # in several partials, as the segment stage gets them
        store.apply_cells(cells[i : i + 7])
    now = T0 + 1502 * MIN + 5_000
    result = store.evaluate(now)
    end = result.end_minute
    assert end == (now - MIN) // MIN
    kept = [k for k in result.series if k[0] == "campaign" and k[2] != OTHER]
    assert len(kept) <= max_campaigns
    assert len([k for k in result.series if k[0] == "channel" and k[1] != OTHER]) <= max_channels
    for w, minutes in WINDOWS.items():
        glob = brute(cells, lambda ch, c: True, end - minutes, end)
        if cells:
            assert result.series[("global", "", "")].windows[w].tolist() == glob
            assert result.series[("global", "", "")].kpis[w] == kpis(glob)
        channels = [0] * N
        for key, series in result.series.items():
            if key[0] != "channel":
                continue
            campaigns = [0] * N
            for k, s in result.series.items():
                if k[0] == "campaign" and k[1] == key[1]:
                    campaigns = [a + int(b) for a, b in zip(campaigns, s.windows[w], strict=True)]
            assert series.windows[w].tolist() == campaigns, (key, w)
            channels = [a + int(b) for a, b in zip(channels, series.windows[w], strict=True)]
        assert channels == glob
    if len({(c[0], c[1]) for c in cells}) <= max_campaigns and len({c[0] for c in cells}) <= (
        max_channels
    ):  # nothing folded: every campaign series is its own raw sum
        for _, channel, campaign in kept:
            got = result.series[("campaign", channel, campaign)].windows["24h"].tolist()
            want = brute(cells, lambda ch, c, k=(channel, campaign): (ch, c) == k, end - 1440, end)
            assert got == want


def test_a_campaign_beyond_the_guard_is_folded_then_promoted_by_spend() -> None:
    store = SegmentStore(max_campaigns=2, settle_ms=0)
    minute = T0 // MIN
    for i, spend in enumerate([5, 50, 500, 1]):  # c0 and c1 are kept: first come
        store.apply_cells([("search", f"c{i}", minute, [1, 0, 0, 0, 0, 0, spend])])
    result = store.evaluate(T0 + 2 * MIN)
    assert sorted(k[2] for k in result.series if k[0] == "campaign") == [OTHER, "c0", "c1"]
    assert result.series[("campaign", "search", OTHER)].windows["5m"][SPEND] == 501
    # An hour later c2 (500 spent) outranks c0 (5): swapped, c0's history into __other__.
    store.apply_cells([("search", "c2", minute + 61, [1, 0, 0, 0, 0, 0, 7])])
    result = store.evaluate(T0 + 63 * MIN)
    assert sorted(k[2] for k in result.series if k[0] == "campaign") == [OTHER, "c1", "c2"]
    other = result.series[("campaign", "search", OTHER)].windows["24h"]
    assert other[SPEND] == 5 + 500 + 1, "c0's and the folded past"
    assert result.series[("campaign", "search", "c2")].windows["24h"][SPEND] == 7
    assert result.series[("channel", "search", "")].windows["24h"][SPEND] == 563
    assert ("search", "c0") in result.measure_totals, "a demoted counter stays, frozen"
    store.apply_cells([("search", "c0", minute + 62, [1, 0, 0, 0, 0, 0, 1])])
    assert store.totals[("search", "c0")][SPEND] == 5, "...and no longer grows"
    store.apply_cells([("search", "c1", minute + 3 * 60, [1, 0, 0, 0, 0, 0, 1])])
    assert ("search", "c0") not in store.totals, "dropped two hours later"


def test_channels_beyond_the_guard_fold_into_other() -> None:
    store = SegmentStore(max_channels=2, settle_ms=0)
    minute = T0 // MIN
    store.apply_cells([(f"ch{i}", f"c{i}", minute, [10, 1, 0, 0, 0, 0, 0]) for i in range(5)])
    result = store.evaluate(T0 + 2 * MIN)
    channels = sorted(k[1] for k in result.series if k[0] == "channel")
    assert channels == [OTHER, "ch0", "ch1"]
    assert result.series[("channel", OTHER, "")].windows["5m"].tolist()[:2] == [30, 3]
    assert {k[2] for k in result.series if k[:2] == ("campaign", OTHER)} == {"c2", "c3", "c4"}
    assert store.channel_guard.folded == {"": 3}
    # Campaign folds start from 0 for every channel (the folded ones included).
    zero = {("campaign", "ch0"): 0, ("campaign", "ch1"): 0, ("campaign", OTHER): 0}
    assert result.folded == {("channel", ""): 3, **zero}


def test_folded_counters_start_at_zero_so_the_first_folds_are_an_increase() -> None:
    """Prometheus counts no increase for a series that appears at N: every channel's
    campaign counter is shown at 0 before its first fold."""
    store = SegmentStore(max_campaigns=1, settle_ms=0)
    minute = T0 // MIN
    store.apply_cells([("search", "c0", minute, [1, 0, 0, 0, 0, 0, 0])])
    before = store.evaluate(T0 + 2 * MIN).folded
    assert before == {("channel", ""): 0, ("campaign", "search"): 0}
    store.apply_cells([("search", f"k{i}", minute + 1, [1, 0, 0, 0, 0, 0, 0]) for i in range(3)])
    after = store.evaluate(T0 + 3 * MIN).folded
    assert after == {("channel", ""): 0, ("campaign", "search"): 3}


def test_state_and_work_stay_bounded_by_the_guards() -> None:
    """50,000 campaign ids over 2,000 channels: series, counters and candidate tables are
    bounded by the guards, not by the ids seen."""
    store = SegmentStore(max_campaigns=50, max_channels=10)
    minute = T0 // MIN
    for hour in range(3):
        store.apply_cells(
            (f"ch{i % 2000}", f"c{i}", minute + hour * 60 + i % 60, [1, 0, 0, 0, 0, 0, i % 97])
            for i in range(50_000)
        )
    assert len(store.series) <= 1 + (10 + 1) + (50 + 10 + 1)
    assert len(store.totals) <= 2 * (50 + 11)
    assert len(store.campaign_guard.candidates) <= 4 * 50
    assert len(store.channel_guard.candidates) <= 4 * 10
    result = store.evaluate(T0 + 4 * 60 * MIN)
    total = sum(i % 97 for i in range(50_000)) * 3
    assert result.series[("global", "", "")].windows["24h"][SPEND] == total


def test_watermark_follows_event_time_while_a_worker_replays() -> None:
    store = SegmentStore()
    now = T0 + 10 * 60 * MIN
    store.report(0, T0 + 60 * MIN, caught_up=False, now_ms=now)
    store.report(1, T0 + 90 * MIN, caught_up=False, now_ms=now)
    store.report(2, now, caught_up=True, now_ms=now)
    assert store.advance_watermark(now) == T0 + 60 * MIN
    assert store.replaying(now)
    for p in (0, 1):
        store.report(p, now - 1000, caught_up=True, now_ms=now)
    assert store.advance_watermark(now) == now
    assert not store.replaying(now)
    # a worker that stopped reporting no longer holds the watermark back
    store.report(3, T0, caught_up=False, now_ms=now)
    assert store.advance_watermark(now + 31_000) == now + 31_000


def test_a_backlogs_end_is_shown_a_settle_delay_after_it_is_claimed() -> None:
    """The report that ends a backlog says its last events are passed on, while they are
    still in flight to their dedup stage. Judged at once, their minutes would miss them
    (a CTR drop whose impressions are in and clicks not, or the reverse): the claim is
    believed a settle delay after it is made, and its minutes are shown then, whole."""
    settle = 5_000
    store = SegmentStore(settle_ms=settle)
    now = T0 + 60 * MIN
    for i in range(11):  # catching up: each second 2 minutes further into the backlog
        store.report(0, T0 + i * 2 * MIN, caught_up=False, now_ms=now - 10_000 + i * 1000)
    store.report(0, now, caught_up=True, now_ms=now)  # its last events routed, in flight
    claimed = store.evaluate(now)
    assert claimed.end_minute == T0 // MIN + 10, "what was passed on a settle delay ago"
    assert claimed.hold_alerts
    in_flight = T0 // MIN + 40
    store.apply_cells([("search", "c1", in_flight, [1] * N)])
    assert store.restated == 0, "not a restatement: its minute was not shown"
    store.report(0, now + settle, caught_up=True, now_ms=now + settle)
    whole = store.evaluate(now + settle)
    assert whole.end_minute == (now + settle - settle) // MIN and not whole.hold_alerts
    assert whole.series[("global", "", "")].windows["24h"].tolist() == [1] * N


def test_live_reports_are_shown_as_soon_as_they_settle() -> None:
    """Believing a claim a settle delay later costs live traffic nothing: its watermark
    is about the wall clock, and its minutes wait the settle delay anyway."""
    settle = 5_000
    store = SegmentStore(settle_ms=settle)
    now = T0 + 60 * MIN
    for t in range(now - 20_000, now + 1, 100):  # a report every step, 100 ms behind
        store.report(t % 3, t - 100, caught_up=False, now_ms=t)
    assert store.advance_watermark(now) == now - 300  # the least of the three partitions


def test_scope_changelog_round_trip() -> None:
    store = SegmentStore()
    minute = T0 // MIN
    store.apply_cells([("search", "c1", minute, [1, 2, 3, 4, 5, 6, 7]),
                       ("social", "c2", minute + 70, [7, 6, 5, 4, 3, 2, 1])])  # fmt: skip
    restored = SegmentStore()
    for state_key, value in store.drain_dirty():
        restored.load(state_key, value)
    assert list(store.drain_dirty()) == []
    now = T0 + 200 * MIN
    a, b = store.evaluate(now), restored.evaluate(now)
    assert a.series.keys() == b.series.keys()
    for key in a.series:
        for w in WINDOWS:
            assert a.series[key].windows[w].tolist() == b.series[key].windows[w].tolist()
    assert a.measure_totals == b.measure_totals


@pytest.mark.parametrize("seconds", [0.05, 0.3, 7, 1000])
def test_latency_histogram(seconds: float) -> None:
    store = SegmentStore()
    store.observe_latency([T0], T0 + int(seconds * 1000))
    assert sum(store.latency_counts) == 1
    assert store.latency_sum == pytest.approx(seconds)


def test_lateness_also_waits_for_the_slowest_source_the_router_reads() -> None:
    """Impressions replayed ahead of clicks must not make the clicks late: the router's
    event time reached (its slowest source) is the reference, not this partition's newest."""
    now = T0 + 5 * 60 * MIN
    state = DedupState()
    state.apply([routed("impression", "i", T0 + 90 * MIN)], now, reached_ms=T0)
    clicks = state.apply([routed("click", "k", T0 + MIN)], now, reached_ms=T0)
    assert clicks.applied["click"] == 1 and not clicks.late
    stale = state.apply([routed("click", "old", T0 + MIN)], now, reached_ms=T0 + 90 * MIN)
    assert stale.late["click"] == 1, "late against both references"


def test_replaying_means_the_watermark_lags_beyond_the_replay_lag() -> None:
    store = SegmentStore(replay_lag_ms=120_000)
    now = T0 + 60 * MIN
    store.report(0, now - 60_000, caught_up=False, now_ms=now)
    assert not store.evaluate(now).replaying, "a minute behind is a hiccup, not a replay"
    assert store.evaluate(now, hold=True).replaying, "held: the store's own input lags"
    store.report(0, now - 60_000, caught_up=False, now_ms=now + 10 * MIN)
    assert store.evaluate(now + 10 * MIN).replaying


def test_restating_holds_alerts_while_a_backlog_of_late_events_is_applied() -> None:
    store = SegmentStore()
    now = T0 + 120 * MIN
    minute = now // MIN
    store.report(0, now, caught_up=True, now_ms=now)
    assert not store.evaluate(now).hold_alerts
    store.apply_cells([("search", "c1", minute - 30, [1] * N)])  # a late event, no backlog
    assert not store.evaluate(now + 10_000).restating, "caught up: the restatement is whole"
    for step in range(1, 13):  # a backlog: restated minutes while the worker lags
        t = now + step * MIN
        store.apply_cells([("search", "c1", minute - 30 + step, [1] * N)])
        store.report(0, t, caught_up=False, now_ms=t)
        held = store.evaluate(t)
        assert held.restating == (step <= 11), "held for at most RESTATING_HOLD_MS"
        assert held.hold_alerts == held.restating and not held.replaying
    t = now + 13 * MIN
    store.report(0, t, caught_up=True, now_ms=t)
    assert not store.evaluate(t).restating
    store.report(0, t + 1000, caught_up=False, now_ms=t + 1000)
    assert not store.evaluate(t + 1000).restating, "lagging alone, with no restatement, is no hold"


def test_a_changelog_written_before_key_hashes_still_deduplicates() -> None:
    """An upgrade restores keys logged as strings; copies of their events stay duplicates."""
    restored = DedupState()
    restored.load_changes({"max_ts": T0, "seen": [["ck-1", T0 // MIN + 60],
                                                  ["oA-1", T0 // MIN + 1440]],
                           "clicks": [["k-1", T0 // MIN + 1440, ["c3", "social"]]]})  # fmt: skip
    out = restored.apply(
        [routed("click", "k-1", T0), routed("order", "A-1", T0, campaign=None, click="k-1"),
         routed("order", "A-2", T0 + MIN, campaign=None, channel="unknown", click="k-1")],
        T0 + 2 * MIN,
    )  # fmt: skip
    assert out.duplicates == Counter({"click": 1, "order": 1})
    assert out.cells[("social", "c3", T0 // MIN + 1)][3] == 1, "attributed via the old click"


def test_one_id_of_two_types_is_two_keys() -> None:
    assert key_hash("click", "e1") != key_hash("order", "e1")
    out = DedupState().apply([routed("click", "e1", T0), routed("order", "e1", T0)], T0)
    assert out.applied == Counter({"click": 1, "order": 1})


def test_a_raised_campaign_limit_admits_a_folded_id_once() -> None:
    """Restarted with a higher KPIMON_MAX_CAMPAIGNS, an id folded before gets a series of
    its own when next seen, and keeps it: no review swaps it with itself."""
    store = SegmentStore(max_campaigns=2, settle_ms=0)
    minute = T0 // MIN
    store.apply_cells([("search", c, minute, [1, 0, 0, 0, 0, 0, s])
                       for c, s in (("c0", 5), ("c1", 5), ("c2", 5000))])  # fmt: skip
    raised = SegmentStore(max_campaigns=3, settle_ms=0)
    for key, value in store.drain_dirty():
        raised.load(key, value)
    raised.apply_cells([("search", "c2", minute + 1, [1, 0, 0, 0, 0, 0, 1])])
    assert ("search", "c2") not in raised.campaign_guard.candidates
    raised.apply_cells([("search", "c0", minute + 61, [1, 0, 0, 0, 0, 0, 1])])  # a review
    result = raised.evaluate(T0 + 63 * MIN)
    assert set(raised.campaign_guard.kept) == {("search", "c0"), ("search", "c1"),
                                               ("search", "c2")}  # fmt: skip
    assert result.series[("campaign", "search", "c2")].windows["24h"][SPEND] == 1
    assert result.series[("campaign", "search", OTHER)].windows["24h"][SPEND] == 5000


def test_scope_changelog_round_trip_through_folding_and_a_demotion() -> None:
    """A store rebuilt from its changelog (tombstones of moved series, guard state) equals
    the live one and folds the next cells the same way."""
    store = SegmentStore(max_campaigns=2, max_channels=2, settle_ms=0)
    restored = SegmentStore(max_campaigns=2, max_channels=2, settle_ms=0)
    minute = T0 // MIN
    batches = [
        [(f"ch{i % 3}", f"c{i}", minute + i, [1, 1, 0, 0, 0, 0, 10 * i]) for i in range(6)],
        [("ch2", "c5", minute + 70, [1, 0, 0, 0, 0, 0, 1000])],  # a review: swaps
        [("ch0", "c0", minute + 71, [1, 0, 0, 0, 0, 0, 1]), ("ch9", "c9", minute + 72, [1] * N)],
    ]
    for batch in batches:
        store.apply_cells(batch)
        for key, value in store.drain_dirty():
            restored.load(key, value)
    now = T0 + 80 * MIN
    a, b = store.evaluate(now), restored.evaluate(now)
    assert a.series.keys() == b.series.keys()
    for series_key in a.series:
        assert {w: v.tolist() for w, v in a.series[series_key].windows.items()} == {
            w: v.tolist() for w, v in b.series[series_key].windows.items()
        }
    assert a.measure_totals == b.measure_totals
    follow = [("ch1", "c7", minute + 75, [2] * N), ("ch2", "c5", minute + 76, [3] * N)]
    store.apply_cells(follow)
    restored.apply_cells(follow)
    assert store.series.keys() == restored.series.keys()


def test_a_lowered_limit_shrinks_the_kept_state_at_the_next_review() -> None:
    store = SegmentStore(max_campaigns=4, settle_ms=0)
    minute = T0 // MIN
    store.apply_cells([("search", f"c{i}", minute, [1, 0, 0, 0, 0, 0, i]) for i in range(4)])
    smaller = SegmentStore(max_campaigns=2, settle_ms=0)  # restarted with a lower limit
    for key, value in store.drain_dirty():
        smaller.load(key, value)
    smaller.apply_cells([("search", "c3", minute + 60, [1, 0, 0, 0, 0, 0, 1])])
    kept = sorted(k[2] for k in smaller.series if k[0] == "campaign")
    assert kept == [OTHER, "c2", "c3"], "the two lowest demoted, their history in __other__"
    result = smaller.evaluate(T0 + 62 * MIN)
    assert result.series[("campaign", "search", OTHER)].windows["24h"].tolist()[:1] == [2]


# --- snapshots: evaluating off the event loop -----------------------------------------


def evaluation_of(result: Any) -> Any:
    """An Evaluation as plain values, to compare two of them."""
    return (
        result.watermark_ms, result.end_minute, result.replaying, result.restating,
        {k: {w: v.tolist() for w, v in s.windows.items()} for k, s in result.series.items()},
        {k: s.kpis for k, s in result.series.items()}, result.measure_totals,
    )  # fmt: skip


@settings(max_examples=50, deadline=None)
@given(
    before=st.lists(cell_st, max_size=30),
    during=st.lists(cell_st, max_size=30),
    max_campaigns=st.integers(1, 10),
)
def test_a_snapshot_evaluates_as_the_store_did_when_taken(
    before: list[Any], during: list[Any], max_campaigns: int
) -> None:
    """Cells, progress reports, latencies and expiry applied to the live store while its
    snapshot is evaluated change nothing in that evaluation; the live store goes on
    exactly as a store evaluated at the snapshot that then took the same input."""
    now = T0 + 1502 * MIN + 5_000
    old = [("search", "c1", T0 // MIN - 50 * 60, [1] * N)]  # folded at this watermark
    store = SegmentStore(max_campaigns=max_campaigns, settle_ms=MIN)
    store.apply_cells(old + before)
    store.report(0, now - 3 * MIN, caught_up=False, now_ms=now)
    store.observe_latency([now - 1000], now)
    as_taken = copy.deepcopy(store)
    store.advance(now)
    view = store.snapshot()
    store.apply_cells(during)
    store.report(0, now + MIN, caught_up=True, now_ms=now + MIN)
    store.observe_latency([now - 5000] * 3, now)
    store.expire_blocks(10**6)
    assert evaluation_of(view.evaluate(now)) == evaluation_of(as_taken.evaluate(now))
    assert view.latency_counts == as_taken.latency_counts

    as_taken.apply_cells(during)
    as_taken.report(0, now + MIN, caught_up=True, now_ms=now + MIN)
    assert store.restated == as_taken.restated
    later = now + 2 * MIN
    store.advance(later)
    assert evaluation_of(store.snapshot().evaluate(later)) == evaluation_of(
        as_taken.evaluate(later)
    )


def test_advancing_the_clock_twice_at_one_time_changes_nothing() -> None:
    now = T0 + 120 * MIN
    store = SegmentStore()
    store.report(0, now - 10 * MIN, caught_up=False, now_ms=now)
    store.apply_cells([("search", "c1", now // MIN - 30, [1] * N)])
    store.evaluate(now - MIN)
    store.apply_cells([("search", "c1", now // MIN - 31, [1] * N)])  # restates a shown minute
    first = store.advance(now)
    state = (store.watermark_ms, store.shown_end, store.restated, store._restating_since)
    assert first[2], "restating: a late cell while a worker lags"
    assert store.advance(now) == first
    assert (store.watermark_ms, store.shown_end, store.restated, store._restating_since) == state


def test_restated_cells_applied_during_an_evaluation_count_at_the_next() -> None:
    now = T0 + 120 * MIN
    minute = now // MIN
    store = SegmentStore()
    store.report(0, now, caught_up=True, now_ms=now)
    store.evaluate(now)
    store.report(0, now, caught_up=False, now_ms=now)  # a backlog of late events
    store.advance(now + 1000)
    view = store.snapshot()
    store.apply_cells([("search", "c1", minute - 29, [1] * N)] * 2)  # during the evaluation
    assert not view.evaluate(now + 1000).restating
    assert store.restated == 2, "the cells applied meanwhile are seen by the next evaluation"
    assert store.evaluate(now + 2000).restating


def test_expiry_of_the_live_store_goes_in_slices_and_ends_as_evaluate_leaves_it() -> None:
    now = T0 + 60 * 60 * MIN
    cells = [("search", f"c{i}", T0 // MIN + m, [1] * N) for i in range(4) for m in (0, 700)]
    store, evaluated = SegmentStore(), SegmentStore()
    for s in (store, evaluated):
        s.apply_cells(cells)
        s.report(0, now, caught_up=True, now_ms=now)
    evaluated.evaluate(now)
    store.advance(now)
    store.snapshot().evaluate(now)
    done = [store.expire_blocks(3) for _ in range(4)]
    assert done == [False, True, True, True]  # 6 series: 4 campaigns, 1 channel, global
    for key, buckets in store.series.items():
        assert sorted(buckets.blocks) == sorted(evaluated.series[key].blocks)
        assert sorted(buckets.coarse) == sorted(evaluated.series[key].coarse)
        assert buckets.dirty == evaluated.series[key].dirty


def test_an_order_no_click_claims_enters_the_counters_once_across_restores() -> None:
    """A waiting order is in the windows at once but in the counters only when no click
    can claim it any more; a worker restored before that counts it then, one restored
    after it (the clock in the changelog says so) does not count it again."""
    cell = ("unknown", UNATTRIBUTED, T0 // MIN)
    order = routed("order", "o1", T0, campaign=None, channel="unknown", click="k1", revenue=9)
    later = T0 + 3 * 60 * MIN
    tick = routed("impression", "i1", later, campaign="c1")

    def counters(out: BatchOutput) -> list[int]:
        rows = codec.cells_list(out.cells, out.counted)
        return [sum(r[3 + i] + (r[3 + N + i] if len(r) > 3 + N else 0) for r in rows
                    if tuple(r[:3]) == cell) for i in range(N)]  # fmt: skip

    live = DedupState()
    first = live.apply([order], T0 + MIN)
    assert first.cells[cell][3] == 1 and counters(first)[3] == 0, "windows now, counters later"
    before = live.drain_changes()
    live.apply([tick], later)
    expired = live.apply([], later)  # the clock passes the order's wait
    assert counters(expired)[3:6] == [1, 0, 9] and cell not in expired.cells
    after = live.drain_changes()

    early = DedupState()
    early.load_changes(before)
    early.apply([tick], later)
    assert counters(early.apply([], later))[3:6] == [1, 0, 9], "restored before: counted then"
    late = DedupState()
    for change in (before, after):
        late.load_changes(change)
    assert late.pending.size == 0
    assert not late.apply([], later + MIN).counted, "restored after: not counted again"


def test_a_too_late_click_ends_the_wait_of_what_names_it() -> None:
    """An order waiting for a click that is then dead-lettered as too late enters the
    counters at once (no click with that id can count any more), and one naming it later
    does not wait at all; a worker restored from the changelog knows the same."""
    cell = ("unknown", UNATTRIBUTED, T0 // MIN)
    now = T0 + 5 * MIN
    order = routed("order", "o1", T0, campaign=None, channel="unknown", click="k1", revenue=9)
    again = routed("order", "o2", T0, campaign=None, channel="unknown", click="k1", revenue=4)
    click = routed("click", "c1", T0 - 90 * MIN, campaign="c1", click="k1")
    tick = routed("impression", "i1", now, campaign="c1")

    live = DedupState()
    first = live.apply([order, tick], now)
    assert first.counted[cell][3] == -1, "in the windows, not yet in the counters"
    changes = [live.drain_changes()]
    settled = live.apply([click], now)
    assert settled.late["click"] == 1 and settled.counted[cell][3:6] == [1, 0, 9]
    assert not settled.cells, "the windows had it as unattributed already"
    assert live.pending.size == 0
    changes.append(live.drain_changes())
    assert not live.apply([again], now).counted, "names a dead click: counted at once"

    for parts in (changes, changes[::-1]):  # parts of a restore in either order
        restored = DedupState()
        for change in parts:
            restored.load_changes(change)
        assert restored.pending.size == 0, "its wait ended live"
        out = restored.apply([again], now)
        assert out.cells[cell][3] == 1 and not out.counted
        assert not restored.apply([], T0 + 3 * 60 * MIN).counted, "never counted twice"
