"""The KPI wall: what the marketing team reads across the room, in kiosk mode.

No variables (kiosk hides them, and a wall must not depend on someone's
selection). Big numbers are the worker's own KPI series (`kpimon_kpi`), the
values the alert rules judge; the arrows compare with the same time yesterday
(the start of the 24 h range), which cancels the daily traffic curve, and the
row below them with the alert rules' own baselines.

Goals and budgets come from the targets file through the worker's series
(``grafana.goals``): a KPI with a goal is green when it meets it and red when it
misses it, its graph draws the goal line, and each channel with a budget has a
pacing gauge and its end-of-day projection. ``FALLBACK_STEPS`` colour a global KPI
only when the targets file sets no goal for it (the shipped default sets none).
"""

from __future__ import annotations

from grafana_foundation_sdk.builders import bargauge, gauge, table
from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as dm

from alerts.pacing import MARGIN
from grafana.goals import BOUNDS, COLOUR_LABEL, NO_GOAL, PACING_STEPS, goal_colour
from grafana.kpis import KPI
from grafana.panels import (
    CAMPAIGN_UID,
    CURRENCY,
    DATASOURCE,
    GOAL_LINE,
    PIPELINE_UID,
    REFRESH,
    TAGS,
    TITLES,
    WALL_UID,
    PanelBuilder,
    Runbooks,
    dashboard_links,
    finish,
    fixed_colour,
    link,
    override,
    query,
    ref_ids,
    stat_panel,
    thresholds,
    timeseries_panel,
)

WINDOW = "15m"
BIG = ("ctr", "conversion_rate", "cac", "roas")
BY_CHANNEL = ("ctr", "conversion_rate", "roas")
# Colours of the big numbers when the targets file sets no global goal for the KPI:
# rough defaults for the simulated shop. A goal (kpimon_kpi_target) replaces them.
# (value from which the colour applies; None = below the first step)
FALLBACK_STEPS: dict[str, list[tuple[float | None, str]]] = {
    "ctr": [(None, "red"), (0.01, "orange"), (0.015, "green")],
    "conversion_rate": [(None, "red"), (0.02, "orange"), (0.03, "green")],
    "cac": [(None, "green"), (200.0, "orange"), (300.0, "red")],
    "roas": [(None, "red"), (1.0, "orange"), (1.5, "green")],
}
# Event time of the newest event, against the wall clock: the settle delay (60 s) plus
# an evaluation and a scrape are normal; minutes mean the screen shows stale numbers.
FRESH_STEPS: list[tuple[float | None, str]] = [(None, "green"), (90.0, "orange"), (180.0, "red")]


def _global_kpi(name: str) -> str:
    return f'max(kpimon_kpi{{kpi="{name}",scope="global",window="{WINDOW}"}})'


def _goal_colour_from(ref_id: str, applies_to: str) -> dm.DataTransformerConfig:
    """Grafana's "config from query results": the colour label of query ``ref_id``
    becomes the fixed colour of query ``applies_to``'s fields; without a row (no
    goal) the panel's own thresholds apply."""
    return dm.DataTransformerConfig(
        id_val="configFromData",
        options={
            "configRefId": ref_id,
            "mappings": [
                {"fieldName": COLOUR_LABEL, "handlerKey": "color"},
                {"fieldName": "Value", "handlerKey": "__ignore"},
                {"fieldName": "Time", "handlerKey": "__ignore"},
            ],
            "applyTo": {"id": "byFrameRefID", "options": applies_to},
        },
    )


