"""Incidents through the engine and the sinks' payloads: an order outage is one incident.

Traffic is a noiseless funnel per campaign (so only the injected cause can alert), fed
minute by minute into a SegmentStore and judged by the AlertEngine, as the worker and
the backtest do; the records then go through the outbox and the sink payloads.
"""

from __future__ import annotations

import itertools
import json
from datetime import datetime
from typing import Any

from alerts.engine import AlertEngine
from alerts.incidents import UPDATE_EVERY
from alerts.notify import (
    alertmanager_alerts,
    slack_payload,
    slack_thread_note,
    slack_update_message,
)
from alerts.outbox import Outbox
from alerts.rules import parse_rules
from alerts.slack import incident_key
from stream.aggregate import SegmentStore
from stream.kpis import KPI
from stream.segments import SegmentView
from tests.alerts.test_notify import check_limits

T0 = 29_916_000  # a minute index
OUTAGE = range(T0 + 120, T0 + 150)
CAMPAIGNS = (("search", "c1"), ("search", "c2"), ("social", "c3"))
ORDER_KPIS = ("orders", "conversion_rate", "cpa", "cac", "roas", "roi", "aov")


def rules_text(kpis: tuple[str, ...] = ORDER_KPIS, *, extra: str = "") -> str:
    rules = "".join(
        f"""
  - name: {kpi}_watch
    kpi: {kpi}
    scopes: [global, channel, campaign]
    min_change: 0.3
    for: 2m
    keep_firing_for: 2m
    repeat_interval: 20m
    severity: {"page" if kpi == "orders" else "ticket"}
    runbook_url: docs/runbooks/value-drop.md
"""
        for kpi in kpis
    )
    return "rules:" + rules + extra


def funnel(store: SegmentStore, minute: int, *, orders_kept: float = 1.0) -> None:
    """Per campaign and minute: 3000 impressions, 90 clicks, 9 leads, 12 orders (6 new),
    revenue 50 an order, spend 1 a click; c1 keeps ``orders_kept`` of its orders."""
    for channel, campaign in CAMPAIGNS:
        kept = orders_kept if campaign == "c1" else 1.0
        orders, new = round(12 * kept), round(6 * kept)
        cell = [3000, 90, 9, orders, new, orders * 50_000_000, 90_000_000]
        store.apply_cells([(channel, campaign, minute, cell)])


def run(engine: AlertEngine, minutes: range, store: SegmentStore) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for minute in minutes:
        funnel(store, minute, orders_kept=0.3 if minute in OUTAGE else 1.0)
        out += engine.evaluate(SegmentView(store.series), minute + 1, (minute + 1) * 60.0)
    return out


def test_an_order_outage_is_one_incident_notification_per_sink() -> None:
    store, engine = SegmentStore(), AlertEngine(parse_rules(rules_text()))
    records = run(engine, range(T0, T0 + 240), store)
    firing = [r for r in records if r["notification"] == "firing"]
    resolved = [r for r in records if r["notification"] == "resolved"]
    assert len(firing) == 1 and len(resolved) == 1, [
        (r["rule"], r["notification"]) for r in records
    ]
    fired = firing[0]
    incident, ident = fired["incident"], fired["incident"]["id"]
    assert resolved[0]["incident"]["id"] == ident and resolved[0]["status"] == "resolved"
    assert all(r["incident"]["id"] == ident for r in records), "repeats are the incident's too"

    # The root is the moved measure where it moved: orders of c1.
    assert incident["root"] == {"rule": "orders_watch", "kpi": "orders", "scope": "campaign",
                                "channel": "search", "campaign": "c1"}  # fmt: skip
    assert (fired["kpi"], fired["campaign"], fired["severity"]) == ("orders", "c1", "page")
    # Every KPI of the order family that moved joined (AOV does not move: orders and
    # their revenue fell together), in c1 and in the channel it drags.
    final = resolved[0]["incident"]
    # the derived KPIs that fired within the outage, all in the one incident
    assert {"orders", "conversion_rate"} <= set(final["kpis"]) <= set(ORDER_KPIS)
    assert "aov" not in final["kpis"]
    segments = {(s["scope"], s["channel"], s["campaign"]) for s in final["segments"]}
    assert segments == {("campaign", "search", "c1"), ("channel", "search", "")}
    assert all(m["status"] == "resolved" and m["ends_at"] for m in final["members"])
    channel = [m for m in final["members"] if m["scope"] == "channel"]
    assert channel and all(m["contributors"][0]["campaign"] == "c1" for m in channel)
    assert all(m["contributors"][0]["share"] >= 0.5 for m in channel)
    assert fired["summary"].startswith("Orders of campaign c1 on search dropped")

    # One entry per sink, and one message / one group downstream.
    outbox = Outbox(("slack", "alertmanager", "console"))
    outbox.add(firing)
    outbox.commit()
    assert outbox.counts() == {"slack": 1, "alertmanager": 1, "console": 1}
    assert incident_key(fired) == ident
    check_limits(slack_payload(fired))
    # Alerts that join later are told in updates (below); the next repeat lists them all.
    (repeat, *_) = [r for r in records if r["notification"] == "repeat"]
    assert len(repeat["incident"]["members"]) > len(incident["members"])
    message = slack_payload(repeat)
    check_limits(message)
    assert "related)" in message["blocks"][0]["text"]["text"]
    assert "Same incident" in json.dumps(message) and "Conversion rate" in json.dumps(message)
    am = alertmanager_alerts([repeat])
    assert len(am) == len(repeat["incident"]["members"])
    assert {a["labels"]["incident"] for a in am} == {ident}
    assert [a["labels"]["incident_role"] for a in am].count("root") == 1
    ended = alertmanager_alerts(resolved)
    assert len(ended) >= len(am) and all("endsAt" in a for a in ended)


