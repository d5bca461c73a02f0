"""The KPI exposition: valid Prometheus text, exact values, escaped labels."""

from __future__ import annotations

import subprocess

from prometheus_client.parser import text_string_to_metric_families

from alerts.exposition import render_alerts
from stream.aggregate import SegmentStore
from stream.metrics import build_registry, render, render_evaluation
from stream.pipeline import PipelineStats
from tests.conftest import require_binary

T0 = 1_795_000_000_000 - 1_795_000_000_000 % 3_600_000
MIN = 60_000


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_render_is_parseable_exact_and_escaped() -> None:
    store = SegmentStore(settle_ms=MIN)
    odd = 'c"1\\\n'
    minute = T0 // MIN
    store.apply_cells([("search", odd, minute, [1000, 30, 3, 2, 1, 90_500_000, 12_250_000])])
    store.observe_latency([T0], T0 + 700)
    now = T0 + 3 * MIN
    text = render_evaluation(store.evaluate(now), store, now).decode()
    got = samples(text)
    labels = {"scope": "campaign", "channel": "search", "campaign": odd, "window": "5m"}
    assert got[("kpimon_kpi", frozenset({**labels, "kpi": "ctr"}.items()))] == 0.03
    assert got[("kpimon_kpi", frozenset({**labels, "kpi": "roas"}.items()))] == 90.5 / 12.25
    total = frozenset({**labels, "measure": "spend"}.items())
    assert got[("kpimon_window_measure", total)] == 12.25
    glob = {"scope": "global", "channel": "", "campaign": "", "window": "24h"}
    assert got[("kpimon_window_measure", frozenset({**glob, "measure": "clicks"}.items()))] == 30
    monotonic = frozenset({"measure": "revenue", "channel": "search", "campaign": odd}.items())
    assert got[("kpimon_measure_total", monotonic)] == 90.5
    assert got[("kpimon_window_end_timestamp_seconds", frozenset())] == (now - MIN) // MIN * 60
    assert got[("kpimon_event_to_metric_latency_seconds_bucket", frozenset({("le", "1.0")}))] == 1
    assert got[("kpimon_event_to_metric_latency_seconds_count", frozenset())] == 1
    absent = frozenset({**labels, "kpi": "cac", "window": "5m"}.items())
    assert ("kpimon_kpi", absent) in got  # 1 new customer: present
    no_leads = {"scope": "campaign", "channel": "search", "campaign": odd, "window": "5m"}
    assert ("kpimon_kpi", frozenset({**no_leads, "kpi": "cpl"}.items())) in got


def test_absent_kpis_are_not_exported() -> None:
    store = SegmentStore(settle_ms=MIN)
    store.apply_cells([("email", "c9", T0 // MIN, [500, 0, 0, 0, 0, 0, 0])])
    now = T0 + 3 * MIN
    got = samples(render_evaluation(store.evaluate(now), store, now).decode())
    kpis = {dict(labels)["kpi"] for name, labels in got if name == "kpimon_kpi"}
    assert kpis == {"ctr"}


def test_alerts_and_baselines_are_exported_for_shown_series_only() -> None:
    store = SegmentStore(settle_ms=MIN, max_campaigns=1)
    minute = T0 // MIN
    store.apply_cells([("search", "big", minute, [1000, 30, 0, 0, 0, 0, 9_000_000]),
                       ("search", "small", minute, [10, 1, 0, 0, 0, 0, 1])])  # fmt: skip
    evaluation = store.evaluate(T0 + 3 * MIN)
    text = render_alerts(
        [("ctr_drop_campaign", "ticket", "campaign", "search", "big")],
        {
            ("ctr", "campaign", "search", "big", "15m"): 0.05,
            ("ctr", "campaign", "search", "small", "15m"): 0.1,  # folded into __other__
        },
        evaluation,
    ).decode()
    got = samples(text)
    firing = {"rule": "ctr_drop_campaign", "severity": "ticket", "scope": "campaign",
              "channel": "search", "campaign": "big"}  # fmt: skip
    assert got[("kpimon_alerts_firing", frozenset(firing.items()))] == 1
    base = {"kpi": "ctr", "scope": "campaign", "channel": "search", "window": "15m"}
    assert got[("kpimon_kpi_baseline", frozenset({**base, "campaign": "big"}.items()))] == 0.05
    assert ("kpimon_kpi_baseline", frozenset({**base, "campaign": "small"}.items())) not in got


def test_whole_page_passes_promtool_lint() -> None:
    """The worker's page as it serves it, every family with samples (firing alerts,
    notifications, late events: what a short live run rarely has), has no lint finding."""
    require_binary("promtool")
    stats = PipelineStats()
    stats.events["click"] = 3
    stats.rejected["not_json"] = 1
    stats.duplicates["order"] = 2
    stats.late["spend"] = 1
    stats.last_event_ms["click"] = T0
    stats.transactions, stats.aborted = 5, 1
    stats.notified("slack", "sent")
    stats.notified("alertmanager", "error", 2)
    stats.outbox_pending["slack"] = 1
    stats.consumer_lag[("events.clicks", 0)] = 7
    odd = 'c"1\\\n'
    store = SegmentStore(settle_ms=MIN)
    store.apply_cells([("search", odd, T0 // MIN, [1000, 30, 3, 2, 1, 90_500_000, 1])])
    store.observe_latency([T0], T0 + 700)
    now = T0 + 3 * MIN
    evaluation = store.evaluate(now)
    page = (
        render(build_registry(stats))
        + render_evaluation(evaluation, store, now)
        + render_alerts(
            [("ctr_drop", "page", "campaign", "search", odd)],
            {("ctr", "campaign", "search", odd, "5m"): 0.05},
            evaluation,
        )
    )
    checked = subprocess.run(
        ["promtool", "check", "metrics"], input=page, capture_output=True, timeout=60, check=False
    )
    findings = (checked.stdout + checked.stderr).decode().strip()
    assert checked.returncode == 0 and not findings, findings
    names = {family.name for family in text_string_to_metric_families(page.decode())}
    wanted = {"kpimon_alerts_firing", "kpimon_kpi_baseline", "kpimon_notifications",
              "kpimon_events_late", "kpimon_outbox_pending", "kpimon_window_measure"}  # fmt: skip
    assert wanted <= names
