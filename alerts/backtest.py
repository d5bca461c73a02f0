"""Offline replay of recorded events through the worker's own stages and alert decision.

Events (JSON lines, each with its ``type``) go through the same stage objects as in the
worker (``stream.stages``, run in memory by ``stream.local``: parser, routing, dedup,
attribution, lateness, scope sums) and the same decision (``alerts.stage.decide`` on the
scope store's evaluation), in event time: the clock is the event time reached, and rules
are evaluated every ``eval_every`` seconds of it. The alerts that would have fired come
out as the same JSON objects the worker writes to ``kpimon.alerts``.
"""

from __future__ import annotations

import copy
import gc
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from alerts.engine import AlertEngine
from alerts.goals import Goals
from alerts.rules import RulesFile
from alerts.stage import decide
from alerts.targets import Targets
from stream.aggregate import SegmentStore
from stream.events import timestamp_ms
from stream.local import LocalRuntime
from stream.settings import Settings

TOPIC = "backtest"
"""The one shared topic the recorded events are replayed from (each line has its type)."""
NO_FUTURE_S = 366 * 86400.0
"""A recording is its own clock: an event is never "from the future" of it."""


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

    Its whole state (stages, alert lifecycles) is plain Python, so :meth:`fork` can
    branch a replay to play "what if" continuations of the same history, e.g. the same
    traffic with and without an incident. ``targets`` (goals and budgets, days in the
    settings' time zone) is what the rules against goals and budgets judge by.
    ``freeze``: freeze the collector's view of what is alive after each evaluation
    (``stream.gcpolicy``): for a process that replays and exits, whose state only grows.
    """

    def __init__(
        self,
        rules: RulesFile,
        settings: Settings,
        *,
        eval_every_s: float = 60.0,
        stats: BacktestStats | None = None,
        targets: Targets | None = None,
        freeze: bool = False,
    ) -> None:
        self.goals = Goals.of(targets, settings.tz) if targets is not None else None
        self.freeze = freeze
        self.stats = stats if stats is not None else BacktestStats()
        replay_settings = settings.model_copy(
            update={"shared_topics": [TOPIC], "max_future_skew_seconds": NO_FUTURE_S}
        )
        self.runtime = LocalRuntime(replay_settings, retain=False)
        self.engine = AlertEngine(
            rules, grafana_url=settings.grafana_url, runbook_base_url=settings.runbook_base_url
        )
        self.step_ms = int(eval_every_s * 1000)
        self.next_eval: int | None = None
        """The event time of the next evaluation; every line fed so far is before it."""
        self._lines: list[bytes] = []
        """Lines fed since the last evaluation, not yet given to the runtime."""

    @property
    def store(self) -> SegmentStore:
        assert self.runtime.stages.segments is not None
        return self.runtime.stages.segments.store

    def feed(self, lines: Iterable[bytes]) -> Iterator[dict[str, Any]]:
        """Apply events; yields the records of every evaluation their event time passes.

        Only a line whose time reaches the next evaluation matters here (the stages parse
        every line again), so a line is parsed for its time only when :func:`_scan_ms`
        cannot rule that out; lines go to the runtime in bulk, at each evaluation.
        """
        stats, step, pending = self.stats, self.step_ms, self._lines
        next_eval = self.next_eval
        count = 0
        for line in lines:
            count += 1
            line = line.strip()
            if not line:
                continue
            if next_eval is not None:
                hint = _scan_ms(line)
                if hint is None or 0 <= hint < next_eval:
                    pending.append(line)
                    continue
            ts = _event_ms(line)
            if ts is not None:
                if next_eval is None:
                    next_eval = self.next_eval = ts - ts % step + step
                if ts >= next_eval:
                    stats.lines += count
                    count = 0
                    while ts >= next_eval:
                        # The time of every line counted so far is below next_eval, so
                        # the event time reached is next_eval.
                        yield from self._tick(next_eval)
                        next_eval = self.next_eval = next_eval + step
            pending.append(line)
        stats.lines += count

    def finish(self) -> Iterator[dict[str, Any]]:
        """The last evaluation, at the event time reached."""
        if self.next_eval is not None:
            yield from self._tick(self.next_eval)
        else:
            self._run(0)

    def fork(self) -> Replay:
        """An independent copy of this replay (rules and parser are shared: immutable)."""
        parser = self.runtime.stages.ingest.handler.parser
        shared: dict[int, object] = {id(parser): parser, id(self.engine.rules): self.engine.rules}
        shared.update({id(rule): rule for rule in self.engine.rules})
        if self.goals is not None:
            shared[id(self.goals.targets)] = self.goals.targets
        return copy.deepcopy(self, shared)

    def _run(self, now_ms: int) -> None:
        """Every event fed so far through the stages, as of ``now_ms``."""
        if self._lines:
            self.runtime.produce_values(TOPIC, self._lines)
            self._lines.clear()  # the same list: feed holds it
            self.runtime.run(now_ms)
        counts, stats = self.runtime.stats, self.stats
        stats.events = sum(counts.events.values())
        stats.rejected = sum(counts.rejected.values())
        stats.too_late = sum(counts.late.values())

    def _tick(self, now_ms: int) -> Iterator[dict[str, Any]]:
        self._run(now_ms)
        store = self.store
        self.stats.evaluations += 1
        records = decide(store, self.engine, store.evaluate(now_ms), self.goals)
        if self.freeze:
            gc.freeze()
        for record in records:
            self.stats.alerts += 1
            yield record


_TS = re.compile(rb'"ts":(?:(-?[0-9]{1,19})[,}]|"([^"]*)")')
"""An integer of at most 19 digits (longer ones are not JSON orjson reads, nor ones
``int`` takes at any length) or a string without escapes."""
UNSURE = -1
"""What :func:`_scan_ms` says of a line it cannot read: parse it."""


def _scan_ms(line: bytes) -> int | None:
    """:func:`_event_ms` of a line without parsing its JSON where that is safe, else
    ``UNSURE``.

    Safe: one ``"ts":`` key, no backslash (so every quote delimits a string and the key is
    a key) and one ``{`` (so the key is the top object's), an integer or a string after
    it. For a line that is a JSON object this is :func:`_event_ms` exactly. For any other
    line (whose time is None) it may name a time: the caller only trusts a time that
    starts no evaluation, and parses the line otherwise."""
    if b"\\" in line or line.count(b"{") != 1 or line.count(b'"ts"') != 1:
        return UNSURE
    found = _TS.search(line)
    if found is None:
        return UNSURE
    number, text = found.groups()
    if number is not None:
        return int(number)
    try:
        moment = datetime.fromisoformat(text.decode())
    except (ValueError, UnicodeDecodeError):
        return None
    return timestamp_ms(moment) if moment.tzinfo is not None else None


def _event_ms(line: bytes) -> int | None:
    """The event time of a line, to know which evaluations it passes (the stages parse it
    again, and reject it if it is not an event)."""
    try:
        ts = orjson.loads(line).get("ts")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    if isinstance(ts, int | float) and not isinstance(ts, bool):
        return int(ts)
    if isinstance(ts, str):
        try:
            moment = datetime.fromisoformat(ts)
        except ValueError:
            return None
        return timestamp_ms(moment) if moment.tzinfo is not None else None
    return None


def run_backtest(
    rules: RulesFile,
    lines: Iterable[bytes],
    settings: Settings,
    *,
    eval_every_s: float = 60.0,
    stats: BacktestStats | None = None,
    targets: Targets | None = None,
    freeze: bool = False,
) -> Iterator[dict[str, Any]]:
    """Yield alert records in event-time order (``freeze``: see :class:`Replay`)."""
    replay = Replay(rules, settings, eval_every_s=eval_every_s, stats=stats, targets=targets,
                    freeze=freeze)  # fmt: skip
    yield from replay.feed(lines)
    yield from replay.finish()