def _kpi_stat(name: str) -> PanelBuilder:
    kpi = KPI[name]
    lower_is_better = kpi.bad == "up"
    value = _global_kpi(name)
    return (
        stat_panel(
            f"{kpi.title} · {WINDOW}",
            [
                query(value, kpi.title),
                query(
                    goal_colour(value, name, 'scope="global"', no_goal=False),
                    instant=True,
                    table=True,
                ),
            ],
            unit=kpi.unit,
            steps=FALLBACK_STEPS[name],
            decimals=2,
            span=6,
            height=6,
            description=(
                f"{kpi.title} over the last 15 complete minutes, all traffic: green when it "
                "meets the global goal of the targets file, red when it misses it (without "
                "a goal, rough default colours). The arrow is the change against the same "
                "time yesterday"
                + (" (a fall is good: lower is better)." if lower_is_better else ".")
            ),
            percent_change=(
                common.PercentChangeColorMode.INVERTED
                if lower_is_better
                else common.PercentChangeColorMode.STANDARD
            ),
        )
        .with_transformation(_goal_colour_from("B", "A"))
        .links([link("Campaign drill-down", f"/d/{CAMPAIGN_UID}?var-channel=All&var-campaign=All")])
    )


def _against_goal(name: str) -> PanelBuilder:
    """The global KPI over the day with its goal lines: how long it has been off goal."""
    kpi = KPI[name]
    panel = timeseries_panel(
        f"{kpi.title} against goal · {WINDOW}",
        [
            query(_global_kpi(name), kpi.title),
            query(
                f'max by (bound) (kpimon_kpi_target{{kpi="{name}",scope="global"}})',
                "goal ({{bound}})",
            ),
        ],
        unit=kpi.unit,
        span=6,
        height=6,
        min_zero=False,
        description=(
            f"{kpi.title} (15 min windows, all traffic) and its global goal from the targets "
            "file (red dashed: min or max). No goal line: the file sets none for it."
        ),
    )
    panel = panel.override_by_name(*override(kpi.title, {"color": fixed_colour("blue")}))
    for bound in BOUNDS:
        panel = panel.override_by_name(*override(f"goal ({bound})", GOAL_LINE))
    return panel


def _vs_baseline(name: str) -> PanelBuilder:
    """How far the KPI is from what the alert rules expect now (their baseline)."""
    kpi = KPI[name]
    sel = f'kpi="{name}",scope="global",window="{kpi.window}"'
    expr = f"max(kpimon_kpi{{{sel}}}) / max(kpimon_kpi_baseline{{{sel}}}) - 1"
    steps: list[tuple[float | None, str]] = (
        [(None, "green"), (0.1, "orange"), (0.2, "red")]
        if kpi.bad == "up"
        else [(None, "red"), (-0.2, "orange"), (-0.1, "green")]
    )
    return stat_panel(
        f"{kpi.title} vs baseline · {kpi.window}",
        [query(expr, "vs baseline")],
        unit="percentunit",
        steps=steps,
        decimals=0,
        span=6,
        height=3,
        description=(
            f"{kpi.title} over the last {kpi.window} against the baseline its alert rules "
            f"compare with (red: {'up' if kpi.bad == 'up' else 'down'} is bad)."
        ),
    )


def _total_stat(title: str, expr: str, unit: str, description: str) -> PanelBuilder:
    return stat_panel(
        title,
        [query(expr, title)],
        unit=unit,
        steps=[(None, "blue")],
        color_mode=common.BigValueColorMode.VALUE,
        decimals=0 if unit == CURRENCY else 1,
        span=5,
        height=5,
        description=description,
    )


def _freshness() -> PanelBuilder:
    # max_over_time keeps the number (growing, red) when the worker stops exporting,
    # where a bare gauge would turn into a grey "No data".
    expr = "time() - max(max_over_time(kpimon_last_event_timestamp_seconds[1h]))"
    return stat_panel(
        "Last event",
        [query(expr, "last event")],
        unit="s",
        steps=FRESH_STEPS,
        decimals=0,
        sparkline=False,
        span=4,
        height=5,
        no_value="no event for 1 h",
        description=(
            "Seconds since the event time of the newest event any worker saw. Red means "
            "the numbers on this screen are stale: see the Pipeline health dashboard."
        ),
    ).links([link("Pipeline health", f"/d/{PIPELINE_UID}")])


