"""``/metrics`` from its own thread: answered while the event loop is busy, consistent
while the loop changes the counters it reads."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from stream.metrics import MetricsServer, build_registry, render
from stream.pipeline import PipelineStats


@pytest.fixture
def stats() -> PipelineStats:
    return PipelineStats()


def serve(stats: PipelineStats, tail: bytes = b"") -> MetricsServer:
    registry = build_registry(stats)
    server = MetricsServer("127.0.0.1", 0, lambda: render(registry) + tail)
    server.start()
    return server


def get(server: MetricsServer, path: str = "/metrics") -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=30) as resp:
        body: bytes = resp.read()
        return body


def test_a_scrape_is_answered_while_the_event_loop_is_blocked(stats: PipelineStats) -> None:
    """The loop runs pure-Python work and never yields until the scrape came back: the
    scrape cannot have waited for it."""
    server = serve(stats, b"kpimon_kpi_marker 1\n")
    answered = threading.Event()
    bodies: list[bytes] = []

    def scrape() -> None:
        bodies.append(get(server))
        answered.set()

    async def busy_loop() -> int:
        threading.Thread(target=scrape, daemon=True).start()
        deadline = time.monotonic() + 30
        spins = 0
        while not answered.is_set():  # no await: the event loop is held all along
            assert time.monotonic() < deadline, "no answer while the loop was busy"
            stats.events["click"] += 1
            spins += sum(range(100)) and 1
        return spins

    try:
        spins = asyncio.run(busy_loop())
    finally:
        server.stop()
    assert spins > 0
    assert b'kpimon_events_total{type="click"}' in bodies[0]
    assert bodies[0].endswith(b"kpimon_kpi_marker 1\n")


def test_scrapes_stay_whole_while_the_counters_change_size(stats: PipelineStats) -> None:
    """Rebalances add and drop lag entries, sinks add notification outcomes, and so on: a
    scrape in the middle of it neither fails nor shows half a family."""
    server = serve(stats)
    stop = threading.Event()
    warm = threading.Event()

    def churn() -> None:
        i = 0
        while not stop.is_set():
            if i == 1000:
                warm.set()  # every key cycle has filled the dicts once
            stats.consumer_lag[("t", i % 500)] = i
            stats.consumer_lag.pop(("t", (i + 250) % 500), None)
            stats.notified(f"sink{i % 300}", "sent")
            stats.last_event_ms[f"kind{i % 400}"] = i
            stats.last_event_ms.pop(f"kind{(i + 200) % 400}", None)
            i += 1

    worker = threading.Thread(target=churn, daemon=True)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads take turns as often as they can
    worker.start()
    try:
        assert warm.wait(30)
        for _ in range(20):
            body = get(server).decode()
            assert "# TYPE kpimon_consumer_lag_records gauge" in body
            assert "kpimon_transactions_total" in body
            assert body.count("kpimon_last_event_timestamp_seconds{") >= 100
    finally:
        stop.set()
        worker.join(10)
        sys.setswitchinterval(interval)
        server.stop()


def test_only_metrics_is_served(stats: PipelineStats) -> None:
    server = serve(stats)
    try:
        with pytest.raises(urllib.error.HTTPError) as err:
            get(server, "/")
        assert err.value.code == 404
        assert get(server, "/metrics?x=1").startswith(b"# HELP")
    finally:
        server.stop()
