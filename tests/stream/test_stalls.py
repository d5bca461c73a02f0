"""Unreadable record batches, without a broker.

``locate`` is run on exceptions raised by the installed aiokafka's own record
reading (real batches built with its builder), since it reads aiokafka's frames.
The worker's ``_gather`` runs against a fake consumer that behaves like
aiokafka's (measured against a broker): a failing ``getmany`` drops the records
it drained from other partitions while their positions moved on.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import aiokafka.codec
import pytest
from aiokafka import TopicPartition
from aiokafka.consumer.fetcher import READ_COMMITTED, PartitionRecords
from aiokafka.errors import KafkaConnectionError
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.memory_records import MemoryRecords

from alerts.rules import DEFAULT_RULES, load_rules
from stream import stalls
from stream.pipeline import PipelineStats
from stream.settings import Settings
from stream.stalls import CORRUPT_BATCH, UNSUPPORTED_CODEC, Stalls, Unreadable, locate
from stream.worker import PipelineService

TOPIC = "events.clicks"
SNAPPY, NONE = 2, 0


def test_every_codec_is_installed() -> None:
    """kpimon's dependencies bring every codec producers use (cramjam for three)."""
    assert aiokafka.codec.has_gzip()
    assert aiokafka.codec.has_snappy()
    assert aiokafka.codec.has_lz4()
    assert aiokafka.codec.has_zstd()


def batch(base: int, n: int, codec: int) -> bytes:
    """A real v2 record batch of ``n`` records at offsets ``base``..``base + n - 1``."""
    builder = DefaultRecordBatchBuilder(
        magic=2, compression_type=codec, is_transactional=0, producer_id=-1,
        producer_epoch=-1, base_sequence=-1, batch_size=1 << 20,
    )  # fmt: skip
    for i in range(n):
        builder.append(i, timestamp=1_795_000_000_000 + i, key=None, value=b'{"i": %d}' % i,
                       headers=[])  # fmt: skip
    raw = bytearray(builder.build())
    raw[0:8] = struct.pack(">q", base)  # the base offset is outside the CRC
    return bytes(raw)


def read(raw: bytes, tp: TopicPartition, fetch_offset: int) -> list[Any]:
    """Records of one fetched partition, read the way aiokafka's fetcher reads them."""
    records = PartitionRecords(tp, MemoryRecords(raw), [], fetch_offset, None, None, True,
                               READ_COMMITTED)  # fmt: skip
    return list(records)


def raised(raw: bytes, tp: TopicPartition, fetch_offset: int, *, snappy: bool = True) -> Exception:
    """What reading ``raw`` raises (``snappy=False``: as on a worker without cramjam;
    aiokafka looks its codec checkers up per batch)."""
    saved = aiokafka.codec.has_snappy
    if not snappy:
        aiokafka.codec.has_snappy = lambda: False
    try:
        with pytest.raises(Exception) as info:
            read(raw, tp, fetch_offset)
    finally:
        aiokafka.codec.has_snappy = saved
    assert isinstance(info.value, Exception)
    return info.value


def test_locate_a_missing_codec() -> None:
    tp = TopicPartition(TOPIC, 2)
    # A readable batch, then a snappy one in the same fetch: reading stops at 105.
    raw = batch(100, 5, NONE) + batch(105, 5, SNAPPY)
    assert [r.offset for r in read(raw, tp, 100)] == list(range(100, 110))
    exc = raised(raw, tp, 100, snappy=False)
    assert "snappy" in str(exc) and TOPIC not in str(exc)  # the error names no partition
    assert locate(exc) == Unreadable(
        tp, 105, 105, 109, "snappy", UNSUPPORTED_CODEC,
        "UnsupportedCodecError: Libraries for snappy compression codec not found",
    )  # fmt: skip


def test_locate_a_corrupt_batch() -> None:
    raw = bytearray(batch(7, 3, NONE))
    raw[-3] ^= 0xFF  # a flipped bit in the last record: the CRC no longer matches
    where = locate(raised(bytes(raw), TopicPartition(TOPIC, 0), 7))
    assert where is not None
    assert (where.offset, where.first, where.last, where.codec, where.reason) == (
        7, 7, 9, "none", CORRUPT_BATCH
    )  # fmt: skip
    assert "CorruptRecordException" in where.error


