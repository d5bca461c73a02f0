"""Incident grouping and lifecycle (alerts.incidents), pure: no engine, no clock."""

from __future__ import annotations

import itertools
import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alerts.incidents import (
    EXPLAIN_SHARE,
    UPDATE_EVERY,
    IncidentNote,
    Incidents,
    Seen,
    causes,
    gap,
    related,
)
from alerts.lifecycle import AlertKey
from stream.kpis import KPI

ORDER_OUTAGE = ("orders", "conversion_rate", "cpa", "cac", "roas", "roi", "aov")
C1 = ("campaign", "search", "c1")
SEARCH = ("channel", "search", "")
ALL = ("global", "", "")


def seen(
    kpi: str, segment: tuple[str, str, str] = C1, *, rule: str | None = None, at: float = 0.0,
    change: float = -0.5, shares: dict[tuple[str, str, str], float] | None = None,
) -> Seen:  # fmt: skip
    """A firing alert of ``kpi`` on ``segment``; ``shares``: its children's shares of its gap."""
    contributors = [
        {"scope": s, "channel": c, "campaign": p, "share": share}
        for (s, c, p), share in (shares or {}).items()
    ]
    details = {"value": 1.0, "baseline": 2.0, "change": change, "contributors": contributors}
    key: AlertKey = (rule or f"{kpi}_rule", *segment)
    return Seen(key, kpi, at, at, details)


def book(repeat: float = 3600.0, **intervals: float) -> Incidents:
    names = {f"{k}_rule": repeat for k in KPI} | intervals
    return Incidents(names)


def groups(incidents: Incidents) -> set[frozenset[AlertKey]]:
    return {frozenset(i.members) for i in incidents.open()}


# ----------------------------------------------------------------------------- the relation


def test_an_order_outage_moves_every_kpi_of_the_order_family_one_way() -> None:
    for kpi in ORDER_OUTAGE:
        assert ("orders", "down") in causes(kpi), kpi
    assert causes("ctr") == {("clicks", "down"), ("impressions", "up")}
    assert ("orders", "down") not in causes("ctr") | causes("cpc")
    # A spend spike is the other cause the cost KPIs share.
    assert all(("spend", "up") in causes(k) for k in ("cpc", "cpl", "cpa", "cac", "roas", "roi"))


def test_gap_is_in_numerator_units_worse_positive() -> None:
    # CTR 1% instead of 2% on 10,000 impressions: 100 clicks missing.
    assert gap("ctr", 0.01, 0.02, 10_000) == pytest.approx(100)
    assert gap("cpa", 30.0, 20.0, 5) == pytest.approx(50)  # cost up is worse
    assert gap("orders", 4.0, 10.0, 0) == pytest.approx(6)  # a count: its own units
    assert gap("ctr", None, 0.02, 10) == 0.0


def test_derived_kpis_of_one_segment_relate_unrelated_causes_do_not() -> None:
    assert related(seen("orders"), seen("cpa"))
    assert related(seen("conversion_rate"), seen("roas"))
    assert related(seen("ctr"), seen("cpc"))  # clicks down: CTR down, CPC up
    assert not related(seen("ctr"), seen("conversion_rate"))  # clicks down lifts conversion
    assert not related(seen("orders"), seen("orders", ("campaign", "search", "c2")))


def test_a_parent_relates_to_the_child_that_explains_its_move() -> None:
    child = seen("ctr", C1)
    explained = seen("ctr", SEARCH, shares={C1: 0.8})
    assert related(child, explained) and related(explained, child)
    assert not related(child, seen("ctr", SEARCH, shares={C1: EXPLAIN_SHARE - 0.01}))
    assert related(child, seen("ctr", SEARCH, shares={C1: EXPLAIN_SHARE}))
    # Global by a channel, not by a grandchild directly; not across channels.
    assert related(seen("ctr", SEARCH), seen("ctr", ALL, shares={SEARCH: 0.9}))
    assert not related(child, seen("ctr", ALL, shares={C1: 0.9}))
    assert not related(child, seen("ctr", ("channel", "social", ""), shares={C1: 0.9}))
    # The KPIs must still share a cause: the channel's CPA rise by c1's order outage.
    assert related(seen("orders", C1), seen("cpa", SEARCH, shares={C1: 0.7}))
    assert not related(seen("ctr", C1), seen("aov", SEARCH, shares={C1: 0.7}))


# ----------------------------------------------------------------------------- grouping


