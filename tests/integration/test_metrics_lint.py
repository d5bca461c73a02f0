"""A live worker's ``/metrics``, with every family populated, passes ``promtool check metrics``.

promtool is the reference linter of the exposition format and its naming conventions
(a gauge must not end in ``_total``, a counter must, units in base units, ...). It exits 0
on lint warnings and prints them, so the test demands empty output as well.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest

from stream.simulate import SimConfig, Simulator
from tests.conftest import require_binary
from tests.helpers import WorkerProcess, produce, run, wait_for

pytestmark = pytest.mark.integration

TOPIC_ENV = {"impression": "KPIMON_TOPIC_IMPRESSIONS", "click": "KPIMON_TOPIC_CLICKS",
             "lead": "KPIMON_TOPIC_LEADS", "order": "KPIMON_TOPIC_ORDERS",
             "spend": "KPIMON_TOPIC_SPEND"}  # fmt: skip
# Label values the exposition must escape: quote, backslash, newline, non-ASCII.
ODD_CAMPAIGN = 'c "quoted" \\ back\nslash é'
# Families that must have samples before the page is linted, the ones that count
# something with a value above zero (the histogram by its _count).
COUNTING = (
    "kpimon_kpi",
    "kpimon_kpi_baseline",
    "kpimon_window_measure",
    "kpimon_measure_total",
    "kpimon_event_to_metric_latency_seconds_count",
    "kpimon_events_total",
    "kpimon_events_rejected_total",
    "kpimon_events_duplicate_total",
    "kpimon_last_event_timestamp_seconds",
    "kpimon_transactions_total",
)
PRESENT = ("kpimon_consumer_lag_records", "kpimon_watermark_lag_seconds", "kpimon_replaying")


def _messages(env: dict[str, str], now_s: float) -> list[tuple[str, bytes | None, bytes | None]]:
    """Eight minutes of simulated traffic ending a minute ago (so the 5m CTR rule has a
    current window and a baseline), a campaign with an awkward name, a duplicate and a
    message that is not JSON."""
    sim = Simulator(SimConfig(seed=11, campaigns=4, rate=8))
    messages: list[tuple[str, bytes | None, bytes | None]] = []
    for kind, event in sim.events(now_s - 540, 480):
        key = event.get("campaign_id")
        messages.append((env[TOPIC_ENV[kind]], key and key.encode(), json.dumps(event).encode()))
    ts = int((now_s - 90) * 1000)
    odd: dict[str, Any] = {"event_id": "odd-1", "ts": ts, "campaign_id": ODD_CAMPAIGN,
                           "channel": "social", "click_id": "odd-1", "cost": 0.5}  # fmt: skip
    messages += [(env["KPIMON_TOPIC_CLICKS"], None, json.dumps(odd).encode())] * 2
    messages.append((env["KPIMON_TOPIC_CLICKS"], None, b"{not json"))
    return messages


def _page(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        body: bytes = resp.read()
    return body.decode()


def _samples(text: str) -> dict[str, float]:
    """Sample name -> the largest value it has on an exposition page."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name = line.split("{", 1)[0].split(" ", 1)[0]
            values[name] = max(values.get(name, 0.0), float(line.rsplit(" ", 1)[1]))
    return values


def test_live_metrics_pass_promtool(
    start_worker: Callable[..., WorkerProcess], worker_env: dict[str, str]
) -> None:
    require_binary("promtool")
    worker = start_worker(KPIMON_EVAL_INTERVAL_SECONDS="1", KPIMON_SETTLE_SECONDS="0")
    worker.wait_ready()
    run(produce(worker_env["KPIMON_KAFKA_BOOTSTRAP"], _messages(worker_env, time.time())))

    missing: list[str] = []

    def complete() -> str | None:
        text = _page(worker.metrics_url)
        samples = _samples(text)
        missing[:] = [n for n in COUNTING if samples.get(n, 0) <= 0]
        missing.extend(n for n in PRESENT if n not in samples)
        if 'campaign="c \\"quoted\\" \\\\ back\\nslash é"' not in text:
            missing.append("the escaped odd campaign")
        return None if missing else text

    try:
        text = wait_for(complete, timeout=120, what="every metric family populated")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; missing: {missing}") from None
    checked = subprocess.run(
        ["promtool", "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    findings = (checked.stdout + checked.stderr).strip()
    assert checked.returncode == 0 and not findings, f"promtool check metrics:\n{findings}"
