"""Prometheus rules, Alertmanager config and runbooks, offline.

``promtool check rules`` / ``promtool test rules`` (the unit tests in
``prometheus/tests/``), ``promtool check config`` on the config as `kpimon dev`
renders it, ``amtool check-config``; that the unit tests cover every rule and
fail when a rule is broken; naming conventions; and that every runbook a rule
links exists and names only real settings, commands and metrics.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from alerts.exposition import render_alerts
from stream.aggregate import SegmentStore
from stream.cli import build_parser
from stream.devstack import render_prometheus_config
from stream.kpis import MEASURES
from stream.metrics import build_registry, render, render_evaluation
from stream.pipeline import PipelineStats
from stream.settings import Settings
from tests.conftest import require_binary
from tests.helpers import REPO
from tests.kpis import KPI_RATIOS

PROM = REPO / "prometheus"
RULES_DIR = PROM / "rules"
UNIT_TESTS = sorted((PROM / "tests").glob("*_test.yml"))
RUNBOOKS = REPO / "docs" / "runbooks"
KPI_RULES_FILE = REPO / "alerts" / "rules.yml"

RECORDING_RULES = {
    "scope:kpimon_window_measure:sum",
    "scope:kpimon_kpi:ratio",
    "channel:kpimon_measure:rate5m",
    "global:kpimon_measure:rate5m",
    "type:kpimon_events:rate5m",
    "reason:kpimon_events_rejected:rate5m",
}
PIPELINE_ALERTS = {
    "KpimonWorkerDown", "KpimonNoWorkers", "KpimonEventsRejected", "KpimonNoEvents",
    "KpimonPartitionStalled", "KpimonSegmentsFolded", "KpimonWatermarkLag",
    "KpimonConsumerLagGrowing", "KpimonNotificationsFailing", "KpimonNotificationBacklog",
}  # fmt: skip
T0 = 1_795_000_000_000 - 1_795_000_000_000 % 3_600_000


def _load(path: Path) -> Any:
    with path.open(encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def _tool(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv), cwd=cwd, capture_output=True, text=True, check=False, timeout=120
    )


def _rules(rules_dir: Path = RULES_DIR) -> list[dict[str, Any]]:
    return [
        rule
        for path in sorted(rules_dir.glob("*.yml"))
        for group in _load(path)["groups"]
        for rule in group["rules"]
    ]


def _alerts() -> list[dict[str, Any]]:
    return [rule for rule in _rules() if "alert" in rule]


# --------------------------------------------------------------------------- promtool / amtool


def test_promtool_check_rules() -> None:
    require_binary("promtool")
    files = sorted(RULES_DIR.glob("*.yml"))
    assert {f.name for f in files} >= {"recording.yml", "pipeline.yml"}
    checked = _tool("promtool", "check", "rules", *map(str, files))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.count("SUCCESS") == len(files)


def test_promtool_unit_tests_pass() -> None:
    require_binary("promtool")
    assert [p.name for p in UNIT_TESTS] == ["pipeline_test.yml", "recording_test.yml"]
    tested = _tool("promtool", "test", "rules", *(p.name for p in UNIT_TESTS), cwd=PROM / "tests")
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert tested.stdout.count("SUCCESS") == len(UNIT_TESTS)


def test_amtool_check_config() -> None:
    require_binary("amtool")
    checked = _tool("amtool", "check-config", str(PROM / "alertmanager.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_rendered_prometheus_config_loads_every_rule_file(tmp_path: Path) -> None:
    """The config `kpimon dev up` and the tests run: valid, with all rule files (not the tests)."""
    require_binary("promtool")
    rendered = render_prometheus_config(
        PROM / "prometheus.yml", scrape_targets=["127.0.0.1:9108"], alertmanager="127.0.0.1:9093"
    )
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(rendered))
    checked = _tool("promtool", "check", "config", str(config))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    loaded = set(re.findall(r"Checking (\S+\.yml)", checked.stdout)) - {str(config)}
    assert {Path(p).resolve() for p in loaded} == {p.resolve() for p in RULES_DIR.glob("*.yml")}


def test_compose_mounts_the_rule_files_where_the_config_looks() -> None:
    prometheus = _load(REPO / "docker-compose.yml")["services"]["prometheus"]
    config_path = next(
        arg.split("=", 1)[1] for arg in prometheus["command"] if arg.startswith("--config.file=")
    )
    mounts = {
        target: source
        for source, target, *_ in (str(v).split(":") for v in prometheus["volumes"])
        if source.startswith("./")
    }
    assert mounts[config_path] == "./prometheus/prometheus.yml"
    config_dir = Path(config_path).parent
    for pattern in _load(PROM / "prometheus.yml")["rule_files"]:
        in_container = config_dir / pattern
        source = mounts.get(str(in_container.parent))
        assert source is not None, f"{in_container.parent} is not mounted"
        matched = {p.name for p in (REPO / source).glob(in_container.name)}
        assert {"recording.yml", "pipeline.yml"} <= matched, pattern


# --------------------------------------------------------------------------- unit-test coverage


def _unit_tests() -> list[dict[str, Any]]:
    return [case for path in UNIT_TESTS for case in _load(path)["tests"]]


def test_unit_tests_cover_every_recording_rule() -> None:
    exprs = [t["expr"] for case in _unit_tests() for t in case.get("promql_expr_test", [])]
    for name in RECORDING_RULES:
        assert any(re.search(rf"(?<![\w:]){re.escape(name)}(?![\w:])", e) for e in exprs), name
    # Every KPI has an expected value, and a test expects absent KPIs (denominator 0).
    samples = [
        s["labels"]
        for case in _unit_tests()
        for t in case.get("promql_expr_test", [])
        for s in t.get("exp_samples") or []
    ]
    for kpi in KPI_RATIOS:
        assert any(f'scope:kpimon_kpi:ratio{{kpi="{kpi}"' in s for s in samples), kpi
    assert any(
        t["expr"].startswith("scope:kpimon_kpi:ratio") and t["exp_samples"] == []
        for case in _unit_tests()
        for t in case.get("promql_expr_test", [])
    )


def test_unit_tests_cover_every_alert_firing_and_silent() -> None:
    fired: set[str] = set()
    silent: set[str] = set()
    for case in _unit_tests():
        for t in case.get("alert_rule_test", []):
            (fired if t.get("exp_alerts") else silent).add(t["alertname"])
    names = {rule["alert"] for rule in _alerts()}
    assert names - fired == set(), "alerts never tested firing"
    assert names - silent == set(), "alerts never tested silent"


def _copy_prometheus(tmp_path: Path) -> Path:
    copy = tmp_path / "prometheus"
    shutil.copytree(PROM / "rules", copy / "rules")
    shutil.copytree(PROM / "tests", copy / "tests")
    return copy


def _unit_test_result(copy: Path) -> subprocess.CompletedProcess[str]:
    return _tool("promtool", "test", "rules", *(p.name for p in UNIT_TESTS), cwd=copy / "tests")


def test_unit_tests_catch_a_missing_zero_denominator_guard(tmp_path: Path) -> None:
    require_binary("promtool")
    copy = _copy_prometheus(tmp_path)
    recording = copy / "rules" / "recording.yml"
    text = recording.read_text()
    assert text.count(" > 0)") == len(KPI_RATIOS)
    recording.write_text(text.replace(" > 0)", ")"))
    result = _unit_test_result(copy)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "NaN" in output and "+Inf" in output


@pytest.mark.parametrize("alert", sorted({r["alert"] for r in _alerts() if "for" in r}))
def test_unit_tests_catch_an_alert_firing_before_its_for(tmp_path: Path, alert: str) -> None:
    require_binary("promtool")
    copy = _copy_prometheus(tmp_path)
    pipeline = copy / "rules" / "pipeline.yml"
    data = _load(pipeline)
    for group in data["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == alert:
                rule["for"] = "0s"
    pipeline.write_text(yaml.safe_dump(data, sort_keys=False))
    result = _unit_test_result(copy)
    assert result.returncode != 0
    assert f"alertname: {alert}," in result.stdout + result.stderr


def test_unit_tests_catch_folds_judged_by_the_counter_not_its_increase(tmp_path: Path) -> None:
    """The folded counter only grows (and is restored after a restart): alerting on its
    value rather than its recent increase would ticket every guard that ever folded."""
    require_binary("promtool")
    copy = _copy_prometheus(tmp_path)
    pipeline = copy / "rules" / "pipeline.yml"
    text = pipeline.read_text()
    increase = "sum by (kind, channel) (increase(kpimon_segments_folded_total[1h])) > 0"
    assert text.count(increase) == 1
    counter = "sum by (kind, channel) (kpimon_segments_folded_total) > 0"
    pipeline.write_text(text.replace(increase, counter))
    result = _unit_test_result(copy)
    assert result.returncode != 0
    assert "alertname: KpimonSegmentsFolded," in result.stdout + result.stderr


# --------------------------------------------------------------------------- conventions


def test_recording_rule_names() -> None:
    names = {rule["record"] for rule in _rules() if "record" in rule}
    assert names == RECORDING_RULES
    for name in names:
        level, metric, operations = name.split(":")
        assert re.fullmatch(r"[a-z]+", level) and re.fullmatch(r"[a-z0-9_]+", operations), name
        assert metric.startswith("kpimon_"), name
        if operations.startswith("rate"):  # a rate of a counter drops the counter's _total
            assert not metric.endswith("_total"), name


def test_recorded_kpis_use_the_worker_formulas() -> None:
    """One rule per KPI of the table, numerator and denominator as in stream.windows."""
    kpi_rules = [r for r in _rules() if r.get("record") == "scope:kpimon_kpi:ratio"]
    by_kpi = {r["labels"]["kpi"]: r["expr"] for r in kpi_rules}
    assert len(kpi_rules) == len(by_kpi) == len(KPI_RATIOS)
    for kpi, (num, den) in KPI_RATIOS.items():
        measures = re.findall(r'measure="(\w+)"', by_kpi[kpi])
        expected = [MEASURES[num], MEASURES[den]]
        if kpi == "roi":  # (revenue - spend) / spend
            expected = ["revenue", "spend", "spend"]
        assert measures == expected, kpi
        assert by_kpi[kpi].rstrip().endswith(f'{{measure="{MEASURES[den]}"}} > 0)'), kpi


def test_alerts_have_severity_summary_description_and_runbook() -> None:
    alerts = _alerts()
    assert {rule["alert"] for rule in alerts} == PIPELINE_ALERTS
    for rule in alerts:
        name = rule["alert"]
        assert re.fullmatch(r"Kpimon[A-Z][A-Za-z]+", name), name
        assert rule["labels"]["severity"] in {"page", "ticket"}, name
        assert rule["labels"]["team"] == "marketing-data", name
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"], name
        assert re.fullmatch(r"docs/runbooks/[a-z-]+\.md", annotations["runbook_url"]), name


# --------------------------------------------------------------------------- runbooks


def _runbook_urls() -> dict[str, set[str]]:
    """runbook_url -> the alerts / KPI rules linking it."""
    urls: dict[str, set[str]] = {}
    for rule in _alerts():
        urls.setdefault(rule["annotations"]["runbook_url"], set()).add(rule["alert"])
    for rule in _load(KPI_RULES_FILE)["rules"]:
        urls.setdefault(rule["runbook_url"], set()).add(rule["name"])
    return urls


def _runbook_pages() -> list[Path]:
    return sorted(p for p in RUNBOOKS.glob("*.md") if p.name != "README.md")


def test_every_runbook_url_names_an_existing_page() -> None:
    urls = _runbook_urls()
    missing = {url: sorted(rules) for url, rules in urls.items() if not (REPO / url).is_file()}
    assert not missing
    linked = {(REPO / url).resolve() for url in urls}
    assert linked == {p.resolve() for p in _runbook_pages()}, "runbooks nothing links"
    assert {Path(url).name for url in urls} >= {
        "worker-down.md", "events-rejected.md", "no-events.md", "watermark-lag.md",
        "consumer-lag.md", "partition-stalled.md", "notification-failures.md",
        "cardinality.md", "rate-drop.md", "volume-drop.md", "cost-rise.md", "value-drop.md",
    }  # fmt: skip


def test_runbook_index_links_every_page_and_names_every_alert() -> None:
    index = (RUNBOOKS / "README.md").read_text()
    for page in _runbook_pages():
        assert f"]({page.name})" in index, page.name
    for rule in _alerts():
        assert f"`{rule['alert']}`" in index, rule["alert"]


def test_runbook_pages_link_only_existing_pages() -> None:
    for page in [*_runbook_pages(), RUNBOOKS / "README.md"]:
        for target in re.findall(r"\]\(([^)#:]+\.md)(?:#[^)]*)?\)", page.read_text()):
            assert (RUNBOOKS / target).is_file(), f"{page.name} links {target}"


def _targets_exposition(store: SegmentStore, now_ms: int) -> bytes:
    """Goals, budgets and pacing as the demo's targets file has the worker export them."""
    from datetime import UTC

    from alerts.targets import TargetsWatcher
    from alerts.targets_export import TargetsExporter

    watcher = TargetsWatcher.load(REPO / "alerts" / "targets.demo.yml", now_ms / 1000)
    return TargetsExporter(watcher, UTC).render(store.series, now_ms // 60_000, now_ms / 1000)


def _known_metrics() -> set[str]:
    """Sample names the worker really exports (rendered here from its own code)."""
    stats = PipelineStats()
    stats.last_event_ms["click"] = T0
    stats.notified("slack", "sent")
    stats.outbox_pending["slack"] = 0
    stats.consumer_lag[("events.clicks", 0)] = 0
    stats.stalled[("events.clicks", 1)] = "unsupported_codec"
    stats.unreadable[("events.clicks", "unsupported_codec")] = 1
    store = SegmentStore(settle_ms=60_000)
    store.apply_cells([("search", "c1", T0 // 60_000, [100, 5, 1, 1, 1, 9_000_000, 2_000_000])])
    store.observe_latency([T0], T0 + 500)
    now = T0 + 180_000
    evaluation = store.evaluate(now)
    text = (
        render(build_registry(stats))
        + render_evaluation(evaluation, store, now)
        + render_alerts(
            [("ctr_drop", "ticket", "global", "", "")],
            {("ctr", "global", "", "", "15m"): 0.02},
            evaluation,
        )
        + _targets_exposition(store, now)
    )
    names = {
        s.name
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
        if s.name.startswith("kpimon_")
    }
    return names


def test_runbooks_name_real_settings_commands_and_metrics() -> None:
    settings = {f"KPIMON_{name.upper()}" for name in Settings.model_fields}
    subcommands = {
        name
        for action in build_parser()._actions
        if isinstance(action, argparse._SubParsersAction)
        for name in action._name_parser_map
    }
    metrics = _known_metrics()
    assert {"kpimon_kpi", "kpimon_window_measure", "kpimon_events_total", "kpimon_replaying",
            "kpimon_event_to_metric_latency_seconds_bucket"} <= metrics  # fmt: skip
    problems: list[str] = []
    for page in [*_runbook_pages(), RUNBOOKS / "README.md"]:
        text = page.read_text()
        for var in set(re.findall(r"\bKPIMON_[A-Z_]+\b", text)):
            if var not in settings and not var.endswith("_"):
                problems.append(f"{page.name}: unknown variable {var}")
        for command in set(re.findall(r"(?:`|bin/)kpimon (\w+)", text)):
            if command not in subcommands:
                problems.append(f"{page.name}: unknown command kpimon {command}")
        for metric in set(re.findall(r"(?<![\w:.])(kpimon_[a-z_]+)(?![\w:])", text)):
            if metric not in metrics:
                problems.append(f"{page.name}: unknown metric {metric}")
        for ops in set(re.findall(r"python -m stream\.ops (\w+)", text)):
            if ops not in {"lag", "tail"}:
                problems.append(f"{page.name}: unknown command stream.ops {ops}")
    assert not problems, "\n".join(problems)
