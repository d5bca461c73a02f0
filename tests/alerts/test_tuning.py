"""The shipped rules (alerts/rules.yml) through the alert engine on simulated minutes: quiet
on stationary traffic at the budgeted rate, large changes found within 1.5x the information
bound, and restarts and repeated evaluations that change no decision.

Minutes come from a small funnel model of a segment: impressions -> clicks (same minute),
leads and orders trailing their clicks by up to ten minutes, right-skewed order values,
spend per click and per impression plus fees reported in a lump every ten minutes (a few
minutes late). Seeded, so reproducible.
"""

from __future__ import annotations

import json
import math
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import pytest

from alerts.detectors import information_bound, kl_per_count
from alerts.engine import AlertEngine
from alerts.rules import DEFAULT_RULES, RulesFile, load_rules
from stream.aggregate import SegmentStore
from stream.segments import SegmentView
from stream.windows import MICROS

DEFAULT = load_rules(DEFAULT_RULES)
T0 = 29_916_000  # a minute index


@dataclass
class Funnel:
    """One campaign's traffic per minute; the keywords of ``minute`` are incidents."""

    impressions: float
    ctr: float = 0.03
    lead_rate: float = 0.1
    conversion_rate: float = 0.04
    aov: float = 60.0
    cpc: float = 1.0
    cpm: float = 4.5
    fee_cpm: float = 12.5  # reported every 10 minutes, 0-3 minutes late
    clicks: deque[int] = field(default_factory=lambda: deque([0] * 10, maxlen=10))
    fees: float = 0.0
    due: int = 0  # the minute of the period its report lands in

    def minute(self, rng: np.random.Generator, minute: int, *, ctr: float = 1.0,
               silent: str = "") -> list[int]:  # fmt: skip
        impressions = int(rng.poisson(self.impressions))
        clicks = int(rng.binomial(impressions, self.ctr * ctr))
        self.clicks.append(clicks)
        matured = sum(self.clicks) / len(self.clicks)  # conversions trail their clicks
        leads = int(rng.poisson(matured * self.lead_rate))
        orders = int(rng.poisson(matured * self.conversion_rate))
        new = int(rng.binomial(orders, 0.3))
        revenue = float(rng.lognormal(math.log(self.aov) - 0.18, 0.6, orders).sum())
        spend = clicks * self.cpc * rng.uniform(0.8, 1.2) + impressions * self.cpm / 1000
        if minute % 10 == 0:  # the last period's report lands 0-3 minutes later
            self.due = int(rng.integers(0, 4))
        if minute % 10 == self.due:
            spend, self.fees = spend + self.fees, 0.0
        self.fees += impressions * self.fee_cpm / 1000
        if silent == "orders":
            orders = new = 0
            revenue = 0.0
        return [impressions, clicks, leads, orders, new, round(revenue * MICROS),
                round(spend * MICROS)]  # fmt: skip


def run(
    engine: AlertEngine, store: SegmentStore, campaigns: dict[str, Funnel], minutes: range,
    rng: np.random.Generator, incident: Any = None,
) -> list[tuple[int, dict[str, Any]]]:  # fmt: skip
    """Feed ``minutes`` and evaluate once a minute (minute + 1 complete, settled a minute
    later); ``incident(name, minute)`` gives a campaign's incident keywords."""
    out = []
    for minute in minutes:
        for i, (name, funnel) in enumerate(campaigns.items()):
            kw = incident(name, minute) if incident else {}
            row = funnel.minute(rng, minute, **kw)
            store.apply_cells([(("social", "search")[i % 2], name, minute, row)])
        now = minute + 2
        for record in engine.evaluate(SegmentView(store.series), minute + 1, now * 60.0):
            out.append((now, record))
    return out


def firing(records: list[tuple[int, dict[str, Any]]]) -> list[tuple[int, dict[str, Any]]]:
    """Every alert that fired, once, at the minute it fired: the member alerts of the
    incident records (an alert joining an open incident is in its next notification)."""
    seen: dict[tuple[str, ...], tuple[int, dict[str, Any]]] = {}
    for _, record in records:
        for m in record["incident"]["members"]:
            if m.get("fired_at"):
                key = (m["rule"], m["scope"], m["channel"], m["campaign"], m["fired_at"])
                minute = int(datetime.fromisoformat(m["fired_at"]).timestamp()) // 60
                seen.setdefault(key, (minute, m))
    return sorted(seen.values(), key=lambda pair: pair[0])


@pytest.mark.parametrize(("impressions", "seed"), [(150.0, 1), (150.0, 2), (2000.0, 3)])
def test_stationary_traffic_alerts_at_most_at_the_budgeted_rate(impressions: float,
                                                               seed: int) -> None:  # fmt: skip
    """The default rules on half a day of stationary traffic of two campaigns, with the
    budget raised to 2,100 false alerts a week (150 a half day, h ~ 7) so that the rate is
    measurable:
    at most the budget, whatever the volume (the CUSUM bound e^h is conservative, and
    the baselines' own noise is discounted)."""
    budget = 2100.0
    rules = RulesFile.model_validate(
        {**DEFAULT.model_dump(by_alias=True), "false_alerts_per_week": budget}
    )
    engine, store = AlertEngine(rules), SegmentStore()
    campaigns = {"c1": Funnel(impressions), "c2": Funnel(impressions / 3, ctr=0.02)}
    rng = np.random.default_rng(seed)
    records = run(engine, store, campaigns, range(T0, T0 + 720), rng)
    fired = len(firing(records))
    assert fired <= budget / 14, fired
    c1 = engine.detectors["ctr_drop_campaign"].by_segment[("campaign", "social", "c1")]
    assert c1.limits[0] == pytest.approx(math.log(3 * 10080 * _detectors(engine) / budget))


