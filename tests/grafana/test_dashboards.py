"""What each dashboard promises: kiosk wall, drill-down variables, links, runbooks."""

from __future__ import annotations

import re
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import yaml

from alerts.engine import AlertEngine
from alerts.rules import load_rules
from grafana.panels import RUNBOOK_BASE
from tests.grafana.walk import by_uid, datasource_uids, load_dashboards, panels, urls, variables
from tests.helpers import REPO

# The runbooks the dashboards and alert rules point at (written on another branch).
EXPECTED_RUNBOOKS = {
    "worker-down.md", "events-rejected.md", "no-events.md", "watermark-lag.md",
    "consumer-lag.md", "partition-stalled.md", "notification-failures.md",
    "cardinality.md", "rate-drop.md", "volume-drop.md", "cost-rise.md", "value-drop.md",
    "target-breach.md", "pacing.md",
}  # fmt: skip
RUNBOOK_DIR = REPO / "docs" / "runbooks"


def _panel(board: dict[str, Any], title: str) -> dict[str, Any]:
    (found,) = [p for p in panels(board) if p.get("title") == title]
    return found


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- the wall


def test_wall_is_kiosk_ready() -> None:
    wall = by_uid()["kpimon-wall"]
    assert variables(wall) == {}, "a wall screen must not depend on a variable selection"
    assert not wall["editable"]
    scrape = _yaml(REPO / "prometheus" / "prometheus.yml")["global"]["scrape_interval"]
    datasource = _yaml(REPO / "grafana" / "provisioning" / "datasources" / "prometheus.yml")
    assert wall["refresh"] == scrape == datasource["datasources"][0]["jsonData"]["timeInterval"]


@pytest.mark.parametrize(
    ("title", "kpi", "colour"),
    [
        ("CTR · 15m", "ctr", "standard"),
        ("Conversion rate · 15m", "conversion_rate", "standard"),
        ("CAC · 15m", "cac", "inverted"),  # lower is better
        ("ROAS · 15m", "roas", "standard"),
    ],
)
def test_wall_kpi_stats(title: str, kpi: str, colour: str) -> None:
    panel = _panel(by_uid()["kpimon-wall"], title)
    options = panel["options"]
    assert options["reduceOptions"]["calcs"] == ["lastNotNull"]
    assert options["graphMode"] == "area"
    assert options["showPercentChange"] is True
    assert options["percentChangeColorMode"] == colour
    steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert len({s["color"] for s in steps}) >= 3
    values = [s["value"] for s in steps[1:]]
    assert values == sorted(values)
    target = panel["targets"][0]  # the KPI; the second query colours it by its goal
    assert f'kpi="{kpi}"' in target["expr"]
    assert 'scope="global"' in target["expr"] and 'window="15m"' in target["expr"]


def test_wall_freshness_turns_red_when_stale() -> None:
    panel = _panel(by_uid()["kpimon-wall"], "Last event")
    assert "time() - max(" in panel["targets"][0]["expr"]
    assert "kpimon_last_event_timestamp_seconds" in panel["targets"][0]["expr"]
    steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert steps[-1]["color"] == "red" and steps[-1]["value"] <= 300
    assert panel["fieldConfig"]["defaults"]["unit"] == "s"


def test_wall_shows_totals_channels_and_alerts() -> None:
    wall = by_uid()["kpimon-wall"]
    exprs = {p["title"]: p["targets"][0]["expr"] for p in panels(wall) if p.get("targets")}
    assert 'measure="spend"' in exprs["Spend · 24 h"] and 'window="24h"' in exprs["Spend · 24 h"]
    assert 'measure="revenue"' in exprs["Revenue · 24 h"]
    assert 'measure="orders"' in exprs["Orders / min"]
    assert 'measure="leads"' in exprs["Leads / min"]
    for kpi in ("CTR", "Conversion rate", "ROAS"):
        assert 'scope="channel"' in exprs[f"{kpi} by channel · 15m"]
    assert "kpimon_alerts_firing" in exprs["Firing KPI alerts"]


def test_every_stat_reduces_to_the_last_value_explicitly() -> None:
    for board in load_dashboards().values():
        for panel in panels(board):
            if panel["type"] == "stat":
                assert panel["options"]["reduceOptions"]["calcs"] == ["lastNotNull"], (
                    f"{board['uid']} / {panel['title']}"
                )


# --------------------------------------------------------------------------- drill-down


def test_campaign_variables_match_the_alert_links() -> None:
    board = by_uid()["kpimon-campaign"]
    found = variables(board)
    assert list(found) == ["channel", "campaign"]
    for variable in found.values():
        assert variable["type"] == "query"
        assert variable["includeAll"] is True
        assert variable["allValue"] == ".*"
        assert variable["query"].startswith("label_values(kpimon_")
        assert variable["current"]["value"] == "$__all"
    assert '"$channel"' in found["campaign"]["query"], "campaigns are filtered by channel"


