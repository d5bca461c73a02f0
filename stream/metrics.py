"""Prometheus exposition: a custom Collector that reads pipeline state at scrape time.

Nothing on the hot path touches prometheus_client: the worker updates plain
dicts and this collector turns them into metric families when scraped.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from stream.pipeline import PipelineStats


class PipelineCollector(Collector):
    """Yields kpimon's pipeline counters from :class:`PipelineStats`."""

    def __init__(self, stats: PipelineStats) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats
        events = CounterMetricFamily(
            "kpimon_events", "Valid events consumed, by type (before dedup)", labels=["type"]
        )
        for kind, count in stats.events.items():
            events.add_metric([kind], count)
        yield events
        rejected = CounterMetricFamily(
            "kpimon_events_rejected",
            "Inputs sent to the dead-letter topic, by reason",
            labels=["reason"],
        )
        for reason, count in stats.rejected.items():
            rejected.add_metric([str(reason)], count)
        yield rejected
        last = GaugeMetricFamily(
            "kpimon_last_event_timestamp_seconds",
            "Event time of the newest valid event seen, by type",
            labels=["type"],
        )
        for kind, ts_ms in stats.last_event_ms.items():
            last.add_metric([kind], ts_ms / 1000)
        yield last


def build_registry(stats: PipelineStats) -> CollectorRegistry:
    """Our collectors plus the usual process, platform and GC metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PipelineCollector(stats))
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
