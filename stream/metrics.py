"""Prometheus exposition: a custom Collector that reads pipeline state at scrape time.

Nothing on the hot path touches prometheus_client: the worker updates plain
dicts and this collector turns them into metric families when scraped.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from stream.aggregate import LATENCY_BUCKETS, PENDING_LIMIT, Evaluation, SegmentStore
from stream.pipeline import PipelineStats
from stream.windows import MEASURES, measure_value


class PipelineCollector(Collector):
    """Yields kpimon's pipeline counters from :class:`PipelineStats`."""

    def __init__(self, stats: PipelineStats) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        """Runs in the metrics thread while the event loop changes ``stats``: every dict is
        copied before it is read (a dict copy is one step under the GIL; iterating the
        live dict could see it change size)."""
        stats = self._stats
        for name, doc, label, counts in (
            ("kpimon_events", "Valid events consumed, by type (before dedup)", "type",
             stats.events),
            ("kpimon_events_rejected", "Inputs sent to the dead-letter topic, by reason",
             "reason", stats.rejected),
            ("kpimon_events_duplicate", "Duplicate events dropped, by type", "type",
             stats.duplicates),
            ("kpimon_events_late", "Events older than their type's dedup horizon, not counted "
             "but dead-lettered as too_late, by type", "type", stats.late),
            ("kpimon_events_out_of_order", "Events counted into a minute the windows had "
             "already shown (the windows were restated), by type", "type", stats.out_of_order),
            ("kpimon_events_reattributed", "Leads and orders moved from campaign=\"unattributed\" "
             "to their click's campaign when the click was counted after them, by type", "type",
             stats.reattributed),
            ("kpimon_events_attribution_overflow", "Leads and orders left unattributed whatever "
             f"click comes: too many ({PENDING_LIMIT:,} per routed partition) were waiting for "
             "theirs, by type", "type", stats.attribution_overflow),
        ):  # fmt: skip
            family = CounterMetricFamily(name, doc, labels=[label])
            for key, count in counts.copy().items():
                family.add_metric([str(key)], count)
            yield family
        yield GaugeMetricFamily(
            "kpimon_event_loop_stall_max_seconds",
            "Longest the worker's event loop was blocked since start (heartbeats, "
            "transactions and scrapes wait that long)",
            value=stats.loop_stall_max_s,
        )
        last = GaugeMetricFamily(
            "kpimon_last_event_timestamp_seconds",
            "Event time of the newest valid event seen, by type",
            labels=["type"],
        )
        for kind, ts_ms in stats.last_event_ms.copy().items():
            last.add_metric([kind], ts_ms / 1000)
        yield last
        notified = CounterMetricFamily(
            "kpimon_notifications", "Alert notification attempts, by sink channel and outcome",
            labels=["channel", "outcome"],
        )  # fmt: skip
        for (channel, outcome), n in sorted(stats.notifications.copy().items()):
            notified.add_metric([channel, outcome], n)
        yield notified
        pending = GaugeMetricFamily(
            "kpimon_outbox_pending", "Notifications waiting in the outbox for their sink",
            labels=["channel"],
        )  # fmt: skip
        for channel, n in sorted(stats.outbox_pending.copy().items()):
            pending.add_metric([channel], n)
        yield pending
        lag = GaugeMetricFamily(
            "kpimon_consumer_lag_records",
            "Records between this worker's position and the end of each assigned partition",
            labels=["topic", "partition"],
        )
        for (topic, partition), n in sorted(stats.consumer_lag.copy().items()):
            lag.add_metric([topic, str(partition)], n)
        yield lag
        stalled = GaugeMetricFamily(
            "kpimon_partition_stalled",
            "1 while a partition is paused on a record batch this worker cannot read",
            labels=["topic", "partition", "reason"],
        )
        for (topic, partition), reason in sorted(stats.stalled.copy().items()):
            stalled.add_metric([topic, str(partition), reason], 1)
        yield stalled
        unreadable = CounterMetricFamily(
            "kpimon_batches_unreadable", "Failed attempts to read a fetched record batch",
            labels=["topic", "reason"],
        )  # fmt: skip
        for (topic, reason), n in sorted(stats.unreadable.copy().items()):
            unreadable.add_metric([topic, reason], n)
        yield unreadable
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