def _channel_stat(name: str) -> PanelBuilder:
    """One value per channel, coloured by that channel's goal ("rows to fields": each row
    of the instant table becomes a field named after its channel, its colour label the
    field's colour; channels without a goal get the text colour)."""
    kpi = KPI[name]
    value = f'max by (channel) (kpimon_kpi{{kpi="{name}",scope="channel",window="{WINDOW}"}})'
    rows = dm.DataTransformerConfig(
        id_val="rowsToFields",
        options={
            "mappings": [
                {"fieldName": "channel", "handlerKey": "field.name"},
                {"fieldName": "Value", "handlerKey": "field.value"},
                {"fieldName": COLOUR_LABEL, "handlerKey": "color"},
                {"fieldName": "Time", "handlerKey": "__ignore"},
            ]
        },
    )
    return (
        stat_panel(
            f"{kpi.title} by channel · {WINDOW}",
            [
                query(
                    goal_colour(value, name, 'scope="channel"', "channel", no_goal=True),
                    instant=True,
                    table=True,
                ),
            ],
            unit=kpi.unit,
            steps=[(None, NO_GOAL)],
            decimals=2,
            span=8,
            height=7,
            sparkline=False,
            text_mode=common.BigValueTextMode.VALUE_AND_NAME,
            description=(
                f"{kpi.title} per channel, last 15 complete minutes: green when it meets the "
                "channel's goal in the targets file, red when it misses it, plain without one."
            ),
        )
        .with_transformation(rows)
        .orientation(common.VizOrientation.HORIZONTAL)
        .data_links(
            [
                db.DashboardLink("Drill down into ${__field.name}").url(
                    f"/d/{CAMPAIGN_UID}?var-channel=${{__field.name}}"
                    "&var-campaign=All&${__url_time_range}"
                )
            ]
        )
    )


def _pacing_gauge(runbooks: Runbooks) -> PanelBuilder:
    """Pacing ratio per channel with a budget, and all traffic when it has one."""
    return (
        gauge.Panel()
        .title("Budget pacing today")
        .description(
            "Spend so far today over the budget prorated along the intraday curve (1 = on "
            f"pace; green within ±{MARGIN:.0%}, the pacing alert's margin; orange under, red "
            "over), per channel with a daily budget in the targets file and for all traffic. "
            "Days are local days of KPIMON_TIMEZONE."
        )
        .datasource(DATASOURCE)
        .targets(
            ref_ids(
                [
                    query('max(kpimon_spend_pacing_ratio{scope="global"})', "all"),
                    query(
                        'max by (channel) (kpimon_spend_pacing_ratio{scope="channel"})',
                        "{{channel}}",
                    ),
                ]
            )
        )
        .unit("percentunit")
        .decimals(0)
        .min(0)
        .max(2)
        .thresholds(thresholds(*PACING_STEPS))
        .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .show_threshold_markers(True)
        .no_value("no budget in the targets file")
        .span(12)
        .height(7)
        .links([runbooks.link("pacing")])
    )


def _projection(runbooks: Runbooks) -> PanelBuilder:
    """Projected end-of-day spend as a share of each channel's daily budget."""
    expr = (
        'max by (channel) (kpimon_spend_projected_today{scope="channel"}) / on(channel) '
        'max by (channel) (kpimon_budget_daily{scope="channel"})'
    )
    return (
        bargauge.Panel()
        .title("Projected spend today / budget")
        .description(
            "Where each channel's spend is heading by midnight, as a share of its daily "
            "budget (today's spend plus the rest of the day at the recent rate along the "
            f"curve). The pacing alert fires once the projection's whole interval is beyond "
            f"±{MARGIN:.0%}; the interval is on the campaign drill-down (Budget row)."
        )
        .datasource(DATASOURCE)
        .targets(ref_ids([query(expr, "{{channel}}")]))
        .unit("percentunit")
        .decimals(0)
        .min(0)
        .max(2)
        .thresholds(thresholds(*PACING_STEPS))
        .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .display_mode(common.BarGaugeDisplayMode.LCD)
        .orientation(common.VizOrientation.HORIZONTAL)
        .show_unfilled(True)
        .no_value("no budget in the targets file")
        .span(12)
        .height(7)
        .links([runbooks.link("pacing")])
    )