def test_an_order_outage_is_one_incident_rooted_at_orders() -> None:
    incidents = book()
    notes = incidents.step(60.0, [seen(k) for k in reversed(ORDER_OUTAGE)])
    assert [n.kind for n in notes] == ["firing"]
    incident = notes[0].incident
    assert {m.kpi for m in incident.members.values()} == set(ORDER_OUTAGE)
    assert incident.root.kpi == "orders" and incident.root.key[1:] == C1
    assert [m.role for m in incident.ordered()] == ["root"] + ["member"] * 6


def test_a_channel_dragged_by_a_campaign_is_the_campaign_s_incident() -> None:
    incidents = book()
    notes = incidents.step(
        60.0,
        [seen("ctr", SEARCH, shares={C1: 0.9}), seen("ctr", C1),
         seen("ctr", ALL, shares={SEARCH: 0.7}), seen("ctr", ("campaign", "social", "c9"))],
    )  # fmt: skip
    assert [n.kind for n in notes] == ["firing", "firing"]
    big = max((n.incident for n in notes), key=lambda i: len(i.members))
    assert {m.key[1:] for m in big.members.values()} == {C1, SEARCH, ALL}
    assert big.root.key[1:] == C1, "the root is the cause: the deepest segment"


def test_a_later_alert_joins_the_open_incident_without_a_new_notification() -> None:
    incidents = book()
    (first,) = incidents.step(60.0, [seen("orders", at=60.0)])
    assert first.kind == "firing"
    assert incidents.step(120.0, [seen("orders", at=60.0), seen("cpa", at=120.0)]) == []
    (incident,) = incidents.open()
    assert set(incident.members) == {("orders_rule", *C1), ("cpa_rule", *C1)}
    assert incident.id == first.incident.id and incident.members[("cpa_rule", *C1)].role == "member"


def test_a_new_alert_touching_two_incidents_joins_the_oldest() -> None:
    incidents = book()
    incidents.step(60.0, [seen("ctr", C1, at=60.0)])
    incidents.step(120.0, [seen("ctr", C1, at=60.0), seen("orders", C1, at=120.0)])
    old, young = sorted(incidents.open(), key=lambda i: i.fired_at)
    # CPC (clicks down) relates to the CTR incident, ROAS (orders down) to the orders one,
    # and they relate to each other (spend up): one component, both existing incidents.
    alerts = [seen("ctr", C1, at=60.0), seen("orders", C1, at=120.0), seen("cpc", C1, at=180.0),
              seen("roas", C1, at=180.0)]  # fmt: skip
    assert incidents.step(180.0, alerts) == []
    by_id = {i.id: i for i in incidents.open()}
    assert {k[0] for k in by_id[old.id].members} == {"ctr_rule", "cpc_rule", "roas_rule"}
    assert set(by_id[young.id].members) == set(young.members), "incidents never merge"


def _components(alerts: list[Seen]) -> set[frozenset[AlertKey]]:
    """The reference: connected components of ``related``, by brute force."""
    left = {a.key: a for a in alerts}
    out = set()
    while left:
        _, start = left.popitem()
        group, frontier = {start.key: start}, [start]
        while frontier:
            node = frontier.pop()
            for key, other in list(left.items()):
                if related(node, other):
                    group[key] = other
                    frontier.append(other)
                    del left[key]
        out.add(frozenset(group))
    return out


SEGMENTS = [ALL, SEARCH, ("channel", "social", ""), C1, ("campaign", "search", "c2"),
            ("campaign", "social", "c3")]  # fmt: skip
CHILDREN = {ALL: [SEARCH, SEGMENTS[2]], SEARCH: [C1, SEGMENTS[4]], SEGMENTS[2]: [SEGMENTS[5]]}


@st.composite
def alert_sets(draw: st.DrawFn) -> list[Seen]:
    pairs = draw(st.sets(st.tuples(st.sampled_from(SEGMENTS), st.sampled_from(sorted(KPI))),
                         min_size=1, max_size=12))  # fmt: skip
    out = []
    for segment, kpi in sorted(pairs):
        shares = {c: draw(st.sampled_from([0.1, 0.5, 0.9])) for c in CHILDREN.get(segment, [])}
        change = draw(st.sampled_from([-0.6, -0.3, 0.4]))
        out.append(seen(kpi, segment, change=change, shares=shares))
    return out


