"""The event contract: pydantic models, JSON Schemas, and the byte-level parser.

The models are the single definition of what producers may send (the JSON
Schemas handed to producers are generated from them). ``EventParser`` turns any
byte string into either a normalised :class:`Event` or a :class:`Rejection`
with a reason from a small fixed set, so bad input can be dead-lettered and
counted instead of crashing the worker. This module has no Kafka imports.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
)

EVENT_TYPES: tuple[str, ...] = ("impression", "click", "lead", "order", "spend")
MONEY_FIELDS: frozenset[str] = frozenset({"cost", "revenue", "amount"})
# Sums are 64-bit integers of millionths: one event may carry up to 10^12 units.
MAX_MONEY = 1e12

# Timestamps outside this range are almost always unit mistakes (seconds or
# microseconds sent as milliseconds), so they are rejected rather than counted.
_MIN_TS_MS = 946_684_800_000  # 2000-01-01T00:00:00Z
_MAX_TS_MS = 4_102_444_800_000  # 2100-01-01T00:00:00Z
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


class RejectReason(StrEnum):
    """Why an input was dead-lettered; the label values of the rejection counter."""

    TOO_LARGE = "too_large"
    NOT_UTF8 = "not_utf8"
    NOT_JSON = "not_json"
    NOT_OBJECT = "not_object"
    UNKNOWN_TYPE = "unknown_type"
    TYPE_MISMATCH = "type_mismatch"
    MISSING_FIELD = "missing_field"
    WRONG_TYPE = "wrong_type"
    INVALID_VALUE = "invalid_value"
    NEGATIVE_MONEY = "negative_money"
    UNKNOWN_CURRENCY = "unknown_currency"
    BAD_TIMESTAMP = "bad_timestamp"
    FUTURE_TIMESTAMP = "future_timestamp"


def timestamp_ms(value: float | datetime) -> int:
    """Epoch milliseconds of a validated ``ts`` (a number of ms, or an aware datetime)."""
    if isinstance(value, datetime):
        return (value - _EPOCH) // _MS
    return int(value)


# Validation is pydantic-native throughout (no Python validator calls): this
# is the hot path. ``ts`` is a number (epoch ms) or an RFC 3339 string with an
# offset; its range is checked when the event is normalised.
Timestamp = Annotated[
    Annotated[float, Field(allow_inf_nan=False)] | AwareDatetime,
    WithJsonSchema(
        {
            "description": "Event time: RFC 3339 with offset, or epoch milliseconds",
            "anyOf": [
                {"type": "string", "format": "date-time"},
                {"type": "integer", "minimum": _MIN_TS_MS, "maximum": _MAX_TS_MS - 1},
            ],
        }
    ),
]
Id = Annotated[str, StringConstraints(min_length=1, max_length=128)]
Money = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Channel = Annotated[str, StringConstraints(strip_whitespace=True, to_lower=True, max_length=64)]
Currency = Annotated[str, StringConstraints(pattern=r"^[A-Za-z]{3}$")]


class EventModel(BaseModel):
    """Fields common to every event. Unknown extra fields are ignored."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)
    kind: ClassVar[str]

    event_id: Id = Field(description="Deduplication key (orders: order_id when present)")
    ts: Timestamp
    campaign_id: Id | None = None
    channel: Channel | None = Field(
        "unknown", description="Lower-cased; 'unknown' when absent or empty"
    )
    ad_group_id: Id | None = None
    creative_id: Id | None = None
    country: Annotated[str, StringConstraints(max_length=64)] | None = None
    device: Annotated[str, StringConstraints(max_length=64)] | None = None
    currency: Currency | None = Field(
        None, description="ISO 4217 code of money fields; default: the reporting currency"
    )


class Impression(EventModel):
    kind: ClassVar[str] = "impression"
    type: Literal["impression"] | None = None
    campaign_id: Id
    cost: Money | None = None


class Click(EventModel):
    kind: ClassVar[str] = "click"
    type: Literal["click"] | None = None
    campaign_id: Id
    click_id: Id | None = None
    cost: Money | None = None


class Lead(EventModel):
    kind: ClassVar[str] = "lead"
    type: Literal["lead"] | None = None
    click_id: Id | None = None
    user_id: Id | None = None


class Order(EventModel):
    kind: ClassVar[str] = "order"
    type: Literal["order"] | None = None
    revenue: Money
    customer_id: Id
    new_customer: bool | None = None
    click_id: Id | None = None
    order_id: Id | None = None


class Spend(EventModel):
    kind: ClassVar[str] = "spend"
    type: Literal["spend"] | None = None
    campaign_id: Id
    amount: Money


MODELS: dict[str, type[EventModel]] = {
    "impression": Impression,
    "click": Click,
    "lead": Lead,
    "order": Order,
    "spend": Spend,
}


def _tagged(model: type[EventModel], kind: str) -> type[EventModel]:
    """The same model with ``type`` required, for topics that carry several types."""
    annotations = {"type": Literal[kind]}
    return type(f"Shared{model.__name__}", (model,), {"__annotations__": annotations})


