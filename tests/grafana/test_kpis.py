"""The KPI table agrees with the stream and the rules; its PromQL computes what it claims.

The PromQL is evaluated offline by ``promtool test rules`` on synthetic series:
ratio of sums (not mean of ratios) over a regex selection, absent on a zero
denominator, the weighted baseline and the alert line (ROI judged via ROAS).
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

from grafana.kpis import KPI, KPIS, alert_line, baseline, ratio
from stream.kpis import MEASURES
from tests.conftest import require_binary
from tests.kpis import KPI_BAD_DIRECTION, KPI_RATIOS


def test_kpi_table_matches_the_stream() -> None:
    assert [k.name for k in KPIS] == list(KPI_RATIOS)
    for kpi in KPIS:
        num, den = KPI_RATIOS[kpi.name]
        assert (kpi.numerator, kpi.denominator) == (MEASURES[num], MEASURES[den])
        assert kpi.bad == KPI_BAD_DIRECTION[kpi.name]
        assert kpi.shift == (-1.0 if kpi.name == "roi" else 0.0)


SELECTION = 'scope="campaign",channel=~"search",campaign=~".*"'
# (channel, campaign) -> window sums (every window the KPIs use carries the same numbers).
SERIES: dict[tuple[str, str], dict[str, float]] = {
    ("search", "c1"): {"impressions": 1000, "clicks": 30, "orders": 3, "spend": 100,
                       "revenue": 300, "new_customers": 2, "leads": 4},
    ("search", "c2"): {"impressions": 3000, "clicks": 10, "orders": 1, "spend": 100,
                       "revenue": 0, "new_customers": 0, "leads": 0},
    # Other channel: outside the selection.
    ("social", "c3"): {"impressions": 5000, "clicks": 500, "orders": 50, "spend": 900,
                       "revenue": 9000, "new_customers": 9, "leads": 40},
}  # fmt: skip
BASELINES = {("ctr", "c1"): 0.04, ("ctr", "c2"): 0.01, ("ctr", "c3"): 0.5,
             ("roi", "c1"): 1.0, ("roi", "c2"): 0.0, ("roi", "c3"): 9.0}  # fmt: skip


def _input_series() -> list[dict[str, str]]:
    out = []
    for (channel, campaign), sums in SERIES.items():
        for window in sorted({kpi.window for kpi in KPIS}):
            labels = f'scope="campaign",channel="{channel}",campaign="{campaign}",window="{window}"'
            for measure, value in sums.items():
                out.append({
                    "series": f'kpimon_window_measure{{measure="{measure}",{labels}}}',
                    "values": f"{value:g}x5",
                })  # fmt: skip
            # The coarser scopes must not leak into a campaign selection.
            out.append({
                "series": f'kpimon_window_measure{{measure="impressions",scope="channel",'
                          f'channel="{channel}",campaign="",window="{window}"}}',
                "values": "1x5",
            })  # fmt: skip
    for (kpi, campaign), value in BASELINES.items():
        channel = "social" if campaign == "c3" else "search"
        window = KPI[kpi].window
        out.append({
            "series": f'kpimon_kpi_baseline{{kpi="{kpi}",scope="campaign",channel="{channel}",'
                      f'campaign="{campaign}",window="{window}"}}',
            "values": f"{value:g}x5",
        })  # fmt: skip
    return out


def _sample(value: float | None) -> list[dict[str, Any]]:
    return [] if value is None else [{"labels": "{}", "value": value}]


CASES: list[tuple[str, str, float | None]] = [
    # Ratio of sums: 40 / 4000, where the mean of the two ratios would be 0.0167.
    ("ctr ratio", ratio(KPI["ctr"], SELECTION), 0.01),
    ("conversion ratio", ratio(KPI["conversion_rate"], SELECTION), 0.1),
    # No new customers in c2 alone: CAC is absent, not Inf.
    ("cac without denominator", ratio(KPI["cac"], SELECTION.replace(".*", "c2")), None),
    ("cac", ratio(KPI["cac"], SELECTION), 100.0),
    # ROI = revenue / spend - 1 = 300 / 200 - 1.
    ("roi", ratio(KPI["roi"], SELECTION), 0.5),
    # Baselines weighted by the denominator: (0.04 * 1000 + 0.01 * 3000) / 4000.
    ("ctr baseline", baseline(KPI["ctr"], SELECTION), 0.0175),
    ("ctr alert line", alert_line(KPI["ctr"], SELECTION), 0.0175 * (1 - KPI["ctr"].min_change)),
    # Weighted by spend: (1.0 * 100 + 0 * 100) / 200; the line is the rule's ROAS drop.
    ("roi baseline", baseline(KPI["roi"], SELECTION), 0.5),
    (
        "roi alert line",
        alert_line(KPI["roi"], SELECTION),
        (0.5 + 1) * (1 - KPI["roi"].min_change) - 1,
    ),
    # Cost KPIs alert upwards: CPC 200 / 40 = 5, no baseline series -> no line.
    ("cpc", ratio(KPI["cpc"], SELECTION), 5.0),
    ("cpc alert line without baseline", alert_line(KPI["cpc"], SELECTION), None),
]


def test_kpi_promql_with_promtool(tmp_path: Path) -> None:
    require_binary("promtool")
    tests = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": _input_series(),
            "promql_expr_test": [
                {"expr": expr, "eval_time": "2m", "exp_samples": _sample(value)}
                for _, expr, value in CASES
            ],
        }],
    }  # fmt: skip
    path = tmp_path / "kpis.test.yml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    result = subprocess.run(["promtool", "test", "rules", str(path)],
                            capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
