"""Rules against goals and budgets (alerts.goals) and through the engine: breaches and
pacing fire, resolve, page and group as the trend rules do; without targets, nothing."""

from __future__ import annotations

import json
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import pytest

from alerts.engine import AlertEngine
from alerts.goals import SPEND_KPI, Goals, exhausted_part, expand, observe
from alerts.incidents import Member, Seen, related
from alerts.notify import alertmanager_alerts, slack_payload
from alerts.rules import GOAL_KPIS, RulesError, parse_rules
from alerts.targets import parse_targets
from stream.aggregate import SegmentStore
from stream.segments import SegmentView
from tests.alerts.test_slack import valid_blocks

UTC = ZoneInfo("UTC")
DAY0 = 29_916_000 - 29_916_000 % 1440  # a UTC midnight, as an epoch minute
RULES = parse_rules("""
rules:
  - name: kpi_target_breach
    against: goal
    scopes: [global, channel, campaign]
    for: 5m
    keep_firing_for: 5m
    runbook_url: docs/runbooks/target-breach.md
  - name: budget_pacing
    against: budget
    scopes: [global, channel, campaign]
    runbook_url: docs/runbooks/pacing.md
""")
CTR_GOAL = parse_targets("channels:\n  search:\n    kpis: {ctr: {min: 0.03}}\n")
BUDGET = parse_targets("channels:\n  search:\n    budget: {daily: 1440}\n")


def records(engine: AlertEngine, store: SegmentStore, minute: int, goals: Goals | None) -> Any:
    return engine.evaluate(SegmentView(store.series), minute + 1, (minute + 1) * 60.0,
                           goals=goals)  # fmt: skip


# ---------------------------------------------------------------- vocabulary


def test_goal_and_budget_rules_run_as_their_parts() -> None:
    breach, pacing = RULES.rules
    parts = expand(breach)
    assert [r.name for r in parts] == [f"kpi_target_breach:{k}" for k in GOAL_KPIS]
    assert {r.alertname for r in parts} == {"kpi_target_breach"}
    assert [r.kpi for r in parts] == list(GOAL_KPIS)
    one = breach.model_copy(update={"kpi": "cac"})
    assert expand(one) == [one]  # a goal rule naming its KPI runs as itself
    over, exhausted = expand(pacing)
    assert (over.name, over.kpi, over.severity, exhausted_part(over)) == (
        "budget_pacing", SPEND_KPI, "ticket", False)  # fmt: skip
    assert (exhausted.alertname, exhausted.severity, exhausted.for_seconds) == (
        "budget_pacing", "page", 0.0)  # fmt: skip
    assert exhausted_part(exhausted) and pacing.margin == 0.2 and pacing.window == "1d"


@pytest.mark.parametrize(
    ("block", "needle", "where"),
    [
        ("  kpi: ctr\n  margin: 0.3\n", "margin applies to rules against: budget only", "margin"),
        ("  against: goal\n  min_change: 0.3\n", "min_change applies to rules against: baseline",
         "min_change"),
        ("  against: budget\n  budget_share: 2\n", "budget_share applies to rules against: "
         "baseline or against: goal", "budget_share"),
        ("  against: budget\n  kpi: cac\n", "judges spend against the daily budgets", "kpi"),
        ("  against: goal\n  kpi: clicks\n", "goals are set on ratio KPIs", "kpi"),
        ("  against: target\n", "'baseline', 'goal' or 'budget'", "against"),
        ("  against: budget\n  margin: 1.2\n", "less than 1", "margin"),
    ],
)  # fmt: skip
def test_goal_keys_are_checked_at_their_line(block: str, needle: str, where: str) -> None:
    text = f"rules:\n- name: a\n  scopes: [global]\n  runbook_url: x\n{block}"
    with pytest.raises(RulesError) as err:
        parse_rules(text, "rules.yml")
    (issue,) = err.value.issues
    assert needle in issue.message
    line = next(i for i, s in enumerate(text.splitlines(), 1) if s.startswith(f"  {where}:"))
    assert (issue.line, issue.path) == (line, f"rules[0].{where}")


def test_a_trend_rule_still_needs_its_kpi() -> None:
    with pytest.raises(RulesError, match=r"rules.yml:2:3: rules\[0\].kpi: a rule against its "
                       "baseline needs kpi"):  # fmt: skip
        parse_rules("rules:\n- name: a\n  scopes: [global]\n  runbook_url: x\n", "rules.yml")


