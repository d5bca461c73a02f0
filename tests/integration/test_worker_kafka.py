"""The worker against a real broker: exact counters on /metrics, exact dead letters."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from tests.helpers import (
    WorkerProcess,
    consume_all,
    create_topics,
    group_lag,
    produce,
    run,
    sample,
    wait_for,
)

pytestmark = pytest.mark.integration


def _event(kind: str, i: int, now_ms: int) -> dict[str, Any]:
    base: dict[str, Any] = {"event_id": f"{kind}-{i}", "ts": now_ms - i * 1000, "channel": "Search"}
    if kind in ("impression", "click", "spend"):
        base["campaign_id"] = f"c{i % 3}"
    if kind == "click":
        base |= {"click_id": f"k{i}", "cost": 0.25}
    if kind == "order":
        base |= {"revenue": 10.0 + i, "customer_id": f"u{i}", "currency": "EUR"}
    if kind == "spend":
        base["amount"] = 5.0
    return base


def _malformed(now_ms: int, max_bytes: int) -> list[tuple[str, bytes, str]]:
    """(topic kind, raw bytes, expected reason) for every reason in SPEC.md."""
    ok_click = {"event_id": "x", "ts": now_ms, "campaign_id": "c1"}
    return [
        ("clicks", b"\x00\xff\xfe not utf8", "not_utf8"),
        ("clicks", b"{'single': 'quotes'}", "not_json"),
        ("clicks", b"[1,2,3]", "not_object"),
        ("clicks", json.dumps({**ok_click, "cost": "0.5"}).encode(), "wrong_type"),
        ("clicks", json.dumps({"event_id": "x", "ts": now_ms}).encode(), "missing_field"),
        ("spend", json.dumps({**ok_click, "amount": -3}).encode(), "negative_money"),
        ("clicks", json.dumps({**ok_click, "currency": "ZZZ"}).encode(), "unknown_currency"),
        ("clicks", json.dumps({**ok_click, "ts": "last tuesday"}).encode(), "bad_timestamp"),
        ("clicks", json.dumps({**ok_click, "ts": now_ms + 3_600_000}).encode(), "future_timestamp"),
        ("clicks", json.dumps({**ok_click, "pad": "x" * max_bytes}).encode(), "too_large"),
        ("events", json.dumps(ok_click).encode(), "unknown_type"),
        ("clicks", json.dumps({**ok_click, "type": "order"}).encode(), "type_mismatch"),
        ("clicks", json.dumps({**ok_click, "event_id": ""}).encode(), "invalid_value"),
    ]  # fmt: skip


def test_counts_and_dead_letters_exact(
    start_worker: Callable[..., WorkerProcess], worker_env: dict[str, str]
) -> None:
    bootstrap = worker_env["KPIMON_KAFKA_BOOTSTRAP"]
    topic = {
        "impressions": worker_env["KPIMON_TOPIC_IMPRESSIONS"],
        "clicks": worker_env["KPIMON_TOPIC_CLICKS"],
        "leads": worker_env["KPIMON_TOPIC_LEADS"],
        "orders": worker_env["KPIMON_TOPIC_ORDERS"],
        "spend": worker_env["KPIMON_TOPIC_SPEND"],
        "events": worker_env["KPIMON_SHARED_TOPICS"],
    }
    plural = {"impression": "impressions", "click": "clicks", "lead": "leads",
              "order": "orders", "spend": "spend"}  # fmt: skip
    worker = start_worker(KPIMON_MAX_MESSAGE_BYTES="2048")
    worker.wait_ready()

    now_ms = int(time.time() * 1000)
    sizes = {"impression": 40, "click": 15, "lead": 4, "order": 3, "spend": 2}
    messages: list[tuple[str, bytes | None, bytes | None]] = []
    expected_events: Counter[str] = Counter()
    for kind, n in sizes.items():
        for i in range(n):
            body = _event(kind, i, now_ms)
            messages.append((topic[plural[kind]], None, json.dumps(body).encode()))
            # the same event again on the shared topic, with its type: counted too
            shared = {**body, "type": kind, "event_id": f"shared-{kind}-{i}"}
            messages.append((topic["events"], None, json.dumps(shared).encode()))
            expected_events[kind] += 2
    bad = _malformed(now_ms, 2048)
    messages += [(topic[t], b"key-" + r.encode(), raw) for t, raw, r in bad]
    run(produce(bootstrap, messages))

    def counted() -> dict[Any, float] | None:
        assert worker.alive(), worker.log_tail()
        samples = worker.scrape()
        if samples is None:
            return None
        total = sum(sample(samples, "kpimon_events_total", type=k) or 0 for k in sizes)
        rejected = sum(
            v for (name, _), v in samples.items() if name == "kpimon_events_rejected_total"
        )
        done = total == sum(expected_events.values()) and rejected == len(bad)
        return samples if done else None

    samples = wait_for(counted, timeout=60, what="all events counted")
    for kind, n in expected_events.items():
        assert sample(samples, "kpimon_events_total", type=kind) == n
    for _, _, reason in bad:
        assert sample(samples, "kpimon_events_rejected_total", reason=reason) == 1, reason

    letters = run(
        consume_all(bootstrap, worker_env["KPIMON_DLQ_TOPIC"], expect=len(bad), within=30)
    )
    assert len(letters) == len(bad)
    by_reason = {dict(r.headers)["kpimon.reason"].decode(): r for r in letters}
    for kind, raw, reason in bad:
        letter = by_reason[reason]
        headers = {k: v.decode() for k, v in letter.headers}
        assert letter.value == raw, reason
        assert letter.key == b"key-" + reason.encode()
        assert headers["kpimon.source.topic"] == topic[kind]
        assert int(headers["kpimon.source.partition"]) >= 0
        assert int(headers["kpimon.source.offset"]) >= 0
        assert headers["kpimon.error"]
    assert worker.alive(), "the worker must keep running after bad input"


def test_a_rejection_too_large_for_the_dlq_becomes_a_marker_and_the_worker_goes_on(
    start_worker: Callable[..., WorkerProcess], worker_env: dict[str, str]
) -> None:
    """Accepted settings, a source topic taking 16 MB: rejected records just over the DLQ
    topic's 4 MiB limit (and far over it) go there as markers; one just under it goes as
    it is; the events behind them are counted, without a single aborted transaction."""
    bootstrap = worker_env["KPIMON_KAFKA_BOOTSTRAP"]
    clicks = worker_env["KPIMON_TOPIC_CLICKS"]
    big = {"max.message.bytes": str(16 << 20)}
    run(create_topics(bootstrap, [clicks], partitions=1, configs=big))  # offsets 0, 1, ...
    worker = start_worker(KPIMON_MAX_MESSAGE_BYTES=str(10 << 20))
    worker.wait_ready()
    now_ms = int(time.time() * 1000)

    def padded(size: int, **fields: Any) -> bytes:
        body = json.dumps({"event_id": "big", "ts": now_ms, "campaign_id": "c1", **fields,
                           "pad": ""}).encode()  # fmt: skip
        return body[:-2] + b"x" * (size - len(body)) + b'"}'

    limit = 4 << 20
    oversized = {
        "just_over": padded(limit + 1, ts="yesterday"),
        "five_mb": padded(5_000_000, ts="yesterday"),
        "too_large": padded((10 << 20) + 1),
    }
    under = padded(limit - 8192, ts="yesterday")
    valid = [json.dumps({"event_id": f"k{i}", "ts": now_ms, "campaign_id": "c1"}).encode()
             for i in range(20)]  # fmt: skip
    messages: list[tuple[str, bytes | None, bytes | None]] = [
        (clicks, name.encode(), raw) for name, raw in oversized.items()
    ]
    messages += [(clicks, b"under", under)] + [(clicks, None, raw) for raw in valid]
    run(produce(bootstrap, messages, max_request_size=32 << 20))

    def counted() -> dict[Any, float] | None:
        assert worker.alive(), worker.log_tail()
        samples = worker.scrape()
        done = samples is not None and sample(samples, "kpimon_events_total", type="click") == 20
        return samples if done else None

    samples = wait_for(counted, timeout=60, what="the events behind the big ones counted")
    assert sample(samples, "kpimon_events_rejected_total", reason="bad_timestamp") == 3
    assert sample(samples, "kpimon_events_rejected_total", reason="too_large") == 1
    assert sample(samples, "kpimon_transactions_aborted_total") == 0
    letters = run(consume_all(bootstrap, worker_env["KPIMON_DLQ_TOPIC"], expect=4, within=30))
    assert len(letters) == 4
    by_key = {letter.key: letter for letter in letters}
    assert by_key[b"under"].value == under, "what fits goes as it is"
    for name, raw in oversized.items():
        letter = by_key[name.encode()]
        headers = {k: v.decode() for k, v in letter.headers}
        assert headers["kpimon.original"] == "truncated"
        assert headers["kpimon.original.size"] == str(len(raw))
        assert headers["kpimon.source.topic"] == clicks
        assert int(headers["kpimon.source.offset"]) == list(oversized).index(name)
        marker = json.loads(letter.value)
        assert marker["size"] == len(raw)
        assert marker["head"] == raw[:1024].decode() and marker["tail"] == raw[-1024:].decode()
    assert worker.alive()


def test_restart_resumes_from_committed_offsets(
    start_worker: Callable[..., WorkerProcess], worker_env: dict[str, str]
) -> None:
    """Nothing is counted twice or lost across a clean restart: offsets were committed."""
    bootstrap = worker_env["KPIMON_KAFKA_BOOTSTRAP"]
    clicks = worker_env["KPIMON_TOPIC_CLICKS"]
    now_ms = int(time.time() * 1000)

    def batch(start: int, n: int) -> list[tuple[str, bytes | None, bytes | None]]:
        return [(clicks, None, json.dumps(_event("click", i, now_ms)).encode())
                for i in range(start, start + n)]  # fmt: skip

    first = start_worker("w1")
    first.wait_ready()
    run(produce(bootstrap, batch(0, 50)))
    wait_for(
        lambda: sample(first.scrape() or {}, "kpimon_events_total", type="click") == 50,
        timeout=60, what="first 50 clicks",
    )  # fmt: skip
    assert first.stop() == 0, first.log_tail()

    run(produce(bootstrap, batch(50, 20)))
    second = start_worker("w1")
    second.wait_ready()
    group = worker_env["KPIMON_GROUP_ID"]
    wait_for(lambda: run(group_lag(bootstrap, group, [clicks])) == 0, timeout=60,
             what="all 70 clicks committed")  # fmt: skip
    # Counters are applied right after each commit: once caught up, exactly the new 20.
    wait_for(
        lambda: sample(second.scrape() or {}, "kpimon_events_total", type="click") == 20,
        timeout=10, what="the 20 new clicks only",
    )  # fmt: skip
