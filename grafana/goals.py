"""Goals and budgets as the dashboards query them: the targets file's series, in PromQL.

The worker exports what the targets file (``KPIMON_TARGETS``, ``alerts/targets.py``)
says for each series it holds: ``kpimon_kpi_target{kpi, scope, channel, campaign,
bound}`` and, for series with a budget, ``kpimon_budget_daily``,
``kpimon_budget_prorated``, ``kpimon_spend_today``, ``kpimon_spend_pacing_ratio``,
``kpimon_spend_projected_today`` and ``kpimon_spend_projected_today_interval``
(``alerts/targets_export.py``). Nothing about a goal is written here: colours and
lines come from those series, so a goal changed in the file changes the wall at the
next scrape.

A goal holds for the series of its own scope (a channel's goal is not each of its
campaigns'), so a drill-down selection shows the goal of the series its figures
equal: the campaign's when one campaign is selected, the channel's when all of one
channel's campaigns are, the global one for everything (:func:`of_selection`).
"""

from __future__ import annotations

from typing import Literal

from alerts.pacing import MARGIN

Bound = Literal["min", "max"]
BOUNDS: tuple[Bound, ...] = ("min", "max")
MET, MISSED = "green", "red"
"""Colours of a KPI that meets / misses its goal (Grafana colour names)."""
NO_GOAL = "text"
"""Colour of a KPI without a goal where the panel has no fallback: the theme's text."""
COLOUR_LABEL = "color"
"""The label carrying the colour; Grafana's "config from query results" and "rows to
fields" transformations map a field of this name to the field's colour."""

# Pacing: on pace within the alert's margin (alerts/pacing.py MARGIN, the default
# of the pacing rule), under-pacing below, over-pacing above.
PACING_STEPS: list[tuple[float | None, str]] = [
    (None, "orange"),
    (round(1 - MARGIN, 6), "green"),
    (round(1 + MARGIN, 6), "red"),
]


def _matchers(*parts: str) -> str:
    return ",".join(p for p in parts if p)


def _agg(op: str, by: str) -> str:
    return f"{op} by ({by})" if by else op


def target(kpi: str, bound: Bound, selector: str, by: str = "") -> str:
    """A KPI's goal bound for the series ``selector`` matches (one per ``by`` group)."""
    matchers = _matchers(f'kpi="{kpi}"', f'bound="{bound}"', selector)
    return f"{_agg('max', by)} (kpimon_kpi_target{{{matchers}}})"


def _colour(expr: str, colour: str) -> str:
    """``expr`` with the colour label set (the empty label matches ``.*``)."""
    return f'label_replace({expr}, "{COLOUR_LABEL}", "{colour}", "{COLOUR_LABEL}", ".*")'


def goal_colour(value: str, kpi: str, selector: str, by: str = "", *, no_goal: bool) -> str:
    """``value`` (one sample per ``by`` group) labelled with its colour against its goal.

    ``MISSED`` when below its ``min`` or above its ``max``, ``MET`` when it has a goal
    and is within it; without a goal the sample is dropped, or labelled ``NO_GOAL``
    when ``no_goal`` (for panels without a fallback). The comparison matches the
    KPI's series with the goal's by ``by``: the same series.
    """
    on = f"on({by})"
    lo, hi = target(kpi, "min", selector, by), target(kpi, "max", selector, by)
    missed = f"(({value}) < {on} {lo}) or (({value}) > {on} {hi})"
    has_goal = f"({lo} or {hi})"
    met = f"(({value}) unless {on} ({missed})) and {on} {has_goal}"
    expr = f"{_colour(missed, MISSED)} or {_colour(met, MET)}"
    if no_goal:
        expr += f" or {_colour(f'({value}) unless {on} {has_goal}', NO_GOAL)}"
    return expr


# --------------------------------------------------------------------------- drill-down

CAMPAIGNS = 'scope="campaign",channel=~"$channel",campaign=~"$campaign"'
"""The drill-down's selection (its variables ``channel`` and ``campaign``)."""


def _count(by: str) -> str:
    """How many (by) groups of campaign series the selection spans."""
    return f"count(group by ({by}) (kpimon_window_measure{{{CAMPAIGNS}}}))"


def of_selection(metric: str, matchers: str = "", by: str = "") -> str:
    """``metric`` of the series the selection's figures equal, one sample per ``by``.

    One campaign selected: that campaign's series. Several campaigns of one channel
    (``All`` of a channel): the channel's series, whose KPIs equal their ratio of
    sums. Several channels: the global series. Exactly one branch holds at a time.
    """
    agg = _agg("max", by)
    campaigns, channels = _count("channel, campaign"), _count("channel")
    campaign = f"{agg} ({metric}{{{_matchers(matchers, CAMPAIGNS)}}}) and on() ({campaigns} == 1)"
    channel_sel = _matchers(matchers, 'scope="channel"', 'channel=~"$channel"')
    channel = (
        f"{agg} ({metric}{{{channel_sel}}}) and on() ({campaigns} > 1) and on() ({channels} == 1)"
    )
    global_sel = _matchers(matchers, 'scope="global"')
    overall = f"{agg} ({metric}{{{global_sel}}}) and on() ({channels} > 1)"
    return f"({campaign}) or ({channel}) or ({overall})"
