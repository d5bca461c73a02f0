"""The three stages and the runtime's step and transaction logic, with no broker.

Stages are driven one by one (records in, messages out, restore from their changelog
messages), then together through ``stream.local`` (the same ``Stages.step`` the worker
runs), against counts recomputed independently from the raw events; the transaction
order is checked on a fake producer.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import random
import weakref
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest

from stream import checkpoint, codec
from stream.aggregate import MEASURES
from stream.gcpolicy import collect_due, gc_paused
from stream.local import LocalRuntime
from stream.pipeline import SourceRecord
from stream.settings import Settings
from stream.stages import Message, Stages, Topology, source_of

NOW = 1_795_000_020_000
MIN = 60_000
SETTINGS = Settings(topic_partitions=3)
TOPO = Topology.of(SETTINGS)
CLICKS = SETTINGS.type_topics["click"]
ORDERS = SETTINGS.type_topics["order"]


def click(i: int, campaign: str = "c1", ts: int = NOW - 5 * MIN) -> bytes:
    event = {"event_id": f"k{i}", "ts": ts, "campaign_id": campaign, "channel": "search",
             "click_id": f"ck{i}", "cost": 0.5}  # fmt: skip
    return json.dumps(event).encode()


def order(i: int, click_id: str, ts: int = NOW - 4 * MIN) -> bytes:
    return json.dumps({"event_id": f"o{i}", "ts": ts, "click_id": click_id, "revenue": 20,
                       "customer_id": f"u{i}"}).encode()  # fmt: skip


def records(topic: str, values: list[bytes], partition: int = 0) -> list[SourceRecord]:
    return [SourceRecord(topic, partition, i, None, v, NOW) for i, v in enumerate(values)]


def as_records(messages: list[Message], topic: str) -> dict[int, list[SourceRecord]]:
    """The messages of one topic as a consumer would read them, by partition."""
    by_partition: dict[int, list[SourceRecord]] = {}
    for m in messages:
        if m.topic == topic:
            got = by_partition.setdefault(m.partition or 0, [])
            got.append(SourceRecord(m.topic, m.partition or 0, len(got), m.key, m.value, NOW,
                                    m.headers))  # fmt: skip
    return by_partition


def test_ingest_routes_valid_events_by_click_id_and_dead_letters_the_rest() -> None:
    stages = Stages(SETTINGS, TOPO)
    batch = {(CLICKS, 0): records(CLICKS, [click(1), b"{not json", click(2)])}
    batch[(ORDERS, 1)] = records(ORDERS, [order(1, "ck1")], partition=1)
    step = stages.step(batch, NOW, {})
    assert step is not None
    routed = as_records(step.messages, TOPO.routed)
    rows = {p: [row for r in rs for row in codec.decode_rows(r.value or b"")]
            for p, rs in routed.items()}  # fmt: skip
    # The order and the click it follows meet in one routed partition (attribution).
    (partition,) = [p for p, rs in rows.items() if any(row[1] == "o1" for row in rs)]
    assert any(row[1] == "k1" for row in rows[partition])
    assert sum(map(len, rows.values())) == 3
    letters = [m for m in step.messages if m.topic == SETTINGS.dlq_topic]
    assert [m.value for m in letters] == [b"{not json"]
    assert dict(letters[0].headers or [])["kpimon.source.offset"] == b"1"
    assert step.offsets == {(CLICKS, 0): 3, (ORDERS, 1): 1}
    assert stages.ingest.newest == {(CLICKS, 0): NOW - 5 * MIN, (ORDERS, 1): NOW - 4 * MIN}


def test_a_lagging_source_partition_holds_the_watermark_at_its_event_time() -> None:
    stages = Stages(SETTINGS, TOPO)
    stages.step({(CLICKS, 0): records(CLICKS, [click(1)])}, NOW, {})
    assert stages.watermark({(CLICKS, 0): 0, (ORDERS, 0): 0}, NOW) == NOW
    assert stages.watermark({(CLICKS, 0): 7}, NOW) == NOW - 5 * MIN
    assert stages.watermark({(ORDERS, 0): None}, NOW) == 0, "unknown lag: nothing reached"


def test_partition_stage_deduplicates_and_restores_from_its_changelog() -> None:
    stages = Stages(SETTINGS, TOPO)
    stages.dedup = {p: stages.new_dedup(p) for p in range(3)}
    values = [click(1), click(1), click(2)]  # one duplicate
    first = stages.step({(CLICKS, 0): records(CLICKS, values)}, NOW, {})
    assert first is not None
    routed = as_records(first.messages, TOPO.routed)
    second = stages.step({(TOPO.routed, p): rs for p, rs in routed.items()}, NOW + 1000, {})
    assert second is not None
    assert sum(sum(out.duplicates.values()) for out in second.outputs) == 1
    partials = [codec.Partial.decode(m.value or b"") for m in second.messages
                if m.topic == TOPO.partials]  # fmt: skip
    assert sum(c[3 + MEASURES.index("clicks")] for p in partials for c in p.cells) == 2
    assert {p.partition for p in partials} == {0, 1, 2}, "every partition reports progress"
    # A stage rebuilt from its changelog messages takes a replayed copy as a duplicate.
    log = as_records(second.messages, TOPO.dedup_log)
    rebuilt = Stages(SETTINGS, TOPO)
    for p in range(3):
        rebuilt.dedup[p] = rebuilt.new_dedup(p)
        for record in log.get(p, []):
            rebuilt.dedup[p].restore(record.value or b"")
    again = rebuilt.step({(TOPO.routed, p): rs for p, rs in routed.items()}, NOW, {})
    assert again is not None
    assert sum(sum(out.duplicates.values()) for out in again.outputs) == 3
    assert not any(out.cells for out in again.outputs)


def test_nothing_to_send_is_no_step_and_a_heartbeat_is_one() -> None:
    stages = Stages(SETTINGS, TOPO)
    assert stages.step({}, NOW, {}) is None
    stages.dedup[0] = stages.new_dedup(0)
    heartbeat = stages.step({}, NOW, {})
    assert heartbeat is not None and [m.topic for m in heartbeat.messages] == [TOPO.partials]
    assert codec.Partial.decode(heartbeat.messages[0].value or b"").caught_up
    assert stages.step({}, NOW + 999, {}) is None
    assert stages.step({}, NOW + 1000, {}) is not None


def feed(runtime: LocalRuntime, raw: list[tuple[str, bytes]], now_ms: int) -> None:
    for i, (topic, value) in enumerate(raw):
        runtime.produce(topic, value, partition=i % 3)
    runtime.run(now_ms)


def recount(raw: list[tuple[str, bytes]]) -> Counter[tuple[str, str]]:
    """Clicks and orders per campaign, from the raw events: dedup by id, attribution by
    click id (an independent recomputation, not the stages' code)."""
    seen: set[str] = set()
    clicked: dict[str, str] = {}
    counts: Counter[tuple[str, str]] = Counter()
    for _, value in raw:
        event = json.loads(value)
        if event["event_id"] in seen:
            continue
        seen.add(event["event_id"])
        if "campaign_id" in event:
            clicked[event["click_id"]] = event["campaign_id"]
            counts[(event["campaign_id"], "clicks")] += 1
        else:
            counts[(clicked.get(event["click_id"], "unattributed"), "orders")] += 1
    return counts


def scope_counts(runtime: LocalRuntime) -> Counter[tuple[str, str]]:
    assert runtime.stages.segments is not None
    counts: Counter[tuple[str, str]] = Counter()
    for (scope, _, campaign), buckets in runtime.stages.segments.store.series.items():
        if scope == "campaign":
            totals = buckets.sum(NOW // MIN - 60, NOW // MIN + 1)
            for measure in ("clicks", "orders"):
                if totals[MEASURES.index(measure)]:
                    counts[(campaign, measure)] += int(totals[MEASURES.index(measure)])
    return counts


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_stages_together_count_exactly_through_shuffles_and_duplicates(seed: int) -> None:
    """Clicks out of time order with redelivered copies, then orders (some for clicks that
    never came) the same way, in batches of every size."""
    rng = random.Random(seed)
    clicks = [(CLICKS, click(i, f"c{i % 4}", NOW - rng.randrange(30) * MIN)) for i in range(300)]
    orders = [(ORDERS, order(i, f"ck{i * 7}", NOW - rng.randrange(30) * MIN)) for i in range(60)]
    raw = []
    for events in (clicks, orders):
        events += rng.sample(events, len(events) // 6)  # redelivered copies
        rng.shuffle(events)
        raw += events
    runtime = LocalRuntime(SETTINGS)
    start = 0
    for i, size in enumerate([1, 7, 150, 3, 500]):
        feed(runtime, raw[start : start + size], NOW + i * 1000)
        start += size
    assert start >= len(raw)
    assert scope_counts(runtime) == recount(raw)
    assert sum(runtime.stats.duplicates.values()) == 50 + 10


def test_a_scope_stage_restored_from_its_changelog_resumes_at_the_offset_it_covers() -> None:
    raw = [(CLICKS, click(i, f"c{i % 3}")) for i in range(40)]
    runtime = LocalRuntime(SETTINGS)
    feed(runtime, raw[:25], NOW)
    assert runtime.step(NOW, snapshot=True) is not None
    feed(runtime, raw[25:], NOW + 1000)  # applied after the snapshot: replayed on restore
    rebuilt = runtime.stages.new_segments()
    for record in runtime.log.partitions[(TOPO.scope_log, 0)]:
        kind, key = codec.scope_log_entry(record.key or b"")
        rebuilt.restore(kind, key, None if record.value is None else json.loads(record.value))
    partials = runtime.log.partitions[(TOPO.partials, 0)]
    assert 0 < rebuilt.position < len(partials)
    rebuilt.apply(partials[rebuilt.position :], NOW + 2000)
    runtime.stages.segments = rebuilt
    assert scope_counts(runtime) == recount(raw)


class FakeProducer:
    """Records the calls of a transaction; fails a send on request."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.fail_on = fail_on

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        self.calls.append(("begin", None))
        try:
            yield
        except BaseException:
            self.calls.append(("abort", None))
            raise
        self.calls.append(("commit", None))

    async def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> asyncio.Future[None]:
        self.calls.append(("send", topic))
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if topic == self.fail_on:
            future.set_exception(RuntimeError("broker said no"))
        else:
            future.set_result(None)
        return future

    async def send_offsets_to_transaction(self, offsets: Any, group_id: str) -> None:
        self.calls.append(("offsets", dict(offsets)))


async def test_a_step_commits_its_messages_then_its_offsets_in_one_transaction() -> None:
    stages = Stages(SETTINGS, TOPO)
    step = stages.step({(CLICKS, 0): records(CLICKS, [click(1), b"x"])}, NOW, {})
    assert step is not None
    producer = FakeProducer()
    await checkpoint.commit(producer, step.messages, step.offsets, "g")
    kinds = [kind for kind, _ in producer.calls]
    assert kinds == ["begin", "send", "send", "offsets", "commit"]
    assert producer.calls[-2] == ("offsets", {(CLICKS, 0): 2})


async def test_a_failed_send_aborts_the_step_and_commits_no_offset() -> None:
    stages = Stages(SETTINGS, TOPO)
    step = stages.step({(CLICKS, 0): records(CLICKS, [click(1), b"x"])}, NOW, {})
    assert step is not None
    producer = FakeProducer(fail_on=SETTINGS.dlq_topic)
    with pytest.raises(RuntimeError, match="broker said no"):
        await checkpoint.commit(producer, step.messages, step.offsets, "g")
    assert [kind for kind, _ in producer.calls][-1] == "abort"
    assert all(kind != "offsets" for kind, _ in producer.calls)


def test_old_large_events_are_routed_in_messages_that_fit_and_dead_lettered_whole() -> None:
    """Events near their horizon carry their original bytes through the routed hop; 300 of
    60 KB each (valid: an unknown field is ignored) made one 18 MB routed message, beyond any
    topic's limit, so the transaction failed and was retried forever."""
    stages = Stages(SETTINGS, TOPO)
    stages.dedup = {p: stages.new_dedup(p) for p in range(3)}
    fresh = [click(i, ts=NOW - MIN) for i in range(30)]
    old = []
    for i in range(300):
        event = json.loads(click(1000 + i, ts=NOW - 2 * 60 * MIN))
        old.append(json.dumps({**event, "note": f"{i}" + 'x"' * 15_000}).encode())
    stages.watermark_before = NOW  # the worker is caught up: its routed rows say so
    first = stages.step({(CLICKS, 0): records(CLICKS, fresh)}, NOW, {})
    assert first is not None
    fresh_routed = as_records(first.messages, TOPO.routed)
    second = stages.step({(CLICKS, 1): records(CLICKS, old, partition=1)}, NOW, {})
    assert second is not None
    routed = [m for m in second.messages if m.topic == TOPO.routed]
    assert all(len(m.value or b"") <= codec.ROUTED_MESSAGE_BYTES for m in routed)
    assert len(routed) > 18, "split by size, not only by rows"
    # The dedup stages see the fresh clicks first (their horizon clock moves to the
    # worker's watermark), then the old ones: too late, each dead-lettered as it came.
    applied = stages.step({(TOPO.routed, p): rs for p, rs in fresh_routed.items()}, NOW, {})
    assert applied is not None
    assert sum(sum(out.applied.values()) for out in applied.outputs) == len(fresh)
    old_routed = as_records(routed, TOPO.routed)
    late = stages.step({(TOPO.routed, p): rs for p, rs in old_routed.items()}, NOW + 1000, {})
    assert late is not None
    letters = [m for m in late.messages if m.topic == SETTINGS.dlq_topic]
    assert sorted(m.value or b"" for m in letters) == sorted(old)
    assert sum(sum(out.late.values()) for out in late.outputs) == len(old)


def test_a_routed_row_too_large_for_any_message_goes_without_its_original() -> None:
    row = [["click", "k1", NOW, "c1", "search", "ck1", 1, 0, False, NOW,
            codec.origin(CLICKS, 0, 7, b"key", b"x" * codec.INTERNAL_MESSAGE_BYTES)]]  # fmt: skip
    small = [["click", f"k{i}", NOW, "c1", "search", "ck1", 1, 0, False, NOW,
              codec.origin(CLICKS, 0, i, b"key", b"y" * 2000)] for i in range(2, 1500)]  # fmt: skip
    parts = [codec.decode_rows(value) for value in codec.encode_routed(row + small)]
    rows = [r for part in parts for r in part]
    assert [r[1] for r in rows] == ["k1"] + [f"k{i}" for i in range(2, 1500)]
    assert rows[0][-1] == [CLICKS, 0, 7], "coordinates kept, original dropped"
    assert all(codec.original_of(r[-1]) == (b"key", b"y" * 2000) for r in rows[1:])
    assert all(len(part) <= codec.ROWS_PER_MESSAGE for part in parts)


def test_with_read_back_routed_rows_carry_no_originals_and_late_letters_wait_for_them() -> None:
    """The worker reads the originals of too-late events back from their source: routed
    rows never carry bytes, and the letters are made once the runtime has the originals."""
    stages = Stages(SETTINGS, TOPO)
    stages.read_back = True
    stages.dedup = {p: stages.new_dedup(p) for p in range(3)}
    stages.watermark_before = NOW
    fresh = [click(i, ts=NOW - MIN) for i in range(30)]
    old = [click(100 + i, ts=NOW - 2 * 60 * MIN) for i in range(20)]
    first = stages.step({(CLICKS, 0): records(CLICKS, fresh)}, NOW, {})
    second = stages.step({(CLICKS, 1): records(CLICKS, old, partition=1)}, NOW, {})
    assert first is not None and second is not None
    rows = [row for m in second.messages if m.topic == TOPO.routed
            for row in codec.decode_rows(m.value or b"")]  # fmt: skip
    assert len(rows) == len(old) and all(len(row[-1]) == 3 for row in rows)
    stages.step({(TOPO.routed, p): rs for p, rs in as_records(first.messages, TOPO.routed).items()},
                NOW, {})  # fmt: skip
    routed = as_records(second.messages, TOPO.routed)
    late = stages.step({(TOPO.routed, p): rs for p, rs in routed.items()}, NOW + 1000, {})
    assert late is not None
    assert not [m for m in late.messages if m.topic == SETTINGS.dlq_topic], "not yet"
    assert sorted(source_of(one) for one in late.late) == [(CLICKS, 1, i) for i in range(20)]
    # All but offset 3 read back (3 was removed by retention, say): that one as parsed.
    originals = {(CLICKS, 1, i): (b"key", value) for i, value in enumerate(old) if i != 3}
    letters = stages.late_letters(late, originals)
    assert len(letters) == len(old)
    by_offset = {dict(m.headers or [])["kpimon.source.offset"]: m for m in letters}
    assert all(by_offset[str(i).encode()].value == old[i] for i in range(20) if i != 3)
    assert by_offset[b"3"].key is None
    assert dict(by_offset[b"3"].headers or [])["kpimon.original"] == b"reconstructed"
    assert json.loads(by_offset[b"3"].value or b"")["event_id"] == "k103"


def test_a_step_holds_the_garbage_collector_off_and_gives_it_back() -> None:
    """Within a step no collection runs; after it, the collector is on again (also when
    the step raises), and a caller that had it off keeps it off."""
    stages = Stages(SETTINGS, TOPO)
    seen: list[bool] = []
    inner = stages.ingest.apply

    def spy(*args: Any) -> None:
        seen.append(gc.isenabled())
        inner(*args)

    stages.ingest.apply = spy  # type: ignore[method-assign,assignment]
    assert gc.isenabled()
    assert stages.step({(CLICKS, 0): records(CLICKS, [click(1)])}, NOW, {}) is not None
    assert seen == [False] and gc.isenabled()
    with pytest.raises(RuntimeError), gc_paused():
        assert not gc.isenabled()
        raise RuntimeError("a stage failed")
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_ingest_keeps_no_event_objects_beyond_its_routed_rows() -> None:
    """A step's ingest result counts events without holding them (the rows carry them),
    and the rows are let go once encoded: what a step holds until it commits is small."""
    stages = Stages(SETTINGS, TOPO)
    step = stages.step({(CLICKS, 0): records(CLICKS, [click(i) for i in range(50)])}, NOW, {})
    assert step is not None
    assert step.records == 50 and step.ingested.result.counts == {"click": 50}
    assert step.ingested.result.events == [] and step.ingested.routed == {}
    rows = [row for r in as_records(step.messages, TOPO.routed).values() for m in r
            for row in codec.decode_rows(m.value or b"")]  # fmt: skip
    assert len(rows) == 50


class _Cycle:
    """Garbage only the cyclic collector frees."""

    def __init__(self) -> None:
        self.me = self


def test_a_pause_that_collects_frees_the_cycles_made_meanwhile_on_its_way_out() -> None:
    """The worker keeps the collector paused through each batch: what it would have
    collected meanwhile is collected at the batch's end, by its thresholds."""
    before = gc.get_threshold()
    gc.collect()
    gc.set_threshold(100, 10, 10)
    try:
        with gc_paused(collect=True):
            cycle = _Cycle()
            gone = weakref.ref(cycle)
            del cycle
            kept = [[i] for i in range(1000)]  # past the threshold: a collection is due
            assert gone() is not None and not gc.isenabled()
        assert gc.isenabled() and gone() is None
        del kept
        with gc_paused(collect=True):  # nothing due: no collection
            cycle = _Cycle()
            gone = weakref.ref(cycle)
            del cycle
        assert gone() is not None
        gc.set_threshold(0)  # the collector switched off by its thresholds: left alone
        collect_due()
        assert gone() is not None
    finally:
        gc.set_threshold(*before)
        gc.collect()
