"""The worker reads too-late events' originals back from their source (real broker)."""

from __future__ import annotations

import time
import uuid

from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.records_to_delete import RecordsToDelete

from stream.clients import SourceReader
from stream.settings import Settings
from tests.helpers import create_topics, produce, run


async def _delete_before(bootstrap: str, topic: str, offset: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_records({TopicPartition(topic, 0): RecordsToDelete(offset)})
    finally:
        await admin.close()


Coordinates = tuple[str, int, int]


async def _read(
    bootstrap: str, wanted: list[Coordinates]
) -> dict[Coordinates, tuple[bytes | None, bytes]]:
    reader = SourceReader(Settings(kafka_bootstrap=bootstrap, worker_id="read-back-test"))
    try:
        return await reader.read(wanted, timeout_s=20)
    finally:
        await reader.stop()


def test_records_are_read_back_by_coordinates_and_removed_ones_are_left_out(
    kafka_bootstrap: str,
) -> None:
    topic = f"read-back-{uuid.uuid4().hex[:8]}"
    run(create_topics(kafka_bootstrap, [topic], partitions=1))
    values = [f'{{"event_id": "e{i}", "pad": "{"x" * 5000}"}}'.encode() for i in range(3000)]
    run(produce(kafka_bootstrap, [(topic, f"k{i}".encode(), v) for i, v in enumerate(values)]))
    run(_delete_before(kafka_bootstrap, topic, 10))  # as retention would
    wanted = [(topic, 0, o) for o in (3, 12, 13, 2500, 2999)]
    started = time.monotonic()
    found = run(_read(kafka_bootstrap, wanted))
    assert found == {(topic, 0, o): (f"k{o}".encode(), values[o]) for o in (12, 13, 2500, 2999)}
    assert time.monotonic() - started < 15, "a removed record is given up at once, not waited for"
