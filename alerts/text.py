"""How alerts read to people: times, KPI values, places and the one-line summary.

Shared by the engine (the record's ``summary``) and the sink payloads (``alerts.notify``),
so a value reads the same in the alert object, in Slack and in Alertmanager. Pure.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from alerts.rules import Rule
from stream.kpis import KPI


def iso(seconds: float) -> str:
    """Unix seconds as ISO 8601 UTC with a ``Z``, to the second."""
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def format_value(kpi: str, value: float | None) -> str:
    """A KPI value in its unit: percentages, money and ratios to the cent, and counts as
    the per-minute rates the engine compares (``0.85/min``: a bare ``1`` read as a count
    of the alert's whole window, and rounded a small shop's rates away)."""
    if value is None:
        return "n/a"
    unit = KPI[kpi].unit if kpi in KPI else None
    if unit == "percent":
        return f"{value * 100:.2f}%"
    if unit == "count":
        digits = 0 if abs(value) >= 100 else 1 if abs(value) >= 10 else 2
        return f"{value:,.{digits}f}/min"
    return f"{value:,.2f}"


def where(scope: str, channel: str, campaign: str) -> str:
    """A segment in words: all traffic, a channel, or a campaign on its channel."""
    if scope == "global":
        return "all traffic"
    if scope == "channel":
        return f"channel {channel}"
    return f"campaign {campaign} on {channel}"


def summary(
    rule: Rule, scope: str, channel: str, campaign: str, d: Mapping[str, Any],
    resolved: bool = False,
) -> str:  # fmt: skip
    """One line saying what moved where, by how much, against what (or that it is back)."""
    name = KPI[rule.kpi].title
    change = d.get("change")
    if resolved:
        now = "n/a" if change is None else f"{change:+.0%}"
        return (
            f"Resolved: {name} of {where(scope, channel, campaign)} is back "
            f"({format_value(rule.kpi, d.get('value'))} vs "
            f"{format_value(rule.kpi, d.get('baseline'))}, {now}, "
            f"{d.get('baseline_kind', 'baseline')})"
        )
    moved = "n/a" if change is None else f"{'rose' if change > 0 else 'dropped'} {abs(change):.0%}"
    value, base = (
        format_value(rule.kpi, d.get("value")),
        format_value(rule.kpi, d.get("baseline")),
    )
    minutes = rule.window_minutes
    span = f"{minutes} min" if minutes < 60 else f"{minutes // 60} h"
    return (
        f"{name} of {where(scope, channel, campaign)} {moved} in the last {span} "
        f"({value} vs {base}, {d.get('baseline_kind', 'baseline')})"
    )