def _alerts_table() -> table.Panel:
    # An empty channel/campaign (coarser scope) becomes "All": readable, and the value the
    # drill-down's variables take for "every channel / campaign".
    expr = (
        "label_replace(label_replace(max by (rule, severity, scope, channel, campaign) "
        '(kpimon_alerts_firing), "channel", "All", "channel", ""), '
        '"campaign", "All", "campaign", "")'
    )
    hidden = {"Time": True, "Value": True}
    order = {"severity": 0, "rule": 1, "scope": 2, "channel": 3, "campaign": 4}
    return (
        table.Panel()
        .title("Firing KPI alerts")
        .description("Alerts firing now; a row opens the campaign drill-down at that segment.")
        .datasource(DATASOURCE)
        .targets(ref_ids([query(expr, instant=True, table=True)]))
        .with_transformation(
            dm.DataTransformerConfig(
                id_val="organize", options={"excludeByName": hidden, "indexByName": order}
            )
        )
        .mappings(
            [
                dm.ValueMap(
                    options={
                        "page": dm.ValueMappingResult(color="red", index=0),
                        "ticket": dm.ValueMappingResult(color="orange", index=1),
                    }
                )
            ]
        )
        .data_links(
            [
                db.DashboardLink("Open ${__data.fields.campaign} (${__data.fields.channel})").url(
                    f"/d/{CAMPAIGN_UID}?var-channel=${{__data.fields.channel}}"
                    "&var-campaign=${__data.fields.campaign}&${__url_time_range}"
                )
            ]
        )
        .no_value("No KPI alert firing")
        .span(24)
        .height(6)
    )


def build(runbooks: Runbooks) -> dm.Dashboard:
    per_minute = 'sum(kpimon_window_measure{{measure="{m}",scope="global",window="5m"}}) / 5'
    day = 'sum(kpimon_window_measure{{measure="{m}",scope="global",window="24h"}})'
    board = (
        db.Dashboard(TITLES[WALL_UID])
        .uid(WALL_UID)
        .description("Marketing KPIs for a wall screen (open with ?kiosk). No variables.")
        .tags(TAGS)
        .readonly()
        .time("now-24h", "now")
        .refresh(REFRESH)
        .links(dashboard_links(WALL_UID))
    )
    for name in BIG:
        board = board.with_panel(_kpi_stat(name))
    for name in BIG:
        board = board.with_panel(_vs_baseline(name))
    board = (
        board.with_panel(_total_stat(
            "Spend · 24 h", day.format(m="spend"), CURRENCY,
            "Spend (impression and click costs plus spend events) over the last 24 hours."))
        .with_panel(_total_stat(
            "Revenue · 24 h", day.format(m="revenue"), CURRENCY,
            "Order revenue over the last 24 hours."))
        .with_panel(_total_stat(
            "Orders / min", per_minute.format(m="orders"), "none",
            "Orders per minute over the last 5 complete minutes."))
        .with_panel(_total_stat(
            "Leads / min", per_minute.format(m="leads"), "none",
            "Leads per minute over the last 5 complete minutes."))
        .with_panel(_freshness())
        .with_row(db.Row("Goals and budgets"))
    )  # fmt: skip
    for name in BIG:
        board = board.with_panel(_against_goal(name))
    board = board.with_panel(_pacing_gauge(runbooks)).with_panel(_projection(runbooks))
    board = board.with_row(db.Row("By channel"))
    for name in BY_CHANNEL:
        board = board.with_panel(_channel_stat(name))
    board = board.with_row(db.Row("Alerts")).with_panel(_alerts_table())
    return finish(board)
