"""Record batches the worker cannot read: pause that partition, say so, lose nothing.

aiokafka decodes (decompresses, checks) a fetched record batch lazily, inside
``consumer.getmany``. When it cannot -- the codec's library is missing
(``UnsupportedCodecError``), the CRC does not match (``CorruptRecordException``),
the compressed payload is broken -- the exception escapes ``getmany`` naming no
partition, and the consumer is left in a treacherous state (measured with
aiokafka 0.14):

* partitions drained earlier in the same call have moved past records that were
  never returned, so catching the error and going on would lose them;
* the bad partition stays where it was, so the next fetch raises again: before
  this module, the worker crashed, restarted, read the same batch and crashed
  again, for good.

So the worker finds the partition and batch in the traceback (aiokafka's fetcher
frame holds them), moves every partition back to what was really returned,
pauses only the bad partition and reports it: one ERROR line (then at most one a
minute), ``kpimon_partition_stalled{topic, partition, reason}`` = 1 and
``kpimon_batches_unreadable_total{topic, reason}``. The other partitions go on.
Nothing is skipped: the bad batch's offset is never committed, so a worker that
can read it (codec installed, batch re-fetched intact) counts it exactly once.

A missing codec cannot appear while the process runs, so such a partition waits
for a restart (or a rebalance to a worker that has the codec); a corrupt batch
may be a transient fault and is re-fetched every ``RETRY_SECONDS``. A batch
the broker accepted was checked by the broker (CRC, and compressed batches are
decompressed on append), so a batch this worker cannot read is far more often
this worker's problem than bad data: it is never skipped automatically.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiokafka import TopicPartition
from aiokafka.errors import UnsupportedCodecError

from stream.pipeline import PipelineStats

log = logging.getLogger("kpimon.worker")

CODECS = {0: "none", 1: "gzip", 2: "snappy", 3: "lz4", 4: "zstd"}
UNSUPPORTED_CODEC = "unsupported_codec"
CORRUPT_BATCH = "corrupt_batch"
RETRY_SECONDS = 60.0
"""How often a partition stalled on a corrupt batch is fetched again."""
LOG_EVERY_SECONDS = 60.0
"""At most one ERROR line a minute per stalled partition after the first."""
_HINT = {
    UNSUPPORTED_CODEC: "this worker lacks the codec: install kpimon with its dependencies "
    "(aiokafka[lz4,snappy,zstd], i.e. cramjam) and restart it",
    CORRUPT_BATCH: f"the batch fails its checks here; fetched again every {RETRY_SECONDS:.0f} s",
}


@dataclass(frozen=True, slots=True)
class Unreadable:
    """Where a fetched batch could not be read, and why."""

    tp: TopicPartition
    offset: int
    """Where reading stopped: the partition is held here."""
    first: int | None
    """First offset of the batch that failed, when known."""
    last: int | None
    codec: str | None
    reason: str
    error: str

    def describe(self) -> str:
        where = f"{self.tp.topic}[{self.tp.partition}] at offset {self.offset}"
        if self.first is not None:
            where += f" (batch {self.first}-{self.last}, {self.codec})"
        return f"{where}: {self.error}"


def locate(exc: BaseException) -> Unreadable | None:
    """The partition and batch a ``getmany`` error came from, or None when the error
    did not come from reading a fetched batch (connection, authorisation, ...).

    The exception names neither, but the traceback passes through aiokafka's
    ``PartitionRecords._unpack_records`` generator, whose frame holds the
    partition, the batch being read and how far reading got. Private to aiokafka
    (pinned < 0.15): tests/stream/test_stalls.py runs this on the installed one.
    """
    frame = None
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name == "_unpack_records" and "aiokafka" in code.co_filename:
            frame = tb.tb_frame
        tb = tb.tb_next
    if frame is None:
        return None
    scope: Mapping[str, Any] = frame.f_locals
    tp, offset = scope.get("tp"), getattr(scope.get("self"), "next_fetch_offset", None)
    if not isinstance(tp, TopicPartition) or not isinstance(offset, int):
        return None
    first = last = codec = None
    batch = scope.get("next_batch")
    end = getattr(batch, "next_offset", None)
    if isinstance(end, int) and offset < end:  # not the previous, fully read batch
        first, last = int(getattr(batch, "base_offset", offset)), end - 1
        kind = getattr(batch, "compression_type", None)
        codec = CODECS.get(kind, f"codec {kind}") if isinstance(kind, int) else None
    reason = UNSUPPORTED_CODEC if isinstance(exc, UnsupportedCodecError) else CORRUPT_BATCH
    error, name = str(exc), type(exc).__name__
    if not error.startswith(name):  # aiokafka's errors start with their name, others do not
        error = f"{name}: {error}" if error else name
    return Unreadable(tp, offset, first, last, codec, reason, error)


async def positions(consumer: Any) -> dict[TopicPartition, int]:
    """Every assigned partition's position: what ``rewind`` goes back to."""
    return {tp: await consumer.position(tp) for tp in consumer.assignment()}


