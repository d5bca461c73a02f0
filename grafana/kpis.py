"""The KPIs as the dashboards show them, and the PromQL that recomputes them from window sums.

The KPIs come from the catalogue (``stream.kpis``) and their alert windows and thresholds
from the default rules (``alerts/rules.yml``): nothing about a KPI is written here.

A KPI over a selection of series (a campaign, every campaign of a channel, all of
them) is a ratio of summed window sums, never a mean of ratios: that is
exact whichever series the selection spans and however many workers export them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from alerts.rules import DEFAULT_RULES, load_rules
from grafana.panels import CURRENCY
from stream.kpis import RATIOS, Unit

GRAFANA_UNITS: dict[Unit, str] = {
    "percent": "percentunit", "currency": CURRENCY, "ratio": "none", "count": "none",
}  # fmt: skip


@dataclass(frozen=True)
class Kpi:
    """One KPI as the dashboards show it: the catalogue's ratio, display, and what its
    campaign-scope alert rule judges (read from the rules, so the two cannot differ)."""

    name: str  # the `kpi` label value
    title: str
    numerator: str  # `measure` label values of kpimon_window_measure
    denominator: str
    unit: str  # a Grafana unit
    bad: Literal["down", "up"]
    window: str  # the window its alert rules judge (alerts/rules.yml)
    min_change: float  # min_change of its campaign-scope rule (alerts/rules.yml)
    runbook: str  # the runbook family of its rules (docs/runbooks/<runbook>.md)
    shift: float = 0.0  # added to the ratio: ROI = revenue / spend - 1


def _dashboard_kpis() -> tuple[Kpi, ...]:
    """Every ratio of the catalogue with its campaign-scope default rule's window,
    min_change and runbook: the dashboards show what the alerts judge."""
    rules = load_rules(DEFAULT_RULES).rules
    out = []
    for kpi in RATIOS:
        (rule,) = [r for r in rules if r.kpi == kpi.name and "campaign" in r.scopes]
        assert kpi.denominator is not None  # a ratio
        out.append(
            Kpi(kpi.name, kpi.title, kpi.numerator, kpi.denominator, GRAFANA_UNITS[kpi.unit],
                kpi.bad, rule.window, rule.min_change, Path(rule.runbook_url).stem, kpi.shift)
        )  # fmt: skip
    return tuple(out)


KPIS: tuple[Kpi, ...] = _dashboard_kpis()
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
