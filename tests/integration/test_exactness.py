"""Every window and KPI series equals an independent recomputation from the produced events.

The stream is a seeded simulation with duplicates, slightly late and too-late
events, click_id-only orders and malformed input, produced to a real broker in
three phases (clicks before the orders that reference them; too-late events
last, so "too late" is unambiguous). Variants: one worker, two workers, a
``kill -9`` halfway, and a broker restart halfway.
"""

from __future__ import annotations

import json
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pytest

from stream.aggregate import DEDUP_MINUTES
from stream.devstack import ManagedProcess
from stream.simulate import SimConfig, Simulator
from tests.helpers import WorkerProcess, consume_all, produce, run, wait_for

pytestmark = pytest.mark.integration

MEASURES = ("impressions", "clicks", "leads", "orders", "new_customers", "revenue", "spend")
WINDOWS = {"5m": 5, "15m": 15, "1h": 60, "24h": 1440}
RATES = {"USD": 1.0, "EUR": 1.1, "GBP": 1.25}
TOPIC_ENV = {"impression": "KPIMON_TOPIC_IMPRESSIONS", "click": "KPIMON_TOPIC_CLICKS",
             "lead": "KPIMON_TOPIC_LEADS", "order": "KPIMON_TOPIC_ORDERS",
             "spend": "KPIMON_TOPIC_SPEND"}  # fmt: skip
Message = tuple[str, bytes | None, bytes | None]


def ts_ms(value: Any) -> int:
    if isinstance(value, int):
        return value
    return int(datetime.fromisoformat(value).timestamp() * 1000)


@dataclass
class Dataset:
    """Produced messages by phase, and what the contract says they must add up to."""

    phases: list[list[Message]] = field(default_factory=lambda: [[], [], []])
    cells: dict[tuple[Any, Any, int], list[int]] = field(default_factory=dict)
    valid: int = 0
    duplicates: int = 0
    late: int = 0
    rejected: int = 0
    by_click: int = 0
    """Counted leads and orders that only their click ties to a campaign."""

    def totals(self) -> dict[tuple[Any, Any], list[int]]:
        out: dict[tuple[Any, Any], list[int]] = {}
        for (channel, campaign, _), values in self.cells.items():
            row = out.setdefault((channel, campaign), [0] * 7)
            for i, v in enumerate(values):
                row[i] += v
        return out


