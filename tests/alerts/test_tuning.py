"""The shipped rules (alerts/rules.yml) against simulated window sums: quiet on stationary
traffic of any volume, and every large drop at typical volume fires.

Window sums come from a small funnel model of one segment (impressions -> clicks ->
leads, orders -> new customers; right-skewed order values; spend per click and per
impression plus fees reported in 10-minute lumps that arrive a few minutes late), so
each rule is judged exactly as the engine judges it, with its Bonferroni share for
the 20 campaigns and 5 channels of the simulator (the engine divides ``p_value`` by
the segments a rule judges). Seeded, so reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from alerts.detectors import ORDER_VALUE_CV, judge
from alerts.engine import AlertEngine, thresholds
from alerts.rules import DEFAULT_RULES, Rule, load_rules
from stream.aggregate import SegmentStore
from stream.segments import SegmentView
from stream.windows import MICROS

RULES = load_rules(DEFAULT_RULES).rules
DRAWS = 1000
SEGMENTS = {"global": 1, "channel": 5, "campaign": 20}


@dataclass(frozen=True)
class Funnel:
    """One segment's traffic per minute and its funnel, costs and order values."""

    impressions: float  # per minute
    ctr: float = 0.03
    lead_rate: float = 0.1
    conversion_rate: float = 0.04
    new_share: float = 0.3
    aov: float = 60.0
    cpc: float = 1.0
    cpm: float = 4.5  # per 1000 impressions, paid per impression
    fee_cpm: float = 12.5  # per 1000 impressions, reported in lumps every 10 minutes

    def draw(
        self, rng: np.random.Generator, minutes: int, n: int, *, silent: str = "",
        ctr: float = 1.0, lead_rate: float = 1.0, conversion_rate: float = 1.0,
        spend: float = 1.0, aov: float = 1.0,
    ) -> np.ndarray:  # fmt: skip
        """``n`` draws of the sums over ``minutes`` (MEASURES order, money in micros);
        the keywords scale a rate, spend or order values (an incident)."""
        impressions = rng.poisson(self.impressions * minutes, n)
        clicks = rng.binomial(impressions, self.ctr * ctr)
        leads = rng.binomial(clicks, self.lead_rate * lead_rate)
        orders = rng.binomial(clicks, self.conversion_rate * conversion_rate)
        new = rng.binomial(orders, self.new_share)
        cv2 = ORDER_VALUE_CV**2  # gamma sums: the mean and spread the detectors assume
        mean = self.aov * aov
        revenue = np.where(orders > 0, rng.gamma(np.maximum(orders, 1) / cv2, mean * cv2), 0.0)
        per_click = clicks * self.cpc * rng.uniform(0.95, 1.05, n)  # many U(0.8, 1.2) costs
        lumps = minutes / 10 + rng.choice([-1, 0, 0, 0, 0, 1], n) * (minutes >= 10)
        fees = lumps * self.impressions * 10 * self.fee_cpm / 1000
        spend_ = (per_click + impressions * self.cpm / 1000 + fees) * spend
        sums = np.stack([impressions, clicks, leads, orders, new, revenue * MICROS,
                         spend_ * MICROS]).T.astype(np.int64)  # fmt: skip
        if silent:
            sums[:, ["impressions", "clicks", "leads", "orders"].index(silent)] = 0
        return sums


def verdicts(rule: Rule, funnel: Funnel, seed: int, segments: int, n: int = DRAWS,
             **incident: float | str) -> list[bool]:  # fmt: skip
    """Is ``rule`` bad on each of ``n`` draws of (current window, baseline)?"""
    rng = np.random.default_rng(seed)
    w, k = rule.window_minutes, rule.baseline_windows
    current = funnel.draw(rng, w, n, **incident)  # type: ignore[arg-type]
    base = funnel.draw(rng, w * k, n)
    th = thresholds(rule, segments)
    return [
        judge(rule.kpi, c.tolist(), b.tolist(), 1 / k, th).bad
        for c, b in zip(current, base, strict=True)
    ]


