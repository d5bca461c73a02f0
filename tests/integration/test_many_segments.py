"""50,000 campaigns over 2,000 channels against a real broker: the worker keeps its group,
counts everything, and exports a bounded exposition whose sums are exact."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest

from tests.helpers import WorkerProcess, produce, run, sample, wait_for

pytestmark = pytest.mark.integration

CAMPAIGNS, CHANNELS = 50_000, 2_000


def test_fifty_thousand_campaigns_keep_the_group_and_the_sums(
    start_worker: Callable[..., WorkerProcess], worker_env: dict[str, str]
) -> None:
    worker = start_worker(KPIMON_EVAL_INTERVAL_SECONDS="2", KPIMON_SETTLE_SECONDS="0")
    worker.wait_ready()
    now_ms = int(time.time() * 1000)
    impressions = worker_env["KPIMON_TOPIC_IMPRESSIONS"]
    spend: dict[str, int] = {}  # channel -> spend in millionths
    messages: list[tuple[str, bytes | None, bytes | None]] = []
    for i in range(CAMPAIGNS):
        channel, cost = f"ch{i % CHANNELS}", (i % 89) * 1000
        spend[channel] = spend.get(channel, 0) + cost
        body = {"event_id": f"i{i}", "ts": now_ms - 60_000 - i % 50_000, "campaign_id": f"c{i}",
                "channel": channel, "cost": cost / 1e6}  # fmt: skip
        messages.append((impressions, f"c{i}".encode(), json.dumps(body).encode()))
    run(produce(worker_env["KPIMON_KAFKA_BOOTSTRAP"], messages))

    def shown() -> dict[Any, float] | None:
        assert worker.alive(), worker.log_tail()
        samples = worker.scrape()
        total = samples and sample(
            samples, "kpimon_window_measure", measure="impressions", scope="global",
            channel="", campaign="", window="5m",
        )  # fmt: skip
        return samples if total == CAMPAIGNS else None

    samples = wait_for(shown, timeout=180, what="all 50,000 impressions in the 5m window")
    assert sample(samples, "kpimon_events_total", type="impression") == CAMPAIGNS
    by_channel = {
        dict(labels)["channel"]: v
        for (name, labels), v in samples.items()
        if name == "kpimon_window_measure"
        and dict(labels) | {"channel": ""}
        == {"measure": "spend", "scope": "channel", "channel": "", "campaign": "", "window": "5m"}
    }
    kept = {ch for ch in by_channel if ch != "__other__"}
    assert 0 < len(kept) <= 50 and "__other__" in by_channel
    for channel in kept:
        assert by_channel[channel] == pytest.approx(spend[channel] / 1e6, abs=1e-9), channel
    folded = sum(v for ch, v in spend.items() if ch not in kept) / 1e6
    assert by_channel["__other__"] == pytest.approx(folded, abs=1e-6)
    campaigns = {
        dict(labels)["campaign"]
        for (name, labels), _ in samples.items()
        if name == "kpimon_window_measure" and dict(labels).get("scope") == "campaign"
    }
    assert len(campaigns - {"__other__"}) <= 500
    # Every folded channel counted at least once (again when forgotten by the bounded
    # candidate table and seen again): the rate says how fast unfamiliar ids arrive.
    folded_ids = sample(samples, "kpimon_segments_folded_total", kind="channel", channel="")
    assert folded_ids is not None and folded_ids >= CHANNELS - len(kept)
    with urllib.request.urlopen(worker.metrics_url, timeout=30) as response:
        lines = response.read().decode().count("\n")
    assert lines < 60_000, lines
    log = worker.log_path.read_text()
    assert not re.search(r"(?i)heartbeat session expired|partitions revoked", log), log[-3000:]
    stall = sample(samples, "kpimon_event_loop_stall_max_seconds")
    print(f"exposition {lines} lines; longest event-loop stall {stall:.3f} s")