def build_dataset(
    env: dict[str, str], now_s: float, seed: int, *, minutes: int = 4, rate: float = 60,
    shuffle: bool = False, impressions: bool = True,
) -> Dataset:  # fmt: skip
    """``minutes`` of simulated traffic ending 2 minutes ago; ``shuffle``: each phase in
    random order (a batch re-sent by an offline SDK or an uploader); ``impressions``:
    False leaves them out (more clicks and orders for the time a test takes)."""
    # Out-of-order events of a 50-minute re-send are the shuffle itself.
    sim = Simulator(SimConfig(seed=seed, campaigns=12, rate=rate, duplicate_rate=0.02,
                              slightly_late_rate=0.02, out_of_order_rate=0 if shuffle else 0.02,
                              late_rate=0.01))  # fmt: skip
    start = now_s - (minutes + 2) * 60
    data = Dataset()
    events = [e for e in sim.events(start, minutes * 60) if impressions or e[0] != "impression"]
    # The simulator moves a too-late event 2-30 min beyond its type's dedup horizon, an
    # out-of-order one 5-50 min back, a slightly late one <= 5 min. Measured from the newest
    # event time (which the horizon clock reaches by the last phase), that is unambiguous.
    end_ms = int((start + minutes * 60) * 1000)

    def too_late(kind: str, ev: dict[str, Any]) -> bool:
        return ts_ms(ev["ts"]) < end_ms - DEDUP_MINUTES[kind] * 60_000

    seen: set[tuple[str, str]] = set()
    clicks: dict[str, tuple[Any, Any]] = {}
    ordered = sorted(events, key=lambda e: (too_late(*e), e[0] in ("lead", "order")))
    for kind, ev in ordered:
        raw = json.dumps(ev).encode()
        key = ev.get("campaign_id")
        topic = env[TOPIC_ENV[kind]]
        phase = 2 if too_late(kind, ev) else (1 if kind in ("lead", "order") else 0)
        data.phases[phase].append((topic, key.encode() if key else None, raw))
        data.valid += 1
        dedup = ev.get("order_id") or ev["event_id"] if kind == "order" else ev["event_id"]
        if (kind, dedup) in seen:
            data.duplicates += 1
            continue
        if too_late(kind, ev):  # cannot be deduplicated any more: never "seen"
            data.late += 1
            continue
        seen.add((kind, dedup))
        channel = ev.get("channel", "unknown")
        campaign = ev.get("campaign_id")
        if kind == "click":
            clicks[ev["click_id"]] = (campaign, channel)
        elif campaign is None:
            campaign, clicked_channel = clicks.get(ev.get("click_id", ""), ("unattributed", None))
            data.by_click += campaign != "unattributed"
            if channel == "unknown" and clicked_channel:
                channel = clicked_channel
        row = data.cells.setdefault((channel, campaign, ts_ms(ev["ts"]) // 60_000), [0] * 7)
        rate = RATES[ev.get("currency", "USD")]
        money = round(float(ev.get("cost", ev.get("amount", ev.get("revenue", 0)))) * rate * 1e6)
        index = {"impression": 0, "click": 1, "lead": 2, "order": 3}.get(kind)
        if index is not None:
            row[index] += 1
        if kind == "order":
            row[4] += 1 if ev.get("new_customer") else 0
            row[5] += money
        elif kind != "lead":
            row[6] += money
    bad = [b"{oops", b"\xff\xfe", json.dumps({"event_id": "x", "ts": 5}).encode()]
    data.phases[2] += [(env["KPIMON_TOPIC_CLICKS"], None, raw) for raw in bad]
    data.rejected = len(bad)
    if shuffle:
        for messages in data.phases:
            random.Random(seed).shuffle(messages)
    return data


def value(raw: int, index: int) -> float:
    return raw / 1e6 if MEASURES[index] in ("revenue", "spend") else float(raw)


def kpis(t: list[int]) -> dict[str, float]:
    v = [value(x, i) for i, x in enumerate(t)]
    imp, clk, lead, orders, new, rev, spend = v
    pairs = {"ctr": (clk, imp), "conversion_rate": (orders, clk), "lead_rate": (lead, clk),
             "cpc": (spend, clk), "cpl": (spend, lead), "cpa": (spend, orders),
             "cac": (spend, new), "roas": (rev, spend), "roi": (rev - spend, spend),
             "aov": (rev, orders)}  # fmt: skip
    return {k: n / d for k, (n, d) in pairs.items() if d > 0}


def scrape_all(workers: list[WorkerProcess]) -> list[dict[Any, float]]:
    out = []
    for w in workers:
        samples = w.scrape()
        assert samples is not None, w.log_tail()
        out.append(samples)
    return out


def owner_samples(workers: list[WorkerProcess]) -> dict[Any, float] | None:
    """The scrape of the one worker exporting KPI series (and check there is one)."""
    scrapes = scrape_all(workers)
    owners = [s for s in scrapes if any(name == "kpimon_window_measure" for name, _ in s)]
    assert len(owners) <= 1, "KPI series exported by more than one worker"
    return owners[0] if owners else None


def measure_totals(samples: dict[Any, float]) -> dict[tuple[str, str], list[float]]:
    out: dict[tuple[str, str], list[float]] = {}
    for (name, labels), v in samples.items():
        if name == "kpimon_measure_total":
            lab = dict(labels)
            row = out.setdefault((lab["channel"], lab["campaign"]), [0.0] * 7)
            row[MEASURES.index(lab["measure"])] = v
    return out


def pipeline_counter(workers: list[WorkerProcess], name: str) -> float:
    return sum(v for s in scrape_all(workers) for (n, _), v in s.items() if n == name)


def check_exact(workers: list[WorkerProcess], data: Dataset, *, counters: bool = True) -> None:
    expected_totals = {k: [value(x, i) for i, x in enumerate(v)] for k, v in data.totals().items()}

    def settled() -> dict[Any, float] | None:
        samples = owner_samples(workers)
        return samples if samples and measure_totals(samples) == expected_totals else None

    try:
        samples = wait_for(settled, timeout=90, what="exact measure totals")
    except AssertionError:
        got = measure_totals(owner_samples(workers) or {})
        keys = {*got, *expected_totals}
        diff = {k: (got.get(k), expected_totals.get(k)) for k in keys
                if got.get(k) != expected_totals.get(k)}  # fmt: skip
        raise AssertionError(f"totals differ (got, expected): {diff}") from None
    end_minute = int(samples[("kpimon_window_end_timestamp_seconds", frozenset())]) // 60
    scopes: dict[tuple[Any, Any, Any], dict[str, list[int]]] = {}
    for (channel, campaign, minute), values in data.cells.items():
        for key in (("campaign", channel, campaign), ("channel", channel, ""), ("global", "", "")):
            windows = scopes.setdefault(key, {w: [0] * 7 for w in WINDOWS})
            for w, minutes in WINDOWS.items():
                if end_minute - minutes <= minute < end_minute:
                    windows[w] = [a + b for a, b in zip(windows[w], values, strict=True)]

    def series(name: str, last: str) -> dict[tuple[str, ...], float]:
        out: dict[tuple[str, ...], float] = {}
        for (n, labels), v in samples.items():
            if n == name:
                lab = dict(labels)
                key = (lab["scope"], lab["channel"], lab["campaign"], lab["window"], lab[last])
                out[key] = v
        return out

    exported = series("kpimon_window_measure", "measure")
    kpi_exported = series("kpimon_kpi", "kpi")
    expected_window: dict[tuple[Any, ...], float] = {}
    expected_kpi: dict[tuple[Any, ...], float] = {}
    for (scope, channel, campaign), windows in scopes.items():
        for w, totals in windows.items():
            for i, measure in enumerate(MEASURES):
                expected_window[(scope, channel, campaign, w, measure)] = value(totals[i], i)
            for k, v in kpis(totals).items():
                expected_kpi[(scope, channel, campaign, w, k)] = v
    assert exported == expected_window
    assert kpi_exported.keys() == expected_kpi.keys()
    for key, v in expected_kpi.items():
        assert kpi_exported[key] == pytest.approx(v, rel=1e-12), key
    if counters:  # per-process counters; a killed worker took its own with it
        assert pipeline_counter(workers, "kpimon_events_total") == data.valid
        assert pipeline_counter(workers, "kpimon_events_rejected_total") == data.rejected


@pytest.fixture
def exact_env(worker_env: dict[str, str]) -> dict[str, str]:
    worker_env.update(KPIMON_EVAL_INTERVAL_SECONDS="1", KPIMON_SNAPSHOT_INTERVAL_SECONDS="1",
                      KPIMON_MAX_BATCH_RECORDS="500")  # fmt: skip
    return worker_env


def _produce_phase(
    bootstrap: str, messages: list[Message], workers: list[WorkerProcess], expect_total: int
) -> None:
    run(produce(bootstrap, messages))
    wait_for(
        lambda: pipeline_counter(workers, "kpimon_events_total")
        + pipeline_counter(workers, "kpimon_events_rejected_total") >= expect_total,
        timeout=90, what=f"{expect_total} inputs consumed",
    )  # fmt: skip


def feed_and_check(
    env: dict[str, str], workers: list[WorkerProcess], data: Dataset, consumed: int = 0
) -> None:
    """Produce the phases in turn (each consumed before the next), then check every sum
    and the duplicate and too-late counts."""
    for phase in data.phases:
        consumed += len(phase)
        _produce_phase(env["KPIMON_KAFKA_BOOTSTRAP"], phase, workers, consumed)
    check_exact(workers, data)
    assert pipeline_counter(workers, "kpimon_events_duplicate_total") == data.duplicates
    assert pipeline_counter(workers, "kpimon_events_late_total") == data.late


def test_one_worker_exact(
    start_worker: Callable[..., WorkerProcess], exact_env: dict[str, str]
) -> None:
    data = build_dataset(exact_env, time.time(), seed=11)
    worker = start_worker("w1")
    worker.wait_ready()
    feed_and_check(exact_env, [worker], data)


def test_shuffled_50_minute_backlog_exact(
    start_worker: Callable[..., WorkerProcess], exact_env: dict[str, str], kafka_bootstrap: str
) -> None:
    """A producer re-sends the last 50 minutes in shuffled order (an offline SDK flushing,
    an uploader): every window sum is exact, events beyond their horizon are dead-lettered
    as ``too_late`` with their original bytes, and the restatements are counted."""
    now = time.time()
    data = build_dataset(exact_env, now, seed=15, minutes=50, rate=7, shuffle=True)
    assert data.valid > 8_000 and data.late > 50  # ~13k at the daily mean
    worker = start_worker("w1")
    worker.wait_ready()
    # Live traffic first: the worker has shown every minute the re-send then restates.
    live = {"event_id": "live-1", "ts": int(now * 1000), "campaign_id": "live"}
    data.cells[("unknown", "live", int(now) // 60)] = [1, 0, 0, 0, 0, 0, 0]
    data.valid += 1
    _produce_phase(kafka_bootstrap,
                   [(exact_env["KPIMON_TOPIC_IMPRESSIONS"], None, json.dumps(live).encode())],
                   [worker], 1)  # fmt: skip
    feed_and_check(exact_env, [worker], data, consumed=1)
    counted = data.valid - data.duplicates - data.late
    out_of_order = pipeline_counter([worker], "kpimon_events_out_of_order_total")
    assert 0.9 * counted < out_of_order <= counted, "nearly all minutes were shown already"
    letters = run(consume_all(kafka_bootstrap, exact_env["KPIMON_DLQ_TOPIC"],
                              expect=data.late + data.rejected, within=30))  # fmt: skip
    too_late = [m for m in letters if dict(m.headers)["kpimon.reason"] == b"too_late"]
    sent_late = {raw for _, _, raw in data.phases[2]}
    assert len(letters) == data.late + data.rejected
    assert len(too_late) == data.late
    assert all(m.value in sent_late for m in too_late), "the original bytes"
    assert all(b"kpimon.original" not in dict(m.headers) for m in too_late)


def test_two_workers_exact(
    start_worker: Callable[..., WorkerProcess], exact_env: dict[str, str]
) -> None:
    data = build_dataset(exact_env, time.time(), seed=12)
    workers = [start_worker("w1"), start_worker("w2")]
    for w in workers:
        w.wait_ready()
    feed_and_check(exact_env, workers, data)


def test_kill_9_halfway_and_restart_exact(
    start_worker: Callable[..., WorkerProcess], exact_env: dict[str, str]
) -> None:
    bootstrap = exact_env["KPIMON_KAFKA_BOOTSTRAP"]
    data = build_dataset(exact_env, time.time(), seed=13)
    first = start_worker("w1")
    second = start_worker("w2")
    for w in (first, second):
        w.wait_ready()
    run(produce(bootstrap, data.phases[0]))
    half = len(data.phases[0]) // 2
    wait_for(lambda: pipeline_counter([first, second], "kpimon_events_total") >= half,
             timeout=90, what="half of phase 1")  # fmt: skip
    first.stop(signal.SIGKILL)
    restarted = start_worker("w1")
    restarted.wait_ready()
    workers = [second, restarted]
    wait_for_clicks(workers, data)  # orders must find their clicks
    for phase in data.phases[1:]:
        run(produce(bootstrap, phase))
    # Counters of the killed process are gone; the KPI state is exact all the same.
    check_exact(workers, data, counters=False)


def wait_for_clicks(
    workers: list[WorkerProcess],
    data: Dataset,
    measures: tuple[int, ...] = (0, 1),
    *,
    windows: bool = False,
) -> None:
    """Wait until the KPI state holds every click and impression of the first phase
    (or every one of other counts, ``measures``: indexes into ``MEASURES``), by the
    counters, or by the global 24 h window (``windows``: where leads and orders waiting
    for their click are, before the counters take them)."""
    expected = [sum(row[i] for row in data.totals().values()) for i in measures]

    def done() -> bool:
        samples = owner_samples(workers) or {}
        if windows:
            got = [0.0] * len(MEASURES)
            for (name, labels), v in samples.items():
                lab = dict(labels)
                if (
                    name == "kpimon_window_measure"
                    and lab["scope"] == "global"
                    and (lab["window"] == "24h")
                ):
                    got[MEASURES.index(lab["measure"])] = v
            return [got[i] for i in measures] == expected
        rows = measure_totals(samples).values()
        return [sum(row[i] for row in rows) for i in measures] == expected

    names = ", ".join(MEASURES[i] for i in measures)
    wait_for(done, timeout=90, what=f"every one of {names} in the state")


def test_orders_before_their_clicks_exact_across_a_kill_9(
    start_worker: Callable[..., WorkerProcess], exact_env: dict[str, str]
) -> None:
    """A backlog read ahead of the clicks (a restart after an outage, the demo's history):
    every lead and order is counted before any click, some only as ``unattributed``; the
    worker is killed, and its successor, restored from the changelog, moves each to its
    click's campaign as the clicks come. Every sum equals the recomputation, which
    attributes whatever the arrival order."""
    bootstrap = exact_env["KPIMON_KAFKA_BOOTSTRAP"]
    data = build_dataset(exact_env, time.time(), seed=16, rate=1200, impressions=False)
    assert data.by_click > 50
    # Every by-click lead and order passes through this pair, whose totals stay exported
    # (at 0 when all of them found their click).
    data.cells.setdefault(("unknown", "unattributed", int(time.time()) // 60), [0] * 7)
    first = start_worker("w1")
    first.wait_ready()
    run(produce(bootstrap, data.phases[1]))
    wait_for_clicks([first], data, measures=(2, 3, 4), windows=True)  # in the changelog
    first.stop(signal.SIGKILL)
    worker = start_worker("w1")
    worker.wait_ready()
    consumed = 0  # by this process
    for phase in (data.phases[0], data.phases[2]):  # too-late events once the clicks are in
        consumed += len(phase)
        _produce_phase(bootstrap, phase, [worker], consumed)
    check_exact([worker], data, counters=False)
    moved = pipeline_counter([worker], "kpimon_events_reattributed_total")
    assert moved == data.by_click, "each moved once, by the restored worker"


def test_broker_restart_exact(
    start_worker: Callable[..., WorkerProcess],
    exact_env: dict[str, str],
    kafka_broker: ManagedProcess,
) -> None:
    bootstrap = exact_env["KPIMON_KAFKA_BOOTSTRAP"]
    data = build_dataset(exact_env, time.time(), seed=14)
    worker = start_worker("w1")
    worker.wait_ready()
    _produce_phase(bootstrap, data.phases[0], [worker], len(data.phases[0]))
    kafka_broker.stop()
    kafka_broker.start()
    assert worker.alive(), worker.log_tail()
    consumed = len(data.phases[0])
    for phase in data.phases[1:]:
        consumed += len(phase)
        _produce_phase(bootstrap, phase, [worker], consumed)
    check_exact([worker], data)


def test_orders_whose_click_is_too_late_counted_at_once(
    start_worker: Callable[..., WorkerProcess], exact_env: dict[str, str], kafka_bootstrap: str
) -> None:
    """An order waits for its click (the counters take it only where it ends); when that
    click is dead-lettered as too late, its wait ends at once, and an order naming a click
    already dead-lettered does not wait: every counter is exact now, not an hour of event
    time later. (The simulated datasets above hold such an order in about one run in ten.)"""
    now = int(time.time() * 1000)
    minute = now // 60_000 - 1
    clicks, orders, leads = (exact_env[f"KPIMON_TOPIC_{t}"] for t in ("CLICKS", "ORDERS", "LEADS"))

    def message(topic: str, **event: Any) -> Message:
        return topic, None, json.dumps(event).encode()

    def order(key: str, click: str, revenue: float) -> Message:
        return message(orders, event_id=key, order_id=key, ts=minute * 60_000 + 5_000,
                       click_id=click, revenue=revenue, customer_id=f"u-{key}")  # fmt: skip

    def too_late_click(click: str) -> Message:
        return message(clicks, event_id=f"c-{click}", ts=now - 75 * 60_000, campaign_id="c1",
                       channel="search", click_id=click)  # fmt: skip

    # A lead of each click's routed partition (keyed by click id) moves its clock to now.
    steps = [[message(leads, event_id=f"l-{k}", ts=now, campaign_id="c1", channel="search",
                      click_id=k, user_id="u1") for k in ("kx", "ky")],
             [order("o-x", "kx", 12.5)],  # waits for kx
             [too_late_click("kx"), too_late_click("ky")],
             [order("o-y", "ky", 7.25)]]  # fmt: skip
    data = Dataset(valid=sum(map(len, steps)), late=2)
    data.cells[("search", "c1", now // 60_000)] = [0, 0, 2, 0, 0, 0, 0]
    data.cells[("unknown", "unattributed", minute)] = [0, 0, 0, 2, 0, 19_750_000, 0]
    worker = start_worker("w1")
    worker.wait_ready()
    consumed = 0
    for step in steps:  # each in before the next: the arrival order is the test
        consumed += len(step)
        _produce_phase(kafka_bootstrap, step, [worker], consumed)
    check_exact([worker], data)
    assert pipeline_counter([worker], "kpimon_events_late_total") == 2
