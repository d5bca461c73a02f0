"""Goal and budget rules: what the targets file says of each segment, as observations.

A rule ``against: goal`` judges KPIs against the goals of the targets file
(``alerts.targets``); a rule ``against: budget`` judges spend against the daily budgets.
Nothing here holds state: :func:`observe` turns the targets in force, one tick's
segment view and its minute into, per rule and segment, "bad" (past the goal with
significance, or spend confidently off its budget), "still bad" (on the wrong side,
not yet or no longer significant: keeps a firing alert firing) or neither, with the
details an alert record is made of. The engine steps each rule's lifecycle
(``alerts.lifecycle``: ``for``, ``keep_firing_for``, repeats) and incidents with them
exactly as it does for the trend rules, so breaches and pacing reach the same sinks.

How a user's rule runs (:func:`expand`): a goal rule without ``kpi`` runs as one rule
per ratio KPI (``name:cac``...), so each KPI of a segment is its own alert, named
``name`` with its ``kpi`` label; a budget rule runs as ``name`` (over or under budget
by more than ``margin``, confidently, once today fills the projection's recent window
(``RECENT_MINUTES``): a shorter one, at night, is dominated by the spend not reported
yet, as reports lag their spend by up to a quarter of an hour: the rule's severity) and
``name:exhausted`` (the budget is spent before the day ends, and the rest of the day at
today's pace would end it more than ``margin`` over: a page). ``:`` cannot occur in a rules
file's names, so these never collide with a user's rule.

Significance of a breach: a goal rule spends ``budget_share`` x ``false_alerts_per_week``
of false alerts a week on its own, split over the goals it judges every minute, as the
trend detectors split theirs (p = that / (10,080 x goals)); the KPI must stay past its
goal for the rule's ``for`` on top, and the breach test's volume floors
(``alerts.pacing.target_breach``) keep a small segment quiet until its volume can say.
A pacing verdict is re-judged every minute too: its interval must clear the margin at
z standard errors from the same budget split over the budgets judged (``pacing_z``).
Without targets (or none for a rule's scopes), nothing is judged: one ``empty()`` check.

Pure module: it reads the view, never a clock.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, tzinfo
from statistics import NormalDist
from typing import Any

from alerts.detectors import WEEK_MINUTES, normal_sf
from alerts.lifecycle import AlertKey
from alerts.pacing import (
    RECENT_MINUTES,
    Day,
    Pacing,
    PacingVerdict,
    Shape,
    SpendSum,
    Z,
    day_of,
    local_day,
    own_shape,
    pace,
    pacing_verdict,
    target_breach,
)
from alerts.rules import GOAL_KPIS, Rule
from alerts.targets import Bound, Budget, Targets
from alerts.text import format_value, where
from stream.aggregate import OTHER, SeriesKey
from stream.kpis import KPI, SPEND, measure_value
from stream.segments import SegmentView

SPEND_KPI = "spend"
"""The ``kpi`` of a budget rule's alerts (spend is a measure, not a catalogue KPI)."""
EXHAUSTED = "exhausted"
"""Suffix of the part of a budget rule that pages when the budget is spent."""

Details = dict[str, object]


# --- the rules as they run --------------------------------------------------------------------


def expand(rule: Rule) -> list[Rule]:
    """The rules ``rule`` runs as (see the module doc); a trend rule is itself."""
    if rule.against == "goal" and not rule.kpi:
        return [rule.model_copy(update={"name": f"{rule.name}:{k}", "kpi": k}) for k in GOAL_KPIS]
    if rule.against == "budget":
        return [
            rule.model_copy(update={"kpi": SPEND_KPI}),
            rule.model_copy(update={"name": f"{rule.name}:{EXHAUSTED}", "kpi": SPEND_KPI,
                                    "severity": "page", "for_": "0s"}),
        ]  # fmt: skip
    return [rule]


def exhausted_part(rule: Rule) -> bool:
    return rule.against == "budget" and rule.name.endswith(f":{EXHAUSTED}")


# --- what the rules judge by ------------------------------------------------------------------


