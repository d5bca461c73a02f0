"""Peers in the throughput benchmark: the same windowed job in other stream processors.

Each peer lives in ``bench/peers/<name>/``: a pinned ``requirements.txt`` and a
``job.py`` that counts events and sums ``cost`` per campaign per 1-minute tumbling
event-time window over a pre-filled topic, then prints one JSON line. Each is
installed into its own virtualenv (``bench/peers/<name>/.venv``, ignored by git) on
first use, so the project's own dependencies stay clean.

The job's result carries a checksum (total count and cost over all windows) that
is compared with what was produced, so a peer that silently dropped events (late,
unkeyed, unparsed) cannot post a rate. Standard library only: the benchmark and
the tests import it from the project's environment.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PEERS_DIR = Path(__file__).resolve().parent
PEERS = ("quix", "bytewax")
LABELS = {"quix": "Quix Streams", "bytewax": "Bytewax"}
STAMP = "requirements.sha256"


class PeerUnavailable(RuntimeError):
    """The peer's virtualenv is absent or could not be created (e.g. no registry)."""


class PeerFailed(RuntimeError):
    """The peer's job failed, or its checksum does not match the input."""


@dataclass
class Checksum:
    """What a correct job must find: events consumed, and over all its windows the
    count and cost of the events that carry a ``campaign_id`` (the others, leads and
    orders tied to their campaign by click id only, are in no campaign's window)."""

    events: int = 0
    keyed: int = 0
    cost: float = 0.0

    def add(self, event: Mapping[str, Any]) -> None:
        self.events += 1
        if isinstance(event.get("campaign_id"), str):
            self.keyed += 1
            self.cost += float(event.get("cost", 0.0))


@dataclass(frozen=True)
class PeerResult:
    """One job's JSON line: its rate, first record to last, and its checksum."""

    name: str
    version: str
    events: int
    seconds: float
    cpu_seconds: float  # the process's CPU (all threads) over the same span
    events_per_s: float
    windows: int
    count: int
    cost: float
    late: int

    @classmethod
    def parse(cls, name: str, line: str) -> PeerResult:
        raw = json.loads(line)
        return cls(
            name=name, version=str(raw["version"]), events=int(raw["events"]),
            seconds=float(raw["seconds"]), cpu_seconds=float(raw["cpu_seconds"]),
            events_per_s=float(raw["events_per_s"]),
            windows=int(raw["windows"]), count=int(raw["count"]), cost=float(raw["cost"]),
            late=int(raw["late"]),
        )  # fmt: skip

    def check(self, expected: Checksum) -> None:
        """Raise ``PeerFailed`` unless every event was consumed and counted in a window."""
        problems = []
        if self.events != expected.events:
            problems.append(f"consumed {self.events} events, not {expected.events}")
        if self.late:
            problems.append(f"{self.late} events dropped as late")
        if self.count != expected.keyed:
            problems.append(f"windows count {self.count} events, not {expected.keyed}")
        # Sums in another order differ in the last bits; a skipped event moves it by > 1e-6.
        if not math.isclose(self.cost, expected.cost, rel_tol=1e-9, abs_tol=1e-6):
            problems.append(f"windows sum cost {self.cost!r}, not {expected.cost!r}")
        if problems:
            raise PeerFailed(f"{self.name}: " + "; ".join(problems))


def peer_dir(name: str) -> Path:
    if name not in PEERS:
        raise ValueError(f"unknown peer {name!r} (known: {', '.join(PEERS)})")
    return PEERS_DIR / name


def _requirements_hash(name: str) -> str:
    return hashlib.sha256((peer_dir(name) / "requirements.txt").read_bytes()).hexdigest()


def venv_python(name: str) -> Path | None:
    """The peer's interpreter if its virtualenv holds the current requirements."""
    venv = peer_dir(name) / ".venv"
    python = venv / "bin" / "python"
    stamp = venv / STAMP
    if python.exists() and stamp.exists() and stamp.read_text() == _requirements_hash(name):
        return python
    return None


def ensure_venv(name: str, *, timeout: float = 900.0) -> Path:
    """The peer's interpreter, creating its virtualenv from the pinned requirements
    first if needed (raises ``PeerUnavailable`` with pip's reason if that fails)."""
    python = venv_python(name)
    if python is not None:
        return python
    venv = peer_dir(name) / ".venv"
    steps = [
        [sys.executable, "-m", "venv", "--clear", str(venv)],
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--upgrade", "pip"],
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
         "-r", str(peer_dir(name) / "requirements.txt")],
    ]  # fmt: skip
    for cmd in steps:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            raise PeerUnavailable(f"{name}: `{' '.join(cmd[-3:])}` timed out") from exc
        if out.returncode != 0:
            raise PeerUnavailable(
                f"{name}: cannot create {venv}: {(out.stderr or out.stdout).strip()[-600:]}"
            )
    (venv / STAMP).write_text(_requirements_hash(name))
    return venv / "bin" / "python"


def run_job(
    name: str, python: Path, *, bootstrap: str, topic: str, events: int,
    pin: Sequence[str] = (), workdir: Path, timeout: float = 3600.0,
) -> PeerResult:  # fmt: skip
    """Run the peer's job on ``topic`` (``pin``: e.g. ``taskset -c 0``) and parse its line."""
    cmd = [*pin, str(python), str(peer_dir(name) / "job.py"), "--bootstrap", bootstrap,
           "--topic", topic, "--events", str(events), "--workdir", str(workdir)]  # fmt: skip
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise PeerFailed(f"{name}: no result after {timeout:.0f} s") from exc
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        raise PeerFailed(
            f"{name}: job exited {out.returncode}:\n{out.stdout[-1500:]}{out.stderr[-2500:]}"
        )
    return PeerResult.parse(name, lines[-1])
