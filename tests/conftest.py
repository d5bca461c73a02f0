"""Shared fixtures: a real Kafka broker (session), real Prometheus/Alertmanager, workers."""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path

import pytest

from stream.devstack import (
    ManagedProcess,
    alertmanager_process,
    ensure_kafka_jars,
    free_port,
    kafka_process,
    prometheus_process,
)
from tests.helpers import REPO, WorkerProcess, delete_topics, run

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Remember a failed test call, so fixtures can add what explains it to the report."""
    report = yield
    if call.when == "call" and report.failed:
        item.stash[FAILED] = True
    return report


def require_binary(*names: str) -> None:
    """Skip loudly when a server binary is absent; never in CI, where that is a failure."""
    if any(shutil.which(name) for name in names):
        return
    message = f"{' / '.join(names)} not installed (run `make setup` as root on Debian)"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedProcess]:
    """A real single-node KRaft broker for the whole test session."""
    libs = ensure_kafka_jars(REPO / ".kpimon" / "cache")
    port, controller = free_port(), free_port()
    broker = kafka_process(
        tmp_path_factory.mktemp("kafka"), libs, port=port, controller_port=controller
    )
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_broker: ManagedProcess) -> str:
    return f"127.0.0.1:{kafka_broker.ports[0]}"


@pytest.fixture
def topic_names(
    request: pytest.FixtureRequest, kafka_bootstrap: str
) -> Iterator[Callable[[str], str]]:
    """Unique topic names per test (``names("clicks")``); deleted afterwards."""
    stem = re.sub(r"[^A-Za-z0-9]+", "-", request.node.name)[:40].strip("-")
    suffix = uuid.uuid4().hex[:6]
    made: list[str] = []

    def name(base: str) -> str:
        topic = f"t.{stem}.{suffix}.{base}"
        made.append(topic)
        return topic

    yield name
    run(delete_topics(kafka_bootstrap, made))


@pytest.fixture
def worker_env(
    kafka_bootstrap: str, topic_names: Callable[[str], str], tmp_path: Path
) -> dict[str, str]:
    """Environment for a worker on this test's own topics, group and port."""
    return {
        "KPIMON_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "KPIMON_GROUP_ID": f"g-{uuid.uuid4().hex[:8]}",
        "KPIMON_TOPIC_IMPRESSIONS": topic_names("impressions"),
        "KPIMON_TOPIC_CLICKS": topic_names("clicks"),
        "KPIMON_TOPIC_LEADS": topic_names("leads"),
        "KPIMON_TOPIC_ORDERS": topic_names("orders"),
        "KPIMON_TOPIC_SPEND": topic_names("spend"),
        "KPIMON_SHARED_TOPICS": topic_names("events"),
        "KPIMON_DLQ_TOPIC": topic_names("dlq"),
        "KPIMON_ALERTS_TOPIC": topic_names("alerts"),
        "KPIMON_METRICS_HOST": "127.0.0.1",
        "KPIMON_STATE_DIR": str(tmp_path / "state"),
        "KPIMON_CURRENCY_RATES": "EUR=1.1,GBP=1.25",
        "KPIMON_LOG_LEVEL": "INFO",
    }


@pytest.fixture
def start_worker(
    worker_env: dict[str, str], tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., WorkerProcess]]:
    """Start ``kpimon worker`` subprocesses; all are stopped at teardown. When the test
    failed, each log's tail goes into its report (CI keeps only the output)."""
    workers: list[WorkerProcess] = []

    def start(worker_id: str = "w1", module: str = "stream.cli", **extra: str) -> WorkerProcess:
        env = {
            **worker_env,
            "KPIMON_WORKER_ID": worker_id,
            "KPIMON_METRICS_PORT": str(free_port()),
            **extra,
        }
        log_path = tmp_path / f"worker-{worker_id}.log"
        worker = WorkerProcess(env=env, log_path=log_path, module=module).start()
        workers.append(worker)
        return worker

    yield start
    failed = request.node.stash.get(FAILED, False)
    for worker in workers:
        if failed and worker.alive():
            print(f"--- {worker.log_path.stem}'s metrics at the failure ---\n{worker.health()}")
        worker.stop()
    if failed:
        for log, worker in sorted({w.log_path: w for w in workers}.items()):
            print(f"--- last lines of {log.name} ---\n{worker.log_tail(80)}")


@pytest.fixture(scope="session")
def alertmanager_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Alertmanager (Debian package) on a loopback port."""
    require_binary("prometheus-alertmanager", "alertmanager")
    port = free_port()
    proc: ManagedProcess = alertmanager_process(tmp_path_factory.mktemp("alertmanager"), port=port)
    proc.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop()


@pytest.fixture
def start_prometheus(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """Start Debian's Prometheus with the repo's config and rules; returns its base URL.

    ``start(targets, alertmanager=None, interval="1s")`` scrapes ``targets`` as job
    ``kpimon`` and evaluates the rules every ``interval``; all are stopped at teardown.
    """
    require_binary("prometheus")
    started: list[ManagedProcess] = []

    def start(
        targets: Sequence[str], *, alertmanager: str | None = None, interval: str = "1s"
    ) -> str:
        port = free_port()
        proc = prometheus_process(
            tmp_path / f"prometheus-{len(started)}",
            port=port,
            scrape_targets=list(targets),
            alertmanager=alertmanager,
            interval=interval,
        )
        started.append(proc)
        proc.start()
        return f"http://127.0.0.1:{port}"

    yield start
    for proc in started:
        proc.stop()