class Curves:
    """Each budget's default curve (the segment's own shape over the past week): it depends
    only on past days, so it is computed once per segment and local day."""

    def __init__(self, tz: tzinfo) -> None:
        self.tz = tz
        self._shapes: dict[tuple[SeriesKey, date], Shape] = {}
        self._day: date | None = None

    def shape(self, key: SeriesKey, spend: SpendSum, day: date) -> Shape:
        if day != self._day:
            self._shapes.clear()
            self._day = day
        found = self._shapes.get((key, day))
        if found is None:
            found = self._shapes[key, day] = own_shape(spend, day_of(day, self.tz), self.tz)
        return found


ShapeOf = Callable[[SeriesKey, SpendSum, date], Shape]


def budget_shape(budget: Budget, key: SeriesKey, spend: SpendSum, day: Day, tz: tzinfo,
                 shape_of: ShapeOf | None) -> Shape:  # fmt: skip
    """The curve ``budget`` follows: the file's weights, else the segment's own shape."""
    shape = shape_of(key, spend, day.date) if shape_of is not None else own_shape(spend, day, tz)
    weights = budget.weights()
    return shape if weights is None else Shape(weights, "file", shape.days, shape.dispersion)


@dataclass(frozen=True)
class Goals:
    """The targets in force at a tick, the zone of "today" and the learnt curves."""

    targets: Targets
    tz: tzinfo
    curves: Curves | None = None

    @classmethod
    def of(cls, targets: Targets, tz: tzinfo) -> Goals:
        return cls(targets, tz, Curves(tz))

    @property
    def shape_of(self) -> ShapeOf | None:
        return self.curves.shape if self.curves is not None else None


@dataclass
class Observed:
    """One rule's tick, as its lifecycle takes it (``RuleAlerts.update``)."""

    bad: dict[AlertKey, Details] = field(default_factory=dict)
    still_bad: set[AlertKey] = field(default_factory=set)
    evaluated: set[AlertKey] = field(default_factory=set)
    current: dict[AlertKey, Details] = field(default_factory=dict)
    """Details as things stand, for every evaluated segment (a resolve says where it is)."""


def _spend(segments: SegmentView, key: SeriesKey) -> SpendSum:
    return lambda start, end: measure_value(SPEND, int(segments.sum(key, start, end)[SPEND]))


def observe(
    rules: Sequence[Rule],
    goals: Goals | None,
    segments: SegmentView,
    end_minute: int,
    tracked: Mapping[str, Iterable[AlertKey]],
    false_alerts_per_week: float,
) -> dict[str, Observed]:
    """Every goal and budget rule (as expanded) over one tick: observations by rule name.

    ``end_minute``: the end (exclusive) of the settled minutes. ``tracked``: the keys each
    rule has an alert for (pending, firing or resolved): a segment that lost its goal or
    budget (the file changed) or left the view is judged "not bad", so its alert resolves.
    """
    out = {rule.name: Observed() for rule in rules}
    targets = goals.targets if goals is not None and not goals.targets.empty() else None
    if targets is not None and goals is not None:
        keys = [k for k in segments if OTHER not in k]
        breach = [r for r in rules if r.against == "goal"]
        tests: dict[str, int] = {}
        found: list[tuple[Rule, SeriesKey, dict[Bound, float]]] = []
        for rule in breach:
            for key in keys:
                if key[0] in rule.scopes:
                    goal = targets.resolve(key).goals.get(rule.kpi)
                    if goal is not None:
                        bounds = goal.bounds()
                        found.append((rule, key, bounds))
                        tests[rule.alertname] = tests.get(rule.alertname, 0) + len(bounds)
        for rule, key, bounds in found:
            p_value = (false_alerts_per_week * rule.budget_share
                       / (WEEK_MINUTES * tests[rule.alertname]))  # fmt: skip
            _breach(out[rule.name], rule, key, bounds, segments, end_minute, p_value)
        day = local_day(end_minute, goals.tz)
        for rule in (r for r in rules if r.against == "budget"):
            budgets = [(k, b) for k in keys if k[0] in rule.scopes
                       and (b := targets.resolve(k).budget) is not None]  # fmt: skip
            z = pacing_z(false_alerts_per_week, len(budgets))
            for key, budget in budgets:
                _pacing(out[rule.name], rule, key, budget, segments, day, end_minute, goals, z)
    for rule in rules:  # alerts whose goal, budget or segment is gone resolve
        seen = out[rule.name]
        for gone in tracked.get(rule.name, ()):
            if gone not in seen.evaluated:
                seen.evaluated.add(gone)
                seen.current[gone] = {"reason": "no goal or budget for this segment any more",
                                     "baseline_kind": "gone"}  # fmt: skip
    return out