# ---------------------------------------------------------------- no targets, no cost


class Untouchable(SegmentView):
    def sum(self, *args: Any) -> Any:
        raise AssertionError("read a segment without a goal or budget")


def test_without_targets_nothing_is_read_or_fired() -> None:
    store = SegmentStore()
    store.apply_cells([("search", "c1", DAY0, [2000, 10, 0, 0, 0, 0, 5_000_000])])
    view = Untouchable(store.series)
    empty = Goals.of(parse_targets(""), UTC)
    rules = [r for rule in RULES.rules for r in expand(rule)]
    seen = observe(rules, empty, view, DAY0 + 1, {}, 1.0)
    assert all(not (o.bad or o.still_bad or o.evaluated) for o in seen.values())
    # A goal on another segment than the store holds: still nothing read.
    other = Goals.of(parse_targets("channels:\n  email:\n    kpis: {ctr: {min: 0.5}}\n"), UTC)
    assert not any(o.evaluated for o in observe(rules, other, view, DAY0 + 1, {}, 1.0).values())


# ---------------------------------------------------------------- target breach


def ctr_traffic(store: SegmentStore, minute: int, impressions: int, ctr: float) -> None:
    store.apply_cells([("search", "c1", minute, [impressions, round(impressions * ctr), 0, 0, 0,
                                                 0, 0])])  # fmt: skip


def test_a_kpi_past_its_goal_fires_after_for_and_resolves_when_back() -> None:
    store, engine = SegmentStore(), AlertEngine(RULES)
    goals = Goals.of(CTR_GOAL, UTC)
    out = []
    for m in range(DAY0, DAY0 + 60):
        ctr_traffic(store, m, 2000, 0.021 if m < DAY0 + 40 else 0.04)  # 30% below 0.03
        out += [(m - DAY0, r) for r in records(engine, store, m, goals)]
    fired = [(t, r) for t, r in out if r["notification"] == "firing"]
    assert [(r["rule"], r["kpi"], r["scope"], r["channel"]) for _, r in fired] == [
        ("kpi_target_breach", "ctr", "channel", "search")]  # fmt: skip
    t, record = fired[0]
    assert 5 <= t <= 8  # significant at once (10,000 impressions in 5 min), then `for`
    assert record["summary"] == "CTR of channel search is 2.10%, below its goal 3.00% (-30%)"
    assert record["baseline"] == 0.03 and record["value"] == pytest.approx(0.021)
    assert record["p_value"] < 1e-6 and record["baseline_kind"] == "goal (min)"
    assert record["labels"]["alertname"] == "kpi_target_breach"
    assert record["labels"]["kpi"] == "ctr" and record["window"] == "5m"
    assert record["annotations"]["runbook_url"] == "docs/runbooks/target-breach.md"
    resolved = [(t, r) for t, r in out if r["notification"] == "resolved"]
    assert len(resolved) == 1 and 40 < resolved[0][0] <= 52  # back, then keep_firing_for
    assert resolved[0][1]["summary"].startswith("Resolved: CTR of channel search is 4.00%")
    # the campaign has no goal of its own (goals do not cascade): no campaign alert
    assert not [r for _, r in out if r["scope"] == "campaign"]


def test_a_kpi_past_its_goal_at_low_volume_is_not_a_breach() -> None:
    store, engine = SegmentStore(), AlertEngine(RULES)
    goals = Goals.of(CTR_GOAL, UTC)
    rng = np.random.default_rng(3)
    out = []
    for m in range(DAY0, DAY0 + 240):  # 40 impressions a minute: 6 clicks expected in 5 min
        clicks = int(rng.binomial(40, 0.02))
        store.apply_cells([("search", "c1", m, [40, clicks, 0, 0, 0, 0, 0])])
        out += records(engine, store, m, goals)
    assert out == []
    state = engine.states["kpi_target_breach:ctr"]
    assert state.alerts() == []


def test_a_goal_removed_from_the_file_resolves_its_alert() -> None:
    store, engine = SegmentStore(), AlertEngine(RULES)
    goals = Goals.of(CTR_GOAL, UTC)
    out = []
    for m in range(DAY0, DAY0 + 30):
        ctr_traffic(store, m, 2000, 0.02)
        out += records(engine, store, m, goals if m < DAY0 + 15 else Goals.of(BUDGET, UTC))
    kinds = [(r["notification"], r["kpi"]) for r in out]
    assert kinds == [("firing", "ctr"), ("resolved", "ctr")]
    assert "no goal or budget" in out[1]["summary"]


