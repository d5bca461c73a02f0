"""A live worker with a targets file scrapes goals, budgets and pacing, and passes promtool."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import require_binary
from tests.helpers import WorkerProcess, produce, run, wait_for
from tests.integration.test_metrics_lint import _messages, _page, _samples

pytestmark = pytest.mark.integration

NEW = (
    "kpimon_kpi_target",
    "kpimon_budget_daily",
    "kpimon_budget_prorated",
    "kpimon_spend_today",
    "kpimon_spend_pacing_ratio",
    "kpimon_spend_projected_today",
    "kpimon_spend_projected_today_interval",
    "kpimon_targets_last_reload_success",
)


def test_targets_series_are_scraped_and_pass_promtool(
    start_worker: Callable[..., WorkerProcess], worker_env: dict[str, str], tmp_path: Path
) -> None:
    require_binary("promtool")
    targets = tmp_path / "targets.yml"
    targets.write_text(
        "global: {kpis: {ctr: {min: 0.01}, roas: {max: 50}}, budget: {daily: 100}}\n"
        "channels: {search: {budget: {daily: 40, curve: flat}}}\n"
        "campaigns: {'*': {kpis: {cpc: {max: 2}}}, c0: {budget: {daily: 30}}}\n"
    )
    worker = start_worker(KPIMON_EVAL_INTERVAL_SECONDS="1", KPIMON_SETTLE_SECONDS="0",
                          KPIMON_TARGETS=str(targets), KPIMON_TIMEZONE="Europe/Berlin")  # fmt: skip
    worker.wait_ready()
    run(produce(worker_env["KPIMON_KAFKA_BOOTSTRAP"], _messages(worker_env, time.time())))

    def complete() -> str | None:
        text = _page(worker.metrics_url)
        samples = _samples(text)
        return text if all(samples.get(n, 0) > 0 for n in NEW) else None

    text = wait_for(complete, timeout=120, what="target and pacing families populated")
    assert 'kpimon_budget_daily{scope="channel",channel="search",campaign=""} 40.0' in text
    assert 'kpimon_kpi_target{kpi="cpc",scope="campaign",channel="search",campaign="c0",' \
        'bound="max"} 2.0' in text  # fmt: skip
    checked = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                             text=True, timeout=60, check=False)  # fmt: skip
    findings = (checked.stdout + checked.stderr).strip()
    assert checked.returncode == 0 and not findings, f"promtool check metrics:\n{findings}"

    # an invalid edit keeps the old targets and says so on the page
    targets.write_text("global: {budget: {daily: -1}}\n")
    wait_for(lambda: "kpimon_targets_last_reload_success 0.0" in _page(worker.metrics_url),
             timeout=30, what="the failed reload on the page")  # fmt: skip
    assert 'kpimon_budget_daily{scope="global",channel="",campaign=""} 100.0' in _page(
        worker.metrics_url
    )
