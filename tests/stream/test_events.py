"""Contract tests of the event parser: every rejection reason, both timestamp forms, fuzzing."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream.events import Event, EventParser, Rejection, RejectReason

NOW_MS = 1_795_000_000_000  # 2026-11-18T11:06:40Z
TS_ISO = "2026-11-18T11:06:40+00:00"


PARSER = EventParser(
    rates={"EUR": 1.1, "GBP": 1.25},
    reporting_currency="USD",
    max_bytes=4096,
    max_future_skew_ms=300_000,
)


@pytest.fixture
def parser() -> EventParser:
    return PARSER


@pytest.fixture
def parse(parser: EventParser) -> Callable[..., Event | Rejection]:
    def _parse(body: Any, topic_type: str | None = "click") -> Event | Rejection:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        return parser.parse(raw, topic_type=topic_type, now_ms=NOW_MS)

    return _parse


def click(**fields: Any) -> dict[str, Any]:
    return {"event_id": "e1", "ts": NOW_MS, "campaign_id": "c1", **fields}


def reason(result: Event | Rejection) -> RejectReason:
    assert isinstance(result, Rejection), f"expected a rejection, got {result}"
    return result.reason


def test_valid_click_is_normalised(parse: Callable[..., Event | Rejection]) -> None:
    event = parse(click(channel="  Social ", click_id="k1", cost=0.5))
    assert event == Event(
        type="click", event_id="e1", dedup_key="e1", ts_ms=NOW_MS, campaign_id="c1",
        channel="social", click_id="k1", spend_micros=500_000,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("ts", "expected"),
    [
        (NOW_MS, NOW_MS),
        (TS_ISO, NOW_MS),
        ("2026-11-18T11:06:40Z", NOW_MS),
        ("2026-11-18T12:06:40.123+01:00", NOW_MS + 123),
        ("2026-11-18T06:06:40-05:00", NOW_MS),
        (float(NOW_MS) + 0.9, NOW_MS),
    ],
)
def test_both_timestamp_forms(
    parse: Callable[..., Event | Rejection], ts: Any, expected: int
) -> None:
    event = parse(click(ts=ts))
    assert isinstance(event, Event)
    assert event.ts_ms == expected


@pytest.mark.parametrize(
    "ts",
    [
        "2026-11-19T08:26:40",
        "yesterday",
        "",
        True,
        None,
        [],
        1_795_000_000,
        1e20,
        "2026-13-01T00:00:00Z",
    ],
)
def test_bad_timestamps(parse: Callable[..., Event | Rejection], ts: Any) -> None:
    assert reason(parse(click(ts=ts))) is RejectReason.BAD_TIMESTAMP


JULY_1_MS = 1_782_864_000_000  # 2026-07-01T00:00:00Z, after the leap second of June 30


@pytest.mark.parametrize(
    ("ts", "expected"),
    [
        ("2026-06-30T23:59:60Z", JULY_1_MS),
        ("2026-06-30T23:59:60.250Z", JULY_1_MS + 250),
        ("2026-06-30t23:59:60z", JULY_1_MS),
        ("2026-07-01T01:59:60+02:00", JULY_1_MS),  # 23:59:60 UTC in local time
        ("2025-12-31T18:59:60-05:00", 1_767_225_600_000),  # 2026-01-01T00:00:00Z
    ],
)
def test_leap_second_counts_as_the_next_second(
    parse: Callable[..., Event | Rejection], ts: str, expected: int
) -> None:
    event = parse(click(ts=ts))
    assert isinstance(event, Event), event
    assert event.ts_ms == expected
    shared = parse({**click(ts=ts), "type": "click"}, topic_type=None)
    assert isinstance(shared, Event) and shared.ts_ms == expected


@pytest.mark.parametrize(
    "ts",
    [
        "2026-06-30T23:59:61Z",
        "2026-06-30T23:59:99Z",
        "2026-06-30T23:59:600Z",
        "2026-06-30T12:30:60Z",  # no leap second at noon
        "2026-06-29T23:59:60Z",  # nor at the end of another day
        "2026-06-30T23:59:60+02:00",  # 21:59:60 UTC
        "2026-06-30T23:59:60",  # no offset
        "2026-02-30T23:59:60Z",  # no such day
        "2026-06-30T23:60:60Z",
    ],
)
def test_invalid_second_60_or_more_is_rejected(
    parse: Callable[..., Event | Rejection], ts: str
) -> None:
    assert reason(parse(click(ts=ts))) is RejectReason.BAD_TIMESTAMP


def test_leap_second_event_is_checked_like_any_other(
    parse: Callable[..., Event | Rejection],
) -> None:
    leap = "2026-06-30T23:59:60Z"
    assert reason(parse(click(ts=leap, cost=-1))) is RejectReason.NEGATIVE_MONEY
    assert reason(parse(click(ts=leap, event_id=""))) is RejectReason.INVALID_VALUE
    assert reason(parse(click(ts="2026-12-31T23:59:60Z"))) is RejectReason.FUTURE_TIMESTAMP
    assert reason(parse({"event_id": "e1", "ts": leap}, topic_type="spend")) is (
        RejectReason.MISSING_FIELD
    )


def test_future_timestamp_beyond_skew(parse: Callable[..., Event | Rejection]) -> None:
    assert isinstance(parse(click(ts=NOW_MS + 299_000)), Event)
    assert reason(parse(click(ts=NOW_MS + 301_000))) is RejectReason.FUTURE_TIMESTAMP


def test_missing_timestamp_is_missing_field(parse: Callable[..., Event | Rejection]) -> None:
    body = click()
    del body["ts"]
    assert reason(parse(body)) is RejectReason.MISSING_FIELD


@pytest.mark.parametrize(
    ("topic_type", "body", "expected"),
    [
        ("click", {"event_id": "e", "ts": NOW_MS}, RejectReason.MISSING_FIELD),
        ("impression", {"event_id": "e", "ts": NOW_MS}, RejectReason.MISSING_FIELD),
        ("spend", {"event_id": "e", "ts": NOW_MS, "campaign_id": "c"}, RejectReason.MISSING_FIELD),
        ("order", {"event_id": "e", "ts": NOW_MS, "revenue": 1}, RejectReason.MISSING_FIELD),
        ("order", {"event_id": "e", "ts": NOW_MS, "customer_id": "u"}, RejectReason.MISSING_FIELD),
        ("click", {"ts": NOW_MS, "campaign_id": "c"}, RejectReason.MISSING_FIELD),
        ("click", click(event_id=5), RejectReason.WRONG_TYPE),
        ("click", click(cost="1.5"), RejectReason.WRONG_TYPE),
        ("click", click(campaign_id=["c"]), RejectReason.WRONG_TYPE),
        ("order", {**click(), "revenue": 1, "customer_id": "u", "new_customer": "yes"},
         RejectReason.WRONG_TYPE),
        ("click", click(event_id=""), RejectReason.INVALID_VALUE),
        ("click", click(event_id="x" * 129), RejectReason.INVALID_VALUE),
        ("click", click(cost=-0.01), RejectReason.NEGATIVE_MONEY),
        ("impression", click(cost=-1), RejectReason.NEGATIVE_MONEY),
        ("spend", click(amount=-5), RejectReason.NEGATIVE_MONEY),
        ("order", {**click(), "revenue": -1, "customer_id": "u"}, RejectReason.NEGATIVE_MONEY),
        ("click", click(cost=1, currency="XYZ"), RejectReason.UNKNOWN_CURRENCY),
        ("click", click(cost=1, currency="dollars"), RejectReason.UNKNOWN_CURRENCY),
        ("click", click(type="order"), RejectReason.TYPE_MISMATCH),
    ],
)  # fmt: skip
def test_rejection_reasons(
    parse: Callable[..., Event | Rejection],
    topic_type: str,
    body: dict[str, Any],
    expected: RejectReason,
) -> None:
    assert reason(parse(body, topic_type)) is expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"", RejectReason.NOT_JSON),
        (b"{not json", RejectReason.NOT_JSON),
        (
            b'{"event_id": "e", "ts": 1795000000000, "campaign_id": "c", "cost": NaN}',
            RejectReason.INVALID_VALUE,
        ),
        (b'{"event_id": "\\ud800"}', RejectReason.NOT_JSON),
        (b"[" * 2000 + b"]" * 2000, RejectReason.NOT_JSON),
        (b"\xff\xfe{}", RejectReason.NOT_UTF8),
        (b'{"event_id": "\xed\xa0\x80"}', RejectReason.NOT_UTF8),
        (b"[1, 2]", RejectReason.NOT_OBJECT),
        (b'"click"', RejectReason.NOT_OBJECT),
        (b"null", RejectReason.NOT_OBJECT),
        (b"{" + b" " * 5000 + b"}", RejectReason.TOO_LARGE),
    ],
)
def test_byte_level_rejections(parser: EventParser, raw: bytes, expected: RejectReason) -> None:
    assert reason(parser.parse(raw, topic_type="click", now_ms=NOW_MS)) is expected


def test_none_value_is_rejected(parser: EventParser) -> None:
    assert reason(parser.parse(None, topic_type="click", now_ms=NOW_MS)) is RejectReason.NOT_JSON


@pytest.mark.parametrize("declared", [None, "purchase", 3, ""])
def test_shared_topic_needs_a_known_type(
    parse: Callable[..., Event | Rejection], declared: Any
) -> None:
    body = click() if declared is None else click(type=declared)
    assert reason(parse(body, None)) is RejectReason.UNKNOWN_TYPE


def test_shared_topic_dispatches_on_type(parse: Callable[..., Event | Rejection]) -> None:
    order = parse(
        {"type": "order", "event_id": "e", "ts": TS_ISO, "revenue": 20, "customer_id": "u",
         "order_id": "o-1", "new_customer": True, "currency": "eur", "click_id": "k"},
        None,
    )  # fmt: skip
    assert isinstance(order, Event)
    assert (order.type, order.dedup_key, order.new_customer, order.click_id) == (
        "order", "o-1", True, "k",
    )  # fmt: skip
    assert order.revenue_micros == 22_000_000
    assert order.campaign_id is None
    assert order.channel == "unknown"


def test_order_without_order_id_dedups_on_event_id(parse: Callable[..., Event | Rejection]) -> None:
    order = parse({**click(), "revenue": 1, "customer_id": "u"}, "order")
    assert isinstance(order, Event)
    assert order.dedup_key == "e1"


@pytest.mark.parametrize(
    ("topic_type", "body", "spend"),
    [
        ("impression", click(cost=2, currency="GBP"), 2.5),
        ("click", click(cost=2), 2.0),
        ("spend", click(amount=10, currency="EUR"), 11.0),
        ("lead", {"event_id": "l", "ts": NOW_MS, "click_id": "k"}, 0.0),
    ],
)
def test_money_converted_to_reporting_currency(
    parse: Callable[..., Event | Rejection], topic_type: str, body: dict[str, Any], spend: float
) -> None:
    event = parse(body, topic_type)
    assert isinstance(event, Event)
    assert event.spend_micros == round(spend * 1_000_000)


def test_extra_fields_are_ignored(parse: Callable[..., Event | Rejection]) -> None:
    assert isinstance(parse(click(utm_source="newsletter", nested={"a": [1]})), Event)


def test_huge_integer_elsewhere_is_still_json(parse: Callable[..., Event | Rejection]) -> None:
    assert isinstance(parse(click(tracking=2**80)), Event)


def test_overflowing_conversion_is_rejected(parser: EventParser) -> None:
    raw = orjson.dumps(click(cost=1.7e308, currency="EUR"))
    assert (
        reason(parser.parse(raw, topic_type="click", now_ms=NOW_MS)) is RejectReason.INVALID_VALUE
    )


def test_timestamp_is_exact_to_the_millisecond(parse: Callable[..., Event | Rejection]) -> None:
    event = parse(click(ts="2026-11-18T11:06:40.001Z"))
    assert isinstance(event, Event)
    assert event.ts_ms == NOW_MS + 1


# --- property-based: no input crashes the parser, valid input always parses ---------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=20,
)
FIELDS = ["event_id", "ts", "campaign_id", "channel", "cost", "amount", "revenue",
          "customer_id", "currency", "type", "click_id", "order_id", "new_customer"]  # fmt: skip


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(raw=st.binary(max_size=600), topic_type=st.sampled_from([None, "click", "order", "spend"]))
def test_any_bytes_parse_or_reject(raw: bytes, topic_type: str | None) -> None:
    result = PARSER.parse(raw, topic_type=topic_type, now_ms=NOW_MS)
    assert isinstance(result, Event | Rejection)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    body=st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=len(FIELDS)),
    topic_type=st.sampled_from([None, "impression", "click", "lead", "order", "spend"]),
)
def test_any_object_parses_or_rejects(body: dict[str, Any], topic_type: str | None) -> None:
    raw = json.dumps(body).encode()
    result = PARSER.parse(raw, topic_type=topic_type, now_ms=NOW_MS)
    assert isinstance(result, Event | Rejection)
    if isinstance(result, Rejection):
        assert result.detail


@given(
    prefix=st.sampled_from(["2026-06-30T23:59", "2026-06-30t12:00", "0000-00-00 99:99", ""]),
    suffix=st.text(max_size=12),
    extra=st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=4),
    topic_type=st.sampled_from([None, "click", "order"]),
)
def test_any_second_60_parses_or_rejects(
    prefix: str, suffix: str, extra: dict[str, Any], topic_type: str | None
) -> None:
    """The leap-second path (taken only for ``:60``) never raises either."""
    body = {**extra, "ts": f"{prefix}:60{suffix}"}
    result = PARSER.parse(json.dumps(body).encode(), topic_type=topic_type, now_ms=NOW_MS)
    assert isinstance(result, Event | Rejection)
    if isinstance(result, Event):
        assert result.ts_ms % 60_000 < 1000  # only ever the first second of a minute


ids = st.text(st.characters(codec="utf-8"), min_size=1, max_size=128)
money = st.floats(min_value=0, max_value=1e9, allow_nan=False)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    event_id=ids, campaign=ids, cost=money, offset_min=st.integers(-23 * 60, 23 * 60),
    delta_ms=st.integers(-10**10, 200_000), iso=st.booleans(),
    channel=st.text(st.characters(categories=["L", "N", "Zs"]), max_size=20),
)  # fmt: skip
def test_valid_clicks_always_parse(
    event_id: str, campaign: str, cost: float, offset_min: int,
    delta_ms: int, iso: bool, channel: str,
) -> None:  # fmt: skip
    from datetime import UTC, datetime, timedelta, timezone

    ts_ms = NOW_MS + delta_ms
    ts: Any = ts_ms
    if iso:
        tz = timezone(timedelta(minutes=offset_min))
        ts = (
            datetime.fromtimestamp(ts_ms / 1000, UTC)
            .astimezone(tz)
            .isoformat(timespec="milliseconds")
        )
    body = {
        "event_id": event_id,
        "ts": ts,
        "campaign_id": campaign,
        "cost": cost,
        "channel": channel,
    }
    result = PARSER.parse(orjson.dumps(body), topic_type="click", now_ms=NOW_MS)
    assert isinstance(result, Event), result
    assert result.ts_ms == ts_ms
    assert result.spend_micros == round(cost * 1_000_000)
    assert result.channel == (channel.strip().lower() or "unknown")
