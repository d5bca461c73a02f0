"""SIGTERM stops the worker within ``KPIMON_SHUTDOWN_TIMEOUT_SECONDS`` in every state.

States: idle, under load (events streaming in), mid-rebalance (a second worker
joins), while restoring state (a restart with a large changelog), and with the
broker unreachable (its own broker, stopped first). Each measures from the
signal to the process's exit against the bound (a correctness bound from
docker compose / Kubernetes, which send SIGKILL 10-30 s after SIGTERM), expects
exit code 0 (the graceful path finished; the watchdog would exit 1), and where
events were in flight checks that the counts are exact after a restart: an
abandoned transaction must be as harmless as after ``kill -9``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from stream.devstack import ManagedProcess, ensure_kafka_jars, free_port, kafka_process
from tests.helpers import REPO, WorkerProcess, produce, run, wait_for
from tests.integration.test_exactness import (
    Dataset,
    Message,
    build_dataset,
    check_exact,
    pipeline_counter,
    wait_for_clicks,
)

pytestmark = pytest.mark.integration

BOUND = 10.0
"""The default of KPIMON_SHUTDOWN_TIMEOUT_SECONDS (the tests leave it unset)."""


@pytest.fixture
def env(worker_env: dict[str, str]) -> dict[str, str]:
    worker_env.update(KPIMON_EVAL_INTERVAL_SECONDS="1", KPIMON_SNAPSHOT_INTERVAL_SECONDS="1",
                      KPIMON_MAX_BATCH_RECORDS="500")  # fmt: skip
    return worker_env


@pytest.fixture
def spawn(env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start a worker (own log file per start, so each run's lines can be told apart)."""
    started: list[WorkerProcess] = []

    def start(worker_id: str = "w1", **extra: str) -> WorkerProcess:
        worker = WorkerProcess(
            env={**env, "KPIMON_WORKER_ID": worker_id, "KPIMON_METRICS_PORT": str(free_port()),
                 **extra},
            log_path=tmp_path / f"{len(started)}-{worker_id}.log",
        ).start()  # fmt: skip
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop(signal.SIGKILL)


def log_of(worker: WorkerProcess) -> str:
    return worker.log_path.read_text(errors="replace")


def stop_within_bound(worker: WorkerProcess, state: str) -> float:
    """SIGTERM; the process must exit by itself (code 0) within the bound."""
    assert worker.proc is not None and worker.alive(), f"{state}: not running\n{worker.log_tail()}"
    signalled = time.monotonic()
    os.killpg(worker.proc.pid, signal.SIGTERM)
    try:
        code = worker.proc.wait(BOUND + 10)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{state}: still running {BOUND + 10:g} s after SIGTERM\n"
                             f"{worker.log_tail()}") from None  # fmt: skip
    taken = time.monotonic() - signalled
    assert taken <= BOUND, f"{state}: exited {taken:.1f} s after SIGTERM\n{worker.log_tail()}"
    assert code == 0, f"{state}: exit code {code}\n{worker.log_tail()}"
    assert "stopped in" in log_of(worker), worker.log_tail()
    return taken


def events_counted(worker: WorkerProcess) -> float:
    return pipeline_counter([worker], "kpimon_events_total")


