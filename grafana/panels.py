"""Shared pieces of the dashboards: datasource, uids, runbooks, query and panel helpers.

The helpers only fix what every kpimon panel has in common (datasource, ref ids,
explicit reducers, legends); each dashboard module still says what it shows.
"""

from __future__ import annotations

import string
from collections.abc import Sequence

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog import variants as cogvariants
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models.prometheus import PromQueryFormat, QueryEditorMode

# Provisioned by grafana/provisioning/datasources/prometheus.yml with this fixed uid.
DATASOURCE = common.DataSourceRef(type_val="prometheus", uid="kpimon-prometheus")

WALL_UID = "kpimon-wall"
# Alert messages link here (alerts/engine.py DASHBOARD_UID) with var-channel/var-campaign.
CAMPAIGN_UID = "kpimon-campaign"
PIPELINE_UID = "kpimon-pipeline"
TITLES = {
    WALL_UID: "kpimon · KPI wall",
    CAMPAIGN_UID: "kpimon · Campaign drill-down",
    PIPELINE_UID: "kpimon · Pipeline health",
}
TAGS = ["kpimon"]
PanelBuilder = cogbuilder.Builder[dm.Panel]
Target = cogbuilder.Builder[cogvariants.Dataquery]
Link = cogbuilder.Builder[dm.DashboardLink]

# The scrape interval (prometheus/prometheus.yml, datasource timeInterval): refreshing
# faster only redraws the same samples.
REFRESH = "15s"
# Money metrics are in the reporting currency (KPIMON_REPORTING_CURRENCY, default USD).
CURRENCY = "currencyUSD"

# Runbooks live in the repository, like the alert rules' runbook_url values; a
# deployment with a browsable copy regenerates with `--runbook-base URL`.
RUNBOOK_BASE = "docs/runbooks/"
RUNBOOKS = {
    "worker-down": "a worker is not scraped (up == 0)",
    "no-events": "no events arrive (last event too old)",
    "events-rejected": "events go to the dead-letter topic",
    "watermark-lag": "windows lag the wall clock (replay, stuck partition)",
    "consumer-lag": "workers fall behind the event topics",
    "partition-stalled": "a partition is paused on a batch a worker cannot read",
    "notification-failures": "Slack / Alertmanager / Kafka alert delivery fails",
    "cardinality": "new campaign or channel ids are folded into __other__",
    "rate-drop": "CTR, conversion or lead rate dropped",
    "volume-drop": "impressions, clicks, leads or orders dropped (tracking outage)",
    "cost-rise": "CPC, CPL, CPA or CAC rose",
    "value-drop": "ROAS, ROI or AOV dropped",
    "target-breach": "a KPI is past its goal in the targets file",
    "pacing": "spend is projected to miss its daily budget, or has exhausted it",
}


class Runbooks:
    """Where runbook links point; one instance per generation."""

    def __init__(self, base: str = RUNBOOK_BASE) -> None:
        self.base = base if base.endswith("/") else base + "/"

    def url(self, name: str) -> str:
        if name not in RUNBOOKS:
            raise KeyError(f"unknown runbook {name!r}")
        return f"{self.base}{name}.md"

    def link(self, name: str) -> db.DashboardLink:
        return db.DashboardLink(f"Runbook: {name}").url(self.url(name)).target_blank(True)


def query(
    expr: str, legend: str = "", *, instant: bool = False, table: bool = False
) -> prometheus.Dataquery:
    """A PromQL target in code mode (the builder mode would rewrite our expressions)."""
    q = prometheus.Dataquery().expr(expr).datasource(DATASOURCE).editor_mode(QueryEditorMode.CODE)
    if legend:
        q = q.legend_format(legend)
    q = q.instant() if instant else q.range()
    if table:
        q = q.format(PromQueryFormat.TABLE)
    return q


def ref_ids(queries: Sequence[prometheus.Dataquery]) -> list[Target]:
    """Ref ids A, B, C… in order, so overrides can name a query by its letter."""
    if len(queries) > len(string.ascii_uppercase):
        raise ValueError("too many queries for one panel")
    return [q.ref_id(letter) for q, letter in zip(queries, string.ascii_uppercase, strict=False)]


def thresholds(*steps: tuple[float | None, str]) -> db.ThresholdsConfig:
    """Absolute thresholds; the first step's value must be None (the base colour)."""
    if not steps or steps[0][0] is not None:
        raise ValueError("the first threshold step is the base: (None, colour)")
    return (
        db.ThresholdsConfig()
        .mode(dm.ThresholdsMode.ABSOLUTE)
        .steps([dm.Threshold(value=value, color=color) for value, color in steps])
    )


