"""The local stack: `kpimon dev up/down`, and a real Prometheus/Alertmanager with our configs.

The offline checks of the configs (promtool, amtool) are in tests/prometheus/.
"""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from stream.devstack import (
    free_port,
    http_ok,
    kafka_api_versions_ok,
    port_open,
)
from tests.conftest import require_binary
from tests.helpers import REPO, WorkerProcess, get_json, wait_for

pytestmark = pytest.mark.integration


def _kpimon(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stream.cli", *args],
        cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True,
        timeout=300, check=False,
    )  # fmt: skip


def test_dev_up_down_idempotent(tmp_path: Path) -> None:
    require_binary("prometheus")
    require_binary("prometheus-alertmanager", "alertmanager")
    state = tmp_path / "state"
    state.mkdir()
    (state / "cache").symlink_to(REPO / ".kpimon" / "cache")  # reuse the jar cache
    ports = {name: free_port() for name in ("kafka", "controller", "prom", "am", "metrics")}
    env = {
        "KPIMON_STATE_DIR": str(state),
        "KPIMON_DEV_KAFKA_PORT": str(ports["kafka"]),
        "KPIMON_DEV_KAFKA_CONTROLLER_PORT": str(ports["controller"]),
        "KPIMON_DEV_PROMETHEUS_PORT": str(ports["prom"]),
        "KPIMON_DEV_ALERTMANAGER_PORT": str(ports["am"]),
        "KPIMON_METRICS_PORT": str(ports["metrics"]),
    }
    try:
        up = _kpimon("dev", "up", env=env)
        assert up.returncode == 0, up.stderr
        for name in ("kafka", "alertmanager", "prometheus"):
            assert f"{name}" in up.stdout and "started" in up.stdout
        assert f"127.0.0.1:{ports['kafka']}" in up.stdout
        assert kafka_api_versions_ok("127.0.0.1", ports["kafka"])
        assert http_ok(f"http://127.0.0.1:{ports['prom']}/-/ready")
        assert http_ok(f"http://127.0.0.1:{ports['am']}/-/ready")
        pids = {p.stem: int(p.read_text()) for p in (state / "dev").glob("*.pid")}
        assert set(pids) == {"kafka", "alertmanager", "prometheus"}

        again = _kpimon("dev", "up", env=env)
        assert again.returncode == 0, again.stderr
        assert again.stdout.count("already running") == 3
        assert {p.stem: int(p.read_text()) for p in (state / "dev").glob("*.pid")} == pids
    finally:
        down = _kpimon("dev", "down", env=env)
    assert down.returncode == 0, down.stderr
    assert down.stdout.count("stopped") == 3
    for port in (ports["kafka"], ports["prom"], ports["am"]):
        assert not port_open("127.0.0.1", port)
    for pid in pids.values():
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()
    assert not list((state / "dev").glob("*.pid"))
    assert _kpimon("dev", "down", env=env).returncode == 0


def test_dev_up_reports_a_busy_port(tmp_path: Path) -> None:
    """A port taken by something else is a clear error, not a hang."""
    import socket

    state = tmp_path / "state"
    state.mkdir()
    (state / "cache").symlink_to(REPO / ".kpimon" / "cache")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        env = {
            "KPIMON_STATE_DIR": str(state),
            "KPIMON_DEV_KAFKA_PORT": str(busy.getsockname()[1]),
            "KPIMON_DEV_KAFKA_CONTROLLER_PORT": str(free_port()),
            "KPIMON_DEV_PROMETHEUS_PORT": str(free_port()),
            "KPIMON_DEV_ALERTMANAGER_PORT": str(free_port()),
        }
        up = _kpimon("dev", "up", env=env)
    _kpimon("dev", "down", env=env)
    assert up.returncode == 1
    assert "kafka" in up.stderr and "in use" in up.stderr


@pytest.fixture
def prometheus_url(
    start_prometheus: Callable[..., str],
    start_worker: Callable[..., WorkerProcess],
    alertmanager_url: str,
) -> tuple[str, WorkerProcess]:
    worker = start_worker()
    worker.wait_ready()
    url = start_prometheus(
        [f"127.0.0.1:{worker.env['KPIMON_METRICS_PORT']}"],
        alertmanager=alertmanager_url.removeprefix("http://"),
    )
    return url, worker


def test_prometheus_scrapes_worker_with_rules_and_alertmanager(
    prometheus_url: tuple[str, WorkerProcess],
) -> None:
    url, _ = prometheus_url
    query = urllib.parse.quote('kpimon_events_total{type="click"}')

    def scraped() -> bool:
        result = get_json(f"{url}/api/v1/query?query={query}")["data"]["result"]
        return bool(result) and result[0]["value"][1] == "0"

    wait_for(scraped, timeout=30, what="Prometheus to scrape the worker")
    groups = get_json(f"{url}/api/v1/rules")["data"]["groups"]
    names = {rule["name"] for group in groups for rule in group["rules"]}
    assert {"KpimonWorkerDown", "KpimonEventsRejected", "scope:kpimon_kpi:ratio"} <= names
    for group in groups:
        for rule in group["rules"]:
            assert rule["health"] in {"ok", "unknown"}, rule
            if rule["type"] == "alerting":
                assert rule["annotations"].get("runbook_url"), rule["name"]
    wait_for(
        lambda: get_json(f"{url}/api/v1/alertmanagers")["data"]["activeAlertmanagers"],
        timeout=30, what="Prometheus to discover Alertmanager",
    )  # fmt: skip
