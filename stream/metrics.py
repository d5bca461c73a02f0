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
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from stream.aggregate import LATENCY_BUCKETS, Evaluation, ScopeStore
from stream.pipeline import PipelineStats
from stream.windows import MEASURES, measure_value


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
        for name, doc, counts in (
            ("kpimon_events_duplicate", "Duplicate events dropped, by type", stats.duplicates),
            ("kpimon_events_late", "Events beyond the allowed lateness, by type", stats.late),
        ):
            family = CounterMetricFamily(name, doc, labels=["type"])
            for kind, count in counts.items():
                family.add_metric([kind], count)
            yield family
        yield CounterMetricFamily(
            "kpimon_transactions", "Kafka transactions committed by this worker",
            value=stats.transactions,
        )  # fmt: skip
        yield CounterMetricFamily(
            "kpimon_transactions_aborted", "Kafka transactions aborted and retried",
            value=stats.aborted,
        )  # fmt: skip


def build_registry(stats: PipelineStats) -> CollectorRegistry:
    """Our collectors plus the usual process, platform and GC metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PipelineCollector(stats))
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


class EvaluationCollector(Collector):
    """The KPI series of one evaluation (exported only by the worker owning the scopes)."""

    def __init__(self, evaluation: Evaluation, scope: ScopeStore, now_ms: int) -> None:
        self._evaluation = evaluation
        self._scope = scope
        self._now_ms = now_ms

    def collect(self) -> Iterator[Metric]:
        ev, scope = self._evaluation, self._scope
        labels = ["scope", "channel", "campaign", "window"]
        kpi = GaugeMetricFamily(
            "kpimon_kpi", "KPI over the window (ratio of sums); absent without denominator",
            labels=["kpi", *labels],
        )  # fmt: skip
        window = GaugeMetricFamily(
            "kpimon_window_total", "Sum of a measure over the window (money in reporting currency)",
            labels=["measure", *labels],
        )  # fmt: skip
        for (scope_name, channel, campaign), result in sorted(ev.series.items()):
            for w, totals in result.windows.items():
                for i, measure in enumerate(MEASURES):
                    window.add_metric(
                        [measure, scope_name, channel, campaign, w],
                        measure_value(i, int(totals[i])),
                    )
                for name, value in result.kpis[w].items():
                    kpi.add_metric([name, scope_name, channel, campaign, w], value)
        yield kpi
        yield window
        monotonic = CounterMetricFamily(
            "kpimon_measure", "Monotonic sum of a measure over all applied events",
            labels=["measure", "channel", "campaign"],
        )  # fmt: skip
        for (channel, campaign), values in sorted(ev.measure_totals.items()):
            for i, measure in enumerate(MEASURES):
                monotonic.add_metric([measure, channel, campaign], measure_value(i, values[i]))
        yield monotonic
        yield GaugeMetricFamily(
            "kpimon_watermark_lag_seconds", "Wall clock minus the event-time watermark",
            value=max(0.0, (self._now_ms - ev.watermark_ms) / 1000),
        )  # fmt: skip
        yield GaugeMetricFamily(
            "kpimon_window_end_timestamp_seconds",
            "End (exclusive) of the complete minutes the windows cover",
            value=ev.end_minute * 60.0,
        )
        yield GaugeMetricFamily(
            "kpimon_replaying", "1 while a worker is working through a backlog",
            value=1.0 if ev.replaying else 0.0,
        )  # fmt: skip
        cumulative, buckets = 0, []
        for bound, count in zip(
            [*map(str, LATENCY_BUCKETS), "+Inf"], scope.latency_counts, strict=True
        ):
            cumulative += count
            buckets.append((bound, float(cumulative)))
        yield HistogramMetricFamily(
            "kpimon_event_to_metric_latency_seconds",
            "From an event's append to its source topic to its arrival in the KPI state",
            buckets=buckets, sum_value=scope.latency_sum,
        )  # fmt: skip


def render_evaluation(evaluation: Evaluation, scope: ScopeStore, now_ms: int) -> bytes:
    """Exposition text of one evaluation, rendered once per tick, off the scrape path."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EvaluationCollector(evaluation, scope, now_ms))
    return generate_latest(registry)
