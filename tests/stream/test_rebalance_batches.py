"""Records fetched while a rebalance restores state are dropped when the restore moved
their partition (aiokafka assigns before it runs the listener)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

from aiokafka import AIOKafkaConsumer, TopicPartition

from stream.clients import still_current

PARTIALS = TopicPartition("g.partials", 0)
ROUTED = TopicPartition("g.routed", 1)
REVOKED = TopicPartition("g.routed", 2)


@dataclass
class Record:
    offset: int


@dataclass
class FakeConsumer:
    positions: dict[TopicPartition, int] = field(default_factory=dict)

    def assignment(self) -> set[TopicPartition]:
        return set(self.positions)

    async def position(self, tp: TopicPartition) -> int:
        return self.positions[tp]


def batch(first: int, last: int) -> list[Any]:
    return [Record(o) for o in range(first, last + 1)]


async def test_stale_records_are_dropped_current_ones_kept() -> None:
    consumer = FakeConsumer({
        PARTIALS: 11,  # the scope restore sought back to its snapshot's offset
        ROUTED: 31,  # consumed normally: the position is past the batch
    })  # fmt: skip
    batches = {PARTIALS: batch(24, 30), ROUTED: batch(20, 30), REVOKED: batch(5, 9)}
    kept = await still_current(cast(AIOKafkaConsumer, consumer), batches)
    assert kept == {ROUTED: batches[ROUTED]}


async def test_a_kept_partition_restarting_from_its_commit_is_fetched_again() -> None:
    consumer = FakeConsumer({ROUTED: 20})  # reassigned: back at the committed offset
    kept = await still_current(cast(AIOKafkaConsumer, consumer), {ROUTED: batch(20, 30)})
    assert kept == {}