def test_locate_ignores_errors_not_from_reading_a_batch() -> None:
    try:
        raise KafkaConnectionError("broker gone")
    except KafkaConnectionError as exc:
        assert locate(exc) is None


# --------------------------------------------------------------------------- the worker's loop


@dataclass(frozen=True)
class Rec:
    topic: str
    partition: int
    offset: int


BAD = "bad"
CORRUPT = "corrupt"


class FakeConsumer:
    """aiokafka's consumer as ``_gather`` sees it, including how ``getmany`` fails:
    partitions are drained in order, ``chunk`` records each per call, and a bad
    batch raises aiokafka's real error after earlier partitions moved on."""

    def __init__(self, logs: dict[int, list[str]], committed: dict[int, int], chunk: int) -> None:
        self.logs = {TopicPartition(TOPIC, p): log for p, log in logs.items()}
        self.committed_offsets = {TopicPartition(TOPIC, p): o for p, o in committed.items()}
        self.positions = {tp: self.committed_offsets.get(tp, 0) for tp in self.logs}
        self.paused_tps: set[TopicPartition] = set()
        self.chunk = chunk
        self.calls = 0

    def assignment(self) -> set[TopicPartition]:
        return set(self.positions)

    def paused(self) -> set[TopicPartition]:
        return set(self.paused_tps)

    def pause(self, *tps: TopicPartition) -> None:
        self.paused_tps.update(tps)

    def resume(self, *tps: TopicPartition) -> None:
        self.paused_tps.difference_update(tps)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.positions[tp] = offset

    async def seek_to_beginning(self, *tps: TopicPartition) -> None:
        for tp in tps:
            self.positions[tp] = 0

    async def committed(self, tp: TopicPartition) -> int | None:
        """Stale on purpose: aiokafka does not ask for stable offsets, so right after a
        transaction this can be the offset before it (the worker must not rely on it)."""
        return self.committed_offsets.get(tp)

    async def position(self, tp: TopicPartition) -> int:
        return self.positions[tp]

    async def getmany(self, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[Rec]]:
        self.calls += 1
        drained: dict[TopicPartition, list[Rec]] = {}
        for tp in sorted(self.positions):
            if tp in self.paused_tps or max_records <= 0:
                continue
            pos, log = self.positions[tp], self.logs[tp]
            if pos >= len(log):
                continue
            if log[pos] in (BAD, CORRUPT):
                raise self._error(tp, pos, log[pos])
            end = min(len(log), pos + self.chunk, pos + max_records)
            while any(kind != "ok" for kind in log[pos:end]):
                end -= 1
            drained[tp] = [Rec(tp.topic, tp.partition, o) for o in range(pos, end)]
            self.positions[tp] = end
            max_records -= end - pos
        return drained

    @staticmethod
    def _error(tp: TopicPartition, offset: int, kind: str) -> Exception:
        raw = batch(offset, 1, SNAPPY if kind == BAD else NONE)
        if kind == CORRUPT:
            raw = raw[:-3] + bytes([raw[-3] ^ 0xFF]) + raw[-2:]
        return raised(raw, tp, offset, snappy=False)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def service() -> Iterator[PipelineService]:
    svc = PipelineService(Settings(), PipelineStats(), load_rules(DEFAULT_RULES))
    yield svc


async def gather_all(svc: PipelineService, consumer: FakeConsumer, rounds: int) -> list[Rec]:
    """``rounds`` iterations of the worker's loop (the fake's committed offsets stay
    those it started with, as a not yet stable commit would)."""
    out: list[Rec] = []
    for _ in range(rounds):
        for records in (await svc._gather(consumer, 100)).values():
            out += records
    return out


def offsets(records: list[Rec], partition: int) -> list[int]:
    return [r.offset for r in records if r.partition == partition]


