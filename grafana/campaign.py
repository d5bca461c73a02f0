"""Campaign drill-down: one campaign, a channel, or everything, against its baseline.

Alert messages open ``/d/kpimon-campaign?from=…&to=…&var-channel=X&var-campaign=Y``
(``All`` for a coarser scope), so the variables are named ``channel`` and
``campaign`` and both include All. Every KPI is a ratio of the summed campaign
series the selection matches (see grafana.kpis): for one campaign that is its own
series, for All of a channel it equals the channel's, for All of all the global one.
"""

from __future__ import annotations

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import stat, table, timeseries
from grafana_foundation_sdk.models import dashboard as dm

from alerts.pacing import MARGIN
from grafana.goals import BOUNDS, CAMPAIGNS, PACING_STEPS, of_selection
from grafana.kpis import KPIS, Kpi, alert_line, baseline, ratio
from grafana.panels import (
    CAMPAIGN_UID,
    CURRENCY,
    DATASOURCE,
    GOAL_LINE,
    TAGS,
    TITLES,
    Runbooks,
    dashboard_links,
    finish,
    fixed_colour,
    override,
    query,
    ref_ids,
    stat_panel,
    timeseries_panel,
)

SELECTION = CAMPAIGNS
# label_values over window sums: every exported campaign has them, KPIs can be absent.
CHANNEL_VALUES = 'label_values(kpimon_window_measure{scope="campaign"}, channel)'
CAMPAIGN_VALUES = (
    'label_values(kpimon_window_measure{scope="campaign",channel=~"$channel"}, campaign)'
)
# Alerts of the selection and of the scopes above it (channel and global alerts have
# empty labels there), as annotations on every graph.
ALERTS = 'max by (rule, severity, scope, channel, campaign) (kpimon_alerts_firing{channel=~"$channel|",campaign=~"$campaign|"})'  # noqa: E501
WINDOW_SUMS = f"kpimon_window_measure{{{SELECTION}}}"
FUNNEL = "clicks|leads|orders|new_customers"
# KPI families (their runbooks) and the row each gets.
FAMILIES = {
    "rate-drop": "Rates (15 min windows)",
    "cost-rise": "Costs (1 h windows)",
    "value-drop": "Value (1 h windows)",
}


def _variable(name: str, label: str, values: str) -> db.QueryVariable:
    # allValue ".*": the URL value All then means "any", also for campaigns that appear
    # after the page loaded; Grafana's default would be a fixed (a|b|c) list.
    return (
        db.QueryVariable(name)
        .label(label)
        .datasource(DATASOURCE)
        .query(values)
        .definition(values)
        .include_all(True)
        .all_value(".*")
        .current(dm.VariableOption(selected=True, text="All", value="$__all"))
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dm.VariableSort.ALPHABETICAL_CASE_INSENSITIVE_ASC)
    )


def _kpi_panel(kpi: Kpi, runbooks: Runbooks) -> timeseries.Panel:
    sign = "-" if kpi.bad == "down" else "+"
    line = f"alert line ({sign}{kpi.min_change:.0%})"
    window = kpi.window.replace("m", " min").replace("h", " h")
    panel = timeseries_panel(
        f"{kpi.title} · {window}",
        [
            query(ratio(kpi, SELECTION), kpi.title),
            query(baseline(kpi, SELECTION), "baseline"),
            query(alert_line(kpi, SELECTION), line),
            query(ratio(kpi, SELECTION, offset="7d"), "last week"),
            query(
                of_selection("kpimon_kpi_target", f'kpi="{kpi.name}"', "bound"), "goal ({{bound}})"
            ),
        ],
        unit=kpi.unit,
        span=8 if kpi.runbook != "cost-rise" else 6,
        height=8,
        min_zero=False,
        description=(
            f"{kpi.title} over {window} windows ({kpi.numerator} / {kpi.denominator}"
            f"{', minus 1' if kpi.shift else ''}), the baseline its alert rules compare with, "
            f"the band up to the campaign rule's alert line ({sign}{kpi.min_change:.0%}, "
            f"{'lower' if kpi.bad == 'down' else 'higher'} is bad), and the same time "
            "last week. For several campaigns the baseline is their baselines weighted "
            f"by {kpi.denominator}. Red dashed: the goal of the targets file for the "
            "selection (the campaign's, all of a channel: the channel's, everything: the "
            "global one), when it sets one."
        ),
    )
    for name, props in (
        override(kpi.title, {"custom.lineWidth": 3, "color": fixed_colour("blue")}),
        override(
            "baseline",
            {
                "custom.lineStyle": {"fill": "dash", "dash": [10, 10]},
                "custom.fillBelowTo": line,
                "custom.fillOpacity": 15,
                "color": fixed_colour("orange"),
            },
        ),
        override(line, {"custom.lineWidth": 1, "color": fixed_colour("red")}),
        override(
            "last week",
            {
                "custom.lineStyle": {"fill": "dot", "dash": [0, 10]},
                "custom.lineWidth": 1,
                "color": fixed_colour("text"),
            },
        ),
        *(override(f"goal ({bound})", GOAL_LINE) for bound in BOUNDS),
    ):
        panel = panel.override_by_name(name, props)
    return panel.links([runbooks.link(kpi.runbook), runbooks.link("target-breach")])


