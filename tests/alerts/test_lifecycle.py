"""Alert lifecycle: every transition, hysteresis, holding, repeats, retention and restarts."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alerts.lifecycle import (
    Alert,
    AlertKey,
    AlertState,
    Notification,
    RuleAlerts,
    Timing,
)

RULE = "ctr_drop"
A: AlertKey = (RULE, "campaign", "search", "c1")
B: AlertKey = (RULE, "campaign", "social", "c2")
C: AlertKey = (RULE, "channel", "email", "")
KEYS = (A, B, C)
NEVER = math.inf


def rule_alerts(
    for_seconds: float = 0.0,
    keep_firing_for: float = 0.0,
    repeat_interval: float = NEVER,
    resolved_retention: float = 900.0,
) -> RuleAlerts:
    return RuleAlerts(
        RULE, Timing(for_seconds, keep_firing_for, repeat_interval, resolved_retention)
    )


def tick(
    alerts: RuleAlerts,
    now: float,
    bad: Iterable[AlertKey] | Mapping[AlertKey, dict[str, object]] = (),
    still: Iterable[AlertKey] = (),
    evaluated: Iterable[AlertKey] = KEYS,
) -> list[Notification]:
    """One evaluation; bad keys given without details get ``{"value": now}``."""
    verdicts: dict[AlertKey, dict[str, object]] = (
        dict(bad) if isinstance(bad, Mapping) else {k: {"value": now} for k in bad}
    )
    return alerts.update(now, verdicts, set(still), set(evaluated))


def kinds(notes: list[Notification]) -> list[tuple[str, float]]:
    return [(n.kind, n.at) for n in notes]


def state_of(alerts: RuleAlerts, key: AlertKey) -> AlertState:
    found = [a.state for a in alerts.alerts() if a.key == key]
    return found[0] if found else AlertState.INACTIVE


# --- transitions ---------------------------------------------------------------------------


def test_bad_segment_goes_pending_then_fires_once_for_has_elapsed() -> None:
    ra = rule_alerts(for_seconds=60)
    assert tick(ra, 0, [A]) == []
    assert state_of(ra, A) is AlertState.PENDING
    assert state_of(ra, B) is AlertState.INACTIVE
    assert tick(ra, 30, [A]) == []
    assert tick(ra, 59.5, [A]) == []
    assert ra.firing() == []
    [note] = tick(ra, 60, [A])
    assert (note.kind, note.at) == ("firing", 60)
    expected = Alert(A, AlertState.FIRING, 0.0, 60.0, None, 60.0, 60.0, {"value": 60})
    assert note.alert == expected
    assert ra.firing() == [expected]
    assert tick(ra, 90, [A]) == []  # firing is announced once


def test_zero_for_fires_on_the_first_bad_evaluation() -> None:
    ra = rule_alerts(for_seconds=0)
    assert kinds(tick(ra, 5, [A])) == [("firing", 5)]
    assert ra.firing()[0].active_since == 5


def test_pending_alert_that_clears_is_dropped_without_notification() -> None:
    ra = rule_alerts(for_seconds=60)
    tick(ra, 0, [A])
    assert tick(ra, 30) == []
    assert ra.alerts() == []
    # It restarts from scratch: `for` counts from the new first bad evaluation.
    tick(ra, 40, [A])
    assert tick(ra, 99, [A]) == []
    assert kinds(tick(ra, 100, [A])) == [("firing", 100)]
    assert ra.firing()[0].active_since == 40


def test_details_follow_the_latest_bad_evaluation_and_snapshots_are_frozen() -> None:
    ra = rule_alerts(for_seconds=10)
    tick(ra, 0, {A: {"value": 0.01, "contributors": ["c9"]}})
    verdict: dict[str, object] = {"value": 0.02, "contributors": ["c7"]}
    [note] = tick(ra, 10, {A: verdict})
    assert note.alert.details == {"value": 0.02, "contributors": ["c7"]}
    verdict["value"] = 99.0  # the caller reusing its dict must not leak into the state
    assert ra.firing()[0].details == {"value": 0.02, "contributors": ["c7"]}
    tick(ra, 20, {A: {"value": 0.03}})
    assert note.alert.details == {"value": 0.02, "contributors": ["c7"]}
    assert note.alert.last_bad_at == 10
    assert ra.firing()[0].details == {"value": 0.03}
    ra.firing()[0].details["value"] = -1.0  # nor may a caller edit state through a snapshot
    assert ra.firing()[0].details == {"value": 0.03}


def test_firing_alert_resolves_only_after_keep_firing_for() -> None:
    ra = rule_alerts(keep_firing_for=120)
    tick(ra, 0, [A])
    assert tick(ra, 10) == []
    assert tick(ra, 119) == []
    assert state_of(ra, A) is AlertState.FIRING
    [note] = tick(ra, 120)
    assert (note.kind, note.at) == ("resolved", 120)
    assert note.alert.state is AlertState.RESOLVED
    assert (note.alert.fired_at, note.alert.resolved_at, note.alert.last_bad_at) == (0, 120, 0)
    assert ra.firing() == []
    assert tick(ra, 130) == []  # resolved is announced once


def test_zero_keep_firing_for_resolves_on_the_first_clear_evaluation() -> None:
    ra = rule_alerts()
    tick(ra, 0, [A])
    assert kinds(tick(ra, 1)) == [("resolved", 1)]


def test_flapping_signal_fires_once_and_never_resolves_within_keep_firing_for() -> None:
    ra = rule_alerts(for_seconds=0, keep_firing_for=120)
    notes: list[Notification] = []
    for step in range(100):  # bad every other 10 s tick: gaps of 20 s < 120 s
        notes += tick(ra, step * 10.0, [A] if step % 2 == 0 else [])
    assert kinds(notes) == [("firing", 0)]
    assert tick(ra, 980 + 119) == []
    assert kinds(tick(ra, 980 + 120)) == [("resolved", 1100)]


def test_still_bad_keeps_a_firing_alert_firing_but_keeps_its_details() -> None:
    ra = rule_alerts(keep_firing_for=60)
    tick(ra, 0, {A: {"change": -0.30}})
    for now in range(10, 310, 10):
        assert tick(ra, now, still=[A]) == []
    [alert] = ra.firing()
    assert alert.last_bad_at == 300
    assert alert.details == {"change": -0.30}
    assert tick(ra, 359) == []
    assert kinds(tick(ra, 360)) == [("resolved", 360)]


def test_still_bad_holds_a_pending_alert_without_advancing_or_resetting_it() -> None:
    ra = rule_alerts(for_seconds=60)
    tick(ra, 0, [A])
    assert tick(ra, 30, still=[A]) == []
    assert state_of(ra, A) is AlertState.PENDING
    assert tick(ra, 70, still=[A]) == []  # does not advance to firing while in the band
    assert state_of(ra, A) is AlertState.PENDING
    [note] = tick(ra, 80, [A])  # not reset either: `for` still counts from 0
    assert (note.kind, note.alert.active_since) == ("firing", 0)


def test_still_bad_alone_never_starts_an_alert() -> None:
    ra = rule_alerts()
    assert tick(ra, 0, still=[A]) == []
    assert ra.alerts() == []


def test_unevaluated_segments_are_held_exactly_as_they_are() -> None:
    ra = rule_alerts(for_seconds=60, keep_firing_for=30, repeat_interval=100)
    tick(ra, 0, [A, B])
    tick(ra, 60, [B])  # B fires; A, evaluated and not bad, is dropped
    tick(ra, 61, [A])  # A pending again, since 61
    held = ra.to_dict()["alerts"]
    # Neither pending A (past `for`) nor firing B (past keep_firing_for and repeat) moves,
    # even when A is reported bad without having been evaluated.
    for now in (200.0, 500.0, 1000.0):
        assert tick(ra, now, [A], evaluated=[C]) == []
        assert ra.to_dict()["alerts"] == held
    assert tick(ra, 1000, [C], evaluated=[]) == []
    assert state_of(ra, C) is AlertState.INACTIVE
    assert kinds(tick(ra, 1010, [A], evaluated=[A, B])) == [("firing", 1010), ("resolved", 1010)]


def test_firing_alert_is_repeated_every_repeat_interval() -> None:
    ra = rule_alerts(for_seconds=0, keep_firing_for=600, repeat_interval=300)
    notes: list[Notification] = []
    for now in range(0, 1000, 60):
        notes += tick(ra, now, [A] if now < 500 else [])  # keeps firing via keep_firing_for
    assert kinds(notes) == [("firing", 0), ("repeat", 300), ("repeat", 600), ("repeat", 900)]
    assert notes[1].alert.details == {"value": 300}
    assert notes[3].alert.last_sent_at == 900
    assert all(n.alert.fired_at == 0 for n in notes)


def test_resolved_alert_is_retained_then_forgotten() -> None:
    ra = rule_alerts(resolved_retention=900)
    tick(ra, 0, [A])
    tick(ra, 100)
    assert state_of(ra, A) is AlertState.RESOLVED
    tick(ra, 999)
    assert state_of(ra, A) is AlertState.RESOLVED
    assert tick(ra, 1000) == []
    assert ra.alerts() == []


def test_resolved_alert_turning_bad_again_starts_a_new_cycle() -> None:
    ra = rule_alerts(for_seconds=60, resolved_retention=900)
    tick(ra, 0, [A])
    tick(ra, 60, [A])
    tick(ra, 100)
    assert tick(ra, 200, [A]) == []
    [again] = ra.alerts()
    assert (again.state, again.active_since, again.fired_at, again.resolved_at) == (
        AlertState.PENDING,
        200,
        None,
        None,
    )
    assert kinds(tick(ra, 260, [A])) == [("firing", 260)]


def test_notifications_are_ordered_by_key() -> None:
    ra = rule_alerts()
    notes = tick(ra, 0, {C: {}, A: {}, B: {}})
    assert [n.alert.key for n in notes] == sorted(KEYS)
    assert [n.alert.key for n in tick(ra, 1, evaluated=[C, B, A])] == sorted(KEYS)


def test_a_late_tick_cannot_rewind_the_timers() -> None:
    ra = rule_alerts(keep_firing_for=100)
    tick(ra, 0, [A])
    tick(ra, 100, [A])
    tick(ra, 50, [A])  # taken at 100: last_bad_at must not move back to 50
    assert ra.firing()[0].last_bad_at == 100
    assert tick(ra, 160) == []
    assert kinds(tick(ra, 200)) == [("resolved", 200)]


def test_invalid_input_is_rejected_and_leaves_state_untouched() -> None:
    with pytest.raises(ValueError, match="keep_firing_for"):
        Timing(0, -1, 60)
    with pytest.raises(ValueError, match="repeat_interval"):
        Timing(0, 0, 0)
    with pytest.raises(ValueError, match="for_seconds"):
        Timing(math.nan, 0, 60)
    ra = rule_alerts()
    tick(ra, 0, [A])
    before = ra.to_dict()
    with pytest.raises(ValueError, match="finite"):
        tick(ra, math.nan, [A])
    with pytest.raises(ValueError, match="belong"):
        tick(ra, 1, [B, ("other_rule", "campaign", "search", "c1")])
    assert ra.to_dict() == before


# --- persistence ---------------------------------------------------------------------------


def json_round_trip(ra: RuleAlerts) -> RuleAlerts:
    data = json.loads(json.dumps(ra.to_dict()))
    return RuleAlerts.from_dict(ra.rule, ra.timing, data)


def test_alert_round_trips_through_json() -> None:
    alert = Alert(B, AlertState.RESOLVED, 1.5, 2.0, 9.0, 3.25, 2.0, {"p_value": 1e-9, "c": [1]})
    restored = Alert.from_dict(json.loads(json.dumps(alert.to_dict())))
    assert restored == alert
    assert isinstance(restored.key, tuple)


def test_restart_mid_pending_fires_exactly_once_at_the_same_time() -> None:
    ra = rule_alerts(for_seconds=60)
    tick(ra, 0, [A])
    restored = json_round_trip(ra)
    assert tick(restored, 59, [A]) == []
    [note] = tick(restored, 60, [A])
    assert (note.kind, note.alert.active_since) == ("firing", 0)


def test_restart_mid_firing_neither_refires_nor_loses_the_resolve() -> None:
    ra = rule_alerts(keep_firing_for=60, repeat_interval=300)
    tick(ra, 0, [A])
    restored = json_round_trip(ra)
    assert tick(restored, 30, [A]) == []  # no second firing after the restart
    assert kinds(tick(restored, 300, still=[A])) == [("repeat", 300)]
    assert kinds(tick(restored, 360)) == [("resolved", 360)]


def test_restore_rejects_foreign_or_corrupt_state() -> None:
    ra = rule_alerts()
    tick(ra, 0, [A])
    good = ra.to_dict()
    with pytest.raises(ValueError, match="rule"):
        RuleAlerts.from_dict("other_rule", ra.timing, good)
    with pytest.raises(ValueError, match="version"):
        RuleAlerts.from_dict(RULE, ra.timing, {**good, "version": 99})
    records = good["alerts"]
    assert isinstance(records, list)
    record = records[0]
    corrupt = [
        {**record, "fired_at": None},  # firing without a firing time
        {**record, "state": "inactive"},
        {**record, "key": ["x"]},
        {**record, "last_bad_at": "soon"},
        {**record, "details": None},
    ]
    for bad_record in corrupt:
        with pytest.raises(ValueError):
            RuleAlerts.from_dict(RULE, ra.timing, {**good, "alerts": [bad_record]})
    with pytest.raises(ValueError, match="inconsistent"):
        RuleAlerts.from_dict(RULE, ra.timing, {**good, "alerts": [record, record]})


# --- properties ----------------------------------------------------------------------------

Tick = tuple[float, frozenset[AlertKey], frozenset[AlertKey], frozenset[AlertKey]]

keys_st = st.frozensets(st.sampled_from(KEYS))
# Most ticks evaluate every segment; some hold a few (replay, thin data), bad or not.
evaluated_st = st.one_of(st.just(frozenset(KEYS)), keys_st)
# Each step is repeated 1-6 times, so conditions last long enough to fire, repeat and resolve.
steps_st = st.lists(
    st.tuples(
        st.integers(0, 12).map(lambda n: n * 10.0),
        keys_st,
        keys_st,
        evaluated_st,
        st.integers(1, 6),
    ),
    max_size=30,
)
timing_st = st.builds(
    Timing,
    for_seconds=st.sampled_from([0.0, 30.0, 60.0, 150.0]),
    keep_firing_for=st.sampled_from([0.0, 40.0, 120.0]),
    repeat_interval=st.sampled_from([50.0, 200.0, NEVER]),
    resolved_retention=st.sampled_from([0.0, 100.0, 900.0]),
)


Step = tuple[float, frozenset[AlertKey], frozenset[AlertKey], frozenset[AlertKey], int]


def timeline(steps: list[Step]) -> list[Tick]:
    """Turn repeated time steps into ticks at absolute, non-decreasing times."""
    now, out = 0.0, []
    for delta, bad, still, evaluated, times in steps:
        for _ in range(times):
            now += delta
            out.append((now, bad, still, evaluated))
    return out


def play(ra: RuleAlerts, ticks: list[Tick]) -> list[Notification]:
    notes: list[Notification] = []
    for now, bad, still, evaluated in ticks:
        verdicts: dict[AlertKey, dict[str, object]] = {
            k: {"value": now, "key": list(k)} for k in bad
        }
        emitted = ra.update(now, verdicts, still, evaluated)
        assert [n.alert.key for n in emitted] == sorted({n.alert.key for n in emitted})
        notes += emitted
    return notes


@settings(max_examples=150, deadline=None)
@given(timing=timing_st, steps=steps_st, split=st.integers(0, 180))
def test_restart_anywhere_yields_the_identical_notification_sequence(
    timing: Timing, steps: list[Step], split: int
) -> None:
    ticks = timeline(steps)
    uninterrupted = RuleAlerts(RULE, timing)
    expected = play(uninterrupted, ticks)
    first = RuleAlerts(RULE, timing)
    got = play(first, ticks[:split])
    second = json_round_trip(first)
    assert second.to_dict() == first.to_dict()
    got += play(second, ticks[split:])
    assert got == expected
    assert second.to_dict() == uninterrupted.to_dict()


@settings(max_examples=150, deadline=None)
@given(timing=timing_st, steps=steps_st)
def test_notifications_per_key_follow_firing_repeats_resolved(
    timing: Timing, steps: list[Step]
) -> None:
    ticks = timeline(steps)
    ra = RuleAlerts(RULE, timing)
    notes = play(ra, ticks)
    # Then everything clears for longer than keep_firing_for: every firing alert must resolve.
    end = (ticks[-1][0] if ticks else 0.0) + timing.keep_firing_for + 10
    notes += play(ra, [(end, frozenset(), frozenset(), frozenset(KEYS))])
    assert ra.firing() == []
    for key in KEYS:
        open_since: float | None = None  # fired_at of the alert currently firing
        last_sent = -math.inf
        for note in (n for n in notes if n.alert.key == key):
            alert = note.alert
            if note.kind == "firing":
                assert open_since is None, "second firing without a resolve in between"
                assert alert.state is AlertState.FIRING and alert.fired_at == note.at
                assert note.at - alert.active_since >= timing.for_seconds
                open_since = last_sent = note.at
            elif note.kind == "repeat":
                assert open_since is not None, "repeat of an alert that is not firing"
                assert alert.state is AlertState.FIRING and alert.fired_at == open_since
                assert note.at - last_sent >= timing.repeat_interval
                last_sent = note.at
            else:
                assert note.kind == "resolved"
                assert open_since is not None, "resolve of an alert that never fired"
                assert alert.state is AlertState.RESOLVED and alert.fired_at == open_since
                assert note.at - alert.last_bad_at >= timing.keep_firing_for
                open_since = None
        assert open_since is None, "a firing alert was never resolved"