def _detectors(engine: AlertEngine) -> int:
    """(rule, segment) detectors of the last evaluation: the engine's N."""
    return sum(len(d.by_segment) for d in engine.detectors.values())


def test_quiet_hours_then_a_ctr_halving_and_an_order_outage_fire_within_the_bound() -> None:
    """Eight quiet hours with the default rules: no alert. Then campaign c1's CTR halves
    (60 clicks a minute) and, two hours later, the order stream goes silent (about 4.6
    orders a minute in all): both fire within 1.5x their bound h / KL, plus the settle
    minute."""
    rng = np.random.default_rng(11)
    campaigns = {"c1": Funnel(2000.0), "c2": Funnel(1500.0, ctr=0.02), "c3": Funnel(800.0)}
    engine, store = AlertEngine(DEFAULT), SegmentStore()
    drop, outage = T0 + 8 * 60, T0 + 10 * 60

    def incident(name: str, minute: int) -> dict[str, Any]:
        ctr = 0.5 if name == "c1" and drop <= minute < drop + 30 else 1.0
        return {"ctr": ctr, "silent": "orders" if minute >= outage else ""}

    records = run(engine, store, campaigns, range(T0, outage + 30), rng, incident)
    fired: dict[str, int] = {}
    for now, r in firing(records):
        onset = drop if now < outage else outage
        fired.setdefault(f"{r['rule']}:{r['campaign']}", now - onset)
    assert [key for key, after in fired.items() if after < 0] == []  # quiet for eight hours
    h = engine.detectors["ctr_drop_campaign"].by_segment[("campaign", "social", "c1")].limits[0]
    # the binomial KL of a 3% CTR halving on 2000 impressions a minute
    ctr_bound = h / (2000 * (0.015 * math.log(0.5) + 0.985 * math.log(0.985 / 0.97)))
    assert fired.get("ctr_drop_campaign:c1", 99) <= 1.5 * ctr_bound + 1, (fired, ctr_bound)
    orders = sum(f.impressions * f.ctr * f.conversion_rate for f in campaigns.values())
    h_orders = engine.detectors["orders_outage"].by_segment[("global", "", "")].limits[0]
    orders_bound = information_bound(h_orders, 0.0, orders)
    assert kl_per_count(0.0) == 1.0
    assert fired.get("orders_outage:", 99) <= 1.5 * orders_bound + 1, (fired, orders_bound)


def test_a_restart_mid_run_and_repeated_evaluations_change_no_decision() -> None:
    """The engine's state through JSON at any minute resumes exactly: the same records
    as the run that never stopped; evaluating a minute twice adds it once."""
    campaigns = {"c1": Funnel(300.0), "c2": Funnel(200.0)}
    store = SegmentStore()
    rng = np.random.default_rng(5)
    minutes = range(T0, T0 + 150)
    rows = {m: {n: f.minute(rng, m, ctr=0.4 if n == "c1" and m >= T0 + 110 else 1.0)
                for n, f in campaigns.items()} for m in minutes}  # fmt: skip
    straight, stopped, twice = (AlertEngine(DEFAULT) for _ in range(3))
    out: dict[str, list[Any]] = {"straight": [], "stopped": [], "twice": []}
    for minute in minutes:
        for i, name in enumerate(campaigns):
            store.apply_cells([(("social", "search")[i % 2], name, minute, rows[minute][name])])
        view, now = SegmentView(store.series), (minute + 2) * 60.0
        out["straight"] += straight.evaluate(view, minute + 1, now)
        if minute == T0 + 115:  # mid-excursion: restore from JSON
            state = json.loads(json.dumps(stopped.to_dict()))
            stopped = AlertEngine(DEFAULT)
            stopped.load(state)
        out["stopped"] += stopped.evaluate(view, minute + 1, now)
        out["twice"] += twice.evaluate(view, minute + 1, now - 30)
        out["twice"] += twice.evaluate(SegmentView(store.series), minute + 1, now)
    assert any(r["notification"] == "firing" and r["campaign"] == "c1" for r in out["straight"])
    assert out["stopped"] == out["straight"]
    assert json.dumps(stopped.to_dict()) == json.dumps(straight.to_dict())
    assert [r["rule"] for r in out["twice"]] == [r["rule"] for r in out["straight"]]
    assert straight.to_dict()["detectors"] == twice.to_dict()["detectors"]


def test_state_of_the_window_engine_restores_its_lifecycles() -> None:
    """A state written before sequential detection (a bare map of rule lifecycles) still
    loads: the alerts keep their lifecycle, the statistics start at zero."""
    engine = AlertEngine(DEFAULT)
    old = {name: state.to_dict() for name, state in engine.states.items()}
    restored = AlertEngine(DEFAULT)
    restored.load(old)
    assert restored.to_dict() == engine.to_dict()
    with pytest.raises(ValueError, match="version"):
        restored.load({"version": 99})