# ---------------------------------------------------------------- pacing


def spend_history(store: SegmentStore, days: int, seed: int = 1) -> np.random.Generator:
    """``days`` of spend at 1 a minute in lumps of 0.1 (Poisson), from DAY0."""
    rng = np.random.default_rng(seed)
    for m in range(DAY0, DAY0 + 1440 * days):
        spend(store, m, rng, 10)
    return rng


def spend(store: SegmentStore, minute: int, rng: np.random.Generator, lumps: float) -> None:
    """A minute's spend of c1 on search: Poisson ``lumps`` of 0.1."""
    store.apply_cells([("search", "c1", minute, [0, 0, 0, 0, 0, 0,
                                                 int(rng.poisson(lumps)) * 100_000])])  # fmt: skip


def pacing_day(boost_from: int | None, seed: int = 1) -> list[tuple[int, dict[str, Any]]]:
    """Day 7 after a normal week, judged every minute; spend x1.5 from ``boost_from``."""
    store, engine = SegmentStore(), AlertEngine(RULES)
    rng = spend_history(store, 7, seed)
    goals = Goals.of(BUDGET, UTC)
    day = DAY0 + 7 * 1440
    out = []
    for m in range(day, day + 1440):
        rate = 15 if boost_from is not None and m - day >= boost_from else 10
        spend(store, m, rng, rate)
        out += [(m + 1 - day, r) for r in records(engine, store, m, goals)]
    return out


def test_a_normal_day_paces_without_an_alert() -> None:
    assert pacing_day(None) == []


def test_overspend_from_ten_is_a_ticket_then_a_page_when_the_budget_is_gone() -> None:
    out = pacing_day(600)
    fired = [(t, r) for t, r in out if r["notification"] == "firing"]
    assert [(r["rule"], r["severity"], r["kpi"]) for _, r in fired] == [
        ("budget_pacing", "ticket", "spend"), ("budget_pacing", "page", "spend")]  # fmt: skip
    (t_over, over), (t_gone, gone) = fired
    assert 600 < t_over <= 600 + 180  # confident within 3 h of the change
    assert over["summary"].startswith("Spend of channel search projected at ")
    assert "of its 1,440 budget today (+" in over["summary"] and "±" in over["summary"]
    assert over["value"] > 1440 * 1.2 and over["baseline"] == 1440 and over["change"] > 0.2
    assert over["baseline_kind"] == "budget" and over["window"] == "1d"
    # 600 min at 1 + the rest at 1.5: the 1,440 are gone at 10:00 + 560 min
    assert 1140 <= t_gone <= 1180
    assert gone["summary"].startswith("Spend of channel search reached its 1,440 budget today")
    assert gone["incident"]["id"] != over["incident"]["id"]  # pacing is its own incident
    assert gone["labels"]["alertname"] == "budget_pacing"
    assert gone["labels"]["severity"] == "page"
    for record in (over, gone):
        payload = slack_payload(record)
        valid_blocks(payload)
        assert payload["blocks"][0]["text"]["text"] == "SPEND alert: channel search"
        assert "*Budget*\n1,440.00 today" in [f["text"] for f in payload["blocks"][2]["fields"]]


def test_pacing_alerts_relate_to_nothing_and_restore() -> None:
    key = ("budget_pacing", "channel", "search", "")
    spend = Seen(key, SPEND_KPI, 0.0, 0.0, {"change": 0.5})
    cpc = Seen(("cpc_rise", "channel", "search", ""), "cpc", 0.0, 0.0, {"change": 0.5})
    assert not related(spend, cpc) and not related(spend, spend)
    member = Member(key, SPEND_KPI, "root", 0.0, 0.0, None, {})
    assert Member.from_dict(json.loads(json.dumps(member.to_dict()))) == member


