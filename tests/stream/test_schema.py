"""The committed JSON Schemas equal a fresh generation and agree with the parser."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from stream.events import EVENT_TYPES, Event, EventParser, json_schemas
from tests.helpers import REPO

SCHEMA_DIR = REPO / "stream" / "schemas"
NOW_MS = 1_795_000_000_000
EXAMPLES: dict[str, dict[str, Any]] = {
    "impression": {"event_id": "i-1", "ts": NOW_MS, "campaign_id": "c1", "channel": "search",
                   "cost": 0.002},
    "click": {"event_id": "k-1", "ts": "2026-11-18T11:06:40Z", "campaign_id": "c1",
              "channel": "search", "click_id": "k-1", "cost": 0.4},
    "lead": {"event_id": "l-1", "ts": NOW_MS, "click_id": "k-1", "user_id": "u-9"},
    "order": {"event_id": "o-1", "ts": NOW_MS, "order_id": "A-1", "revenue": 59.9,
              "customer_id": "u-9", "new_customer": True, "currency": "EUR", "click_id": "k-1"},
    "spend": {"event_id": "s-1", "ts": NOW_MS, "campaign_id": "c1", "amount": 120.0},
}  # fmt: skip


def test_committed_schemas_are_current() -> None:
    for name, schema in json_schemas().items():
        committed = json.loads((SCHEMA_DIR / f"{name}.schema.json").read_text())
        assert committed == schema, f"run `kpimon schema --write stream/schemas` ({name})"


@pytest.mark.parametrize("kind", EVENT_TYPES)
def test_examples_valid_for_schema_and_parser(kind: str) -> None:
    schema = json_schemas()[kind]
    jsonschema.validate(EXAMPLES[kind], schema)
    parser = EventParser(rates={"EUR": 1.1}, reporting_currency="USD", max_bytes=65536,
                         max_future_skew_ms=300_000)  # fmt: skip
    result = parser.parse(json.dumps(EXAMPLES[kind]).encode(), topic_type=kind, now_ms=NOW_MS)
    assert isinstance(result, Event)


@pytest.mark.parametrize("kind", ["impression", "click", "spend"])
def test_schema_requires_campaign_where_contract_does(kind: str) -> None:
    assert "campaign_id" in json_schemas()[kind]["required"]


def test_schema_rejects_negative_money() -> None:
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**EXAMPLES["spend"], "amount": -1}, json_schemas()["spend"])
