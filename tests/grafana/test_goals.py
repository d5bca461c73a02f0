"""Goals and budgets on the dashboards: what the panels promise, and what their PromQL computes.

The PromQL is evaluated by ``promtool test rules`` on synthetic target, budget and
KPI series (the live version, on a worker's real series, is
tests/integration/test_dashboards.py).
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from alerts.pacing import MARGIN
from grafana.goals import MET, MISSED, NO_GOAL, PACING_STEPS, goal_colour, of_selection
from grafana.kpis import KPI
from grafana.wall import BIG, BY_CHANNEL, FALLBACK_STEPS
from tests.conftest import require_binary
from tests.grafana.walk import by_uid, panels


def _panel(board: dict[str, Any], title: str) -> dict[str, Any]:
    (found,) = [p for p in panels(board) if p.get("title") == title]
    return found


def _steps(panel: dict[str, Any]) -> list[tuple[float | None, str]]:
    steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
    return [(s["value"], s["color"]) for s in steps]


# --------------------------------------------------------------------------- the wall


@pytest.mark.parametrize("name", BIG)
def test_wall_kpi_colour_comes_from_the_goal(name: str) -> None:
    """The big number's second query labels the KPI red/green against its global goal,
    and Grafana's "config from query results" makes that label the number's colour."""
    panel = _panel(by_uid()["kpimon-wall"], f"{KPI[name].title} · 15m")
    value, colour = panel["targets"]
    assert colour["refId"] == "B" and colour["instant"] and colour["format"] == "table"
    assert f'kpimon_kpi_target{{kpi="{name}",bound="min",scope="global"}}' in colour["expr"]
    assert f'kpimon_kpi_target{{kpi="{name}",bound="max",scope="global"}}' in colour["expr"]
    assert value["expr"] in colour["expr"]  # the very value shown
    assert f'"color", "{MISSED}"' in colour["expr"] and f'"color", "{MET}"' in colour["expr"]
    (transform,) = panel["transformations"]
    assert transform["id"] == "configFromData"
    options = transform["options"]
    assert options["configRefId"] == "B"
    assert {"fieldName": "color", "handlerKey": "color"} in options["mappings"]
    assert options["applyTo"] == {"id": "byFrameRefID", "options": "A"}
    # Without a goal, the fallback thresholds apply: they are the only KPI constants.
    assert _steps(panel) == FALLBACK_STEPS[name]


@pytest.mark.parametrize("name", BY_CHANNEL)
def test_wall_channel_colours_come_from_each_channels_goal(name: str) -> None:
    panel = _panel(by_uid()["kpimon-wall"], f"{KPI[name].title} by channel · 15m")
    (target,) = panel["targets"]
    assert target["instant"] and target["format"] == "table"
    assert 'kpimon_kpi_target{kpi="' + name + '",bound="min",scope="channel"}' in target["expr"]
    assert "on(channel)" in target["expr"]
    for colour in (MET, MISSED, NO_GOAL):
        assert f'"color", "{colour}"' in target["expr"]
    (transform,) = panel["transformations"]
    assert transform["id"] == "rowsToFields"
    assert {"fieldName": "color", "handlerKey": "color"} in transform["options"]["mappings"]
    assert {"fieldName": "channel", "handlerKey": "field.name"} in transform["options"]["mappings"]
    assert _steps(panel) == [(None, NO_GOAL)]  # no constant


def test_no_kpi_threshold_outside_the_fallback() -> None:
    """Every threshold step on a KPI panel of the wall is a goal's fallback (of a panel
    that takes its colour from the goal) or a neutral base: no other constant."""
    wall = by_uid()["kpimon-wall"]
    for panel in panels(wall):
        exprs = " ".join(t["expr"] for t in panel.get("targets", []))
        if "kpimon_kpi{" not in exprs or "kpimon_kpi_baseline" in exprs:
            continue  # not a KPI value ("vs baseline" is a relative change)
        steps = _steps(panel) if "thresholds" in panel["fieldConfig"]["defaults"] else []
        if len(steps) > 1:
            assert "kpimon_kpi_target" in exprs, panel["title"]
            assert panel["transformations"][0]["id"] == "configFromData", panel["title"]
            assert steps in FALLBACK_STEPS.values(), panel["title"]


@pytest.mark.parametrize("name", BIG)
def test_wall_draws_each_kpi_against_its_goal_line(name: str) -> None:
    panel = _panel(by_uid()["kpimon-wall"], f"{KPI[name].title} against goal · 15m")
    value, goal = (t["expr"] for t in panel["targets"])
    assert f'kpi="{name}"' in value and 'scope="global"' in value
    assert goal == f'max by (bound) (kpimon_kpi_target{{kpi="{name}",scope="global"}})'
    styled = {o["matcher"]["options"] for o in panel["fieldConfig"]["overrides"]}
    assert {"goal (min)", "goal (max)"} <= styled


def test_wall_pacing_gauge_per_channel_with_the_projection() -> None:
    wall = by_uid()["kpimon-wall"]
    gauge = _panel(wall, "Budget pacing today")
    assert gauge["type"] == "gauge"
    exprs = [t["expr"] for t in gauge["targets"]]
    assert 'max by (channel) (kpimon_spend_pacing_ratio{scope="channel"})' in exprs
    assert 'max(kpimon_spend_pacing_ratio{scope="global"})' in exprs
    # Green is the alert's own margin around 1, from alerts/pacing.py.
    assert _steps(gauge) == PACING_STEPS
    assert [v for v, _ in PACING_STEPS[1:]] == pytest.approx([1 - MARGIN, 1 + MARGIN])
    projection = _panel(wall, "Projected spend today / budget")
    (target,) = projection["targets"]
    assert "kpimon_spend_projected_today{" in target["expr"]
    assert "kpimon_budget_daily{" in target["expr"] and "on(channel)" in target["expr"]
    assert _steps(projection) == PACING_STEPS
    for panel in (gauge, projection):
        assert any(link["url"].endswith("pacing.md") for link in panel["links"])


# --------------------------------------------------------------------------- drill-down


def test_drilldown_kpis_have_the_selections_goal_lines() -> None:
    board = by_uid()["kpimon-campaign"]
    kpi_panels = [p for p in panels(board) if p["type"] == "timeseries" and len(p["targets"]) == 5]
    assert len(kpi_panels) == len(KPI)
    for panel in kpi_panels:
        goal = panel["targets"][4]
        assert goal["legendFormat"] == "goal ({{bound}})"
        for scope in ("campaign", "channel", "global"):
            assert f'scope="{scope}"' in goal["expr"]
        styled = {o["matcher"]["options"] for o in panel["fieldConfig"]["overrides"]}
        assert {"goal (min)", "goal (max)"} <= styled
        assert any(link["url"].endswith("target-breach.md") for link in panel["links"])


def test_drilldown_spend_against_the_prorated_budget() -> None:
    board = by_uid()["kpimon-campaign"]
    panel = _panel(board, "Spend today against budget")
    legends = {t["legendFormat"]: t["expr"] for t in panel["targets"]}
    assert "kpimon_spend_today{" in legends["spend today"]
    assert "kpimon_budget_prorated{" in legends["budget so far"]
    assert "kpimon_budget_daily{" in legends["daily budget"]
    assert "kpimon_spend_projected_today{" in legends["projected by midnight"]
    assert 'bound="lower"' in legends["projection low"]
    for expr in legends.values():
        assert "$channel" in expr and "$campaign" in expr
    pacing = _panel(board, "Pacing today")
    assert "kpimon_spend_pacing_ratio{" in pacing["targets"][0]["expr"]
    assert _steps(pacing) == PACING_STEPS


# --------------------------------------------------------------------------- the PromQL

GLOBAL_KPI = 'max(kpimon_kpi{{kpi="{}",scope="global",window="15m"}})'
CHANNEL_KPI = 'max by (channel) (kpimon_kpi{{kpi="{}",scope="channel",window="15m"}})'


def _kpi(kpi: str, scope: str, value: float, channel: str = "", campaign: str = "") -> str:
    return (f'kpimon_kpi{{kpi="{kpi}",scope="{scope}",channel="{channel}",campaign="{campaign}",'
            f'window="15m"}} {value}')  # fmt: skip


def _target(kpi: str, scope: str, bound: str, value: float, channel: str = "",
            campaign: str = "") -> str:  # fmt: skip
    return (f'kpimon_kpi_target{{kpi="{kpi}",scope="{scope}",channel="{channel}",'
            f'campaign="{campaign}",bound="{bound}"}} {value}')  # fmt: skip


def _metric(name: str, scope: str, value: float, channel: str = "", campaign: str = "") -> str:
    return f'{name}{{scope="{scope}",channel="{channel}",campaign="{campaign}"}} {value}'


SERIES = [
    _kpi("ctr", "global", 0.01), _target("ctr", "global", "min", 0.02),  # missed: red
    _kpi("cac", "global", 30), _target("cac", "global", "max", 40),  # met: green
    _kpi("roas", "global", 2.0),  # no goal
    # a range, past its max: red
    _kpi("conversion_rate", "global", 0.05), _target("conversion_rate", "global", "min", 0.01),
    _target("conversion_rate", "global", "max", 0.04),
    _kpi("ctr", "channel", 0.03, "search"), _target("ctr", "channel", "min", 0.02, "search"),
    _kpi("ctr", "channel", 0.01, "social"), _target("ctr", "channel", "min", 0.02, "social"),
    _kpi("ctr", "channel", 0.02, "email"),
    # a campaign goal of search must not colour the search channel
    _target("ctr", "campaign", "min", 0.5, "search", "c1"),
    # drill-down: campaigns c1, c2 (search) and c3 (social), with spend and goals
    *(f'kpimon_window_measure{{measure="spend",scope="campaign",channel="{ch}",campaign="{c}",'
      f'window="5m"}} 1' for ch, c in (("search", "c1"), ("search", "c2"), ("social", "c3"))),
    _metric("kpimon_spend_today", "campaign", 10, "search", "c1"),
    _metric("kpimon_spend_today", "campaign", 7, "social", "c3"),
    _metric("kpimon_spend_today", "channel", 25, "search"),
    _metric("kpimon_spend_today", "channel", 9, "social"),
    _metric("kpimon_spend_today", "global", 100),
    _target("cac", "campaign", "max", 50, "search", "c1"),
    _target("cac", "channel", "max", 45, "search"),
]  # fmt: skip


def _at(expr: str, channel: str, campaign: str) -> str:
    return expr.replace("$channel", channel).replace("$campaign", campaign)


SPEND = of_selection("kpimon_spend_today")
CAC_GOAL = of_selection("kpimon_kpi_target", 'kpi="cac"', "bound")
CASES: list[tuple[str, str, list[tuple[str, float]]]] = [
    ("missed min", goal_colour(GLOBAL_KPI.format("ctr"), "ctr", 'scope="global"', no_goal=False),
     [(f'{{color="{MISSED}"}}', 0.01)]),
    ("met max", goal_colour(GLOBAL_KPI.format("cac"), "cac", 'scope="global"', no_goal=False),
     [(f'{{color="{MET}"}}', 30)]),
    ("no goal: fallback", goal_colour(GLOBAL_KPI.format("roas"), "roas", 'scope="global"',
                                      no_goal=False), []),
    ("no goal: neutral", goal_colour(GLOBAL_KPI.format("roas"), "roas", 'scope="global"',
                                     no_goal=True), [(f'{{color="{NO_GOAL}"}}', 2.0)]),
    ("past a range's max", goal_colour(GLOBAL_KPI.format("conversion_rate"), "conversion_rate",
                                       'scope="global"', no_goal=False),
     [(f'{{color="{MISSED}"}}', 0.05)]),
    ("per channel", goal_colour(CHANNEL_KPI.format("ctr"), "ctr", 'scope="channel"', "channel",
                                no_goal=True),
     [(f'{{channel="social",color="{MISSED}"}}', 0.01),
      (f'{{channel="search",color="{MET}"}}', 0.03),
      (f'{{channel="email",color="{NO_GOAL}"}}', 0.02)]),
    ("one campaign: its own", _at(SPEND, "search", "c1"), [("{}", 10)]),
    ("any channel, one campaign", _at(SPEND, ".*", "c1"), [("{}", 10)]),
    ("all of a channel: the channel's", _at(SPEND, "search", ".*"), [("{}", 25)]),
    ("a channel of one campaign: the campaign's", _at(SPEND, "social", ".*"), [("{}", 7)]),
    ("everything: the global one", _at(SPEND, ".*", ".*"), [("{}", 100)]),
    ("campaign goal", _at(CAC_GOAL, "search", "c1"), [('{bound="max"}', 50)]),
    ("channel goal", _at(CAC_GOAL, "search", ".*"), [('{bound="max"}', 45)]),
    ("global goal", _at(CAC_GOAL, ".*", ".*"), [('{bound="max"}', 40)]),
    ("no goal for the selection", _at(CAC_GOAL, "social", "c3"), []),
]  # fmt: skip


def test_goal_promql_with_promtool(tmp_path: Path) -> None:
    require_binary("promtool")
    series = []
    for line in SERIES:
        name, value = line.rsplit(" ", 1)
        series.append({"series": name, "values": f"{value}x5"})
    tests = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": series,
            "promql_expr_test": [
                {"expr": expr, "eval_time": "2m",
                 "exp_samples": [{"labels": labels, "value": value} for labels, value in exp]}
                for _, expr, exp in CASES
            ],
        }],
    }  # fmt: skip
    path = tmp_path / "goals.test.yml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    result = subprocess.run(["promtool", "test", "rules", str(path)],
                            capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