def test_goal_alerts_survive_a_restart_without_a_second_notice() -> None:
    store, engine = SegmentStore(), AlertEngine(RULES)
    goals = Goals.of(CTR_GOAL, UTC)
    first = []
    for m in range(DAY0, DAY0 + 20):
        ctr_traffic(store, m, 2000, 0.02)
        first += records(engine, store, m, goals)
    restored = AlertEngine(RULES)
    restored.load(json.loads(json.dumps(engine.to_dict())))
    later = []
    for m in range(DAY0 + 20, DAY0 + 40):
        ctr_traffic(store, m, 2000, 0.02)
        later += records(restored, store, m, goals)
    assert [r["notification"] for r in first] == ["firing"]
    assert [r["notification"] for r in later] == []
    assert restored.firing_labels() == [
        ("kpi_target_breach", "ticket", "channel", "search", "")]  # fmt: skip


# ---------------------------------------------------------------- messages


def test_messages_read_as_goals_and_budgets_in_slack_and_alertmanager() -> None:
    store, engine = SegmentStore(), AlertEngine(RULES, grafana_url="http://grafana:3000")
    goals = Goals.of(CTR_GOAL, UTC)
    out = []
    for m in range(DAY0, DAY0 + 10):
        ctr_traffic(store, m, 2000, 0.021)
        out += records(engine, store, m, goals)
    (record,) = out
    payload = slack_payload(record, silence_url="http://am:9093/#/silences/new")
    valid_blocks(payload)
    fields = [f["text"] for f in payload["blocks"][2]["fields"]]
    assert "*Goal*\nat least 3.00%" in fields
    assert payload["blocks"][0]["text"]["text"] == "CTR alert: channel search"
    (alert,) = alertmanager_alerts([record])
    assert alert["labels"]["alertname"] == "kpi_target_breach"
    assert alert["labels"]["kpi"] == "ctr" and alert["labels"]["rule"] == "kpi_target_breach"


# ---------------------------------------------------------------- the backtest


def test_the_backtest_judges_goals_from_a_targets_file() -> None:
    """Simulated traffic through Replay: c1's CTR goal at twice its CTR fires the breach;
    the same replay without targets fires none (goals come only from the file)."""
    from alerts.backtest import run_backtest
    from stream.settings import Settings
    from stream.simulate import SimConfig, Simulator, encode

    def lines() -> list[bytes]:
        sim = Simulator(SimConfig(seed=4, rate=40.0, campaigns=3, diurnal=False))
        start = DAY0 * 60.0 + 10 * 3600
        return [encode(k, e, with_type=True) for k, e in sim.events(start, 30 * 60)]

    ctr = Simulator(SimConfig(seed=4, rate=40.0, campaigns=3)).campaigns[1].ctr
    targets = parse_targets(f"campaigns:\n  c1: {{kpis: {{ctr: {{min: {2 * ctr:.4f}}}}}}}\n")
    settings = Settings(currency_rates={"EUR": 1.1})
    got = list(run_backtest(RULES, lines(), settings, targets=targets))
    assert [(r["rule"], r["kpi"], r["campaign"], r["notification"]) for r in got] == [
        ("kpi_target_breach", "ctr", "c1", "firing")]  # fmt: skip
    assert "below its goal" in got[0]["summary"]
    assert list(run_backtest(RULES, lines(), settings)) == []


def test_no_pacing_verdict_alerts_before_today_fills_the_recent_window() -> None:
    """Spend stops at midnight: 'under' is confident within the hour, but the rule waits
    until the projection's two-hour window is all today's (unreported spend would weigh
    too much in a shorter one), then fires."""
    store, engine = SegmentStore(), AlertEngine(RULES)
    spend_history(store, 7)
    goals = Goals.of(BUDGET, UTC)
    day = DAY0 + 7 * 1440
    out = []
    for m in range(day, day + 180):
        store.apply_cells([("search", "c1", m, [1, 0, 0, 0, 0, 0, 0])])
        out += [(m + 1 - day, r) for r in records(engine, store, m, goals)]
    assert [(t, r["notification"]) for t, r in out] == [(120, "firing")]
    assert "projected at " in out[0][1]["summary"] and "(-" in out[0][1]["summary"]


def test_pacing_intervals_widen_with_the_budgets_judged() -> None:
    """Re-judged every minute, the verdicts share the file's false-alarm budget."""
    from alerts.goals import pacing_z

    assert pacing_z(1.0, 1) < pacing_z(1.0, 6) < pacing_z(1.0, 500)
    assert pacing_z(1.0, 6) == pytest.approx(4.15, abs=0.01)  # p = 1 / (10,080 x 6)
    assert pacing_z(10_000.0, 1) == 3.0  # never narrower than the dashboards' +-3 SE