class MetricsServer:
    """``/metrics`` served from a daemon thread, so a scrape never waits for the event loop.

    The body is ``body()``: the registry rendered at scrape time (plain counters read
    from dicts) plus the last evaluation tick's exposition bytes, which the worker
    replaces whole. The thread takes the GIL in switch-interval slices while a batch is
    processed (``sys.setswitchinterval``), not after the batch. Other paths: 404.
    """

    def __init__(self, host: str, port: int, body: Callable[[], bytes]) -> None:
        self._body = body
        self._server = _Server((host, port), self._handler())
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
            name="kpimon-metrics", daemon=True,
        )  # fmt: skip

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop answering (returns within the poll interval)."""
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        body = self._body

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                if self.path.split("?", 1)[0] != "/metrics":
                    self.send_error(404)
                    return
                content = body()
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE_LATEST)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # a scrape every few seconds is not worth a log line

        return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def escape(value: str) -> str:
    """A label value as the text exposition format writes it between quotes."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def family(out: list[str], name: str, kind: str, doc: str) -> None:
    """The HELP and TYPE lines that open a metric family in hand-written exposition."""
    out.append(f"# HELP {name} {doc}\n# TYPE {name} {kind}\n")


def render_evaluation(evaluation: Evaluation, scope: SegmentStore, now_ms: int) -> bytes:
    """Exposition text of one evaluation, rendered once per tick, off the scrape path.

    Written directly rather than through prometheus_client: with 500 campaigns
    this is ~40k lines, and the generic path takes several times longer.
    """
    ev = evaluation
    series = sorted(ev.series.items())
    prefixes = [
        f'scope="{name}",channel="{escape(channel)}",campaign="{escape(campaign)}",window="'
        for (name, channel, campaign), _ in series
    ]
    out: list[str] = []
    family(out, "kpimon_kpi", "gauge",
            "KPI over the window (ratio of sums); absent without a denominator")  # fmt: skip
    for prefix, (_, result) in zip(prefixes, series, strict=True):
        for w, values in result.kpis.items():
            for name, value in values.items():
                out.append(f'kpimon_kpi{{kpi="{name}",{prefix}{w}"}} {value!r}\n')
    family(out, "kpimon_window_measure", "gauge",
            "Sum of a measure over the window (money in the reporting currency)")  # fmt: skip
    for prefix, (_, result) in zip(prefixes, series, strict=True):
        for w, totals in result.windows.items():
            for i, measure in enumerate(MEASURES):
                value = measure_value(i, int(totals[i]))
                out.append(f'kpimon_window_measure{{measure="{measure}",{prefix}{w}"}} {value!r}\n')
    family(out, "kpimon_measure_total", "counter",
            "Monotonic sum of a measure over all applied events")  # fmt: skip
    for (channel, campaign), counts in sorted(ev.measure_totals.items()):
        labels = f'channel="{escape(channel)}",campaign="{escape(campaign)}"'
        for i, measure in enumerate(MEASURES):
            value = measure_value(i, counts[i])
            out.append(f'kpimon_measure_total{{measure="{measure}",{labels}}} {value!r}\n')
    family(out, "kpimon_segments_folded_total", "counter",
            "Ids folded into __other__ by the cardinality guards that they were not already "
            "tracking, by kind and the channel they came from")  # fmt: skip
    for (kind, channel), n in sorted(ev.folded.items()):
        out.append(f'kpimon_segments_folded_total{{kind="{kind}",channel="{escape(channel)}"}} '
                   f"{float(n)!r}\n")  # fmt: skip
    gauges = (
        ("kpimon_watermark_lag_seconds", "Wall clock minus the event-time watermark",
         max(0.0, (now_ms - ev.watermark_ms) / 1000)),
        ("kpimon_window_end_timestamp_seconds",
         "End (exclusive) of the complete minutes the windows cover", ev.end_minute * 60.0),
        ("kpimon_replaying", "1 while a worker is working through a backlog",
         1.0 if ev.replaying else 0.0),
        ("kpimon_restating", "1 while late events restate shown minutes and a worker is "
         "still working through a backlog of them (alerts wait)", 1.0 if ev.restating else 0.0),
    )  # fmt: skip
    for name, doc, value in gauges:
        family(out, name, "gauge", doc)
        out.append(f"{name} {value!r}\n")
    name = "kpimon_event_to_metric_latency_seconds"
    doc = "From an event's append to its source topic to its arrival in the KPI state"
    family(out, name, "histogram", doc)
    cumulative = 0
    bounds = [*(repr(float(b)) for b in LATENCY_BUCKETS), "+Inf"]
    for bound, count in zip(bounds, scope.latency_counts, strict=True):
        cumulative += count
        out.append(f'{name}_bucket{{le="{bound}"}} {float(cumulative)!r}\n')
    out.append(f"{name}_count {float(cumulative)!r}\n{name}_sum {scope.latency_sum!r}\n")
    return "".join(out).encode()
