"""The KPI table (SPEC) and the PromQL that recomputes KPIs from window sums.

A KPI over a selection of series (a campaign, every campaign of a channel, all of
them) is a ratio of summed window sums, never a mean of ratios: that is
exact whichever series the selection spans and however many workers export them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from alerts.rules import DEFAULT_RULES, load_rules
from grafana.panels import CURRENCY


@dataclass(frozen=True)
class Kpi:
    """One KPI: its ratio, display, and what its campaign-scope alert rule judges."""

    name: str  # the `kpi` label value
    title: str
    numerator: str  # `measure` label values of kpimon_window_measure
    denominator: str
    unit: str
    bad: Literal["down", "up"]
    window: str  # the window its alert rules judge (alerts/rules.yml)
    min_change: float  # min_change of its campaign-scope rule (alerts/rules.yml)
    runbook: str
    shift: float = 0.0  # added to the ratio: ROI = revenue / spend - 1


def _campaign_rule(kpi: str) -> tuple[str, float]:
    """Window and min_change of the KPI's campaign-scope default rule: the dashboards
    show what the alerts judge, so they are read from the rules, not repeated here."""
    (rule,) = [r for r in _RULES if r.kpi == kpi and "campaign" in r.scopes]
    return rule.window, rule.min_change


_RULES = load_rules(DEFAULT_RULES).rules
_TABLE = (
    ("ctr", "CTR", "clicks", "impressions", "percentunit", "down", "rate-drop", 0.0),
    ("conversion_rate", "Conversion rate", "orders", "clicks", "percentunit", "down",
     "rate-drop", 0.0),
    ("lead_rate", "Lead rate", "leads", "clicks", "percentunit", "down", "rate-drop", 0.0),
    ("cpc", "CPC", "spend", "clicks", CURRENCY, "up", "cost-rise", 0.0),
    ("cpl", "CPL", "spend", "leads", CURRENCY, "up", "cost-rise", 0.0),
    ("cpa", "CPA", "spend", "orders", CURRENCY, "up", "cost-rise", 0.0),
    ("cac", "CAC", "spend", "new_customers", CURRENCY, "up", "cost-rise", 0.0),
    ("roas", "ROAS", "revenue", "spend", "none", "down", "value-drop", 0.0),
    ("roi", "ROI", "revenue", "spend", "percentunit", "down", "value-drop", -1.0),
    ("aov", "AOV", "revenue", "orders", CURRENCY, "down", "value-drop", 0.0),
)  # fmt: skip
KPIS: tuple[Kpi, ...] = tuple(
    Kpi(name, title, num, den, unit, bad, *_campaign_rule(name), runbook, shift)  # type: ignore[arg-type]
    for name, title, num, den, unit, bad, runbook, shift in _TABLE
)
KPI = {kpi.name: kpi for kpi in KPIS}

# Labels that identify one exported series of a window metric, whatever the metric.
_SERIES = "on(scope, channel, campaign, window)"


def _shifted(expr: str, shift: float) -> str:
    if not shift:
        return expr
    return f"({expr}) {'+' if shift > 0 else '-'} {abs(shift):g}"


def window_sum(measure: str, window: str, selector: str, offset: str = "") -> str:
    """Sum of one measure over the window, across every series the selector matches."""
    at = f" offset {offset}" if offset else ""
    return f'sum(kpimon_window_measure{{measure="{measure}",window="{window}",{selector}}}{at})'


def ratio(kpi: Kpi, selector: str, *, window: str | None = None, offset: str = "") -> str:
    """The KPI over the selection; absent (not Inf/NaN) when its denominator is 0."""
    w = window or kpi.window
    num = window_sum(kpi.numerator, w, selector, offset)
    den = window_sum(kpi.denominator, w, selector, offset)
    return _shifted(f"{num} / ({den} > 0)", kpi.shift)


def baseline(kpi: Kpi, selector: str) -> str:
    """The alert baseline over the selection: series baselines weighted by denominator.

    For one series this is its ``kpimon_kpi_baseline``; for several it is the KPI
    expected if each series ran at its own baseline with today's volume mix.
    """
    b = f'kpimon_kpi_baseline{{kpi="{kpi.name}",window="{kpi.window}",{selector}}}'
    d = f'kpimon_window_measure{{measure="{kpi.denominator}",window="{kpi.window}",{selector}}}'
    return f"sum({b} * {_SERIES} {d}) / (sum({d} and {_SERIES} {b}) > 0)"


def alert_line(kpi: Kpi, selector: str) -> str:
    """Where the campaign rule's ``min_change`` in the bad direction starts (ROI via ROAS)."""
    factor = 1 - kpi.min_change if kpi.bad == "down" else 1 + kpi.min_change
    base = baseline(kpi, selector)
    if kpi.shift:
        return _shifted(f"({_shifted(base, -kpi.shift)}) * {factor:g}", kpi.shift)
    return f"({base}) * {factor:g}"
