"""The worker's evaluation tick without a broker: computed off the event loop, committed
on it in one transaction, discarded when the scope state moved meanwhile."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from aiokafka import TopicPartition

import alerts.stage
from alerts.engine import AlertEngine
from alerts.rules import parse_rules
from alerts.stage import HEAD, AlertStage, joined, state_entries
from stream import codec
from stream.aggregate import SegmentStore
from stream.pipeline import PipelineStats
from stream.settings import Settings
from stream.stages import SegmentStage
from stream.worker import PipelineService, in_thread

ALERTS_STATE_KEY = codec.scope_log_key("alerts")

RULES = parse_rules("""
rules:
  - name: ctr_drop
    kpi: ctr
    scopes: [campaign]
    min_change: 0.3
    for: 0s
    severity: page
    runbook_url: docs/runbooks/rate-drop.md
""")
FIRING = 'kpimon_alerts_firing{rule="ctr_drop",severity="page",scope="campaign",channel="social",campaign="c1"} 1.0'  # noqa: E501


class FakeProducer:
    """A transactional producer that records what each committed transaction held."""

    def __init__(self) -> None:
        self.committed: list[list[tuple[str, bytes | None, bytes | None]]] = []
        self._open: list[tuple[str, bytes | None, bytes | None]] | None = None

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        self._open = []
        yield
        self.committed.append(self._open)
        self._open = None

    async def send(
        self, topic: str, value: bytes | None, *, key: bytes | None = None, **_: Any
    ) -> asyncio.Future[None]:
        assert self._open is not None, "a send outside a transaction"
        self._open.append((topic, key, value))
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future


class FakeConsumer:
    """The segment stage has applied all of its input (no hold)."""

    def highwater(self, tp: TopicPartition) -> int:
        return 0


def scope_with_a_ctr_drop(now_ms: int) -> SegmentStore:
    """Two hours of three campaigns at 2% CTR; c1's falls 60% in the last 20 minutes."""
    store = SegmentStore()
    now_minute = now_ms // 60_000
    for minute in range(now_minute - 120, now_minute):
        for channel, campaign in (("social", "c1"), ("social", "c2"), ("search", "c3")):
            clicks = 16 if campaign == "c1" and minute >= now_minute - 20 else 40
            store.apply_cells([(channel, campaign, minute, [2000, clicks, 0, 0, 0, 0, 0])])
    store.report(0, now_ms, caught_up=True, now_ms=now_ms)
    return store


@pytest.fixture
def service() -> PipelineService:
    svc = PipelineService(Settings(), PipelineStats(), RULES)
    svc._producer = FakeProducer()
    svc._consumer = FakeConsumer()
    install(svc, scope_with_a_ctr_drop(int(time.time() * 1000)), AlertEngine(RULES))
    return svc


def install(svc: PipelineService, store: SegmentStore, engine: AlertEngine) -> None:
    """The scope and alert stages as ``_restore_segments`` leaves them."""
    svc.stages.segments = SegmentStage(store, svc.topology)
    svc.alerting = AlertStage(RULES, svc.settings, svc.topology, ("console",))
    svc.alerting.engine = engine
    svc.alerting.state = state_entries(engine.to_dict())


def live_engine(svc: PipelineService) -> AlertEngine | None:
    return svc.alerting.engine if svc.alerting is not None else None


class Gate:
    """Holds the tick's computation in its thread until released."""

    def __init__(self) -> None:
        self.entered, self.release = threading.Event(), threading.Event()
        self.thread: str | None = None
        self.real = alerts.stage.compute_tick

    def compute(self, *args: Any) -> Any:
        self.thread = threading.current_thread().name
        self.entered.set()
        assert self.release.wait(30), "never released"
        return self.real(*args)


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[Gate]:
    gate = Gate()
    monkeypatch.setattr("stream.worker.compute_tick", gate.compute)
    yield gate
    gate.release.set()


async def entered(gate: Gate) -> None:
    assert await asyncio.to_thread(gate.entered.wait, 30), "the tick never started computing"


