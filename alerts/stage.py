"""The alert stage: the alert engine and its outbox, beside the segment stage.

It runs where the segment stage runs (one worker), on the evaluation timer rather than on
records: each tick judges a snapshot of the scope store (``compute_tick``, off the event
loop in the worker), and its decisions, the engine's new state and the notifications to
deliver are committed in one transaction (:meth:`AlertStage.messages`), so a crash before
the commit redoes the tick with nothing sent yet. Its state lives in the scope changelog
(``alerts`` and ``outbox`` entries, keyed by ``stream.codec``). The backtest runs the same
decision (:func:`decide`) on the same scope store.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from alerts.engine import AlertEngine
from alerts.exposition import render_alerts
from alerts.goals import Goals
from alerts.outbox import Outbox
from alerts.rules import RulesFile
from alerts.targets_export import TargetsExporter
from stream import codec
from stream.aggregate import Evaluation, SegmentStore
from stream.metrics import render_evaluation
from stream.segments import SegmentView
from stream.settings import Settings
from stream.stages import Message, Topology

log = logging.getLogger("kpimon.alerts")


@dataclass(frozen=True)
class Tick:
    """One evaluation computed off the event loop, waiting to be committed on it."""

    engine: AlertEngine
    """A clone of the live engine, stepped by this tick."""
    records: list[dict[str, Any]]
    state: bytes
    """The stepped engine's state, as the scope changelog holds it."""
    exposition: bytes
    evaluate_s: float
    alert_s: float
    render_s: float


def decide(
    view: SegmentStore, engine: AlertEngine, evaluation: Evaluation, goals: Goals | None = None
) -> list[dict[str, Any]]:
    """Step ``engine`` on an evaluated scope store: the alert records of this tick (goal and
    budget rules judge by ``goals``, the targets in force)."""
    segments = SegmentView(view.series)
    return engine.evaluate(segments, evaluation.end_minute, evaluation.watermark_ms / 1000,
                           replaying=evaluation.hold_alerts, goals=goals)  # fmt: skip


def compute_tick(
    view: SegmentStore,
    engine: AlertEngine,
    now_ms: int,
    hold: bool,
    targets: TargetsExporter | None = None,
) -> Tick:
    """Windows and KPIs of a scope snapshot, alert decisions on a clone of ``engine`` and
    the exposition (with goals, budgets and pacing when ``targets`` is given): everything
    of a tick that takes time, touching no live state (it runs in a thread while the event
    loop goes on)."""
    started = time.perf_counter()
    evaluation = view.evaluate(now_ms, hold=hold)
    evaluated = time.perf_counter()
    stepped = engine.clone()
    goals = targets.goals(now_ms / 1000) if targets is not None else None
    records = decide(view, stepped, evaluation, goals)
    state = codec.encode_json(stepped.to_dict())
    alerted = time.perf_counter()
    exposition = render_evaluation(evaluation, view, now_ms) + render_alerts(
        stepped.firing_labels(), stepped.baselines, evaluation
    )
    if targets is not None:
        exposition += targets.render(view.series, evaluation.end_minute, now_ms / 1000)
    return Tick(stepped, records, state, exposition, evaluated - started, alerted - evaluated,
                time.perf_counter() - alerted)  # fmt: skip


class AlertStage:
    """The live alert engine, its committed state and the outbox of one scope partition."""

    def __init__(
        self,
        rules: RulesFile,
        settings: Settings,
        topology: Topology,
        channels: Sequence[str],
        targets: TargetsExporter | None = None,
    ) -> None:
        self.engine = AlertEngine(
            rules, grafana_url=settings.grafana_url, runbook_base_url=settings.runbook_base_url
        )
        self.outbox = Outbox(tuple(channels))
        self.targets = targets
        self.alerts_topic = settings.alerts_topic
        self.topology = topology
        self.state = codec.encode_json(self.engine.to_dict())
        """The engine's state as last committed to the changelog."""
        self._restored: Any = None

    # -- changelog ----------------------------------------------------------------
    def restore(self, kind: codec.ScopeLogKind, key: tuple[Any, ...], value: Any) -> None:
        """One scope changelog entry of the alert stage's kinds (``alerts``, ``outbox``)."""
        if kind == "alerts":
            self._restored = value
        elif kind == "outbox":
            self.outbox.load(key, value)

    def restored(self) -> None:
        """Every entry is in: rebuild the engine (a state that no longer fits the rules,
        e.g. a rule changed meaning, starts those alerts afresh) and the outbox queues."""
        if self._restored:
            try:
                self.engine.load(self._restored)
            except ValueError as exc:
                log.error("alert state not restored (%s): alerts start inactive", exc)
        self._restored = None
        self.outbox.loaded()
        self.state = codec.encode_json(self.engine.to_dict())

    def outbox_changes(self) -> list[Message]:
        """Outbox entries added or delivered since the last call (None deletes)."""
        topic = self.topology.scope_log
        return [
            Message(topic, None if value is None else codec.encode_json(value),
                    key=codec.scope_log_key("outbox", key), partition=0)
            for key, value in self.outbox.drain_changes()
        ]  # fmt: skip

    # -- ticks --------------------------------------------------------------------
    def tick(self, view: SegmentStore, now_ms: int, hold: bool) -> Tick:
        return compute_tick(view, self.engine, now_ms, hold, self.targets)

    def messages(self, tick: Tick) -> list[Message]:
        """What committing ``tick`` writes: its alert records, the engine's new state and
        the outbox entries; nothing when it decided nothing and the state is unchanged."""
        if not tick.records and tick.state == self.state:
            return []
        self.outbox.add(tick.records)
        alerts = [
            Message(self.alerts_topic, codec.encode_json(record), key=codec.alert_key(record))
            for record in tick.records
        ]
        state = Message(self.topology.scope_log, tick.state, key=codec.scope_log_key("alerts"),
                        partition=0)  # fmt: skip
        return [*alerts, state, *self.outbox_changes()]

    def committed(self, tick: Tick) -> None:
        """``tick``'s transaction committed (or it had nothing to commit)."""
        if tick.records or tick.state != self.state:
            self.state = tick.state
            self.outbox.commit()
        self.engine = tick.engine

    def firing_records(self, now_s: float) -> list[dict[str, Any]]:
        return self.engine.firing_records(now_s)
