"""The alert stage: the alert engine and its outbox, beside the segment stage.

It runs where the segment stage runs (one worker), on the evaluation timer rather than on
records: each tick judges a snapshot of the scope store (``compute_tick``, off the event
loop in the worker), and its decisions, the engine's new state and the notifications to
deliver are committed in one transaction (:meth:`AlertStage.messages`), so a crash before
the commit redoes the tick with nothing sent yet. Its state lives in the scope changelog
(``alerts``, ``detectors`` and ``outbox`` entries, keyed by ``stream.codec``). The backtest
runs the same decision (:func:`decide`) on the same scope store.

The engine's state is split (:func:`state_entries`): its lifecycles and incidents in the
``alerts`` entry, and each rule's detector statistics (most of the bytes: hundreds of
segments per rule, rewritten every minute) in a ``detectors`` entry of its own,
compressed. One rule's entry stays far below Kafka's message limit at any number of
rules, and only entries that changed are written, all in the tick's one transaction.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
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

HEAD = "@engine"
"""The entry of the engine's state but for its detectors (rule names cannot start so)."""
SPLIT = "detectors_split"
"""Marks an ``alerts`` entry whose detectors are in entries of their own (an entry written
before the split holds them inline, and still restores)."""
AlertState = dict[str, bytes]
"""The engine's state as the changelog holds it: JSON by entry (:data:`HEAD`, then rule
names for their detectors)."""


def state_entries(state: Mapping[str, Any]) -> AlertState:
    """An engine's ``to_dict()`` as changelog entries: JSON of each."""
    detectors = state.get("detectors") or {}
    entries = {HEAD: codec.encode_json({**state, "detectors": {}, SPLIT: True})}
    for rule, value in detectors.items():
        entries[rule] = codec.encode_json(value)
    return entries


def joined(head: Mapping[str, Any], detectors: Mapping[str, Any]) -> dict[str, Any]:
    """The engine state of an ``alerts`` entry and the ``detectors`` entries beside it:
    ``head`` as it is when it holds its detectors inline (written before the split)."""
    if not head.get(SPLIT):
        return dict(head)
    whole = {k: v for k, v in head.items() if k != SPLIT}
    whole["detectors"] = dict(detectors)
    return whole


def _wire(entry: str, state: bytes) -> bytes:
    return state if entry == HEAD else codec.encode_detectors(state)


@dataclass(frozen=True)
class Tick:
    """One evaluation computed off the event loop, waiting to be committed on it."""

    engine: AlertEngine
    """A clone of the live engine, stepped by this tick."""
    records: list[dict[str, Any]]
    state: AlertState
    """The stepped engine's state, as the scope changelog holds it (JSON by entry)."""
    wire: dict[str, bytes]
    """The values to write of the entries that differ from the committed state given to
    :func:`compute_tick` (encoding them takes time: it is done off the loop too)."""
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
    committed: Mapping[str, bytes] | None = None,
) -> Tick:
    """Windows and KPIs of a scope snapshot, alert decisions on a clone of ``engine`` and
    the exposition (with goals, budgets and pacing when ``targets`` is given): everything
    of a tick that takes time, touching no live state (it runs in a thread while the event
    loop goes on). ``committed``: the state entries as last committed, so that only the
    entries that changed are encoded for the changelog."""
    started = time.perf_counter()
    evaluation = view.evaluate(now_ms, hold=hold)
    evaluated = time.perf_counter()
    stepped = engine.clone()
    goals = targets.goals(now_ms / 1000) if targets is not None else None
    records = decide(view, stepped, evaluation, goals)
    state = state_entries(stepped.to_dict())
    before = committed or {}
    wire = {k: _wire(k, v) for k, v in state.items() if before.get(k) != v}
    alerted = time.perf_counter()
    exposition = render_evaluation(evaluation, view, now_ms) + render_alerts(
        stepped.firing_labels(), stepped.baselines, evaluation
    )
    if targets is not None:
        exposition += targets.render(view.series, evaluation.end_minute, now_ms / 1000)
    return Tick(stepped, records, state, wire, exposition, evaluated - started,
                alerted - evaluated, time.perf_counter() - alerted)  # fmt: skip


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
        self.state: AlertState = state_entries(self.engine.to_dict())
        """The engine's state as last committed to the changelog."""
        self._restored: Any = None
        self._detectors: dict[str, Any] = {}

    # -- changelog ----------------------------------------------------------------
    def restore(self, kind: codec.ScopeLogKind, key: tuple[Any, ...], value: Any) -> None:
        """One scope changelog entry of the alert stage's kinds (``alerts``, ``detectors``,
        ``outbox``)."""
        if kind == "alerts":
            self._restored = value
        elif kind == "detectors":
            rule = key[1]
            if value is None:
                self._detectors.pop(rule, None)
            else:
                self._detectors[rule] = value
        elif kind == "outbox":
            self.outbox.load(key, value)

    def restored(self) -> None:
        """Every entry is in: rebuild the engine (a state that no longer fits the rules,
        e.g. a rule changed meaning, starts those alerts afresh) and the outbox queues."""
        head, detectors = self._restored, self._detectors
        if head:
            try:
                self.engine.load(joined(head, detectors))
            except ValueError as exc:
                log.error("alert state not restored (%s): alerts start inactive", exc)
        self.outbox.loaded()
        self.state = state_entries(self.engine.to_dict())
        if head and not head.get(SPLIT):
            # Written before the split (detectors inline): the next commit writes every
            # entry, the head last holding them inline included.
            self.state = {}
        # Entries of rules gone from the rules file: never equal, so the next commit
        # deletes them.
        self.state.update({rule: b"" for rule in detectors if rule not in self.state})
        self._restored, self._detectors = None, {}

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
        return compute_tick(view, self.engine, now_ms, hold, self.targets, self.state)

    def messages(self, tick: Tick) -> list[Message]:
        """What committing ``tick`` writes: its alert records, the entries of the engine's
        state that changed (and deletes of rules gone) and the outbox entries; nothing when
        it decided nothing and the state is unchanged."""
        if not tick.records and tick.state == self.state:
            return []
        self.outbox.add(tick.records)
        alerts = [
            Message(self.alerts_topic, codec.encode_json(record), key=codec.alert_key(record))
            for record in tick.records
        ]
        topic, state = self.topology.scope_log, []
        for entry, value in tick.state.items():
            if self.state.get(entry) == value:
                continue
            wire = tick.wire.get(entry)
            if wire is None:  # computed against another committed state
                wire = _wire(entry, value)
            state.append(Message(topic, wire, key=_entry_key(entry), partition=0))
        state += [Message(topic, None, key=_entry_key(entry), partition=0)
                  for entry in self.state if entry not in tick.state]  # fmt: skip
        return [*alerts, *state, *self.outbox_changes()]

    def committed(self, tick: Tick) -> None:
        """``tick``'s transaction committed (or it had nothing to commit)."""
        if tick.records or tick.state != self.state:
            self.state = tick.state
            self.outbox.commit()
        self.engine = tick.engine

    def firing_records(self, now_s: float) -> list[dict[str, Any]]:
        return self.engine.firing_records(now_s)


def _entry_key(entry: str) -> bytes:
    if entry == HEAD:
        return codec.scope_log_key("alerts")
    return codec.scope_log_key("detectors", ("detectors", entry))
