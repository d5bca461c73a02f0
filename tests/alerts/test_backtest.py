"""The backtest's fast feed against the plain one: the same records on the same input.

The reference below is the backtest as it was before its feed was made cheap: every line
parsed for its time, produced one by one into the in-memory runtime, an evaluation every
time the event time passes a step. The fast feed skips the parse for lines whose time
cannot start an evaluation and hands lines to the runtime in bulk; it must not change a
record, a statistic or a rejection.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson
import pytest

from alerts.backtest import TOPIC, BacktestStats, Replay, _event_ms, _scan_ms, run_backtest
from alerts.rules import RulesFile, parse_rules
from alerts.stage import decide
from stream.settings import Settings
from stream.simulate import Incident, SimConfig, Simulator, encode
from tests.helpers import REPO

START_S = 1_795_000_000
SETTINGS = Settings(currency_rates={"EUR": 1.1})


def reference(rules: RulesFile, lines: Iterable[bytes], eval_every_s: float = 60.0) -> tuple[
    list[dict[str, Any]], tuple[int, int, int, int]
]:  # fmt: skip
    """The backtest's loop before the fast feed, through the runtime's public API."""
    replay = Replay(rules, SETTINGS, eval_every_s=eval_every_s)
    runtime, step = replay.runtime, int(eval_every_s * 1000)
    next_eval: int | None = None
    newest = pending = 0
    records: list[dict[str, Any]] = []

    def tick(now_ms: int) -> None:
        nonlocal pending
        if pending:  # the stages step only when lines came since the last evaluation
            runtime.run(now_ms)
            pending = 0
        store = replay.store
        records.extend(decide(store, replay.engine, store.evaluate(now_ms)))

    for line in lines:
        line = line.strip()
        if not line:
            continue
        ts = _event_ms(line)
        if ts is not None:
            if next_eval is None:
                next_eval = ts - ts % step + step
            while ts >= next_eval:
                tick(max(newest, next_eval))
                next_eval += step
            newest = max(newest, ts)
        runtime.produce(TOPIC, line)
        pending += 1
    if next_eval is not None:
        tick(max(newest, next_eval))
    counts = runtime.stats
    totals = (sum(counts.events.values()), sum(counts.rejected.values()),
              sum(counts.late.values()), len(records))  # fmt: skip
    return records, totals


AHEAD = b"%d" % ((START_S + 180) * 1000)
"""A time minutes ahead of the trace's start: it starts evaluations wherever it is read."""
ODD_LINES = [
    b"",
    b"   ",
    b"not json",
    b'{"type":"click","ts":',  # cut short
    b'{"type":"click","ts":' + AHEAD,  # not JSON, yet its time would start evaluations
    b'[{"ts":' + AHEAD + b"}]",  # JSON, but not an object: no time
    b'{"type":"impression","event_id":"x1","meta":{"ts":' + AHEAD + b'},"ts":1}',
    b'{"type":"impression","event_id":"x2","ts":1,"ts":' + AHEAD + b"}",  # the last one counts
    b'{"type":"impression","event_id":"x3","t\\u0073":' + AHEAD + b"}",
    b'{"type":"impression","event_id":"x4","ts" : ' + AHEAD + b"}",
    b'{"type":"impression","event_id":"x5","ts":1.7e12}',
    b'{"type":"impression","event_id":"x6","ts":"2026-11-18T10:00:00"}',  # no offset
    b'{"type":"impression","event_id":"x7","ts":"yesterday"}',
    b'{"type":"impression","event_id":"x8","ts":true}',
    b'{"type":"impression","event_id":"x9","channel":"ts","campaign_id":"c0"}',
    b'{"type":"impression","event_id":"x10","ts":017}',
    b'{"type":"impression","event_id":"x11","ts":' + b"9" * 5000 + b"}",
]


def trace(seed: int, minutes: int, *, odd_every: int = 0) -> list[bytes]:
    """A seeded simulated trace with a CTR drop; ``odd_every``: an odd line that often."""
    incident = Incident.parse("ctr_drop:campaign=c1:at=+45m:by=70%:for=20m")
    sim = Simulator(SimConfig(seed=seed, rate=12, campaigns=4, incidents=[incident]))
    lines = [
        encode(kind, event, with_type=True)
        for tick in range(0, minutes * 60, 60)
        for kind, event in sim.events(START_S + tick, 60)
    ]
    if odd_every:
        for i, odd in zip(range(odd_every, len(lines), odd_every), ODD_LINES * 50, strict=False):
            lines.insert(i, odd)
    return lines


@pytest.mark.parametrize("line", ODD_LINES)
def test_the_scan_is_exact_or_unsure(line: bytes) -> None:
    """Where the scan names a time, it is the time the full parse reads (lines that are not
    JSON objects may get any: their time is then checked by the full parse)."""
    scanned = _scan_ms(line.strip())
    try:
        valid = type(orjson.loads(line)) is dict
    except orjson.JSONDecodeError:
        valid = False
    if valid and scanned is not None and scanned >= 0:
        assert scanned == _event_ms(line.strip())


def test_the_scan_reads_the_simulators_times() -> None:
    for line in trace(3, 2)[:500]:
        assert _scan_ms(line) == _event_ms(line)


def test_the_fast_feed_gives_the_records_of_the_plain_one() -> None:
    rules = parse_rules((REPO / "alerts" / "rules.yml").read_text())
    lines = trace(11, 80, odd_every=997)
    expected, totals = reference(rules, lines)
    stats = BacktestStats()
    records = list(run_backtest(rules, lines, SETTINGS, stats=stats))
    assert any(r["notification"] == "firing" for r in expected), "the trace must alert"
    assert records == expected
    assert (stats.events, stats.rejected, stats.too_late, stats.alerts) == totals
    assert stats.rejected > 0 and stats.lines == len(lines)


def test_fed_in_pieces_and_every_30_s_it_still_gives_the_same_records() -> None:
    rules = parse_rules((REPO / "alerts" / "rules.yml").read_text())
    lines = trace(12, 60, odd_every=499)
    expected, _ = reference(rules, lines, eval_every_s=30)
    replay = Replay(rules, SETTINGS, eval_every_s=30)
    records: list[dict[str, Any]] = []
    for start in range(0, len(lines), 7919):
        records += replay.feed(lines[start : start + 7919])
    records += replay.finish()
    assert records == expected