def _spend_against_budget(runbooks: Runbooks) -> timeseries.Panel:
    """Spend so far today climbing along the prorated budget curve, and where it heads."""
    lines = [
        ("kpimon_spend_today", "", "spend today"),
        ("kpimon_budget_prorated", "", "budget so far"),
        ("kpimon_budget_daily", "", "daily budget"),
        ("kpimon_spend_projected_today", "", "projected by midnight"),
        ("kpimon_spend_projected_today_interval", 'bound="lower"', "projection low"),
        ("kpimon_spend_projected_today_interval", 'bound="upper"', "projection high"),
    ]
    panel = timeseries_panel(
        "Spend today against budget",
        [query(of_selection(metric, matchers), legend) for metric, matchers, legend in lines],
        unit=CURRENCY,
        span=16,
        height=8,
        description=(
            "Spend since local midnight (KPIMON_TIMEZONE) against the daily budget prorated "
            "along the intraday curve (the budget the day should have used by now), the "
            "daily budget, and the end-of-day projection with its interval (projection -/+ "
            "3 standard errors). Shown for the series the selection equals when the targets "
            "file gives it a budget: one campaign (exact id), all of a channel, everything."
        ),
    )
    for name, props in (
        override("spend today", {"custom.lineWidth": 3, "color": fixed_colour("blue")}),
        override("budget so far", {"custom.lineStyle": {"fill": "dash", "dash": [10, 10]},
                                   "color": fixed_colour("green")}),
        override("daily budget", {"custom.lineWidth": 1, "color": fixed_colour("red")}),
        override("projected by midnight", {"custom.lineWidth": 1, "color": fixed_colour("purple"),
                                           "custom.lineStyle": {"fill": "dot", "dash": [0, 10]}}),
        override("projection low", {"custom.lineWidth": 0, "color": fixed_colour("purple"),
                                    "custom.fillBelowTo": "projection high",
                                    "custom.fillOpacity": 10}),
        override("projection high", {"custom.lineWidth": 0, "color": fixed_colour("purple")}),
    ):  # fmt: skip
        panel = panel.override_by_name(name, props)
    return panel.links([runbooks.link("pacing")])


def _pacing(runbooks: Runbooks) -> stat.Panel:
    return stat_panel(
        "Pacing today",
        [query(of_selection("kpimon_spend_pacing_ratio"), "pacing")],
        unit="percentunit",
        steps=PACING_STEPS,
        decimals=0,
        span=8,
        height=8,
        no_value="no budget for this selection",
        description=(
            "Spend today over the prorated budget (1 = on pace; green within the pacing "
            f"alert's ±{MARGIN:.0%}, orange under, red over), for the series the selection "
            "equals when it has a budget."
        ),
    ).links([runbooks.link("pacing")])


def _window_sums() -> table.Panel:
    return (
        table.Panel()
        .title("Window sums")
        .description("kpimon_window_measure of the selection: each measure over each window.")
        .datasource(DATASOURCE)
        .targets(
            ref_ids([query(f"sum by (measure, window) ({WINDOW_SUMS})", instant=True, table=True)])
        )
        .with_transformation(
            dm.DataTransformerConfig(
                id_val="groupingToMatrix",
                options={"columnField": "window", "rowField": "measure", "valueField": "Value"},
            )
        )
        .with_transformation(
            dm.DataTransformerConfig(
                id_val="organize",
                options={
                    "indexByName": {"measure\\window": 0, "5m": 1, "15m": 2, "1h": 3, "24h": 4}
                },
            )
        )
        .decimals(2)
        .span(8)
        .height(8)
    )