@pytest.mark.parametrize("impressions", [20.0, 200.0, 2000.0, 20_000.0])
@pytest.mark.parametrize("seed", [1, 2])
def test_no_rule_fires_on_stationary_traffic_of_any_volume(impressions: float, seed: int) -> None:
    """2 x 4 x 1000 comparisons per rule at its per-segment p (~1e-7 to 1e-6): expect none."""
    funnel = Funnel(impressions)
    for rule in RULES:
        segments = sum(SEGMENTS[scope] for scope in rule.scopes)
        fired = sum(verdicts(rule, funnel, seed, segments))
        assert fired == 0, (rule.name, impressions)


# A large channel of the simulator at its default 200 events/s: 300 clicks, 30 leads,
# 12 orders and 3.6 new customers a minute (CAC, the sparsest KPI, needs that much for a
# doubling to be beyond doubt in one hour).
TYPICAL = Funnel(10_000.0)


def incident_of(rule: Rule) -> dict[str, float | str]:
    """A large move of the rule's KPI in its bad direction: a rate or order value halved,
    spend doubled, a stream silent."""
    if rule.kind == "count":
        return {"silent": rule.kpi}
    if rule.kind == "rate":
        return {rule.kpi: 0.5}
    if rule.kpi == "aov":
        return {"aov": 0.5}
    return {"spend": 2.0}


@pytest.mark.parametrize("rule", RULES, ids=[rule.name for rule in RULES])
def test_every_large_drop_at_typical_volume_fires(rule: Rule) -> None:
    # A window that misses by a hair is caught at one of the next evaluations (every
    # minute, on windows that overlap almost entirely): 99% of windows is "fires".
    segments = sum(SEGMENTS[scope] for scope in rule.scopes)
    fired = verdicts(rule, TYPICAL, 7, segments, n=200, **incident_of(rule))
    assert fired.count(True) >= 0.99 * len(fired), (rule.name, fired.count(False))


def test_through_the_engine_quiet_hours_then_a_ctr_drop_and_an_order_outage_fire_fast() -> None:
    """Eight hours of stationary minutes through AlertEngine with the default rules: not one
    alert; then campaign c1's CTR halves for 30 minutes and, two hours later, the order stream
    goes silent (4.6 orders a minute): both fire within 10 minutes."""
    rng = np.random.default_rng(11)
    campaigns = {"c1": Funnel(2000.0), "c2": Funnel(1500.0, ctr=0.02), "c3": Funnel(800.0)}
    channel = {"c1": "social", "c2": "social", "c3": "search"}
    store, engine = SegmentStore(), AlertEngine(load_rules(DEFAULT_RULES))
    start = 29_916_000  # a minute index
    drop, outage = start + 8 * 60, start + 10 * 60
    fired: dict[str, float] = {}  # rule:campaign -> minutes from onset to firing
    for minute in range(start, outage + 20):
        for name, funnel in campaigns.items():
            ctr = 0.5 if name == "c1" and drop <= minute < drop + 30 else 1.0
            silent = "orders" if minute >= outage else ""
            row = funnel.draw(rng, 1, 1, ctr=ctr, silent=silent)[0]
            store.apply_cells([(channel[name], name, minute, row.tolist())])
        now = minute + 2  # the watermark: minute + 1 is complete, plus the 1-minute settle
        for record in engine.evaluate(SegmentView(store.series), minute + 1, now * 60.0):
            if record["notification"] == "firing":
                onset = drop if now < outage else outage
                fired.setdefault(f"{record['rule']}:{record['campaign']}", now - onset)
    assert [key for key, after in fired.items() if after < 0] == []  # quiet for eight hours
    assert fired.get("ctr_drop_campaign:c1", 99) <= 10, fired
    assert fired.get("orders_outage:", 99) <= 10, fired