def test_a_healthy_shop_opens_no_incident() -> None:
    store, engine = SegmentStore(), AlertEngine(parse_rules(rules_text()))
    for minute in range(T0, T0 + 200):
        funnel(store, minute)
        assert engine.evaluate(SegmentView(store.series), minute + 1, (minute + 1) * 60.0) == []


def test_the_incident_survives_a_restart_mid_outage_exactly() -> None:
    rules = parse_rules(rules_text())
    straight = run(AlertEngine(rules), range(T0, T0 + 240), SegmentStore())
    open_at_cut = []
    for cut in (T0 + 125, T0 + 131, T0 + 140, T0 + 160):
        store, engine = SegmentStore(), AlertEngine(rules)
        first = run(engine, range(T0, cut), store)
        restored = AlertEngine(rules)
        state = json.loads(json.dumps(engine.to_dict()))
        open_at_cut.append(bool(state["incidents"]["incidents"]))
        restored.load(state)
        assert restored.to_dict() == engine.to_dict()
        assert first + run(restored, range(cut, T0 + 240), store) == straight, cut
    assert open_at_cut[0] is False and any(open_at_cut), "restarts before and during it"


def test_a_state_from_before_incidents_adopts_what_fires_without_telling_again() -> None:
    rules = parse_rules(rules_text())
    store, engine = SegmentStore(), AlertEngine(rules)
    first = run(engine, range(T0, T0 + 131), store)
    assert [r["notification"] for r in first] == ["firing"]
    old = {k: v for k, v in json.loads(json.dumps(engine.to_dict())).items() if k != "incidents"}
    restored = AlertEngine(rules)
    restored.load(old)
    rest = run(restored, range(T0 + 131, T0 + 240), store)
    assert "firing" not in [r["notification"] for r in rest]
    assert [r["notification"] for r in rest].count("resolved") == 1


def test_resent_firing_records_are_the_open_incidents() -> None:
    store, engine = SegmentStore(), AlertEngine(parse_rules(rules_text()))
    run(engine, range(T0, T0 + 135), store)
    (record,) = engine.firing_records((T0 + 135) * 60.0)
    assert record["notification"] == "repeat" and record["status"] == "firing"
    assert len(alertmanager_alerts([record])) == len(record["incident"]["members"])
    assert len(engine.firing_labels()) == len(record["incident"]["members"])


def order_outage_repeat() -> dict[str, Any]:
    """The order outage's incident record at its first repeat, all members in (for the
    Alertmanager routing and inhibition tests)."""
    records = run(AlertEngine(parse_rules(rules_text())), range(T0, T0 + 150), SegmentStore())
    return next(r for r in records if r["notification"] == "repeat")