def _campaigns() -> table.Panel:
    """The campaigns in the selection by 24 h spend, each opening its own drill-down."""
    by = "sum by (channel, campaign)"
    day = 'window="24h",' + SELECTION
    columns = {"Value #A": "Spend · 24 h", "Value #B": "Revenue · 24 h",
               "Value #C": "Orders · 24 h", "Value #D": "ROAS · 24 h"}  # fmt: skip
    queries = [
        query(f'{by} (kpimon_window_measure{{measure="spend",{day}}})', instant=True, table=True),
        query(f'{by} (kpimon_window_measure{{measure="revenue",{day}}})', instant=True, table=True),
        query(f'{by} (kpimon_window_measure{{measure="orders",{day}}})', instant=True, table=True),
        query(
            f'{by} (kpimon_window_measure{{measure="revenue",{day}}}) / '
            f'({by} (kpimon_window_measure{{measure="spend",{day}}}) > 0)',
            instant=True,
            table=True,
        ),
    ]
    panel = (
        table.Panel()
        .title("Campaigns in the selection")
        .description("Click a campaign to drill into it.")
        .datasource(DATASOURCE)
        .targets(ref_ids(queries))
        .with_transformation(dm.DataTransformerConfig(id_val="merge", options={}))
        .with_transformation(
            dm.DataTransformerConfig(
                id_val="organize",
                options={"excludeByName": {"Time": True}, "renameByName": columns},
            )
        )
        .sort_by([common_builders.TableSortByFieldState().display_name("Spend · 24 h").desc(True)])
        .span(24)
        .height(8)
    )
    for name, props in (
        override("Spend · 24 h", {"unit": CURRENCY, "decimals": 0}),
        override("Revenue · 24 h", {"unit": CURRENCY, "decimals": 0}),
        override("ROAS · 24 h", {"decimals": 2}),
        override(
            "campaign",
            {
                "links": [
                    {
                        "title": "Drill into ${__data.fields.campaign}",
                        "url": f"/d/{CAMPAIGN_UID}?var-channel=${{__data.fields.channel}}"
                        "&var-campaign=${__data.fields.campaign}&${__url_time_range}",
                    }
                ]
            },
        ),
    ):
        panel = panel.override_by_name(name, props)
    return panel


def build(runbooks: Runbooks) -> dm.Dashboard:
    board = (
        db.Dashboard(TITLES[CAMPAIGN_UID])
        .uid(CAMPAIGN_UID)
        .description("One campaign, a channel or everything: KPIs against baseline and last week.")
        .tags(TAGS)
        .readonly()
        .time("now-6h", "now")
        .refresh("1m")
        .tooltip(dm.DashboardCursorSync.CROSSHAIR)
        .with_variable(_variable("channel", "Channel", CHANNEL_VALUES))
        .with_variable(_variable("campaign", "Campaign", CAMPAIGN_VALUES))
        .annotation(
            db.AnnotationQuery()
            .name("KPI alerts")
            .datasource(DATASOURCE)
            .enable(True)
            .icon_color("red")
            .expr(ALERTS)
            .step("1m")
            .title_format("{{rule}} ({{severity}})")
            .text_format("{{scope}} {{channel}} {{campaign}}")
            .tag_keys("severity,scope")
        )
        .links(dashboard_links(CAMPAIGN_UID))
    )
    for family, title in FAMILIES.items():
        board = board.with_row(db.Row(title))
        for kpi in KPIS:
            if kpi.runbook == family:
                board = board.with_panel(_kpi_panel(kpi, runbooks))
    funnel = timeseries_panel(
        "Funnel · 15 min windows",
        [
            query(
                f'sum by (measure) (kpimon_window_measure{{measure=~"{FUNNEL}",window="15m",'
                f"{SELECTION}}})",
                "{{measure}}",
            ),
            query(
                f'sum(kpimon_window_measure{{measure="impressions",window="15m",{SELECTION}}})',
                "impressions",
            ),
        ],
        unit="short",
        span=8,
        height=8,
        description="Counts over 15 min windows; impressions on the right axis.",
    ).override_by_name(*override("impressions", {"custom.axisPlacement": "right"}))
    money = timeseries_panel(
        "Spend and revenue · 1 h windows",
        [
            query(
                f'sum by (measure) (kpimon_window_measure{{measure=~"spend|revenue",window="1h",'
                f"{SELECTION}}})",
                "{{measure}}",
            )
        ],
        unit=CURRENCY,
        span=8,
        height=8,
        description="Spend and order revenue over 1 h windows.",
    )
    board = (
        board.with_row(db.Row("Budget"))
        .with_panel(_spend_against_budget(runbooks))
        .with_panel(_pacing(runbooks))
        .with_row(db.Row("Volumes"))
        .with_panel(_window_sums())
        .with_panel(funnel)
        .with_panel(money)
        .with_row(db.Row("Campaigns"))
        .with_panel(_campaigns())
    )
    return finish(board)
