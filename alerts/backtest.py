"""Offline replay of recorded events through the live aggregation and rule engine.

Events (JSON lines, each with its ``type``) go through the same parser,
deduplication, attribution, lateness, buckets and alert engine as in the
worker, in event time: the watermark is the event time reached, and rules are
evaluated every ``eval_every`` seconds of it. The alerts that would have fired
come out as the same JSON objects the worker writes to ``kpimon.alerts``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from alerts.engine import AlertEngine
from alerts.rules import RulesFile
from stream import codec
from stream.aggregate import BatchOutput, Horizons, PartitionState, ScopeStore
from stream.events import Event, EventParser
from stream.settings import Settings

NO_FUTURE = 4_102_444_800_000  # the recorded stream is its own clock: nothing is "future"


@dataclass
class BacktestStats:
    lines: int = 0
    events: int = 0
    rejected: int = 0
    evaluations: int = 0
    alerts: int = 0


def run_backtest(
    rules: RulesFile,
    lines: Iterable[bytes],
    settings: Settings,
    *,
    eval_every_s: float = 60.0,
    stats: BacktestStats | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield alert records in event-time order."""
    stats = stats if stats is not None else BacktestStats()
    parser = EventParser(
        rates=settings.rates,
        reporting_currency=settings.reporting_currency,
        max_bytes=settings.max_message_bytes,
        max_future_skew_ms=0,
    )
    state = PartitionState(
        Horizons(allowed_lateness_ms=int(settings.allowed_lateness_seconds * 1000))
    )
    store = ScopeStore(
        settle_ms=int(settings.settle_seconds * 1000), max_campaigns=settings.max_campaigns
    )
    engine = AlertEngine(
        rules, grafana_url=settings.grafana_url, runbook_base_url=settings.runbook_base_url
    )
    step_ms = int(eval_every_s * 1000)
    settle_ms = int(settings.settle_seconds * 1000)
    next_eval: int | None = None
    rows: list[list[Any]] = []

    def flush() -> None:
        if rows:
            out = state.apply(rows, NO_FUTURE, BatchOutput())
            store.apply_cells((ch, camp, m, v) for (ch, camp, m), v in out.cells.items())
            rows.clear()

    for line in lines:
        stats.lines += 1
        line = line.strip()
        if not line:
            continue
        event = parser.parse(line, topic_type=None, now_ms=NO_FUTURE)
        if not isinstance(event, Event):
            stats.rejected += 1
            continue
        stats.events += 1
        if next_eval is None:
            next_eval = event.ts_ms - event.ts_ms % step_ms + step_ms
        while event.ts_ms >= next_eval:
            flush()
            watermark = max(state.max_ts, next_eval)
            yield from _tick(engine, store, watermark, settle_ms, stats)
            next_eval += step_ms
        rows.append(codec.routed_row(event, event.ts_ms))
    flush()
    if next_eval is not None:
        yield from _tick(engine, store, max(state.max_ts, next_eval), settle_ms, stats)


def _tick(
    engine: AlertEngine, store: ScopeStore, watermark: int, settle_ms: int, stats: BacktestStats
) -> Iterator[dict[str, Any]]:
    end_minute = (watermark - settle_ms) // 60_000
    if stats.evaluations % 60 == 0:
        for buckets in store.series.values():
            buckets.expire(watermark // 60_000)
    stats.evaluations += 1
    for record in engine.evaluate(store, end_minute, watermark / 1000):
        stats.alerts += 1
        yield record