async def rewind(
    consumer: Any,
    returned: Mapping[TopicPartition, list[Any]],
    held: Mapping[TopicPartition, int],
    before: Mapping[TopicPartition, int],
) -> None:
    """Move every assigned partition back to just after what ``getmany`` returned.

    A partition with records in ``returned`` goes to after its last one; one in
    ``held`` to that offset (the segment stage's partials position, which a restore
    during the failed call may have moved); any other to its position ``before``
    the batch was gathered, or, assigned since, to its committed offset. Not the committed
    offset for all: aiokafka fetches it without ``require_stable``, so right after
    a transaction it can still be the one before it. Re-reading a skipped control
    record is harmless; skipping a record never returned is not.
    """
    for tp in consumer.assignment():
        records = returned.get(tp)
        if records:
            consumer.seek(tp, records[-1].offset + 1)
        elif tp in held:
            consumer.seek(tp, held[tp])
        elif tp in before:
            consumer.seek(tp, before[tp])
        else:
            committed = await consumer.committed(tp)
            if committed is None:
                await consumer.seek_to_beginning(tp)
            else:
                consumer.seek(tp, committed)


@dataclass(slots=True)
class _Stall:
    where: Unreadable
    since: float
    logged: float
    retry_at: float | None
    attempts: int = 1


class Stalls:
    """The stalled partitions of one consumer: pause, report, retry, heal."""

    def __init__(self, stats: PipelineStats, clock: Callable[[], float] = time.monotonic) -> None:
        self._stats = stats
        self._clock = clock
        self._stalls: dict[TopicPartition, _Stall] = {}

    def __contains__(self, tp: object) -> bool:
        return tp in self._stalls

    def stalled(self, consumer: Any, where: Unreadable) -> None:
        """Pause ``where.tp`` and report it (first time: ERROR; then once a minute)."""
        consumer.pause(where.tp)
        tp, now = where.tp, self._clock()
        retry_at = now + RETRY_SECONDS if where.reason == CORRUPT_BATCH else None
        key = (tp.topic, where.reason)
        self._stats.unreadable[key] = self._stats.unreadable.get(key, 0) + 1
        self._stats.stalled[(tp.topic, tp.partition)] = where.reason
        stall = self._stalls.get(tp)
        if stall is None:
            self._stalls[tp] = _Stall(where, since=now, logged=now, retry_at=retry_at)
            log.error(
                "partition stalled: cannot read %s. Paused at offset %d: nothing at or past it "
                "is counted or committed, the other partitions go on; %s",
                where.describe(), where.offset, _HINT[where.reason],
            )  # fmt: skip
            return
        stall.where, stall.retry_at = where, retry_at
        stall.attempts += 1
        self._still(stall, now)

    def due(self, consumer: Any) -> None:
        """Before each fetch: forget partitions no longer assigned, resume those due
        for a retry, repeat the ERROR line of the others once a minute."""
        now = self._clock()
        assigned = consumer.assignment()
        for tp, stall in list(self._stalls.items()):
            if tp not in assigned:  # revoked: its new owner reports it if it fails there too
                self._forget(tp)
            elif stall.retry_at is not None and now >= stall.retry_at:
                stall.retry_at = None
                consumer.resume(tp)
            else:
                self._still(stall, now)

    def read(self, consumer: Any, batches: Mapping[TopicPartition, list[Any]]) -> None:
        """Stalled partitions that returned records and are not paused (again: records
        before the bad batch may come in the same gather) are readable again."""
        if not self._stalls:
            return
        paused = consumer.paused()
        for tp in [tp for tp in self._stalls if batches.get(tp) and tp not in paused]:
            stall = self._forget(tp)
            log.info(
                "partition %s[%d] readable again after %.0f s (was: %s)",
                tp.topic, tp.partition, self._clock() - stall.since, stall.where.describe(),
            )  # fmt: skip

    def _still(self, stall: _Stall, now: float) -> None:
        if now - stall.logged < LOG_EVERY_SECONDS:
            return
        stall.logged = now
        log.error(
            "partition still stalled for %.0f s (%d failed reads): cannot read %s; %s",
            now - stall.since, stall.attempts, stall.where.describe(),
            _HINT[stall.where.reason],
        )  # fmt: skip

    def _forget(self, tp: TopicPartition) -> _Stall:
        self._stats.stalled.pop((tp.topic, tp.partition), None)
        return self._stalls.pop(tp)