# --- target breach ----------------------------------------------------------------------------


def _breach(
    seen: Observed, rule: Rule, key: SeriesKey, bounds: Mapping[Bound, float],
    segments: SegmentView, end: int, p_value: float,
) -> None:  # fmt: skip
    start = end - rule.window_minutes
    totals = segments.sum(key, start, end)
    judged = [target_breach(rule.kpi, b, g, [int(x) for x in totals], p_value=p_value)
              for b, g in bounds.items()]  # fmt: skip
    if all(j.value is None for j in judged):
        return  # no data in the window: held as it is
    # At most one bound can be past (min <= max): judge by it, else by the nearer one.
    worst = next((j for j in judged if j.breached), None) or next(
        (j for j in judged if _past(j.bound, j.value, j.goal)), judged[0]
    )
    alert_key: AlertKey = (rule.name, *key)
    known = KPI[rule.kpi]
    change = known.change(worst.value, worst.goal)
    details: Details = {
        "value": worst.value,
        "baseline": worst.goal,
        "change": change,
        "goal": worst.goal,
        "bound": worst.bound,
        "p_value": worst.p_value,
        "statistic": None,
        "threshold": p_value,
        "enough_data": worst.enough_data,
        "reason": worst.reason + f" (significance {p_value:.1e})",
        "baseline_kind": f"goal ({worst.bound})",
        "window_start": start * 60,
        "window_end": end * 60,
        "contributors": _breach_contributors(rule, key, segments, start, end),
    }
    seen.evaluated.add(alert_key)
    seen.current[alert_key] = details
    if worst.breached:
        seen.bad[alert_key] = details
    elif _past(worst.bound, worst.value, worst.goal):
        seen.still_bad.add(alert_key)


def _past(bound: str, value: float | None, goal: float) -> bool:
    return value is not None and (value < goal if bound == "min" else value > goal)


def _breach_contributors(
    rule: Rule, key: SeriesKey, segments: SegmentView, start: int, end: int, top: int = 3
) -> list[dict[str, Any]]:
    """The child segments with the most volume on the wrong side: where the KPI stands in
    each (no goal of their own is needed to say which campaign drags a channel)."""
    known = KPI[rule.kpi]
    parent = segments.sum(key, start, end)
    whole = float(parent[known.den])
    if known.den == known.num or whole <= 0:
        return []
    value = float(parent[known.num]) / whole + known.shift
    rows: list[dict[str, Any]] = []
    for child in segments.children(key):
        sums = segments.sum(child, start, end)
        den = float(sums[known.den])
        if den <= 0:
            continue
        v = float(sums[known.num]) / den + known.shift
        change = known.change(v, value)
        rows.append({"scope": child[0], "channel": child[1], "campaign": child[2], "value": v,
                     "baseline": value, "change": change, "share": den / whole,
                     "impact": known.worse_by(change) * den})  # fmt: skip
    rows.sort(key=lambda r: -float(r["impact"]))
    return [r for r in rows if float(r["impact"]) > 0][:top]


# --- pacing -----------------------------------------------------------------------------------


def pacing_z(false_alerts_per_week: float, budgets: int) -> float:
    """Half-width of the interval a pacing verdict must clear, in standard errors: the
    file's false-alarm budget split over the budgets judged every minute (one-sided), as
    the detectors split theirs, never below the dashboards' ``Z`` (3). The projection is
    re-judged every minute, so a per-look 3 SE would add up over a week of looks."""
    p = false_alerts_per_week / (WEEK_MINUTES * max(budgets, 1))
    return max(Z, NormalDist().inv_cdf(1 - min(p, 0.5)))


