"""The local stack without Docker: a real Kafka broker, Prometheus and Alertmanager.

Kafka's jars are resolved from Maven Central with the machine's Maven into a
cache folder once; later starts reuse them. Every server runs as its own
process group on loopback, is waited on until it answers its real protocol
(Kafka ApiVersions, ``/-/ready``), and is stopped with SIGTERM then SIGKILL.
``kpimon dev up/down`` and the test fixtures share these classes.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

KAFKA_VERSION = "3.9.1"
_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>dev.kpimon</groupId><artifactId>kafka-runtime</artifactId><version>1</version>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId>
      <version>{version}</version></dependency>
    <dependency><groupId>org.slf4j</groupId><artifactId>slf4j-reload4j</artifactId>
      <version>1.7.36</version></dependency>
  </dependencies>
</project>
"""
_LOG4J = """log4j.rootLogger=WARN, stdout
log4j.appender.stdout=org.apache.log4j.ConsoleAppender
log4j.appender.stdout.layout=org.apache.log4j.PatternLayout
log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka.server.KafkaRaftServer=INFO
"""
PROJECT_ROOT = Path(__file__).resolve().parent.parent


class DevStackError(RuntimeError):
    """A local server could not be installed, started or reached."""


def free_port() -> int:
    """A loopback port that is free right now (for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def port_open(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


def wait_until(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> None:
    """Poll ``check`` until it is true; raise DevStackError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        if time.monotonic() > deadline:
            raise DevStackError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def ensure_kafka_jars(cache_dir: Path, *, version: str = KAFKA_VERSION) -> Path:
    """Resolve Kafka and its runtime dependencies into ``cache_dir``; return the lib dir."""
    libs = cache_dir.resolve() / f"kafka-{version}" / "libs"
    marker = libs / ".complete"
    if marker.exists():
        return libs
    mvn = shutil.which("mvn")
    if mvn is None:
        raise DevStackError("Maven (mvn) is not installed: apt-get install maven")
    libs.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="libs-", dir=libs.parent))
    pom = staging / "pom.xml"
    pom.write_text(_POM.format(version=version))
    cmd = [
        mvn, "-q", "-B", "-f", str(pom), "dependency:copy-dependencies",
        f"-DoutputDirectory={staging / 'jars'}", "-DincludeScope=runtime",
    ]  # fmt: skip
    log.info("resolving Apache Kafka %s from Maven Central into %s", version, libs)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
        raise DevStackError("mvn could not resolve Kafka:\n" + "\n".join(tail))
    if libs.exists():
        shutil.rmtree(libs)
    (staging / "jars").rename(libs)
    shutil.rmtree(staging, ignore_errors=True)
    marker.write_text(version + "\n")
    return libs


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still "exists": read its state to tell.
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    return True


@dataclass
class ManagedProcess:
    """A server process in its own process group, tracked by a pid file."""

    name: str
    argv: Sequence[str]
    workdir: Path
    ready: Callable[[], bool]
    ports: tuple[int, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    start_timeout: float = 90.0
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def pid_file(self) -> Path:
        return self.workdir / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def pid(self) -> int | None:
        """The pid of the running server, or None (a stale pid file is removed)."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        if _pid_alive(pid):
            return pid
        self.pid_file.unlink(missing_ok=True)
        return None

    def start(self) -> bool:
        """Start unless already running; wait until ready. True if it was started now."""
        if self.pid() is not None:
            wait_until(self.ready, self.start_timeout, f"running {self.name} to answer")
            return False
        for port in self.ports:
            if port_open("127.0.0.1", port):
                raise DevStackError(
                    f"{self.name}: port {port} is already in use by another process"
                )
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as out:
            log_start = out.tell()
            self._proc = subprocess.Popen(
                list(self.argv),
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
                start_new_session=True,
            )
        self.pid_file.write_text(f"{self._proc.pid}\n")

        def ready_or_dead() -> bool:
            if self._proc is not None and self._proc.poll() is not None:
                with self.log_file.open("rb") as logged:
                    logged.seek(log_start)
                    tail = logged.read().decode(errors="replace").splitlines()[-20:]
                raise DevStackError(
                    f"{self.name} exited with {self._proc.returncode}:\n" + "\n".join(tail)
                )
            return self.ready()

        try:
            wait_until(ready_or_dead, self.start_timeout, f"{self.name} to answer")
        except DevStackError:
            self.stop()
            raise
        return True

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop the server (SIGTERM, then SIGKILL). True if something was running."""
        pid = self.pid()
        if pid is None:
            return False
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, sig)
            if self._proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._proc.wait(wait)
            with contextlib.suppress(DevStackError):
                wait_until(lambda: not _pid_alive(pid), wait, f"{self.name} to stop")
            if not _pid_alive(pid):
                break
        self.pid_file.unlink(missing_ok=True)
        return True


