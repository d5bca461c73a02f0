"""`python -m stream.ops` (the runbooks' Kafka checks) against a real broker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import OffsetAndMetadata

from stream.ops import main
from tests.helpers import REPO, create_topics, produce, run

pytestmark = pytest.mark.integration


async def _produce_with_headers(bootstrap: str, topic: str, n: int) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for i in range(n):
            value = b"\xff not utf-8" if i == n - 1 else json.dumps({"i": i}).encode()
            await producer.send_and_wait(
                topic, value=value, key=f"k{i}".encode(), partition=i % 2,
                timestamp_ms=1_795_000_000_000 + i * 1000,
                headers=[("kpimon.reason", b"not_json"), ("kpimon.source.offset", str(i).encode())],
            )  # fmt: skip
    finally:
        await producer.stop()


async def _commit(bootstrap: str, group: str, offsets: dict[TopicPartition, int]) -> None:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        consumer.assign(list(offsets))
        await consumer.commit({tp: OffsetAndMetadata(o, "") for tp, o in offsets.items()})
    finally:
        await consumer.stop()


def test_tail_prints_the_newest_records_with_headers(
    kafka_bootstrap: str,
    topic_names: Callable[[str], str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    topic = topic_names("dlq")
    run(create_topics(kafka_bootstrap, [topic], partitions=2))
    run(_produce_with_headers(kafka_bootstrap, topic, 7))
    monkeypatch.setenv("KPIMON_KAFKA_BOOTSTRAP", kafka_bootstrap)

    assert main(["tail", topic, "-n", "3"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["key"] for line in lines] == ["k4", "k5", "k6"]  # oldest first, across partitions
    assert lines[0]["value"] == {"i": 4}
    assert lines[2]["value"] == "\ufffd not utf-8"
    assert lines[1]["headers"] == {"kpimon.reason": "not_json", "kpimon.source.offset": "5"}
    assert lines[0]["timestamp"] == "2026-11-18T11:06:44+00:00"

    assert main(["tail", f"{topic}-missing"]) == 1
    assert "does not exist" in capsys.readouterr().err


def _strict(name: str) -> Any:
    raise AssertionError(f"{name} in the output: not JSON")


def test_tail_prints_any_payload(kafka_bootstrap: str, topic_names: Callable[[str], str]) -> None:
    """Dead letters are whatever producers sent: the tail prints each as one strict JSON line."""
    topic = topic_names("dlq")
    run(create_topics(kafka_bootstrap, [topic], partitions=1))
    nested = b"[" * 30_000 + b"]" * 30_000  # 60 KB, dead-lettered as not_json
    payloads = [
        nested,
        b'{"s": "\\ud800 lone surrogate"}',  # valid JSON, not valid UTF-8 once decoded
        b"[NaN, Infinity]",
        b"\x00\x01\xff\xfe binary",
        b"[" * 101 + b"]" * 101,  # parseable, but deeper than an event ever is
        b'{"ok": ["fine", 1]}',
    ]
    run(produce(kafka_bootstrap, [(topic, nested, value) for value in payloads]))
    proc = subprocess.run(
        [sys.executable, "-m", "stream.ops", "tail", topic, "-n", str(len(payloads))],
        cwd=REPO,
        env={**os.environ, "KPIMON_KAFKA_BOOTSTRAP": kafka_bootstrap},
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
    assert proc.stderr == b""
    lines = [json.loads(line, parse_constant=_strict) for line in proc.stdout.splitlines()]
    values = [line["value"] for line in lines]
    assert values[0] == nested.decode() and lines[0]["key"] == nested.decode()
    assert values[1] == {"s": "\ud800 lone surrogate"}
    assert values[2] == "[NaN, Infinity]"
    assert values[3] == "\x00\x01\ufffd\ufffd binary"
    assert values[4] == "[" * 101 + "]" * 101
    assert values[5] == {"ok": ["fine", 1]}


def test_lag_per_partition_and_topic(
    kafka_bootstrap: str,
    topic_names: Callable[[str], str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    topic = topic_names("clicks")
    group = f"g-{uuid.uuid4().hex[:8]}"
    run(create_topics(kafka_bootstrap, [topic], partitions=2))
    run(_produce_with_headers(kafka_bootstrap, topic, 10))  # 5 records per partition
    run(_commit(kafka_bootstrap, group, {TopicPartition(topic, 0): 2, TopicPartition(topic, 1): 5}))
    monkeypatch.setenv("KPIMON_KAFKA_BOOTSTRAP", kafka_bootstrap)

    assert main(["lag", "--group", group]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert rows[0] == ["topic", "partition", "committed", "end", "lag"]
    assert rows[1:3] == [[topic, "0", "2", "5", "3"], [topic, "1", "5", "5", "0"]]
    assert rows[3] == ["total", topic, "3"]

    monkeypatch.setenv("KPIMON_GROUP_ID", f"{group}-none")
    assert main(["lag"]) == 1
    assert "no committed offsets" in capsys.readouterr().err