def link(title: str, url: str, *, keep_time: bool = True) -> db.DashboardLink:
    """A link to another dashboard (``/d/<uid>``), keeping the time range by default."""
    return db.DashboardLink(title).type(dm.DashboardLinkType.LINK).url(url).keep_time(keep_time)


def dashboard_links(current: str) -> list[Link]:
    """Links from one kpimon dashboard to the two others."""
    return [link(title, f"/d/{uid}") for uid, title in TITLES.items() if uid != current]


def stat_panel(
    title: str,
    queries: Sequence[prometheus.Dataquery],
    *,
    unit: str,
    steps: Sequence[tuple[float | None, str]],
    span: int,
    height: int,
    description: str,
    color_mode: common.BigValueColorMode = common.BigValueColorMode.BACKGROUND,
    percent_change: common.PercentChangeColorMode | None = None,
    sparkline: bool = True,
    text_mode: common.BigValueTextMode = common.BigValueTextMode.AUTO,
    decimals: int | None = None,
    no_value: str | None = None,
    mappings: list[dm.ValueMapping] | None = None,
) -> stat.Panel:
    """A big number, reduced with ``lastNotNull`` (explicitly: Grafana's default is the mean)."""
    panel = (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .targets(ref_ids(queries))
        .unit(unit)
        .thresholds(thresholds(*steps))
        .color_mode(color_mode)
        .graph_mode(common.BigValueGraphMode.AREA if sparkline else common.BigValueGraphMode.NONE)
        .text_mode(text_mode)
        .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .show_percent_change(percent_change is not None)
        .span(span)
        .height(height)
    )
    if percent_change is not None:
        panel = panel.percent_change_color_mode(percent_change)
    if decimals is not None:
        panel = panel.decimals(decimals)
    if no_value is not None:
        panel = panel.no_value(no_value)
    if mappings:
        panel = panel.mappings(mappings)
    return panel


def timeseries_panel(
    title: str,
    queries: Sequence[prometheus.Dataquery],
    *,
    unit: str,
    span: int,
    height: int,
    description: str,
    min_zero: bool = True,
) -> timeseries.Panel:
    """Lines with a legend table (last and max) and a shared tooltip."""
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .targets(ref_ids(queries))
        .unit(unit)
        .line_width(2)
        .fill_opacity(0)
        .legend(
            common_builders.VizLegendOptions()
            .show_legend(True)
            .display_mode(common.LegendDisplayMode.TABLE)
            .placement(common.LegendPlacement.BOTTOM)
            .calcs(["lastNotNull", "max"])
        )
        .tooltip(
            common_builders.VizTooltipOptions()
            .mode(common.TooltipDisplayMode.MULTI)
            .sort(common.SortOrder.DESCENDING)
        )
        .span(span)
        .height(height)
    )
    if min_zero:
        panel = panel.min(0)
    return panel


def value_map(**texts: tuple[str, str]) -> dm.ValueMap:
    """Map raw values to (text, colour), e.g. ``value_map(**{"1": ("UP", "green")})``."""
    return dm.ValueMap(
        options={
            raw: dm.ValueMappingResult(text=text, color=color, index=i)
            for i, (raw, (text, color)) in enumerate(texts.items())
        }
    )


def override(name: str, properties: dict[str, object]) -> tuple[str, list[dm.DynamicConfigValue]]:
    """Arguments of ``override_by_name``: a series and its field properties (``custom.x``)."""
    return name, [dm.DynamicConfigValue(id_val=k, value=v) for k, v in properties.items()]


def fixed_colour(colour: str) -> dict[str, str]:
    """A field colour property (``color``) that is one colour, whatever the value."""
    return {"mode": "fixed", "fixedColor": colour}


# A goal from the targets file drawn on a graph: thin, red, dashed.
GOAL_LINE: dict[str, object] = {
    "custom.lineWidth": 1,
    "custom.lineStyle": {"fill": "dash", "dash": [4, 4]},
    "color": fixed_colour("red"),
}


def finish(builder: db.Dashboard) -> dm.Dashboard:
    """Build and number the panels 1… in layout order (links and ``viewPanel`` need ids)."""
    board = builder.build()
    for i, panel in enumerate(board.panels or [], start=1):
        panel.id_val = i
    return board