async def test_missing_codec_pauses_only_its_partition_and_loses_nothing(
    service: PipelineService, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    service.stalls = Stalls(service.stats, clock=clock)
    # p0 is drained before p1 raises: aiokafka dropped those records, they must come back.
    consumer = FakeConsumer({0: ["ok"] * 6, 1: ["ok"] * 2 + [BAD] * 3, 2: ["ok"] * 4},
                            committed={0: 1, 1: 2}, chunk=100)  # fmt: skip
    with caplog.at_level(logging.INFO, logger="kpimon.worker"):
        got = await gather_all(service, consumer, rounds=5)
    assert offsets(got, 0) == [1, 2, 3, 4, 5]  # from the committed offset, each once
    assert offsets(got, 1) == []
    assert offsets(got, 2) == [0, 1, 2, 3]
    tp1 = TopicPartition(TOPIC, 1)
    assert consumer.paused_tps == {tp1} and consumer.positions[tp1] == 2
    assert service.stats.stalled == {(TOPIC, 1): UNSUPPORTED_CODEC}
    assert service.stats.unreadable == {(TOPIC, UNSUPPORTED_CODEC): 1}
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert f"{TOPIC}[1] at offset 2 (batch 2-2, snappy)" in errors[0]
    assert "codec not found" in errors[0] and "cramjam" in errors[0]

    # A missing codec cannot come back while the process runs: not retried, only
    # reported again once a minute.
    caplog.clear()
    calls = consumer.calls
    for step in (30, 31, 30):
        clock.now += step
        assert await gather_all(service, consumer, rounds=1) == []
    assert consumer.paused_tps == {tp1} and consumer.calls == calls + 3
    repeated = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(repeated) == 1 and "still stalled for 61 s" in repeated[0]

    # Revoked: its new owner reports it if it cannot read it either.
    del consumer.positions[tp1]
    await gather_all(service, consumer, rounds=1)
    assert service.stats.stalled == {} and tp1 not in service.stalls


async def test_error_after_a_first_fetch_keeps_what_was_returned(
    service: PipelineService,
) -> None:
    """The failing call is the second of a batch: records already returned stay in
    the batch (they are processed), those dropped by the failing call come back."""
    consumer = FakeConsumer({0: ["ok"] * 10, 1: ["ok"] * 3 + [BAD]}, committed={}, chunk=3)
    first = await service._gather(consumer, 100)
    # The second call drained 3-5 of p0, then failed on p1: 3-5 come in the next batch.
    assert {tp.partition: [r.offset for r in recs] for tp, recs in first.items()} == {
        0: [0, 1, 2], 1: [0, 1, 2]
    }  # fmt: skip
    assert consumer.positions[TopicPartition(TOPIC, 0)] == 3
    rest = await gather_all(service, consumer, rounds=4)
    assert offsets(rest, 0) == [3, 4, 5, 6, 7, 8, 9] and offsets(rest, 1) == []


async def test_corrupt_batch_is_retried_and_heals(
    service: PipelineService, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    service.stalls = Stalls(service.stats, clock=clock)
    consumer = FakeConsumer({0: ["ok", CORRUPT, "ok"], 1: ["ok"]}, committed={}, chunk=100)
    got = await gather_all(service, consumer, rounds=3)
    assert offsets(got, 0) == [0] and offsets(got, 1) == [0]
    tp0 = TopicPartition(TOPIC, 0)
    assert service.stats.stalled == {(TOPIC, 0): CORRUPT_BATCH}

    clock.now += stalls.RETRY_SECONDS  # retried, still corrupt: paused again, counted
    assert await gather_all(service, consumer, rounds=2) == []
    assert service.stats.unreadable == {(TOPIC, CORRUPT_BATCH): 2}
    assert tp0 in consumer.paused_tps

    consumer.logs[tp0][1] = "ok"  # a transient fault: the next fetch reads it
    clock.now += stalls.RETRY_SECONDS
    with caplog.at_level(logging.INFO, logger="kpimon.worker"):
        got = await gather_all(service, consumer, rounds=2)
    assert offsets(got, 0) == [1, 2]
    assert service.stats.stalled == {} and not consumer.paused_tps
    assert any("readable again after 120 s" in r.getMessage() for r in caplog.records)


async def test_other_errors_still_raise(service: PipelineService) -> None:
    class Broken(FakeConsumer):
        async def getmany(self, timeout_ms: int, max_records: int) -> Any:
            raise KafkaConnectionError("broker gone")

    with pytest.raises(KafkaConnectionError):
        await service._gather(Broken({0: []}, committed={}, chunk=1), 10)