@settings(max_examples=150, deadline=None)
@given(alert_sets(), st.randoms(use_true_random=False))
def test_grouping_is_the_components_whatever_the_order_alerts_are_seen_in(
    alerts: list[Seen], rnd: Any
) -> None:
    reference = Incidents({})
    reference.step(60.0, alerts)
    assert groups(reference) == _components(alerts)
    for _ in range(3):
        shuffled = list(alerts)
        rnd.shuffle(shuffled)
        again = Incidents({})
        again.step(60.0, shuffled)
        assert again.to_dict() == reference.to_dict()  # ids, roots, members: identical


# ----------------------------------------------------------------------------- lifecycle


def kinds(notes: list[IncidentNote]) -> list[str]:
    return [n.kind for n in notes]


def test_repeats_at_the_shortest_interval_of_its_firing_members() -> None:
    incidents = book(orders_rule=600.0, cpa_rule=300.0)
    orders, cpa = seen("orders"), seen("cpa")
    assert kinds(incidents.step(0.0, [orders])) == ["firing"]
    assert kinds(incidents.step(250.0, [orders, cpa])) == []  # joined: no message of its own
    (note,) = incidents.step(300.0, [orders, cpa])  # cpa firing: every 5 min
    assert note.kind == "repeat" and len(note.incident.members) == 2
    assert kinds(incidents.step(599.0, [orders, cpa])) == []
    assert kinds(incidents.step(600.0, [orders, cpa])) == ["repeat"]
    assert kinds(incidents.step(700.0, [orders])) == []  # cpa resolved: orders' 10 min again
    assert kinds(incidents.step(1199.0, [orders])) == []
    assert kinds(incidents.step(1200.0, [orders])) == ["repeat"]


def test_resolves_once_when_its_last_member_resolved_with_where_the_kpi_is_now() -> None:
    incidents = book()
    orders, cpa = seen("orders"), seen("cpa")
    incidents.step(0.0, [orders, cpa])
    assert incidents.step(60.0, [cpa], {orders.key: {"value": 9.0, "change": -0.05}}) == []
    (still,) = incidents.open()
    assert still.members[orders.key].resolved_at == 60.0
    assert still.members[orders.key].details["value"] == 9.0
    (note,) = incidents.step(120.0, [], {cpa.key: {"value": 20.0, "change": 0.02}})
    assert note.kind == "resolved" and note.incident.resolved_at == 120.0
    assert note.incident.members[cpa.key].details["value"] == 20.0
    assert incidents.open() == [] and incidents.step(180.0, []) == []


def test_an_alert_nobody_watches_any_more_resolves_its_incident() -> None:
    incidents = book()
    incidents.step(0.0, [seen("orders")])
    assert kinds(incidents.step(60.0, [])) == ["resolved"]


def test_a_refired_alert_after_the_resolve_opens_a_new_incident() -> None:
    incidents = book()
    (first,) = incidents.step(0.0, [seen("orders", at=0.0)])
    incidents.step(60.0, [])
    (second,) = incidents.step(600.0, [seen("orders", at=540.0)])
    assert second.kind == "firing" and second.incident.id != first.incident.id


def test_time_never_runs_backwards_and_must_be_finite() -> None:
    incidents = book(repeat=60.0)
    incidents.step(100.0, [seen("orders")])
    assert kinds(incidents.step(50.0, [seen("orders")])) == []  # taken at 100
    with pytest.raises(ValueError):
        incidents.step(math.nan, [])


# ----------------------------------------------------------------------------- restarts


Steps = list[tuple[float, list[Seen], dict[AlertKey, dict[str, object]]]]
"""Ticks of an incident book: (now, alerts seen, details of the alerts that resolved)."""


def _scenario() -> Steps:
    o, c = seen("orders", at=0.0), seen("cpa", at=60.0)
    s = seen("ctr", SEARCH, at=60.0, shares={C1: 0.8})
    x = seen("ctr", C1, at=120.0)
    return [
        (0.0, [o], {}), (60.0, [o, c, s], {}), (120.0, [o, c, s, x], {}),
        (3700.0, [c, s, x], {o.key: {"value": 1.0}}), (3800.0, [s], {}),
        (7400.0, [s], {}), (7500.0, [], {}),
    ]  # fmt: skip


def run(incidents: Incidents, steps: Steps) -> list[list[IncidentNote]]:
    """Each tick's notes."""
    return [incidents.step(now, alerts, resolved) for now, alerts, resolved in steps]


