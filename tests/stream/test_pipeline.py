"""Batch handling and the metrics collector, without Kafka."""

from __future__ import annotations

import json

from prometheus_client.parser import text_string_to_metric_families

from stream import codec
from stream.aggregate import TooLate
from stream.events import Event, RejectReason
from stream.metrics import build_registry, render
from stream.pipeline import (
    DeadLetter,
    PipelineStats,
    RecordHandler,
    SourceRecord,
    fit_for_dlq,
    too_late_letter,
)
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


def _late(carried: bool) -> TooLate:
    raw = json.dumps({"event_id": "k-1", "ts": NOW_MS - 7_200_000, "campaign_id": "c1",
                      "cost": 0.25}).encode()  # fmt: skip
    event = handler().parser.parse(raw, topic_type="click", now_ms=NOW_MS)
    assert isinstance(event, Event)
    where = (
        codec.origin("events.clicks", 2, 41, b"\xffkey", raw)
        if carried
        else codec.origin("events.clicks", 2, 41)
    )
    row = codec.routed_row(event, NOW_MS - 9, where)
    return TooLate(codec.decode_rows(codec.encode_rows([row]))[0], NOW_MS)


def headers_of(letter: DeadLetter) -> dict[str, str]:
    return {name: value.decode() for name, value in letter.headers}


def test_a_too_late_event_is_dead_lettered_as_its_original_bytes() -> None:
    late = _late(carried=True)
    letter = too_late_letter(late, {"click": 60}, "USD")
    assert letter.key == b"\xffkey"
    assert json.loads(letter.value or b"")["event_id"] == "k-1"
    headers = headers_of(letter)
    assert headers["kpimon.reason"] == "too_late"
    assert (headers["kpimon.source.topic"], headers["kpimon.source.partition"]) == (
        "events.clicks", "2",
    )  # fmt: skip
    assert headers["kpimon.source.offset"] == "41"
    assert "60 min dedup horizon" in headers["kpimon.error"]
    assert "kpimon.original" not in headers


def test_without_its_bytes_a_too_late_event_is_reconstructed_and_says_so() -> None:
    letter = too_late_letter(_late(carried=False), {"click": 60}, "USD")
    headers = headers_of(letter)
    assert headers["kpimon.original"] == "reconstructed"
    assert headers["kpimon.source.offset"] == "41"
    event = json.loads(letter.value or b"")
    assert event == {"type": "click", "event_id": "k-1", "ts": NOW_MS - 7_200_000,
                     "campaign_id": "c1", "channel": "unknown", "currency": "USD",
                     "cost": 0.25}  # fmt: skip
    parsed = handler().parser.parse(letter.value, topic_type=None, now_ms=NOW_MS)
    assert isinstance(parsed, Event), "a reconstruction parses back into the same event"


def test_a_dead_letter_too_large_for_the_dlq_becomes_a_marker() -> None:
    value = b"A" * 2000 + b"\xff" + b"B" * 5_000_000 + b"the end"
    source = SourceRecord("events.orders", 1, 99, b"k", value, NOW_MS)
    letter = handler().handle([source], now_ms=NOW_MS).dead_letters[0]
    assert fit_for_dlq(letter, 6_000_000) is letter, "fits: unchanged"
    marker = fit_for_dlq(letter, 4_000_000)
    assert marker.key == b"k"
    assert len(marker.value or b"") < 4 * 1024 + 500
    headers = headers_of(marker)
    assert headers["kpimon.reason"] == "too_large"
    assert headers["kpimon.source.offset"] == "99" and headers["kpimon.original"] == "truncated"
    assert headers["kpimon.original.size"] == str(len(value))
    body = json.loads(marker.value or b"")
    assert body["size"] == len(value) and body["key_size"] == 1
    assert body["head"] == "A" * 1024 and body["tail"].endswith("the end")
    assert len(body["tail"]) == 1024
