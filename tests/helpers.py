"""Test helpers: condition waits, a worker subprocess, Kafka produce/consume."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from prometheus_client.parser import text_string_to_metric_families

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[1]


def wait_for(
    check: Callable[[], T | None], *, timeout: float, what: str, interval: float = 0.2
) -> T:
    """Poll until ``check`` returns something truthy; fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


async def until(check: Callable[[], bool], *, within: float, interval: float = 0.02) -> None:
    """Poll ``check`` on the running loop (other tasks run between polls) until it holds;
    TimeoutError after ``within`` seconds. The async twin of :func:`wait_for`."""
    async with asyncio.timeout(within):
        while not check():  # noqa: ASYNC110 (a polled condition)
            await asyncio.sleep(interval)


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def prom_query(base_url: str, expr: str, at: float | None = None) -> list[dict[str, Any]]:
    """Result vector of an instant PromQL query (``at``: evaluation time, epoch seconds)."""
    params = {"query": expr} if at is None else {"query": expr, "time": repr(at)}
    body = get_json(f"{base_url}/api/v1/query?{urllib.parse.urlencode(params)}")
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Samples of a /metrics page keyed by (name, labels)."""
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def sample(
    samples: Mapping[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float | None:
    return samples.get((name, frozenset(labels.items())))


HEALTH = (
    "kpimon_replaying", "kpimon_restating", "kpimon_watermark_lag_seconds",
    "kpimon_window_end_timestamp_seconds", "kpimon_consumer_lag_records",
    "kpimon_outbox_pending", "kpimon_notifications", "kpimon_alerts_firing",
    "kpimon_transactions", "kpimon_event_loop_stall_max_seconds", "kpimon_partition_stalled",
)  # fmt: skip
"""The metrics of :meth:`WorkerProcess.health`."""


@dataclass
class WorkerProcess:
    """``kpimon worker`` as a real subprocess with its own env and log file."""

    env: dict[str, str]
    log_path: Path
    module: str = "stream.cli"
    """Run as ``python -m MODULE worker`` (a test may wrap the CLI)."""
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.env['KPIMON_METRICS_PORT']}/metrics"

    def start(self) -> WorkerProcess:
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", self.module, "worker"],
                cwd=REPO,
                env={**os.environ, **self.env},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def scrape(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float] | None:
        try:
            return scrape(self.metrics_url)
        except OSError:
            return None

    def wait_ready(self, timeout: float = 60) -> None:
        def ready() -> bool:
            assert self.alive(), f"worker exited:\n{self.log_tail()}"
            return self.scrape() is not None

        wait_for(ready, timeout=timeout, what="worker /metrics")

    def health(self) -> str:
        """The worker's own gauges and counters (no per-segment KPIs): what says why it
        did not do what a test waited for (held, replaying, lagging, not delivering)."""
        try:
            with urllib.request.urlopen(self.metrics_url, timeout=5) as resp:
                text = resp.read().decode()
        except OSError as exc:
            return f"/metrics: {exc}"
        return "\n".join(line for line in text.splitlines() if line.startswith(HEALTH))

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        os.killpg(self.proc.pid, sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(10)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def create_topics(
    bootstrap: str,
    topics: Iterable[str],
    partitions: int = 3,
    configs: dict[str, str] | None = None,
) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(t, partitions, 1, topic_configs=configs or {}) for t in topics]
        )
    finally:
        await admin.close()


async def delete_topics(bootstrap: str, topics: Iterable[str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        doomed = [t for t in topics if t in existing]
        if doomed:
            await admin.delete_topics(doomed)
    finally:
        await admin.close()


async def produce(
    bootstrap: str,
    messages: Iterable[tuple[str, bytes | None, bytes | None]],
    max_request_size: int = 4 << 20,
) -> None:
    """Send (topic, key, value) triples and wait until all are acknowledged."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", max_request_size=max_request_size
    )
    await producer.start()
    try:
        futures = [await producer.send(t, value=v, key=k) for t, k, v in messages]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def consume_all(bootstrap: str, topic: str, *, expect: int, within: float) -> list[Any]:
    """Read a topic from the start (committed records only) until ``expect`` records arrive."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        isolation_level="read_committed",
        max_partition_fetch_bytes=4 << 20,
    )
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic)
        deadline = time.monotonic() + within
        while not partitions and time.monotonic() < deadline:
            await consumer._client.force_metadata_update()
            partitions = consumer.partitions_for_topic(topic)
        assert partitions, f"topic {topic} does not exist"
        tps = [TopicPartition(topic, p) for p in partitions]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        records: list[Any] = []
        while len(records) < expect and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            for recs in batch.values():
                records.extend(recs)
        # One more short read: more records than expected is a failure too.
        batch = await consumer.getmany(timeout_ms=300)
        for recs in batch.values():
            records.extend(recs)
        return records
    finally:
        await consumer.stop()


async def group_lag(bootstrap: str, group: str, topics: Iterable[str]) -> int:
    """Records of ``topics`` (written without transactions: a commit marker takes an offset)
    not yet committed by consumer group ``group``."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, isolation_level="read_committed")
    await admin.start()
    await consumer.start()
    try:
        cluster = await consumer._client.fetch_all_metadata()  # a fresh client knows no topic
        committed = await admin.list_consumer_group_offsets(group)
        tps = [TopicPartition(t, p) for t in topics for p in cluster.partitions_for_topic(t) or ()]
        assert tps, f"no partitions of {list(topics)}"
        ends = await consumer.end_offsets(tps)
        return sum(
            end - (committed[tp].offset if tp in committed else 0) for tp, end in ends.items()
        )
    finally:
        await consumer.stop()
        await admin.close()