class Feeder(threading.Thread):
    """Produces messages at a steady pace from its own thread: events keep streaming in
    while the test signals the worker."""

    def __init__(self, bootstrap: str, messages: list[Message], per_second: int) -> None:
        super().__init__(daemon=True)
        self.bootstrap, self.messages, self.per_second = bootstrap, messages, per_second
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            asyncio.run(self._feed())
        except BaseException as exc:  # surfaced by finish()
            self.error = exc

    async def _feed(self) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all")
        await producer.start()
        try:
            step = max(1, self.per_second // 20)
            for i in range(0, len(self.messages), step):
                paced = time.monotonic() + 0.05
                sent = [await producer.send(topic, value, key=key)
                        for topic, key, value in self.messages[i : i + step]]  # fmt: skip
                await asyncio.gather(*sent)
                await asyncio.sleep(max(0.0, paced - time.monotonic()))
        finally:
            await producer.stop()

    def finish(self) -> None:
        self.join(120)
        assert not self.is_alive(), "feeder did not finish"
        if self.error is not None:
            raise self.error


def finish_exact(worker: WorkerProcess, env: dict[str, str], data: Dataset) -> None:
    """The surviving or restarted worker ends with exact counts (the stopped process took
    its own counters with it, so those are not compared)."""
    wait_for_clicks([worker], data)  # orders must find their clicks
    for phase in data.phases[1:]:
        run(produce(env["KPIMON_KAFKA_BOOTSTRAP"], phase))
    check_exact([worker], data, counters=False)


def test_idle(spawn: Callable[..., WorkerProcess]) -> None:
    worker = spawn()
    worker.wait_ready()
    wait_for(lambda: "state ready" in log_of(worker), timeout=60, what="state restored")
    stop_within_bound(worker, "idle")


def test_under_load_then_exact(spawn: Callable[..., WorkerProcess], env: dict[str, str]) -> None:
    data = build_dataset(env, time.time(), seed=21)
    first = data.phases[0]
    worker = spawn()
    worker.wait_ready()
    feeder = Feeder(env["KPIMON_KAFKA_BOOTSTRAP"], first, per_second=1500)  # ~10 s of events
    feeder.start()
    wait_for(lambda: events_counted(worker) > 1000, timeout=60, what="events flowing")
    assert feeder.is_alive(), "the events were all sent before the signal: not under load"
    stop_within_bound(worker, "under load")
    feeder.finish()
    restarted = spawn()
    restarted.wait_ready()
    finish_exact(restarted, env, data)


def test_mid_rebalance_then_exact(spawn: Callable[..., WorkerProcess], env: dict[str, str]) -> None:
    data = build_dataset(env, time.time(), seed=22)
    first = data.phases[0]
    leaving = spawn("w1")
    leaving.wait_ready()
    feeder = Feeder(env["KPIMON_KAFKA_BOOTSTRAP"], first, per_second=2000)
    feeder.start()
    wait_for(lambda: events_counted(leaving) > 0, timeout=60, what="events flowing")
    joining = spawn("w2")
    # w1 gave up its partitions and is rejoining: mid-rebalance.
    wait_for(lambda: "partitions revoked" in log_of(leaving), timeout=60, interval=0.02,
             what="w1 to start rebalancing")  # fmt: skip
    stop_within_bound(leaving, "mid-rebalance")
    rebalance = log_of(leaving).split("partitions revoked", 1)[1]
    signalled = rebalance.index("SIGTERM")
    assert "state ready" not in rebalance[:signalled], "the rebalance was over at the signal"
    feeder.finish()
    finish_exact(joining, env, data)


def bulk_impressions(env: dict[str, str], data: Dataset, n: int, now_s: float) -> list[Message]:
    """``n`` distinct impressions (a large dedup changelog to restore), added to what
    ``data`` expects."""
    topic = env["KPIMON_TOPIC_IMPRESSIONS"]
    start_ms = int(now_s * 1000) - 6 * 60_000
    messages: list[Message] = []
    for i in range(n):
        campaign = f"bulk{i % 4}"
        ts = start_ms + (i * 7919) % (4 * 60_000)
        event = {"event_id": f"bulk-{i}", "ts": ts, "campaign_id": campaign, "channel": "display"}
        messages.append((topic, campaign.encode(), json.dumps(event).encode()))
        data.cells.setdefault(("display", campaign, ts // 60_000), [0] * 7)[0] += 1
    data.valid += n
    return messages


def test_while_restoring_then_exact(
    spawn: Callable[..., WorkerProcess], env: dict[str, str]
) -> None:
    now = time.time()
    data = build_dataset(env, now, seed=23)
    bulk = bulk_impressions(env, data, 100_000, now)
    worker = spawn(KPIMON_MAX_BATCH_RECORDS="20000")
    worker.wait_ready()
    run(produce(env["KPIMON_KAFKA_BOOTSTRAP"], bulk + data.phases[0]))
    total = len(bulk) + len(data.phases[0])
    wait_for(lambda: events_counted(worker) >= total, timeout=120, what=f"{total} events in")
    stop_within_bound(worker, "idle with state")

    restoring = spawn()
    wait_for(lambda: "partitions assigned" in log_of(restoring), timeout=60, interval=0.02,
             what="the restore to start")  # fmt: skip
    stop_within_bound(restoring, "restoring")
    lines = log_of(restoring)
    assert "state restore abandoned" in lines and "state ready" not in lines, lines

    restarted = spawn()
    restarted.wait_ready()
    finish_exact(restarted, env, data)


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[ManagedProcess]:
    """A broker of this test's own: stopping it must not disturb the other tests."""
    libs = ensure_kafka_jars(REPO / ".kpimon" / "cache")
    broker = kafka_process(tmp_path / "kafka", libs, port=free_port(), controller_port=free_port())
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def test_broker_unreachable_then_exact(
    spawn: Callable[..., WorkerProcess], env: dict[str, str], own_broker: ManagedProcess
) -> None:
    bootstrap = f"127.0.0.1:{own_broker.ports[0]}"
    env["KPIMON_KAFKA_BOOTSTRAP"] = bootstrap
    data = build_dataset(env, time.time(), seed=24)
    worker = spawn()
    worker.wait_ready()
    run(produce(bootstrap, data.phases[0]))
    wait_for(lambda: events_counted(worker) > 0, timeout=60, what="events flowing")
    own_broker.stop()
    stop_within_bound(worker, "broker unreachable")

    own_broker.start()
    restarted = spawn()
    restarted.wait_ready()
    finish_exact(restarted, env, data)
