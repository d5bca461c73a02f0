"""The KPI wall: what the marketing team reads across the room, in kiosk mode.

No variables (kiosk hides them, and a wall must not depend on someone's
selection). Big numbers are the worker's own KPI series (`kpimon_kpi`), the
values the alert rules judge; the arrows compare with the same time yesterday
(the start of the 24 h range), which cancels the daily traffic curve, and the
row below them with the alert rules' own baselines.
"""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import table
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as dm

from grafana.kpis import KPI
from grafana.panels import (
    CAMPAIGN_UID,
    CURRENCY,
    DATASOURCE,
    PIPELINE_UID,
    REFRESH,
    TAGS,
    TITLES,
    WALL_UID,
    PanelBuilder,
    dashboard_links,
    finish,
    link,
    query,
    ref_ids,
    stat_panel,
)

WINDOW = "15m"
# Colour thresholds of the big numbers: defaults for the simulated shop, tune per business.
# (value from which the colour applies; None = below the first step)
STEPS: dict[str, list[tuple[float | None, str]]] = {
    "ctr": [(None, "red"), (0.01, "orange"), (0.015, "green")],
    "conversion_rate": [(None, "red"), (0.02, "orange"), (0.03, "green")],
    "cac": [(None, "green"), (200.0, "orange"), (300.0, "red")],
    "roas": [(None, "red"), (1.0, "orange"), (1.5, "green")],
}
# Event time of the newest event, against the wall clock: the settle delay (60 s) plus
# an evaluation and a scrape are normal; minutes mean the screen shows stale numbers.
FRESH_STEPS: list[tuple[float | None, str]] = [(None, "green"), (90.0, "orange"), (180.0, "red")]


def _kpi_stat(name: str) -> PanelBuilder:
    kpi = KPI[name]
    lower_is_better = kpi.bad == "up"
    return stat_panel(
        f"{kpi.title} · {WINDOW}",
        [query(f'max(kpimon_kpi{{kpi="{name}",scope="global",window="{WINDOW}"}})', kpi.title)],
        unit=kpi.unit,
        steps=STEPS[name],
        decimals=2,
        span=6,
        height=6,
        description=(
            f"{kpi.title} over the last 15 complete minutes, all traffic. The arrow is the "
            "change against the same time yesterday"
            + (" (a fall is good: lower is better)." if lower_is_better else ".")
        ),
        percent_change=(
            common.PercentChangeColorMode.INVERTED
            if lower_is_better
            else common.PercentChangeColorMode.STANDARD
        ),
    ).links([link("Campaign drill-down", f"/d/{CAMPAIGN_UID}?var-channel=All&var-campaign=All")])


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
    kpi = KPI[name]
    return (
        stat_panel(
            f"{kpi.title} by channel · {WINDOW}",
            [
                query(
                    f'max by (channel) (kpimon_kpi{{kpi="{name}",scope="channel",'
                    f'window="{WINDOW}"}})',
                    "{{channel}}",
                )
            ],
            unit=kpi.unit,
            steps=STEPS[name],
            decimals=2,
            span=8,
            height=7,
            text_mode=common.BigValueTextMode.VALUE_AND_NAME,
            percent_change=common.PercentChangeColorMode.STANDARD,
            description=f"{kpi.title} per channel, last 15 complete minutes; arrows vs yesterday.",
        )
        .orientation(common.VizOrientation.HORIZONTAL)
        .data_links(
            [
                db.DashboardLink("Drill down into ${__field.labels.channel}").url(
                    f"/d/{CAMPAIGN_UID}?var-channel=${{__field.labels.channel}}"
                    "&var-campaign=All&${__url_time_range}"
                )
            ]
        )
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


def build() -> dm.Dashboard:
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
    for name in ("ctr", "conversion_rate", "cac", "roas"):
        board = board.with_panel(_kpi_stat(name))
    for name in ("ctr", "conversion_rate", "cac", "roas"):
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
        .with_row(db.Row("By channel"))
    )  # fmt: skip
    for name in ("ctr", "conversion_rate", "roas"):
        board = board.with_panel(_channel_stat(name))
    board = board.with_row(db.Row("Alerts")).with_panel(_alerts_table())
    return finish(board)