# One pass over the bytes on a shared topic too: a union tagged by ``type``.
_TAGGED: Any = Union[tuple(_tagged(model, kind) for kind, model in MODELS.items())]  # noqa: UP007
_SHARED: TypeAdapter[EventModel] = TypeAdapter(Annotated[_TAGGED, Field(discriminator="type")])


def json_schemas() -> dict[str, dict[str, Any]]:
    """JSON Schema (draft 2020-12) of each event type, for producers."""
    schemas: dict[str, dict[str, Any]] = {}
    for name, model in MODELS.items():
        schema = model.model_json_schema(mode="validation")
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["$id"] = f"https://kpimon.dev/schemas/{name}.schema.json"
        schema["description"] = (
            f"kpimon {name} event. 'type' is required when several types share a topic."
        )
        schemas[name] = schema
    return schemas


@dataclass(slots=True)
class Event:
    """A validated event, normalised for aggregation.

    Money is in millionths of the reporting currency, as integers, so that sums
    are exact whatever order events arrive in.
    """

    type: str
    event_id: str
    dedup_key: str
    ts_ms: int
    campaign_id: str | None
    channel: str
    click_id: str | None = None
    spend_micros: int = 0
    revenue_micros: int = 0
    new_customer: bool = False
    customer_id: str | None = None


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why an input could not be counted; ``detail`` is for humans (DLQ, logs)."""

    reason: RejectReason
    detail: str


def _classify(field: str, kind: str) -> RejectReason:
    if kind == "missing":
        return RejectReason.MISSING_FIELD
    if field == "ts":
        return RejectReason.BAD_TIMESTAMP
    if field == "type" and kind == "literal_error":
        return RejectReason.TYPE_MISMATCH
    if field == "currency" and not kind.endswith("_type"):
        return RejectReason.UNKNOWN_CURRENCY
    if field in MONEY_FIELDS and kind == "greater_than_equal":
        return RejectReason.NEGATIVE_MONEY
    if kind.endswith(("_type", "_parsing")) or kind == "literal_error":
        return RejectReason.WRONG_TYPE
    return RejectReason.INVALID_VALUE


_REASON_PRIORITY: tuple[RejectReason, ...] = (
    RejectReason.TYPE_MISMATCH,
    RejectReason.MISSING_FIELD,
    RejectReason.WRONG_TYPE,
    RejectReason.BAD_TIMESTAMP,
    RejectReason.NEGATIVE_MONEY,
    RejectReason.UNKNOWN_CURRENCY,
    RejectReason.INVALID_VALUE,
)


def _rejection_from(exc: ValidationError, raw: bytes, shared: bool) -> Rejection:
    errors = exc.errors(include_url=False, include_input=False)
    first: dict[str, Any] = dict(errors[0]) if errors else {}
    kind = str(first.get("type", ""))
    if kind == "json_invalid":
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as bad:
            return Rejection(RejectReason.NOT_UTF8, f"invalid UTF-8 at byte {bad.start}")
        return Rejection(RejectReason.NOT_JSON, str(first.get("msg", "invalid JSON"))[:200])
    if kind in ("model_type", "model_attributes_type") or (
        kind == "dict_type" and not first.get("loc")
    ):
        return Rejection(RejectReason.NOT_OBJECT, "expected a JSON object")
    if kind in ("union_tag_not_found", "union_tag_invalid"):
        return Rejection(
            RejectReason.UNKNOWN_TYPE,
            f"type must be one of {', '.join(EVENT_TYPES)} on a shared topic",
        )
    classified = []
    for err in errors:
        loc = tuple(err.get("loc") or ())
        if shared:
            loc = loc[1:]  # drop the union tag
        classified.append((_classify(str(loc[0]) if loc else "", str(err.get("type"))), loc, err))
    reason, loc, err = min(classified, key=lambda c: _REASON_PRIORITY.index(c[0]))
    field = ".".join(str(part) for part in loc) or "(event)"
    if reason is RejectReason.MISSING_FIELD:
        return Rejection(reason, f"missing required field {field!r}")
    if reason is RejectReason.BAD_TIMESTAMP:
        return Rejection(reason, "ts must be RFC 3339 with a UTC offset, or epoch milliseconds")
    return Rejection(reason, f"{field}: {err.get('msg', 'invalid')}")


def _validate(raw: bytes, topic_type: str | None) -> EventModel:
    if topic_type is None:
        return _SHARED.validate_json(raw)
    return MODELS[topic_type].model_validate_json(raw)


# The seconds of an RFC 3339 ``ts`` string: group 1 is everything before them.
_SECOND_60 = re.compile(r"(\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}):60(?!\d)")


def _leap_second(raw: bytes, topic_type: str | None) -> EventModel | Rejection | None:
    """The event whose ``ts`` is a leap second, with ``ts`` the next second (as most
    systems read ``23:59:60``), else why it is rejected all the same (second 60 where
    no leap second can be, another bad field); None when its ``ts`` has no second 60.

    Off the hot path: only input the validator refused for its ``ts`` comes here. The
    time is validated as second 59 (so every other rule of the format is pydantic's).
    """
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    ts = body.get("ts") if isinstance(body, dict) else None
    if not isinstance(ts, str) or (match := _SECOND_60.match(ts)) is None:
        return None
    body["ts"] = f"{match[1]}:59{ts[match.end() :]}"
    fixed = json.dumps(body).encode()
    try:
        model = _validate(fixed, topic_type)
    except ValidationError as exc:  # what else is wrong with it (or with its ts)
        return _rejection_from(exc, fixed, topic_type is None)
    except (ValueError, RecursionError):
        return None
    if not isinstance(model.ts, datetime):
        return None
    after = model.ts + timedelta(seconds=1)
    utc = after.astimezone(UTC)
    if (utc.day, utc.hour, utc.minute, utc.second) != (1, 0, 0, 0):
        return Rejection(
            RejectReason.BAD_TIMESTAMP,
            "ts: second 60 (a leap second) exists only at 23:59:60 UTC on a month's last day",
        )
    return model.model_copy(update={"ts": after})


class EventParser:
    """Bytes -> :class:`Event` or :class:`Rejection`. Never raises on any input."""

    def __init__(
        self,
        *,
        rates: dict[str, float],
        reporting_currency: str,
        max_bytes: int,
        max_future_skew_ms: int,
    ) -> None:
        self._rates = dict(rates)
        self._rates[reporting_currency] = 1.0
        self._reporting_currency = reporting_currency
        self._max_bytes = max_bytes
        self._max_future_skew_ms = max_future_skew_ms

    def parse(self, raw: bytes | None, *, topic_type: str | None, now_ms: int) -> Event | Rejection:
        """Parse one message value; ``topic_type`` is None on a shared topic."""
        if raw is None or len(raw) == 0:
            return Rejection(RejectReason.NOT_JSON, "empty message")
        if len(raw) > self._max_bytes:
            return Rejection(
                RejectReason.TOO_LARGE, f"{len(raw)} bytes exceeds the {self._max_bytes} limit"
            )
        try:
            model = _validate(raw, topic_type)
        except ValidationError as exc:
            rejection = _rejection_from(exc, raw, topic_type is None)
            if rejection.reason is RejectReason.BAD_TIMESTAMP and b":60" in raw:
                leap = _leap_second(raw, topic_type)
                if isinstance(leap, Rejection):
                    return leap
                if leap is not None:
                    return self._normalise(leap, now_ms)
            return rejection
        except (ValueError, RecursionError) as exc:  # defensive: the parser itself gave up
            return Rejection(RejectReason.NOT_JSON, str(exc)[:200])
        return self._normalise(model, now_ms)

    def _normalise(self, model: EventModel, now_ms: int) -> Event | Rejection:
        ts = timestamp_ms(model.ts)
        if not _MIN_TS_MS <= ts < _MAX_TS_MS:
            return Rejection(
                RejectReason.BAD_TIMESTAMP,
                f"ts {ts} is outside 2000-2100 (epoch milliseconds expected)",
            )
        if ts > now_ms + self._max_future_skew_ms:
            return Rejection(
                RejectReason.FUTURE_TIMESTAMP,
                f"ts is {(ts - now_ms) / 1000:.0f} s in the future "
                f"(limit {self._max_future_skew_ms / 1000:.0f} s)",
            )
        currency = model.currency.upper() if model.currency else self._reporting_currency
        rate = self._rates.get(currency)
        if rate is None:
            return Rejection(RejectReason.UNKNOWN_CURRENCY, f"no rate configured for {currency}")
        spend = revenue = 0.0
        new_customer = False
        click_id = customer_id = None
        dedup_key = model.event_id
        if isinstance(model, Impression):
            spend = (model.cost or 0.0) * rate
        elif isinstance(model, Click):
            spend = (model.cost or 0.0) * rate
            click_id = model.click_id
        elif isinstance(model, Lead):
            click_id = model.click_id
        elif isinstance(model, Order):
            revenue = model.revenue * rate
            new_customer = bool(model.new_customer)
            click_id = model.click_id
            customer_id = model.customer_id
            dedup_key = model.order_id or model.event_id
        elif isinstance(model, Spend):
            spend = model.amount * rate
        if not (spend + revenue) < MAX_MONEY:
            return Rejection(RejectReason.INVALID_VALUE, "money too large after conversion")
        return Event(
            type=model.kind,
            event_id=model.event_id,
            dedup_key=dedup_key,
            ts_ms=ts,
            campaign_id=model.campaign_id,
            channel=model.channel or "unknown",
            click_id=click_id,
            spend_micros=round(spend * 1_000_000),
            revenue_micros=round(revenue * 1_000_000),
            new_customer=new_customer,
            customer_id=customer_id,
        )
