"""Exposition of goals, budgets and pacing, rendered once per evaluation tick.

The alert stage adds :meth:`TargetsExporter.render` to each tick's page
(``alerts.stage.compute_tick``); the command line builds the process' exporter (the
file watcher, the time zone) at start-up and hands it to the worker. Only series the scope state has
are shown, so the series count is bounded by the cardinality guards: goals for
every series a goal resolves to, spend and pacing for every series with a budget.
``__other__`` segments are never shown (their members change).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import date, tzinfo
from typing import Protocol

from alerts.goals import Curves, Goals, budget_shape
from alerts.pacing import Shape, SpendSum, local_day, pace
from alerts.targets import SeriesKey, Targets, TargetsWatcher
from stream.windows import MICROS, SPEND, Totals

OTHER = "__other__"


class Summable(Protocol):
    """A series' minute store: sums of every measure over minutes [start, end)."""

    def sum(self, start: int, end: int) -> Totals | Sequence[int]: ...


def spend_of(buckets: Summable) -> SpendSum:
    """The spend (reporting currency) of a series store, as pacing's ``SpendSum``."""
    return lambda start, end: int(buckets.sum(start, end)[SPEND]) / MICROS


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


FAMILIES: tuple[tuple[str, str], ...] = (
    ("kpimon_kpi_target", "Goal of a KPI from the targets file, by bound (min or max)"),
    ("kpimon_budget_daily", "Daily budget from the targets file (reporting currency)"),
    ("kpimon_budget_prorated", "Daily budget times the share of the day's spend the intraday "
     "curve expects by now"),
    ("kpimon_spend_today", "Spend since local midnight (KPIMON_TIMEZONE) up to the windows' end"),
    ("kpimon_spend_pacing_ratio", "Spend today over the prorated budget (1 = on pace); absent "
     "before the curve expects any spend"),
    ("kpimon_spend_projected_today", "Projected spend by the end of the local day"),
    ("kpimon_spend_projected_today_interval", "Bounds of the projection's interval (projection "
     "-/+ 3 standard errors; the lower never below the spend so far)"),
)  # fmt: skip


def render_targets(
    targets: Targets,
    now_minute: int,
    spends: Mapping[SeriesKey, SpendSum],
    tz: tzinfo,
    shape_of: Callable[[SeriesKey, SpendSum, date], Shape] | None = None,
) -> str:
    """The target, budget and pacing families for the series in ``spends`` at ``now_minute``.

    ``now_minute`` is the end (exclusive) of the complete minutes; ``shape_of``
    gives a budget's default curve (the series' own shape, computed here when None).
    """
    lines: dict[str, list[str]] = {name: [] for name, _ in FAMILIES}
    day = local_day(now_minute, tz) if now_minute > 0 else None
    for key in sorted(spends):
        scope, channel, campaign = key
        if OTHER in (channel, campaign):
            continue
        resolved = targets.resolve(key)
        if resolved.empty():
            continue
        labels = f'scope="{scope}",channel="{_esc(channel)}",campaign="{_esc(campaign)}"'
        for kpi, goal in sorted(resolved.goals.items()):
            for bound, value in goal.bounds().items():
                lines["kpimon_kpi_target"].append(
                    f'kpimon_kpi_target{{kpi="{kpi}",{labels},bound="{bound}"}} {value!r}\n'
                )
        budget = resolved.budget
        if budget is None:
            continue
        lines["kpimon_budget_daily"].append(f"kpimon_budget_daily{{{labels}}} {budget.daily!r}\n")
        if day is None:
            continue
        spend = spends[key]
        shape = budget_shape(budget, key, spend, day, tz, shape_of)
        p = pace(spend, budget.daily, day, now_minute, shape)
        lines["kpimon_budget_prorated"].append(
            f"kpimon_budget_prorated{{{labels}}} {budget.daily * p.share!r}\n"
        )
        lines["kpimon_spend_today"].append(f"kpimon_spend_today{{{labels}}} {p.spend!r}\n")
        if p.ratio is not None:
            lines["kpimon_spend_pacing_ratio"].append(
                f"kpimon_spend_pacing_ratio{{{labels}}} {p.ratio!r}\n"
            )
        lines["kpimon_spend_projected_today"].append(
            f"kpimon_spend_projected_today{{{labels}}} {p.projected!r}\n"
        )
        for side, value in (("lower", p.low), ("upper", p.high)):
            lines["kpimon_spend_projected_today_interval"].append(
                f'kpimon_spend_projected_today_interval{{{labels},bound="{side}"}} {value!r}\n'
            )
    text = []
    for name, doc in FAMILIES:
        text.append(f"# HELP {name} {doc}\n# TYPE {name} gauge\n")
        text.extend(lines[name])
    return "".join(text)


class TargetsExporter:
    """The process' targets: the file watcher, the time zone, and a day's learnt curves
    (``alerts.goals.Curves``), shared by the exposition and the goal rules."""

    def __init__(self, watcher: TargetsWatcher, tz: tzinfo) -> None:
        self.watcher = watcher
        self.tz = tz
        self.curves = Curves(tz)

    def shape(self, key: SeriesKey, spend: SpendSum, day: date) -> Shape:
        return self.curves.shape(key, spend, day)

    def goals(self, now_s: float) -> Goals:
        """The targets in force (the file reloaded first if it changed), for the rules."""
        return Goals(self.watcher.poll(now_s), self.tz, self.curves)

    def render(self, series: Mapping[SeriesKey, Summable], now_minute: int, now_s: float) -> bytes:
        """Poll the file (reload if changed), then render targets, pacing and reload metrics."""
        targets = self.watcher.poll(now_s)
        spends = {key: spend_of(buckets) for key, buckets in series.items()}
        body = render_targets(targets, now_minute, spends, self.tz, self.shape)
        return (body + self.watcher.exposition()).encode()