def kafka_api_versions_ok(host: str, port: int) -> bool:
    """True when a broker answers an ApiVersions request without error."""
    client = b"kpimon-devstack"
    body = struct.pack(">hhih", 18, 0, 1, len(client)) + client
    try:
        with socket.create_connection((host, port), timeout=2.0) as sock:
            sock.sendall(struct.pack(">i", len(body)) + body)
            header = sock.recv(4)
            if len(header) < 4:
                return False
            size = struct.unpack(">i", header)[0]
            data = b""
            while len(data) < min(size, 6):
                chunk = sock.recv(size - len(data))
                if not chunk:
                    return False
                data += chunk
            correlation, error = struct.unpack(">ih", data[:6])
            return bool(correlation == 1 and error == 0)
    except OSError:
        return False


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2.0) as resp:
            return 200 <= int(resp.status) < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def kafka_process(
    workdir: Path, libs: Path, *, port: int = 9092, controller_port: int = 9094,
    partitions: int = 3, name: str = "kafka",
) -> ManagedProcess:  # fmt: skip
    """A single-node KRaft broker+controller on 127.0.0.1:port (formatted on first use)."""
    workdir = workdir.resolve()
    data = workdir / f"{name}-data"
    props = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@127.0.0.1:{controller_port}",
        "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port}",
        "controller.listener.names": "CONTROLLER",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "inter.broker.listener.name": "PLAINTEXT",
        "log.dirs": str(data),
        "num.partitions": str(partitions),
        "offsets.topic.replication.factor": "1",
        "offsets.topic.num.partitions": "10",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "transaction.state.log.num.partitions": "10",
        "group.initial.rebalance.delay.ms": "0",
        "auto.create.topics.enable": "true",
    }
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / f"{name}.properties"
    config.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
    log4j = workdir / f"{name}-log4j.properties"
    log4j.write_text(_LOG4J)
    java = shutil.which("java") or "java"
    classpath = f"{libs}/*"
    if not (data / "meta.properties").exists():
        data.mkdir(parents=True, exist_ok=True)
        fmt = subprocess.run(
            [java, "-cp", classpath, f"-Dlog4j.configuration=file:{log4j}",
             "kafka.tools.StorageTool", "format", f"--cluster-id={_cluster_id()}",
             "-c", str(config), "--ignore-formatted"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if fmt.returncode != 0:
            raise DevStackError("formatting the KRaft log dir failed:\n" + fmt.stderr[-2000:])
    argv = [
        java, "-Xms256m", "-Xmx1g", "-XX:+UseG1GC", "-Djava.awt.headless=true",
        f"-Dlog4j.configuration=file:{log4j}", "-cp", classpath, "kafka.Kafka", str(config),
    ]  # fmt: skip
    return ManagedProcess(
        name=name,
        argv=argv,
        workdir=workdir,
        ready=lambda: kafka_api_versions_ok("127.0.0.1", port),
        ports=(port, controller_port),
    )


def _cluster_id() -> str:
    """A Kafka cluster id: 16 random bytes, URL-safe base64 without padding."""
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


def render_prometheus_config(
    source: Path, *, scrape_targets: Sequence[str], alertmanager: str | None,
    interval: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The compose Prometheus config with loopback targets and absolute rule paths."""
    config: dict[str, Any] = yaml.safe_load(source.read_text())
    for job in config.get("scrape_configs", []):
        if job.get("job_name") == "kpimon":
            job["static_configs"] = [{"targets": list(scrape_targets)}]
        elif job.get("job_name") == "prometheus":
            job["static_configs"] = [{"targets": []}]
    if interval is not None:
        config.setdefault("global", {})["scrape_interval"] = interval
        config["global"]["evaluation_interval"] = interval
    config["rule_files"] = [str(source.parent / path) for path in config.get("rule_files", [])]
    if alertmanager is None:
        config.pop("alerting", None)
    else:
        config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]}
    return config


def prometheus_process(
    workdir: Path, *, port: int, scrape_targets: Sequence[str], alertmanager: str | None,
    interval: str | None = None, name: str = "prometheus",
) -> ManagedProcess:  # fmt: skip
    """Debian's Prometheus on 127.0.0.1:port with the repo's config and rule files."""
    binary = shutil.which("prometheus")
    if binary is None:
        raise DevStackError("prometheus is not installed: apt-get install prometheus")
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / f"{name}.yml"
    rendered = render_prometheus_config(
        PROJECT_ROOT / "prometheus" / "prometheus.yml",
        scrape_targets=scrape_targets,
        alertmanager=alertmanager,
        interval=interval,
    )
    config.write_text(yaml.safe_dump(rendered, sort_keys=False))
    return _prometheus_style(
        name, workdir, port,
        [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / (name + '-data')}",
         "--web.enable-lifecycle"],
    )  # fmt: skip


def _prometheus_style(name: str, workdir: Path, port: int, argv: list[str]) -> ManagedProcess:
    """A Prometheus-family server on 127.0.0.1:port, ready when ``/-/ready`` answers."""
    return ManagedProcess(
        name=name,
        argv=[*argv, f"--web.listen-address=127.0.0.1:{port}"],
        workdir=workdir,
        ready=lambda: http_ok(f"http://127.0.0.1:{port}/-/ready"),
        ports=(port,),
    )


def alertmanager_process(
    workdir: Path, *, port: int, name: str = "alertmanager", config: Path | None = None
) -> ManagedProcess:
    """Debian's Alertmanager on 127.0.0.1:port, clustering off."""
    binary = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
    if binary is None:
        raise DevStackError(
            "alertmanager is not installed: apt-get install prometheus-alertmanager"
        )
    source = config or PROJECT_ROOT / "prometheus" / "alertmanager.yml"
    return _prometheus_style(
        name, workdir, port,
        [binary, f"--config.file={source}", f"--storage.path={workdir / (name + '-data')}",
         "--cluster.listen-address="],
    )  # fmt: skip


@dataclass(frozen=True)
class DevStack:
    """What ``kpimon dev up`` runs, with fixed ports, state under ``state_dir/dev``."""

    state_dir: Path
    kafka_port: int = 9092
    kafka_controller_port: int = 9094
    prometheus_port: int = 9090
    alertmanager_port: int = 9093
    metrics_port: int = 9108

    @property
    def workdir(self) -> Path:
        return self.state_dir.resolve() / "dev"

    @property
    def cache_dir(self) -> Path:
        return self.state_dir / "cache"

    def processes(self) -> list[ManagedProcess]:
        """Kafka, then Alertmanager and Prometheus when installed."""
        libs = ensure_kafka_jars(self.cache_dir)
        procs = [
            kafka_process(
                self.workdir, libs, port=self.kafka_port, controller_port=self.kafka_controller_port
            )
        ]
        has_am = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
        if has_am:
            procs.append(alertmanager_process(self.workdir, port=self.alertmanager_port))
        if shutil.which("prometheus"):
            am = f"127.0.0.1:{self.alertmanager_port}" if has_am else None
            procs.append(
                prometheus_process(
                    self.workdir,
                    port=self.prometheus_port,
                    scrape_targets=[f"127.0.0.1:{self.metrics_port}"],
                    alertmanager=am,
                )
            )
        return procs

    def addresses(self) -> dict[str, str]:
        return {
            "kafka": f"127.0.0.1:{self.kafka_port}",
            "alertmanager": f"http://127.0.0.1:{self.alertmanager_port}",
            "prometheus": f"http://127.0.0.1:{self.prometheus_port}",
            "metrics": f"http://127.0.0.1:{self.metrics_port}/metrics",
        }

    def up(self) -> list[tuple[str, str]]:
        """Start what is not running (idempotent); return (name, status) pairs."""
        result = []
        for proc in self.processes():
            started = proc.start()
            result.append((proc.name, "started" if started else "already running"))
        return result

    def down(self) -> list[tuple[str, str]]:
        """Stop everything ``up`` started (Prometheus first, Kafka last)."""
        result = []
        for name in ("prometheus", "alertmanager", "kafka"):
            proc = ManagedProcess(name, [], self.workdir, ready=lambda: False)
            if not proc.pid_file.exists():
                continue
            stopped = proc.stop()
            result.append((proc.name, "stopped" if stopped else "not running"))
        return result
