"""Batch handling and the metrics collector, without Kafka."""

from __future__ import annotations

import json

from prometheus_client.parser import text_string_to_metric_families

from stream.events import RejectReason
from stream.metrics import build_registry, render
from stream.pipeline import PipelineStats, RecordHandler, SourceRecord
from stream.settings import Settings

NOW_MS = 1_795_000_000_000


def record(topic: str, value: bytes | None, offset: int = 0) -> SourceRecord:
    return SourceRecord(topic, 2, offset, b"c1", value, NOW_MS - 5)


def handler() -> RecordHandler:
    return RecordHandler(Settings(shared_topics=["events.all"]))


def test_batch_splits_events_and_dead_letters() -> None:
    click = json.dumps({"event_id": "e", "ts": NOW_MS, "campaign_id": "c1"}).encode()
    batch = handler().handle(
        [
            record("events.clicks", click, 10),
            record("events.clicks", b"garbage", 11),
            record("events.all", click, 12),
            record("events.all", json.dumps({"type": "click", "ts": NOW_MS}).encode(), 13),
        ],
        now_ms=NOW_MS,
    )
    assert [e.type for e in batch.events] == ["click"]
    assert batch.rejected == {"not_json": 1, "unknown_type": 1, "missing_field": 1}
    first = batch.dead_letters[0]
    assert first.value == b"garbage"
    assert first.key == b"c1"
    assert dict(first.headers) == {
        "kpimon.reason": b"not_json",
        "kpimon.error": first.headers[1][1],
        "kpimon.source.topic": b"events.clicks",
        "kpimon.source.partition": b"2",
        "kpimon.source.offset": b"11",
        "kpimon.source.timestamp": str(NOW_MS - 5).encode(),
    }
    assert first.headers[1][1]


def test_stats_and_collector() -> None:
    stats = PipelineStats()
    click = json.dumps({"event_id": "e", "ts": NOW_MS, "campaign_id": "c1"}).encode()
    stats.apply(handler().handle([record("events.clicks", click), record("events.leads", b"[]")],
                                 now_ms=NOW_MS))  # fmt: skip
    text = render(build_registry(stats)).decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("kpimon_events_total", (("type", "click"),))] == 1
    assert samples[("kpimon_events_total", (("type", "order"),))] == 0
    assert samples[("kpimon_events_rejected_total", (("reason", "not_object"),))] == 1
    for reason in RejectReason:
        assert ("kpimon_events_rejected_total", (("reason", reason.value),)) in samples
    assert samples[("kpimon_last_event_timestamp_seconds", (("type", "click"),))] == NOW_MS / 1000
    assert any(name == "process_cpu_seconds_total" for name, _ in samples)