def assert_restarts_resume_exactly(steps: Steps, expected: list[list[IncidentNote]]) -> None:
    """A restart before any tick, through JSON as the scope changelog holds the state,
    gives the same notes as the straight run."""
    for cut in range(len(steps)):
        incidents = book()
        got = run(incidents, steps[:cut])
        state = json.loads(json.dumps(incidents.to_dict()))
        got += run(Incidents.from_dict(state, book().repeat_interval), steps[cut:])
        assert got == expected, f"restart before tick {cut}"


def test_a_restart_at_any_tick_resumes_exactly() -> None:
    steps = _scenario()
    expected = run(book(), steps)
    assert [kinds(n) for n in expected] == [
        ["firing"],
        ["firing"],
        [],
        ["repeat", "repeat"],
        ["resolved"],
        ["repeat"],
        ["resolved"],
    ]
    assert_restarts_resume_exactly(steps, expected)


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda d: d.update(version=99),
        lambda d: d["incidents"][0]["members"][0].update(role="member"),  # no root
        lambda d: d["incidents"][0]["members"][0].update(kpi="nope"),
        lambda d: d["incidents"].append(json.loads(json.dumps(d["incidents"][0]))),
        lambda d: d["incidents"][0].update(fired_at="soon"),
        lambda d: d["incidents"][0].update(resolved_at=5.0),
        lambda d: d["incidents"][0]["members"][0].update(told="yes"),
        lambda d: d["incidents"][0]["members"][0].pop("told"),
        lambda d: d["incidents"][0].update(last_update_at="later"),
    ],
)
def test_a_corrupt_state_is_refused(corrupt: Any) -> None:
    incidents = book()
    incidents.step(0.0, [seen("orders")])
    state = json.loads(json.dumps(incidents.to_dict()))
    corrupt(state)
    with pytest.raises(ValueError):
        Incidents.from_dict(state, {})


# ----------------------------------------------------------------------------- late joiners


def test_a_late_joiner_makes_one_update_after_the_spacing_naming_it() -> None:
    incidents = book()  # repeat 1 h: updates spaced by UPDATE_EVERY (5 min)
    orders, cpa = seen("orders", at=0.0), seen("cpa", at=60.0)
    assert kinds(incidents.step(0.0, [orders])) == ["firing"]
    assert incidents.spacing(incidents.open()[0]) == UPDATE_EVERY == 300.0
    assert kinds(incidents.step(60.0, [orders, cpa])) == []  # within 5 min of the firing
    assert kinds(incidents.step(299.0, [orders, cpa])) == []
    (note,) = incidents.step(300.0, [orders, cpa])
    assert note.kind == "update" and note.joined == (cpa.key,)
    assert set(note.incident.members) == {orders.key, cpa.key}, "the incident's members now"
    assert all(m.told for m in note.incident.members.values())
    for now in range(360, 3600, 60):  # told once: nothing more until the repeat
        assert incidents.step(float(now), [orders, cpa]) == [], now
    (repeat,) = incidents.step(3600.0, [orders, cpa])
    assert repeat.kind == "repeat" and repeat.joined == ()


def test_members_of_the_first_evaluation_are_in_the_firing_note_not_an_update() -> None:
    incidents = book()
    alerts = [seen(k, at=0.0) for k in ORDER_OUTAGE]
    (first,) = incidents.step(0.0, alerts)
    assert first.kind == "firing" and len(first.incident.members) == len(ORDER_OUTAGE)
    assert all(incidents.step(float(t), alerts) == [] for t in range(60, 3600, 60))


def test_joins_coalesce_into_one_update_per_spacing() -> None:
    incidents = book()
    o = seen("orders", at=0.0)
    cpa, roas, cac = (seen(k, at=60.0 * i) for i, k in ((1, "cpa"), (2, "roas"), (2, "cac")))
    roi = seen("roi", at=400.0)
    incidents.step(0.0, [o])
    incidents.step(60.0, [o, cpa])
    assert incidents.step(120.0, [o, cpa, roas, cac]) == []  # two joins in one evaluation
    (update,) = incidents.step(300.0, [o, cpa, roas, cac])
    assert update.kind == "update" and update.joined == tuple(sorted([cpa.key, roas.key, cac.key]))
    assert incidents.step(400.0, [o, cpa, roas, cac, roi]) == []  # 5 min after the last update
    assert incidents.step(599.0, [o, cpa, roas, cac, roi]) == []
    (second,) = incidents.step(600.0, [o, cpa, roas, cac, roi])
    assert (second.kind, second.joined) == ("update", (roi.key,))


