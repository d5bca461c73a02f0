"""Smoke test of bench/throughput's peers: each peer's job on a tiny topic, real broker.

The peers' virtualenvs are created by the benchmark on first use, never by the test
suite (CI does not install them): a peer whose venv is absent is skipped, saying how
to create it. ``KPIMON_BENCH_PEERS_INSTALL=1`` lets this test create them (it skips
if that fails, e.g. no package registry).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from bench.peers import runner as peers
from stream.simulate import SimConfig, Simulator, encode
from tests.helpers import create_topics, produce, run

T0_S = 1_790_000_000.0  # a fixed instant, so windows do not depend on the wall clock


def _peer_python(name: str) -> Path:
    python = peers.venv_python(name)
    if python is None and os.environ.get("KPIMON_BENCH_PEERS_INSTALL") == "1":
        try:
            python = peers.ensure_venv(name)
        except peers.PeerUnavailable as exc:
            pytest.skip(str(exc))
    if python is None:
        pytest.skip(
            f"bench/peers/{name}/.venv absent: run `bench/throughput --peers {name}` once "
            "(or set KPIMON_BENCH_PEERS_INSTALL=1); CI does not install the peers"
        )
    return python


def _events() -> list[tuple[str, dict[str, Any]]]:
    """Simulated events (ms and ISO timestamps, duplicates, unkeyed leads and orders),
    plus an impression 24 h late and an unkeyed order with a cost-like field."""
    sim = Simulator(SimConfig(seed=3, campaigns=10, rate=150))
    events = list(sim.events(T0_S, 4))
    late = {"event_id": "late-1", "ts": int((T0_S - 24 * 3600) * 1000), "channel": "search",
            "campaign_id": "c1", "cost": 0.25}  # fmt: skip
    events.append(("impression", late))
    events.append(("order", {"event_id": "o-x", "ts": int(T0_S * 1000), "click_id": "k-x",
                             "order_id": "A-x", "revenue": 10.0}))  # fmt: skip
    return events


def _minute(ts: int | str) -> int:
    ms = int(datetime.fromisoformat(ts).timestamp() * 1000) if isinstance(ts, str) else ts
    return ms // 60_000


@pytest.mark.integration
@pytest.mark.parametrize("name", peers.PEERS)
def test_peer_job_counts_every_event_in_its_window(
    name: str, kafka_bootstrap: str, topic_names: Callable[[str], str], tmp_path: Path
) -> None:
    python = _peer_python(name)
    topic = topic_names("events")
    events = _events()
    expected = peers.Checksum()
    for _, event in events:
        expected.add(event)
    windows = {(e["campaign_id"], _minute(e["ts"])) for _, e in events if "campaign_id" in e}
    assert expected.keyed < expected.events  # some events carry no campaign
    run(create_topics(kafka_bootstrap, [topic], partitions=3))
    run(produce(kafka_bootstrap, [
        (topic, e["campaign_id"].encode() if "campaign_id" in e else None,
         encode(kind, e, with_type=True)) for kind, e in events
    ]))  # fmt: skip

    result = peers.run_job(name, python, bootstrap=kafka_bootstrap, topic=topic,
                           events=len(events), workdir=tmp_path, timeout=180)  # fmt: skip

    result.check(expected)
    assert result.windows == len(windows)
    assert result.events_per_s > 0


def test_check_rejects_a_peer_that_skipped_events() -> None:
    expected = peers.Checksum()
    for cost in (0.5, 0.25, 0.125):
        expected.add({"campaign_id": "c1", "cost": cost, "ts": 0})
    expected.add({"click_id": "k1", "ts": 0})
    line = {"version": "x", "events": 4, "seconds": 1.0, "cpu_seconds": 0.9, "events_per_s": 3.0,
            "windows": 1, "count": 3, "cost": 0.875, "late": 0}  # fmt: skip
    peers.PeerResult.parse("p", orjson.dumps(line).decode()).check(expected)
    for wrong in ({"events": 3}, {"count": 2}, {"cost": 0.75}, {"late": 1}):
        result = peers.PeerResult.parse("p", orjson.dumps({**line, **wrong}).decode())
        with pytest.raises(peers.PeerFailed):
            result.check(expected)