@pytest.mark.parametrize(
    ("scope", "channel", "campaign"),
    [("campaign", "social", "c7"), ("channel", "social", ""), ("global", "", "")],
)
def test_alert_dashboard_url_opens_the_drilldown(scope: str, channel: str, campaign: str) -> None:
    engine = AlertEngine(load_rules(REPO / "alerts" / "rules.yml"), grafana_url="http://g:3000")
    url = engine.dashboard_url(scope, channel, campaign, 1_800_000_000, 1_800_003_600)
    assert url is not None
    parts = urllib.parse.urlsplit(url)
    uid = parts.path.removeprefix("/d/")
    assert uid in by_uid(), f"alert links point at a dashboard that does not exist: {uid}"
    params = urllib.parse.parse_qs(parts.query)
    found = variables(by_uid()[uid])
    for key, (value,) in params.items():
        if key.startswith("var-"):
            variable = found[key.removeprefix("var-")]
            assert value != "All" or variable["includeAll"]
    assert {"from", "to"} <= set(params)


def test_every_kpi_panel_compares_with_baseline_and_last_week() -> None:
    board = by_uid()["kpimon-campaign"]
    kpi_panels = [p for p in panels(board) if p["type"] == "timeseries" and len(p["targets"]) == 5]
    assert len(kpi_panels) == 10
    for panel in kpi_panels:
        value, base, line, last_week, goal = (t["expr"] for t in panel["targets"])
        assert "kpimon_kpi_target" in goal and 'kpi="' in goal
        assert "kpimon_kpi_baseline" in base and "kpimon_kpi_baseline" in line
        assert "offset 7d" in last_week and last_week.replace(" offset 7d", "") == value
        for expr in (value, base, line, last_week):
            assert 'campaign=~"$campaign"' in expr and 'channel=~"$channel"' in expr


def test_drilldown_annotates_alerts_of_the_selection() -> None:
    (annotation,) = by_uid()["kpimon-campaign"]["annotations"]["list"]
    assert annotation["expr"].count("kpimon_alerts_firing") == 1
    assert "$campaign" in annotation["expr"] and "$channel" in annotation["expr"]
    assert annotation["enable"] is True


# --------------------------------------------------------------------------- pipeline


def test_pipeline_covers_the_on_call_signals() -> None:
    exprs = " ".join(
        t["expr"] for p in panels(by_uid()["kpimon-pipeline"]) for t in p.get("targets", [])
    )
    for metric in (
        "kpimon_events_total", "kpimon_events_rejected_total", "kpimon_events_late_total",
        "kpimon_events_duplicate_total", "kpimon_watermark_lag_seconds",
        "kpimon_consumer_lag_records", "kpimon_partition_stalled",
        "kpimon_notifications_total", 'up{job="kpimon"}',
        'scrape_duration_seconds{job="kpimon"}', "kpimon_event_to_metric_latency_seconds_bucket",
    ):  # fmt: skip
        assert metric in exprs, metric
    assert exprs.count("histogram_quantile(") == 3


# --------------------------------------------------------------------------- links


def test_every_dashboard_link_points_to_an_existing_dashboard() -> None:
    boards = by_uid()
    checked = 0
    for uid, board in boards.items():
        for url in urls(board):
            path, _, query = url.partition("?")
            if not path.startswith("/d/"):
                continue
            target = path.removeprefix("/d/").split("/")[0]
            assert target in boards, f"{uid} links to unknown dashboard {url}"
            names = {k.removeprefix("var-") for k in urllib.parse.parse_qs(query) if "var-" in k}
            assert names <= set(variables(boards[target])), f"{uid}: {url}"
            checked += 1
    assert checked >= 10


def test_dashboards_link_to_each_other() -> None:
    boards = by_uid()
    for uid, board in boards.items():
        linked = {link["url"].removeprefix("/d/") for link in board["links"]}
        assert linked == set(boards) - {uid}
        assert all(link["keepTime"] for link in board["links"])


def _runbook_links() -> set[str]:
    return {
        url.removeprefix(RUNBOOK_BASE)
        for board in load_dashboards().values()
        for url in urls(board)
        if url.startswith(RUNBOOK_BASE)
    }


def test_runbook_links_name_the_expected_runbooks() -> None:
    assert _runbook_links() == EXPECTED_RUNBOOKS


def test_alert_rules_runbooks_are_linked_from_the_dashboards() -> None:
    rule_files = [REPO / "alerts" / "rules.yml", *sorted((REPO / "prometheus" / "rules").glob("*"))]
    pattern = re.compile(r"runbook_url:\s*\"?([^\s\"]+)")
    used = {
        Path(url).name
        for path in rule_files
        for url in pattern.findall(path.read_text(encoding="utf-8"))
    }
    assert used, "no runbook_url found in the rule files"
    assert used <= _runbook_links()


@pytest.mark.parametrize("name", sorted(EXPECTED_RUNBOOKS))
def test_runbook_file_exists(name: str) -> None:
    assert (RUNBOOK_DIR / name).is_file(), f"dashboards link docs/runbooks/{name}"


# --------------------------------------------------------------------------- datasource


def test_every_query_uses_the_provisioned_datasource() -> None:
    provisioned = _yaml(REPO / "grafana" / "provisioning" / "datasources" / "prometheus.yml")
    uid = provisioned["datasources"][0]["uid"]
    for board in load_dashboards().values():
        found = set(datasource_uids(board))
        assert found == {uid}, board["uid"]
        for panel in panels(board):
            if panel["type"] != "row" and panel["type"] != "text":
                assert panel["datasource"]["uid"] == uid