async def test_a_tick_commits_its_decisions_with_their_state_in_one_transaction(
    service: PipelineService,
) -> None:
    engine = live_engine(service)
    assert engine is not None
    before = engine.to_dict()
    assert await service._tick() is None
    producer: FakeProducer = service._producer  # type: ignore[assignment]
    assert len(producer.committed) == 1
    sent = producer.committed[0]
    alerts = [json.loads(v or b"") for t, _, v in sent if t == service.settings.alerts_topic]
    assert [(a["notification"], a["campaign"]) for a in alerts] == [("firing", "c1")]
    states = [v for t, k, v in sent if t == service.topology.scope_log and k == ALERTS_STATE_KEY]
    entries = [(codec.scope_log_entry(k or b""), v) for t, k, v in sent
               if t == service.topology.scope_log]  # fmt: skip
    outbox = [key for (kind, key), _ in entries if kind == "outbox"]
    detectors = {key[1]: codec.scope_log_value(kind, v or b"")
                 for (kind, key), v in entries if kind == "detectors"}  # fmt: skip
    assert len(states) == 1 and len(outbox) == 1  # one entry for the one sink
    live = live_engine(service)
    assert live is not None and live is not engine, "the clone is in place"
    assert service.alerting is not None
    # The engine's state: the alerts entry, and one entry per rule for its detectors.
    assert states[0] == service.alerting.state[HEAD]
    assert joined(json.loads(states[0] or b""), detectors) == live.to_dict()
    assert engine.to_dict() == before, "the engine it cloned was never changed"
    assert service.alerting.outbox.counts() == {"console": 1}
    assert FIRING in service.kpi_exposition.decode()
    assert b'kpimon_kpi{kpi="ctr",scope="campaign",channel="social",campaign="c1"' in (
        service.kpi_exposition
    )
    # The next tick notifies nothing again (its state, with the alert's clock, moves on).
    assert await service._tick() is None
    assert all(t != service.settings.alerts_topic for t, _, _ in producer.committed[-1])


async def test_the_event_loop_and_the_lock_are_free_while_a_tick_computes(
    service: PipelineService, gate: Gate
) -> None:
    """Transactions (which take the lock) and cells applied meanwhile go on; the tick shows
    the state as of its snapshot, and the live state keeps the new cells."""
    tick = asyncio.create_task(service._tick())
    await entered(gate)
    assert gate.thread is not None and gate.thread != threading.current_thread().name
    async with asyncio.timeout(5):
        async with service._lock:  # as a transaction would
            assert service.stages.segments is not None
            minute = int(time.time()) // 60 - 5
            cell = ("social", "newcomer", minute, [9, 1, 0, 0, 0, 0, 0])
            service.stages.segments.store.apply_cells([cell])
    assert not tick.done()
    gate.release.set()
    assert await tick is None
    assert FIRING in service.kpi_exposition.decode()
    assert b'campaign="newcomer"' not in service.kpi_exposition, "the snapshot predates it"
    assert ("campaign", "social", "newcomer") in service.stages.segments.store.series
    assert await service._tick() is None
    assert b'campaign="newcomer"' in service.kpi_exposition


@pytest.mark.parametrize("rebuilt", [False, True], ids=["revoked", "revoked-reassigned"])
async def test_a_tick_is_discarded_when_the_scope_partition_moves_meanwhile(
    service: PipelineService, gate: Gate, caplog: pytest.LogCaptureFixture, rebuilt: bool
) -> None:
    """Its decisions were taken on a state that is no longer this worker's (or no longer
    the committed one): nothing of it is committed, shown or kept."""
    tick = asyncio.create_task(service._tick())
    await entered(gate)
    await service.revoke([TopicPartition(service.topology.partials, 0)])
    fresh_engine = AlertEngine(RULES)
    if rebuilt:  # as _restore_segments leaves it, from the changelog
        install(service, scope_with_a_ctr_drop(int(time.time() * 1000)), fresh_engine)
    gate.release.set()
    with caplog.at_level(logging.INFO, logger="kpimon.worker"):
        assert await tick is None
    producer: FakeProducer = service._producer  # type: ignore[assignment]
    assert producer.committed == []
    assert service.kpi_exposition == b""
    assert live_engine(service) is (fresh_engine if rebuilt else None)
    assert fresh_engine.firing_labels() == []
    assert "evaluation discarded" in caplog.text
    if rebuilt:  # the next tick decides on the new state, once
        assert await service._tick() is None
        assert len(producer.committed) == 1 and FIRING in service.kpi_exposition.decode()


async def test_in_thread_returns_or_raises_on_the_loop() -> None:
    assert await in_thread(sum, [1, 2, 3]) == 6
    with pytest.raises(ZeroDivisionError):
        await in_thread(divmod, 1, 0)
    release = threading.Event()
    waiting = asyncio.ensure_future(in_thread(release.wait, 30))
    await asyncio.sleep(0)
    waiting.cancel()  # a stopping worker stops waiting; the thread ends on its own
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await waiting


async def test_no_tick_before_the_first_progress_report(service: PipelineService) -> None:
    """Until a worker has reported progress, the wall clock would pass for a watermark:
    the tick shows nothing (the backlog about to arrive would land in shown minutes)."""
    assert service.stages.segments is not None
    store = service.stages.segments.store
    store.reporters.clear()
    assert await service._tick() is None
    producer: FakeProducer = service._producer  # type: ignore[assignment]
    assert producer.committed == [] and store.watermark_ms == 0
    assert service.kpi_exposition == b""
    now_ms = int(time.time() * 1000)
    store.report(0, now_ms, caught_up=True, now_ms=now_ms)
    assert await service._tick() is None
    assert len(producer.committed) == 1 and store.watermark_ms >= now_ms