def test_a_growing_incident_is_rate_limited_and_names_every_joiner_once() -> None:
    """A channel-wide outage: a new campaign joins every minute for two hours."""
    incidents = book()
    parent = seen("ctr", SEARCH, at=0.0, shares={("campaign", "search", f"c{i}"): 0.9
                                                 for i in range(130)})  # fmt: skip
    firing, notes = [parent], []
    for minute in range(122):
        if minute:
            firing.append(seen("ctr", ("campaign", "search", f"c{minute}"), at=minute * 60.0))
        notes += incidents.step(minute * 60.0, firing)
    assert kinds(notes).count("firing") == 1
    told = [n.at for n in notes if n.kind in ("firing", "repeat", "update")]
    assert all(b - a >= 300.0 for a, b in itertools.pairwise(told)), told
    assert len(told) <= 7200 / 300 + 1, "at most one message per incident every 5 min"
    named = [k for n in notes for k in n.joined]
    waiting = incidents.open()[0].untold()
    assert waiting and len(waiting) < 5, "the last few wait their turn"
    assert sorted(named + waiting) == sorted(a.key for a in firing[1:]), "each named once"


def test_a_repeat_due_within_the_spacing_carries_the_joiners() -> None:
    incidents = book(orders_rule=600.0, cpa_rule=600.0)  # spacing 600/6 = 100 s
    orders, cpa = seen("orders", at=0.0), seen("cpa", at=540.0)
    incidents.step(0.0, [orders])
    assert incidents.step(540.0, [orders, cpa]) == []  # the repeat comes in 60 s < 100 s
    (repeat,) = incidents.step(600.0, [orders, cpa])
    assert (repeat.kind, repeat.joined) == ("repeat", (cpa.key,))
    late = seen("cac", at=660.0)
    assert incidents.step(660.0, [orders, cpa, late]) == []
    (update,) = incidents.step(700.0, [orders, cpa, late])  # 100 s since the repeat
    assert (update.kind, update.joined) == ("update", (late.key,))


def test_a_joiner_that_resolved_before_its_turn_makes_no_update() -> None:
    incidents = book()
    orders, cpa = seen("orders", at=0.0), seen("cpa", at=60.0)
    incidents.step(0.0, [orders])
    incidents.step(60.0, [orders, cpa])
    assert incidents.step(120.0, [orders], {cpa.key: {"value": 1.0}}) == []
    assert all(incidents.step(float(t), [orders]) == [] for t in range(180, 3600, 60))


def _growing() -> Steps:
    o, c = seen("orders", at=0.0), seen("cpa", at=60.0)
    r, x = seen("roas", at=120.0), seen("roi", at=420.0)
    s = seen("ctr", SEARCH, at=0.0, shares={C1: 0.8})
    k = seen("ctr", C1, at=180.0)
    return [
        (0.0, [o, s], {}), (60.0, [o, c, s], {}), (120.0, [o, c, r, s], {}),
        (180.0, [o, c, r, s, k], {}), (300.0, [o, c, r, s, k], {}),
        (420.0, [o, c, r, x, s, k], {}), (480.0, [o, c, x, s, k], {r.key: {"value": 1.0}}),
        (600.0, [o, c, x, s, k], {}), (3600.0, [o, c, x, s, k], {}),
        (3700.0, [], {}),
    ]  # fmt: skip


def test_a_restart_at_any_tick_resumes_updates_exactly() -> None:
    steps = _growing()
    expected = run(book(), steps)
    assert [kinds(n) for n in expected] == [
        ["firing", "firing"], [], [], [], ["update", "update"], [], [], ["update"],
        ["repeat", "repeat"], ["resolved", "resolved"],
    ]  # fmt: skip
    assert_restarts_resume_exactly(steps, expected)


def test_a_version_1_state_loads_and_tells_who_joined_since_its_last_message() -> None:
    steps = _growing()
    incidents = book()
    for now, alerts, resolved in steps[:4]:  # firing at 0; cpa, roas and ctr c1 joined since
        incidents.step(now, alerts, resolved)
    state = json.loads(json.dumps(incidents.to_dict()))
    state["version"] = 1  # as written before updates existed
    for incident in state["incidents"]:
        del incident["last_update_at"]
        for member in incident["members"]:
            del member["told"]
    old = Incidents.from_dict(state, book().repeat_interval)
    assert old.to_dict() == incidents.to_dict(), "who was told follows from the times"
    now, alerts, resolved = steps[4]
    assert {k for n in old.step(now, alerts, resolved) for k in n.joined} == {
        ("cpa_rule", *C1), ("roas_rule", *C1), ("ctr_rule", *C1)}  # fmt: skip