def test_a_rule_removed_across_a_restart_leaves_its_incidents_coherent() -> None:
    """The rules file lost the root's rule: the incident goes on under its best member."""
    store, engine = SegmentStore(), AlertEngine(parse_rules(rules_text()))
    run(engine, range(T0, T0 + 140), store)
    (before,) = engine.incidents.open()
    assert before.root.key[0] == "orders_watch" and len(before.members) > 2
    fewer = AlertEngine(parse_rules(rules_text(ORDER_KPIS[1:])))
    fewer.load(json.loads(json.dumps(engine.to_dict())))
    (after,) = fewer.incidents.open()
    assert after.id == before.id and after.root.key[0] != "orders_watch"
    assert {k for k in after.members} == {k for k in before.members if k[0] != "orders_watch"}
    rest = run(fewer, range(T0 + 140, T0 + 240), store)
    assert [r["notification"] for r in rest].count("resolved") == 1
    assert "firing" not in [r["notification"] for r in rest]
    none = AlertEngine(parse_rules(rules_text(("ctr",))))
    none.load(json.loads(json.dumps(engine.to_dict())))
    assert none.incidents.open() == []


def test_the_order_rules_are_evaluated_in_changes_nothing() -> None:
    """Grouping is stable under the order of evaluation: the rules file reversed (so every
    tick sees the alerts in the other order) gives the same records, ids and roots."""
    forward = run(AlertEngine(parse_rules(rules_text())), range(T0, T0 + 240), SegmentStore())
    backward = run(
        AlertEngine(parse_rules(rules_text(tuple(reversed(ORDER_KPIS))))),
        range(T0, T0 + 240), SegmentStore(),
    )  # fmt: skip
    assert forward and backward == forward


def test_alerts_joining_the_order_outage_are_told_in_spaced_updates() -> None:
    """The cost KPIs and the channel join c1's order outage minutes after it fired: each is
    named once, in updates at least the spacing apart (repeat 20 min: 200 s)."""
    records = run(AlertEngine(parse_rules(rules_text())), range(T0, T0 + 240), SegmentStore())
    fired = records[0]
    told = [r for r in records if r["notification"] != "resolved"]
    updates = [r for r in told if r["notification"] == "update"]
    assert len(updates) >= 2, [(r["notification"], r["notified_at"]) for r in records]
    at = [datetime.fromisoformat(r["notified_at"]).timestamp() for r in told]
    assert min(b - a for a, b in itertools.pairwise(at)) >= min(UPDATE_EVERY, 20 * 60 / 6)
    ident = fired["incident"]["id"]
    first = {(m["rule"], m["scope"], m["campaign"]) for m in fired["incident"]["members"]}
    named: list[tuple[str, str, str]] = []
    for update in updates:
        assert update["status"] == "firing" and update["incident"]["id"] == ident
        members = {(m["rule"], m["scope"], m["campaign"]) for m in update["incident"]["members"]}
        joined = [(j["rule"], j["scope"], j["campaign"]) for j in update["incident"]["joined"]]
        assert joined and set(joined) <= members - first
        named += joined
        assert update["incident"]["root"] == fired["incident"]["root"]
    assert fired["incident"]["joined"] == []
    final = {(m["rule"], m["scope"], m["campaign"]) for m in records[-1]["incident"]["members"]}
    repeat_named = [(j["rule"], j["scope"], j["campaign"]) for r in told
                    for j in r["incident"]["joined"] if r["notification"] == "repeat"]  # fmt: skip
    assert sorted(named + repeat_named) == sorted(final - first), "every joiner named once"
    # Each update is one more entry per sink, with an id of its own.
    outbox = Outbox(("slack", "alertmanager"))
    outbox.add(told)
    outbox.commit()
    assert outbox.counts() == {"slack": len(told), "alertmanager": len(told)}
    # Its Slack forms: the member list marks who is new, the reply and the webhook say it.
    update = updates[0]
    message = slack_payload(update)
    check_limits(message)
    title = KPI[update["incident"]["joined"][0]["kpi"]].title
    assert "(new)" in json.dumps(message)
    reply = slack_thread_note(update, duration_s=None)["text"]
    assert reply.startswith(":heavy_plus_sign: Also affected: ") and title in reply
    short = slack_update_message(update)
    check_limits(short)
    assert short["text"].startswith(":heavy_plus_sign: Also affected: ") and ident in json.dumps(
        short
    )
    assert len(alertmanager_alerts([update])) == len(update["incident"]["members"])
