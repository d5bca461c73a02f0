"""Offline replay of recorded events through the live aggregation and rule engine.

Events (JSON lines, each with its ``type``) go through the same parser,
deduplication, attribution, lateness, buckets and alert engine as in the
worker, in event time: the watermark is the event time reached, and rules are
evaluated every ``eval_every`` seconds of it. The alerts that would have fired
come out as the same JSON objects the worker writes to ``kpimon.alerts``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from alerts.engine import AlertEngine
from alerts.rules import RulesFile
from stream import codec
from stream.aggregate import BatchOutput, Horizons, PartitionState, ScopeStore
from stream.events import Event, EventParser
from stream.segments import SegmentView
from stream.settings import Settings

NO_FUTURE = 4_102_444_800_000  # the recorded stream is its own clock: nothing is "future"


@dataclass
class BacktestStats:
    lines: int = 0
    events: int = 0
    rejected: int = 0
    too_late: int = 0
    evaluations: int = 0
    alerts: int = 0


class Replay:
    """A backtest in progress: feed it lines in event-time order, get alert records.

    Its whole state (dedup, buckets, alert lifecycles) is plain Python, so
    :meth:`fork` can branch a replay to play "what if" continuations of the same
    history, e.g. the same traffic with and without an incident.
    """

    def __init__(
        self,
        rules: RulesFile,
        settings: Settings,
        *,
        eval_every_s: float = 60.0,
        stats: BacktestStats | None = None,
    ) -> None:
        self.stats = stats if stats is not None else BacktestStats()
        self.parser = EventParser(
            rates=settings.rates,
            reporting_currency=settings.reporting_currency,
            max_bytes=settings.max_message_bytes,
            max_future_skew_ms=0,
        )
        self.state = PartitionState(
            Horizons(
                dedup_minutes=settings.horizon_minutes,
                settle_ms=int(settings.settle_seconds * 1000),
            )
        )
        self.store = ScopeStore(
            settle_ms=int(settings.settle_seconds * 1000),
            max_campaigns=settings.max_campaigns,
            max_channels=settings.max_channels,
        )
        self.engine = AlertEngine(
            rules, grafana_url=settings.grafana_url, runbook_base_url=settings.runbook_base_url
        )
        self.step_ms = int(eval_every_s * 1000)
        self.settle_ms = int(settings.settle_seconds * 1000)
        self.next_eval: int | None = None
        self.rows: list[list[Any]] = []

    def feed(self, lines: Iterable[bytes]) -> Iterator[dict[str, Any]]:
        """Apply events; yields the records of every evaluation their event time passes."""
        stats = self.stats
        for line in lines:
            stats.lines += 1
            line = line.strip()
            if not line:
                continue
            event = self.parser.parse(line, topic_type=None, now_ms=NO_FUTURE)
            if not isinstance(event, Event):
                stats.rejected += 1
                continue
            stats.events += 1
            if self.next_eval is None:
                self.next_eval = event.ts_ms - event.ts_ms % self.step_ms + self.step_ms
            while event.ts_ms >= self.next_eval:
                self._flush()
                yield from self._tick(max(self.state.max_ts, self.next_eval))
                self.next_eval += self.step_ms
            self.rows.append(codec.routed_row(event, event.ts_ms))

    def finish(self) -> Iterator[dict[str, Any]]:
        """The last evaluation, at the event time reached."""
        self._flush()
        if self.next_eval is not None:
            yield from self._tick(max(self.state.max_ts, self.next_eval))

    def fork(self) -> Replay:
        """An independent copy of this replay (rules and parser are shared: immutable)."""
        shared = {id(self.parser): self.parser, id(self.engine.rules): self.engine.rules}
        shared.update({id(rule): rule for rule in self.engine.rules})
        return copy.deepcopy(self, shared)

    def _flush(self) -> None:
        if self.rows:
            out = self.state.apply(self.rows, NO_FUTURE, BatchOutput())
            self.stats.too_late += len(out.too_late)
            self.store.apply_cells((ch, camp, m, v) for (ch, camp, m), v in out.cells.items())
            self.rows.clear()
            self.state.drain_changes()  # no changelog offline: the log would grow forever

    def _tick(self, watermark: int) -> Iterator[dict[str, Any]]:
        yield from _tick(self.engine, self.store, watermark, self.settle_ms, self.stats)


def run_backtest(
    rules: RulesFile,
    lines: Iterable[bytes],
    settings: Settings,
    *,
    eval_every_s: float = 60.0,
    stats: BacktestStats | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield alert records in event-time order."""
    replay = Replay(rules, settings, eval_every_s=eval_every_s, stats=stats)
    yield from replay.feed(lines)
    yield from replay.finish()


def _tick(
    engine: AlertEngine, store: ScopeStore, watermark: int, settle_ms: int, stats: BacktestStats
) -> Iterator[dict[str, Any]]:
    end_minute = (watermark - settle_ms) // 60_000
    if stats.evaluations % 60 == 0:
        for buckets in store.series.values():
            buckets.expire(watermark // 60_000)
    stats.evaluations += 1
    for record in engine.evaluate(SegmentView(store.series), end_minute, watermark / 1000):
        stats.alerts += 1
        yield record
