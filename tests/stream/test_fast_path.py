"""The parser's fast path (orjson and plain checks) reads every input as the pydantic
models do: the same Event, or the same Rejection (reason and message), or it stands aside.

``EventParser.parse`` is the fast path with the models behind it; ``parse_validated`` is
the models alone. Hypothesis generates events field by field from valid, boundary and
wrong values of every field type, and hand-made inputs cover what generation rarely hits.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream.events import (
    _FAST_FIELDS,
    EVENT_TYPES,
    MODELS,
    Event,
    EventParser,
    Rejection,
    RejectReason,
)

NOW = 1_796_000_000_000
PARSER = EventParser(
    rates={"EUR": 1.1, "GBP": 1.25},
    reporting_currency="USD",
    max_bytes=65536,
    max_future_skew_ms=300_000,
)

ids = st.one_of(
    st.sampled_from(
        [
            "a",
            "c1",
            "x" * 128,
            "x" * 129,
            "",
            " ",
            "Ünïcødé-ид",
            "😀" * 128,
            "😀" * 129,
            "a\u0000b",
            "a\nb",
        ]
    ),
    st.text(max_size=140),
)
wrong = st.sampled_from([0, 1.5, True, False, [], {}, ["a"], {"a": 1}])
money = st.one_of(
    st.sampled_from(
        [
            0,
            0.0,
            -0.0,
            -1,
            -0.5,
            1e-9,
            0.1,
            12.5,
            2**53,
            2**53 + 1,
            2**63 - 1,
            2**64,
            10**30,
            1e11,
            1e12,
            9.99e11,
            1e300,
            True,
            "1.5",
            "1",
        ]
    ),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.floats(allow_nan=False, allow_infinity=False),
)
iso = st.builds(
    lambda y, mo, d, h, mi, s, frac, tz: (
        f"{y:04d}-{mo:02d}-{d:02d}T{h:02d}:{mi:02d}:{s:02d}{frac}{tz}"
    ),
    st.integers(1999, 2101),
    st.integers(0, 13),
    st.integers(0, 32),
    st.integers(0, 24),
    st.integers(0, 60),
    st.integers(55, 61),
    st.sampled_from(["", ".5", ".123", ".123456", ".1234567", "."]),
    st.sampled_from(
        ["Z", "z", "+00:00", "-00:00", "+01:00", "-05:30", "+23:59", "+24:00", "+1:00", "", "+0100"]
    ),
)
timestamps = st.one_of(
    st.sampled_from(
        [
            NOW,
            NOW - 1,
            NOW + 299_999,
            NOW + 300_001,
            946_684_800_000,
            946_684_799_999,
            4_102_444_800_000,
            4_102_444_799_999,
            1_796_000_000,
            1_796_000_000_000_000,
            NOW + 0.7,
            float(NOW),
            2**53 + 1,
            2**64,
            -1,
            "2026-12-01T10:00:00Z",
            "2026-12-01t10:00:00z",
            "2026-12-01 10:00:00Z",
            "2016-12-31T23:59:60Z",
            "2016-12-31T23:59:60.5+00:00",
            "2026-12-01T10:00:60Z",
            "2024-02-29T12:00:00Z",
            "2026-02-29T12:00:00Z",
            "2026-12-01T10:00:00",
            "2026-12-01",
            str(NOW),
            "",
            True,
        ]
    ),
    iso,
    st.integers(min_value=0, max_value=5 * 10**12),
    st.floats(min_value=9e11, max_value=5e12),
)
channels = st.one_of(
    st.sampled_from(
        [
            "search",
            "Search",
            " SEARCH ",
            "\tsearch",
            "search\x1c",
            "\x1csearch",
            "",
            " ",
            "ÄBC",
            "İ",
            "ΟΔΟΣ",
            "x" * 64,
            "x" * 65,
            " " + "x" * 64,
            "é" * 64,
            "a\x7f",
        ]
    ),
    st.text(max_size=70),
)
currencies = st.one_of(
    st.sampled_from(
        ["EUR", "eur", "Eur", "GBP", "USD", "JPY", "EU", "EURO", "EU1", "ÉUR", "EUR\n", ""]
    ),
    st.text(max_size=4),
)
short_text = st.one_of(st.text(max_size=70), st.sampled_from(["x" * 64, "x" * 65]))

FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "event_id": ids, "campaign_id": ids, "ad_group_id": ids, "creative_id": ids,
    "click_id": ids, "user_id": ids, "customer_id": ids, "order_id": ids,
    "ts": timestamps, "channel": channels, "currency": currencies, "country": short_text,
    "device": short_text, "cost": money, "revenue": money, "amount": money,
    "new_customer": st.sampled_from([True, False, 0, 1, "true"]),
}  # fmt: skip
ALL_FIELDS = sorted({name for model in MODELS.values() for name in model.model_fields})


def valid_value(name: str) -> Any:
    return {"ts": NOW - 60_000, "channel": "search", "currency": "EUR", "new_customer": True,
            "cost": 0.25, "revenue": 99.5, "amount": 10}.get(name, f"{name}-1")  # fmt: skip


@st.composite
def events(draw: st.DrawFn) -> tuple[dict[str, Any], str | None]:
    kind = draw(st.sampled_from(EVENT_TYPES))
    body: dict[str, Any] = {}
    for name, info in MODELS[kind].model_fields.items():  # a valid event, then changes
        if name != "type" and (info.is_required() or draw(st.booleans())):
            body[name] = valid_value(name)
    fields = [name for name in ALL_FIELDS if name != "type"]
    for name in draw(st.lists(st.sampled_from(fields), max_size=4, unique=True)):
        choice = draw(st.sampled_from(["drawn", "drawn", "drawn", "null", "missing", "wrong"]))
        if choice == "drawn":
            body[name] = draw(FIELD_VALUES.get(name, st.text(max_size=5)))
        elif choice == "null":
            body[name] = None
        elif choice == "wrong":
            body[name] = draw(wrong)
        else:
            body.pop(name, None)
    tag = draw(st.sampled_from(["kind", "kind", "none", "missing", "other", "wrong"]))
    if tag == "kind":
        body["type"] = kind
    elif tag == "none":
        body["type"] = None
    elif tag == "other":
        body["type"] = draw(st.sampled_from([*EVENT_TYPES, "view", "", "Click"]))
    elif tag == "wrong":
        body["type"] = draw(wrong)
    if draw(st.booleans()):
        body[draw(st.text(max_size=8))] = draw(st.one_of(wrong, st.text(max_size=3)))
    topic_type = draw(st.sampled_from([None, kind]))
    return body, topic_type


def both(raw: bytes, topic_type: str | None) -> tuple[Event | Rejection, Event | Rejection]:
    return (
        PARSER.parse(raw, topic_type=topic_type, now_ms=NOW),
        PARSER.parse_validated(raw, topic_type=topic_type, now_ms=NOW),
    )


def encodings(body: dict[str, Any]) -> list[bytes]:
    """orjson's bytes, and json's (spacing, ASCII escapes, big integers)."""
    out = [json.dumps(body).encode(), json.dumps(body, ensure_ascii=False).encode()]
    with contextlib.suppress(TypeError):  # an integer orjson cannot write
        out.append(orjson.dumps(body))
    return out


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events())
def test_the_fast_path_reads_every_generated_event_as_the_models_do(
    case: tuple[dict[str, Any], str | None],
) -> None:
    body, topic_type = case
    for raw in encodings(body):
        fast, reference = both(raw, topic_type)
        assert fast == reference, raw


def test_the_generated_events_reach_the_fast_path_and_every_outcome() -> None:
    """The equivalence test means something only if the fast path decides much of its
    input, and the models see valid and rejected events of every kind."""
    decided = outcomes = 0
    reasons: set[RejectReason] = set()

    @settings(max_examples=1000, deadline=None, database=None, derandomize=True)
    @given(events())
    def count(case: tuple[dict[str, Any], str | None]) -> None:
        nonlocal decided, outcomes
        body, topic_type = case
        raw = orjson.dumps(body) if all(
            not isinstance(v, int) or abs(v) < 2**63 for v in body.values()
        ) else json.dumps(body).encode()  # fmt: skip
        outcomes += 1
        if PARSER._fast(raw, topic_type, NOW) is not None:
            decided += 1
        result = PARSER.parse_validated(raw, topic_type=topic_type, now_ms=NOW)
        if isinstance(result, Rejection):
            reasons.add(result.reason)

    count()
    assert decided > outcomes / 4
    assert {RejectReason.MISSING_FIELD, RejectReason.WRONG_TYPE, RejectReason.BAD_TIMESTAMP,
            RejectReason.NEGATIVE_MONEY, RejectReason.INVALID_VALUE} <= reasons  # fmt: skip


HAND_MADE: list[tuple[bytes, str | None]] = [
    (b'{"type":"click","event_id":"e","ts":1796000000000,"campaign_id":"c","cost":0.5}', None),
    (
        b'{"type":"click","event_id":"e","event_id":"f","ts":1796000000000,"campaign_id":"c"}',
        None,
    ),  # duplicate keys: the last one
    (b'{"type":"click","event_id":"e","ts":1796000000000,"campaign_id":"c","cost":NaN}', None),
    (b'{"type":"click","event_id":"e","ts":1796000000000,"campaign_id":"c","cost":1e400}', None),
    (
        b'{"type":"click","event_id":"e","ts":1796000000000,"campaign_id":"c",'
        b'"cost":123456789012345678901234567890}',
        None,
    ),
    (b'{"type":"click","event_id":"\\ud800","ts":1796000000000,"campaign_id":"c"}', None),
    (b'{"type":"click","event_id":"\xff","ts":1796000000000,"campaign_id":"c"}', None),
    (b'{"type":"click","event_id":"e","ts":1796000000000,"campaign_id":"c"} trailing', None),
    (b'{"type":"click","event_id":"e","ts":1796000000000,"campaign_id":"c"}  \n', None),
    (b'[{"type":"click"}]', None),
    (b'"click"', None),
    (b"null", None),
    (
        b'{"type":"order","event_id":"e","ts":"2016-12-31T23:59:60Z","customer_id":"u",'
        b'"revenue":1}',
        None,
    ),  # a leap second: read as the next second
    (
        b'{"type":"order","event_id":"e","ts":"2016-12-30T23:59:60Z","customer_id":"u",'
        b'"revenue":1}',
        None,
    ),  # second 60 where no leap second can be
    (b'{"event_id":"e","ts":"2026-11-30T10:00:00.1234567Z","campaign_id":"c"}', "impression"),
    (b'{"event_id":"e","ts":"2026-11-30T10:00:00+14:00","campaign_id":"c"}', "impression"),
    (b'{"event_id":"e","ts":1796000000000,"campaign_id":"c","type":"click"}', "impression"),
    (
        b'{"event_id":"e","ts":1796000000000,"campaign_id":"c","currency":"JPY","cost":1}',
        "impression",
    ),
    (
        b'{"event_id":"e","ts":1796000000000,"campaign_id":"c","currency":"eur","cost":1e12}',
        "impression",
    ),  # money too large after conversion
    (
        b'{"event_id":"e","ts":1796000000000,"campaign_id":"c","channel":"  Mixed Case "}',
        "impression",
    ),
    (b'{"event_id":"e","ts":1796000000000.9,"campaign_id":"c"}', "impression"),
    (b'{"event_id":"e","ts":-1796000000000,"campaign_id":"c"}', "impression"),
    (b'{"event_id":"e","ts":true,"campaign_id":"c"}', "impression"),
    (b'{"event_id":"e","ts":1796000000000,"revenue":true,"customer_id":"u"}', "order"),
    (
        b'{"event_id":"e","ts":1796000000000,"revenue":1,"customer_id":"u","order_id":"o",'
        b'"new_customer":true,"click_id":"k"}',
        "order",
    ),
    (b'{"event_id":"e","ts":1796000000000,"amount":-0.0,"campaign_id":"c"}', "spend"),
    (b'{"event_id":"e","ts":1796000000000,"amount":-1,"campaign_id":"c"}', "spend"),
    (
        b'{"event_id":"e","ts":1796000000000,"user_id":"", "extra":{"deep":[1,2,{"x":null}]}}',
        "lead",
    ),
]


@pytest.mark.parametrize(("raw", "topic_type"), HAND_MADE)
def test_the_fast_path_reads_hand_made_edge_inputs_as_the_models_do(
    raw: bytes, topic_type: str | None
) -> None:
    fast, reference = both(raw, topic_type)
    assert fast == reference


def test_the_fast_path_decides_the_common_shapes_itself() -> None:
    """Typical events never reach pydantic (else the fast path buys nothing)."""
    common = [
        b'{"type":"impression","event_id":"i1","ts":1796000000000,"channel":"search",'
        b'"campaign_id":"c0","cost":0.002562}',
        b'{"type":"click","event_id":"k1","ts":"2026-11-29T23:00:00.123+01:00",'
        b'"channel":"social","campaign_id":"c1","click_id":"ck1","cost":0.4,"currency":"EUR"}',
        b'{"type":"order","event_id":"o1","ts":1796000000000,"click_id":"ck1",'
        b'"customer_id":"u1","revenue":42,"new_customer":false,"order_id":"A-1"}',
        b'{"type":"lead","event_id":"l1","ts":1796000000000,"click_id":"ck1"}',
        b'{"type":"spend","event_id":"s1","ts":1796000000000,"campaign_id":"c1","amount":12.5}',
    ]
    for raw in common:
        fast = PARSER._fast(raw, None, NOW)
        assert isinstance(fast, Event), raw
        assert fast == PARSER.parse_validated(raw, topic_type=None, now_ms=NOW)


def test_every_field_of_every_model_has_a_fast_rule() -> None:
    """The rules are derived from the models (an unknown field shape fails at import)."""
    for kind, model in MODELS.items():
        assert [f[0] for f in _FAST_FIELDS[kind]] == list(model.model_fields)
