"""The demo's start on a fresh broker: its worker's first join finds the group coordinator.

A fresh broker creates its offsets topic on the first coordinator lookup and answers
"coordinator not available" until it has, which aiokafka prints as an ERROR at the
worker's first join: the first thing a new user of ``make demo`` saw. The demo now
waits for the coordinator while it creates its topics (``stream.cli._create_topics``).
Its own broker here: the session's has long had its offsets topic.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaClient
from aiokafka.client import CoordinationType

from stream.cli import _create_topics
from stream.devstack import ensure_kafka_jars, free_port, kafka_process
from stream.settings import load_settings
from tests.helpers import REPO

pytestmark = pytest.mark.integration


async def _lookup_once(bootstrap: str, group: str) -> int:
    """One FindCoordinator request (no retry): the coordinator's node id, or it raises."""
    client = AIOKafkaClient(bootstrap_servers=bootstrap)
    try:
        await client.bootstrap()
        node: int = await client.coordinator_lookup(CoordinationType.GROUP, group)
        return node
    finally:
        await client.close()


def test_a_fresh_broker_names_the_group_coordinator_once_the_demo_has_set_up(
    tmp_path: Path,
) -> None:
    port = free_port()
    broker = kafka_process(
        tmp_path, ensure_kafka_jars(REPO / ".kpimon" / "cache"), port=port,
        controller_port=free_port(),
    )  # fmt: skip
    broker.start()
    try:
        run = uuid.uuid4().hex[:8]
        settings = load_settings(
            kafka_bootstrap=f"127.0.0.1:{port}", group_id=f"kpimon-demo-{run}",
            **{f"topic_{t}": f"demo-{run}.{t}"
               for t in ("impressions", "clicks", "leads", "orders", "spend")},
        )  # fmt: skip
        asyncio.run(asyncio.wait_for(_create_topics(settings), 90))
        # The worker's first lookup: answered at once, no "not available" to print.
        assert asyncio.run(_lookup_once(settings.kafka_bootstrap, settings.group_id)) == 1
    finally:
        broker.stop()
