"""The alert stage's state in the scope changelog: split per rule, restored exactly.

The changelog is compacted: what a restart reads is the last value of every key. These
tests keep it as such a map, write ticks into it as the worker commits them, and restore
a fresh stage from it.
"""

from __future__ import annotations

import random
from typing import Any

from alerts.rules import DEFAULT_RULES, RulesFile, load_rules
from alerts.stage import HEAD, SPLIT, AlertStage
from stream import codec
from stream.aggregate import SegmentStore
from stream.settings import Settings
from stream.stages import Message, Topology

SETTINGS = Settings()
TOPOLOGY = Topology.of(SETTINGS)
START = 29_916_000  # a minute index (2026-11-18)
RULES = load_rules(DEFAULT_RULES)
TREND_RULES = [r for r in RULES.rules if r.against == "baseline"]
"""Rules with detectors (goal and budget rules judge the targets, with no state of their own)."""

Log = dict[bytes, bytes]
"""A compacted scope changelog: key -> last value."""


def traffic(store: SegmentStore, minute: int, rng: random.Random, campaigns: int = 12) -> None:
    """Noisy minutes of ``campaigns`` campaigns: the detectors move off zero."""
    cells = []
    for c in range(campaigns):
        imps = rng.randint(80, 160)
        clicks = rng.randint(0, 8)
        orders = rng.randint(0, 2)
        cells.append((f"ch{c % 3}", f"c{c}", minute,
                      [imps, clicks, rng.randint(0, 1), orders, orders // 2, orders * 30_000_000,
                       clicks * 400_000]))  # fmt: skip
    store.apply_cells(cells)


def write(log: Log, messages: list[Message]) -> None:
    for m in messages:
        if m.topic != TOPOLOGY.scope_log:
            continue
        assert m.key is not None
        if m.value is None:
            log.pop(m.key, None)
        else:
            log[m.key] = m.value


def restore(log: Log, rules: RulesFile = RULES) -> AlertStage:
    stage = AlertStage(rules, SETTINGS, TOPOLOGY, ["log"])
    for key, value in log.items():
        kind, parsed = codec.scope_log_entry(key)
        stage.restore(kind, parsed, codec.scope_log_value(kind, value))
    stage.restored()
    return stage


def run(stage: AlertStage, store: SegmentStore, log: Log, minutes: range, seed: int) -> None:
    rng = random.Random(seed)
    for minute in minutes:
        traffic(store, minute, rng)
        tick = stage.tick(store, (minute + 2) * 60_000 + 5_000, False)
        write(log, stage.messages(tick))
        stage.committed(tick)


def history(hours: int = 3) -> SegmentStore:
    store, rng = SegmentStore(), random.Random(1)
    for minute in range(START - hours * 60, START):
        traffic(store, minute, rng)
    return store


def fresh() -> tuple[AlertStage, SegmentStore, Log]:
    """A stage, 3 hours of history and an empty changelog."""
    return AlertStage(RULES, SETTINGS, TOPOLOGY, ["log"]), history(), {}


def active(stage: AlertStage) -> int:
    return sum(
        any(s > 0 for s in cusum.stats)
        for detectors in stage.engine.detectors.values()
        for cusum in detectors.by_segment.values()
    )


def test_a_restart_restores_the_engine_exactly_from_its_split_entries() -> None:
    stage, store, log = fresh()
    run(stage, store, log, range(START, START + 6), seed=2)
    assert active(stage) > 50, "the detectors must hold statistics for the test to mean much"
    kinds = [codec.scope_log_entry(key)[0] for key in log]
    assert kinds.count("alerts") == 1
    assert kinds.count("detectors") == len(TREND_RULES)
    restored = restore(log)
    assert restored.engine.to_dict() == stage.engine.to_dict()
    assert restored.state == stage.state
    # Both go on alike; the restored one writes nothing its committed state already holds.
    twin_log = dict(log)
    run(stage, store.snapshot(), log, range(START + 6, START + 9), seed=3)
    run(restored, store, twin_log, range(START + 6, START + 9), seed=3)
    assert twin_log == log
    assert restored.engine.to_dict() == stage.engine.to_dict()


def test_only_entries_that_changed_are_written() -> None:
    stage, store, log = fresh()
    run(stage, store, log, range(START, START + 3), seed=2)
    now_ms = (START + 4) * 60_000 + 5_000
    tick = stage.tick(store, now_ms, False)
    write(log, stage.messages(tick))
    stage.committed(tick)
    again = stage.tick(store, now_ms, False)  # the same minute again: nothing new to add
    assert again.state == tick.state
    assert stage.messages(again) == [], "an unchanged state writes nothing"
    assert again.wire == {}, "nor encodes anything"


def test_state_written_before_the_split_still_restores_and_is_rewritten_split() -> None:
    stage, store, log = fresh()
    run(stage, store, log, range(START, START + 4), seed=2)
    # The log as the code before the split wrote it: the whole state in the alerts entry.
    old: Log = {codec.scope_log_key("alerts"): codec.encode_json(stage.engine.to_dict())}
    restored = restore(old)
    assert restored.engine.to_dict() == stage.engine.to_dict()
    rng = random.Random(5)
    traffic(store, START + 4, rng)
    tick = restored.tick(store, (START + 6) * 60_000 + 5_000, False)
    write(old, restored.messages(tick))
    restored.committed(tick)
    head = codec.decode_json(old[codec.scope_log_key("alerts")])
    assert head[SPLIT] and head["detectors"] == {}
    assert sum(codec.scope_log_entry(key)[0] == "detectors" for key in old) == len(TREND_RULES)
    assert restore(old).engine.to_dict() == restored.engine.to_dict()


def test_the_entry_of_a_rule_gone_from_the_rules_file_is_deleted() -> None:
    stage, store, log = fresh()
    run(stage, store, log, range(START, START + 3), seed=2)
    one = [r for r in RULES.rules if r.name == "ctr_drop_campaign"]
    kept = RULES.model_copy(update={"rules": one})
    fewer = restore(log, kept)
    run(fewer, store, log, range(START + 3, START + 4), seed=4)
    entries = [codec.scope_log_entry(key) for key in log]
    assert sorted(key[1] for kind, key in entries if kind == "detectors") == ["ctr_drop_campaign"]
    assert restore(log, kept).engine.to_dict() == fewer.engine.to_dict()


def test_each_entry_is_a_small_share_of_the_state() -> None:
    """The reason for the split: no message holds every rule's detectors."""
    stage, store, log = fresh()
    run(stage, store, log, range(START, START + 3), seed=2)
    whole = len(codec.encode_json(stage.engine.to_dict()))
    sizes: dict[str, Any] = {key.decode(): len(value) for key, value in log.items()}
    assert max(sizes.values()) < whole / 10, sizes
    assert sum(sizes.values()) < whole / 2, "compressed, the entries hold less than before"
    assert stage.state[HEAD] == log[codec.scope_log_key("alerts")]
