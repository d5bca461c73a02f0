"""The stages run in one process without Kafka: topics held in memory.

The backtest and the broker-free tests run the same :class:`~stream.stages.Stages` as the
worker, through this runtime: each :meth:`LocalRuntime.step` reads what every partition
has unread, hands it to the stages and appends the messages of the step to the log, as
the worker's transaction would. One worker owns every partition, and every step commits.
"""

from __future__ import annotations

from collections.abc import Sequence

from stream.pipeline import PipelineStats, Record, SourceRecord
from stream.settings import Settings
from stream.stages import Message, Partition, Stages, Step, Topology


class Line:
    """A record of a bare value on partition 0 of one topic (no key, timestamp 0, no
    headers): what a replayed line is. Cheaper to make than a :class:`SourceRecord` (a
    backtest makes one per event), and read the same way by the stages."""

    __slots__ = ("offset", "topic", "value")
    partition = 0
    key: bytes | None = None
    timestamp = 0
    headers: Sequence[tuple[str, bytes]] | None = None

    def __init__(self, topic: str, value: bytes, offset: int) -> None:
        self.topic = topic
        self.value: bytes | None = value
        self.offset = offset


class LocalLog:
    """Partitions of topics as lists of records; offsets count from 0 and survive trimming."""

    def __init__(self) -> None:
        self.partitions: dict[Partition, list[Record]] = {}
        self._base: dict[Partition, int] = {}

    def append(self, message: Message, timestamp_ms: int) -> None:
        tp = (message.topic, message.partition or 0)
        records = self.partitions.setdefault(tp, [])
        offset = self._base.get(tp, 0) + len(records)
        records.append(SourceRecord(tp[0], tp[1], offset, message.key, message.value,
                                    timestamp_ms, message.headers))  # fmt: skip

    def extend(self, topic: str, values: Sequence[bytes]) -> None:
        """Bare values on partition 0 of ``topic``, in order (see :class:`Line`)."""
        records = self.partitions.setdefault((topic, 0), [])
        offset = self._base.get((topic, 0), 0) + len(records)
        records.extend(map(Line, [topic] * len(values), values,
                           range(offset, offset + len(values))))  # fmt: skip

    def read(self, tp: Partition, offset: int) -> list[Record]:
        return self.partitions.get(tp, [])[offset - self._base.get(tp, 0) :]

    def trim(self, tp: Partition, offset: int) -> None:
        """Forget the records before ``offset`` (a replay has no use for them)."""
        base = self._base.get(tp, 0)
        del self.partitions[tp][: offset - base]
        self._base[tp] = offset


class LocalRuntime:
    """Every stage of one deployment in one process, stepped by the caller's clock."""

    def __init__(self, settings: Settings, *, retain: bool = True) -> None:
        """``retain``: keep every message in the log (the changelogs, dead letters, and
        records already consumed); a long replay keeps only what is still to be read."""
        self.topology = Topology.of(settings)
        self.stages = Stages(settings, self.topology)
        for p in range(settings.topic_partitions):
            self.stages.dedup[p] = self.stages.new_dedup(p)
        self.stages.segments = self.stages.new_segments()
        self.stats = PipelineStats()
        self.log = LocalLog()
        self.positions: dict[Partition, int] = {}
        self.retain = retain
        topo = self.topology
        self._consumed = {*self.stages.ingest.topics, topo.routed, topo.partials}

    def produce(self, topic: str, value: bytes, *, key: bytes | None = None,
                partition: int = 0, timestamp_ms: int = 0) -> None:  # fmt: skip
        """A record on a source topic, as a producer would write it."""
        self.log.append(Message(topic, value, key=key, partition=partition), timestamp_ms)

    def produce_values(self, topic: str, values: Sequence[bytes]) -> None:
        """Bare values on partition 0 of a source topic, in order: what :meth:`produce` of
        each would do (no key, timestamp 0), at a fraction of the cost."""
        self.log.extend(topic, values)

    def unread(self) -> dict[Partition, list[Record]]:
        """What each consumed partition holds beyond its position."""
        unread = {}
        for tp in self.log.partitions:
            if tp[0] in self._consumed:
                records = self.log.read(tp, self.positions.get(tp, 0))
                if records:
                    unread[tp] = records
        return unread

    def step(self, now_ms: int, *, snapshot: bool = False) -> Step | None:
        """One iteration of the worker's loop over everything unread; committed."""
        batches = self.unread()
        lags = dict.fromkeys(self.log.partitions, 0)  # everything is read in one step
        step = self.stages.step(batches, now_ms, lags, snapshot=snapshot)
        if step is None:
            return None
        for message in step.messages:
            if self.retain or message.topic in self._consumed:
                self.log.append(message, now_ms)
        for tp, offset in step.offsets.items():
            self.positions[tp] = offset
            if not self.retain:
                self.log.trim(tp, offset)
        self.stages.committed(step, self.stats)
        return step

    def run(self, now_ms: int) -> int:
        """Step until every stage has consumed all of its input; returns the steps taken."""
        steps = 0
        while self.step(now_ms) is not None:
            steps += 1
            if not self.unread():
                break
        return steps