def _pacing(
    seen: Observed, rule: Rule, key: SeriesKey, budget: Budget, segments: SegmentView,
    day: Day, end: int, goals: Goals, z: float = Z,
) -> None:  # fmt: skip
    spend = _spend(segments, key)
    shape = budget_shape(budget, key, spend, day, goals.tz, goals.shape_of)
    verdict = pacing_verdict(pace(spend, budget.daily, day, end, shape, z=z), rule.margin)
    alert_key: AlertKey = (rule.name, *key)
    details = pacing_details(verdict, day, end, goals.tz)
    seen.evaluated.add(alert_key)
    seen.current[alert_key] = details
    status = verdict.status
    if exhausted_part(rule):
        # Gone, and the rest of the day at today's pace ends it past the margin: a budget
        # that runs out at 23:56 on a normal day is the budget met, not a page.
        if status == "exhausted" and verdict.pacing.projected > budget.daily * (1 + rule.margin):
            seen.bad[alert_key] = details
        elif status == "exhausted":
            seen.still_bad.add(alert_key)
    elif status in ("over", "under") and verdict.confident and end - day.start >= RECENT_MINUTES:
        seen.bad[alert_key] = details
    elif status in ("over", "under", "exhausted"):
        seen.still_bad.add(alert_key)


def pacing_details(verdict: PacingVerdict, day: Day, end: int, tz: tzinfo) -> Details:
    """An alert's details for a pacing verdict: value = the projection, baseline = the
    budget, change relative to it, and the interval (``low``, ``high``) it was sure by."""
    p: Pacing = verdict.pacing
    margin = verdict.margin
    line = p.budget * (1 + margin) if verdict.status != "under" else p.budget * (1 - margin)
    z = (p.projected - line) / p.stderr if p.stderr > 0 else None
    if verdict.status == "under" and z is not None:
        z = -z
    return {
        "value": p.projected,
        "baseline": p.budget,
        "change": p.projected / p.budget - 1,
        "status": verdict.status,
        "confident": verdict.confident,
        "spent": p.spend,
        "budget": p.budget,
        "projected": p.projected,
        "low": p.low,
        "high": p.high,
        "expected_share": p.share,
        "pacing_ratio": p.ratio,
        "margin": margin,
        "statistic": z,
        "p_value": normal_sf(z) if z is not None and verdict.status != "exhausted" else None,
        "local_time": datetime.fromtimestamp(end * 60, tz).strftime("%H:%M"),
        "reason": verdict.summary,
        "baseline_kind": "budget",
        "window_start": day.start * 60,
        "window_end": end * 60,
        "contributors": [],
    }


# --- how they read ----------------------------------------------------------------------------


def summary(rule: Rule, scope: str, channel: str, campaign: str, d: Mapping[str, Any],
            resolved: bool = False) -> str:  # fmt: skip
    """One line for a growth manager: the figure, the goal or budget, by how much."""
    place = where(scope, channel, campaign)
    if d.get("baseline_kind") == "gone":
        return f"Resolved: {rule.alertname} of {place}: no goal or budget for it any more"
    if rule.against == "budget":
        return _pacing_summary(place, d, resolved)
    kpi = rule.kpi
    title = KPI[kpi].title if kpi in KPI else kpi
    value, goal = format_value(kpi, d.get("value")), format_value(kpi, d.get("goal"))
    change = d.get("change")
    moved = "" if change is None else f" ({change:+.0%})"
    side = "below" if d.get("bound") == "min" else "above"
    if resolved:
        return f"Resolved: {title} of {place} is {value}, within its goal {goal}{moved}"
    return f"{title} of {place} is {value}, {side} its goal {goal}{moved}"


def _pacing_summary(place: str, d: Mapping[str, Any], resolved: bool) -> str:
    budget, projected = float(d.get("budget") or 0.0), float(d.get("projected") or 0.0)
    change = projected / budget - 1 if budget else 0.0
    half = (float(d.get("high") or 0.0) - float(d.get("low") or 0.0)) / 2 / budget if budget else 0
    if resolved:
        return (f"Resolved: spend of {place} is {float(d.get('spent') or 0.0):,.0f} of its "
                f"{budget:,.0f} budget so far today, projected {projected:,.0f} "
                f"({change:+.0%})")  # fmt: skip
    if d.get("status") == "exhausted":
        return (f"Spend of {place} reached its {budget:,.0f} budget today "
                f"({float(d.get('spent') or 0.0):,.0f} spent by {d.get('local_time')}), "
                f"projected {projected:,.0f} by midnight")  # fmt: skip
    return (f"Spend of {place} projected at {projected:,.0f} of its {budget:,.0f} budget today "
            f"({change:+.0%}, ±{half:.0%})")  # fmt: skip
