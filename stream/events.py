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
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from types import UnionType
from typing import Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

import orjson
from annotated_types import Ge
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
from pydantic.fields import FieldInfo
from pydantic.types import AllowInfNan

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
        self._fast_events = {
            kind: make(self._event, self._rates, self._rates[reporting_currency],
                       max_future_skew_ms)
            for kind, make in _FAST_MAKERS.items()
        }  # fmt: skip
        """Per type: ``body, now_ms`` -> Event, Rejection or None (see :func:`_fast_source`)."""

    def parse(self, raw: bytes | None, *, topic_type: str | None, now_ms: int) -> Event | Rejection:
        """Parse one message value; ``topic_type`` is None on a shared topic."""
        if raw and len(raw) <= self._max_bytes:
            done = self._fast(raw, topic_type, now_ms)
            if done is not None:
                return done
        return self._parse(raw, topic_type, now_ms)

    def _parse(self, raw: bytes | None, topic_type: str | None, now_ms: int) -> Event | Rejection:
        """Through the pydantic models."""
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

    def parse_validated(
        self, raw: bytes | None, *, topic_type: str | None, now_ms: int
    ) -> Event | Rejection:
        """:meth:`parse` through the pydantic models only (no fast path): the reference
        the fast path is tested against."""
        return self._parse(raw, topic_type, now_ms)

    def _normalise(self, model: EventModel, now_ms: int) -> Event | Rejection:
        money = None
        new_customer = None
        click_id = customer_id = order_id = None
        if isinstance(model, Impression):
            money = model.cost
        elif isinstance(model, Click):
            money = model.cost
            click_id = model.click_id
        elif isinstance(model, Lead):
            click_id = model.click_id
        elif isinstance(model, Order):
            money = model.revenue
            new_customer = model.new_customer
            click_id = model.click_id
            customer_id = model.customer_id
            order_id = model.order_id
        elif isinstance(model, Spend):
            money = model.amount
        return self._event(
            now_ms,
            model.kind, model.event_id, timestamp_ms(model.ts), model.campaign_id,
            model.channel, model.currency, money, click_id, new_customer, customer_id,
            order_id,
        )  # fmt: skip

    def _event(
        self,
        now_ms: int,
        kind: str,
        event_id: str,
        ts: int,
        campaign_id: str | None,
        channel: str | None,
        currency: str | None,
        money: float | None,
        click_id: str | None,
        new_customer: bool | None,
        customer_id: str | None,
        order_id: str | None,
    ) -> Event | Rejection:
        """The rules beyond the schema (range, clock skew, rates), on validated fields:
        the pydantic path's; the fast path inlines the same expressions for an event they
        accept and calls this for any other, so a rejection is always made here."""
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
        currency = currency.upper() if currency else self._reporting_currency
        rate = self._rates.get(currency)
        if rate is None:
            return Rejection(RejectReason.UNKNOWN_CURRENCY, f"no rate configured for {currency}")
        spend = revenue = 0.0
        if kind == "order":
            revenue = (money or 0.0) * rate
        else:
            spend = (money or 0.0) * rate
        if not (spend + revenue) < MAX_MONEY:
            return Rejection(RejectReason.INVALID_VALUE, "money too large after conversion")
        return Event(
            kind,
            event_id,
            order_id or event_id,
            ts,
            campaign_id,
            channel or "unknown",
            click_id,
            round(spend * 1_000_000),
            round(revenue * 1_000_000),
            bool(new_customer),
            customer_id,
        )

    def _fast(self, raw: bytes, topic_type: str | None, now_ms: int) -> Event | Rejection | None:
        """The event of ``raw`` when it has the common shape, else None and the pydantic
        models decide. It never accepts what they would refuse nor reads a field
        differently: each check (see :func:`_fast_source`) is narrower than the schema's,
        and tests/stream/test_fast_path.py compares both over generated inputs."""
        try:
            body = _loads(raw)
        except _JSONDecodeError:
            return None
        if type(body) is not dict:
            return None
        tag = body.get("type")
        if topic_type is None:
            fast = self._fast_events.get(tag) if type(tag) is str else None
            if fast is None:
                return None
        else:
            if tag is not None and tag != topic_type:
                return None
            fast = self._fast_events[topic_type]
        return fast(body, now_ms)


# -- the fast path's view of the models ----------------------------------------------
# Each field of each model, as one of a few rules the fast path checks in plain Python.
# Derived from the models at import: a field of a shape it does not know fails here, at
# import, rather than being let through unchecked.
_STR, _LOWER, _MONEY, _TS, _CURRENCY, _BOOL, _TAG = range(7)
_INF = float("inf")
_EXACT_INT = 2**53
"""Integers up to here are exact as floats (pydantic reads JSON integers as floats here)."""
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:[0-5]\d(?:\.\d{1,6})?(?:Z|[+-]\d{2}:\d{2})")
"""The usual shape of a ``ts`` string (a subset of what pydantic reads, second 60 left to it)."""
_loads = orjson.loads
_JSONDecodeError = orjson.JSONDecodeError

FastField = tuple[str, int, bool, bool, int, int]
"""(name, rule, required, nullable, min length, max length)."""
_MONEY_METADATA = sorted(map(repr, [Ge(ge=0), AllowInfNan(allow_inf_nan=False)]))


def _fast_field(name: str, info: Any) -> FastField:
    annotation = info.annotation
    nullable = False
    args = get_args(annotation)
    if get_origin(annotation) in (Union, UnionType) and type(None) in args:
        nullable = True
        rest = [a for a in args if a is not type(None)]
        annotation = rest[0] if len(rest) == 1 else Union[tuple(rest)]  # noqa: UP007
    required = info.is_required()
    metadata = list(info.metadata)
    if get_origin(annotation) is Annotated:
        for m in annotation.__metadata__:
            metadata += list(m.metadata) if isinstance(m, FieldInfo) else [m]
        annotation = get_args(annotation)[0]
    if name == "ts":
        return name, _TS, required, nullable, 0, 0
    if get_origin(annotation) is Literal:
        return name, _TAG, required, nullable, 0, 0
    if annotation is bool:
        return name, _BOOL, required, nullable, 0, 0
    if annotation is float and sorted(map(repr, metadata)) == _MONEY_METADATA:
        return name, _MONEY, required, nullable, 0, 0
    if annotation is str:
        (c,) = [m for m in metadata if isinstance(m, StringConstraints)]
        if c.pattern == r"^[A-Za-z]{3}$" and c.max_length is None and not c.to_lower:
            return name, _CURRENCY, required, nullable, 0, 0
        if c.pattern is None and not c.to_upper and c.max_length is not None:
            if c.strip_whitespace and c.to_lower and not c.min_length:
                return name, _LOWER, required, nullable, 0, c.max_length
            if not c.strip_whitespace and not c.to_lower:
                return name, _STR, required, nullable, c.min_length or 0, c.max_length
    raise TypeError(f"the parser's fast path does not know field {name!r}: {info}")


_FAST_FIELDS: dict[str, tuple[FastField, ...]] = {
    kind: tuple(_fast_field(name, info) for name, info in model.model_fields.items())
    for kind, model in MODELS.items()
}
_READ = ("event_id", "ts", "campaign_id", "channel", "currency", "", "click_id",
         "new_customer", "customer_id", "order_id")  # fmt: skip
"""The fields :meth:`EventParser._event` takes, in order ("": the type's money field)."""


def _fast_source(kind: str, fields: tuple[FastField, ...]) -> str:
    """Python source of the fast path of one type: ``make_<kind>(slow, rates, default_rate,
    skew)`` returns ``fast(body, now_ms)`` -> the :class:`Event`, or None (the models
    decide). One block per field, in the model's order; a field the model lacks is None
    (an extra is ignored). Then :meth:`EventParser._event`'s rules, inlined for the common
    case (no call, no argument tuple: this runs once an event); whatever they would refuse
    goes to ``slow`` (that method) with the same arguments, so the rejection is its own."""
    lines = [f"def make_{kind}(slow, rates, default_rate, skew):", " def fast(body, now_ms):"]
    money = None
    for name, rule, required, nullable, lo, hi in fields:
        if rule == _TAG:
            continue  # the type: checked before
        var = f"f_{name}"
        lines.append(f"    {var} = body.get({name!r})")
        if rule == _MONEY:
            money = var
        if rule == _TS:
            lines += [
                f"    t = type({var})",
                "    if t is int:",
                f"        if not -EXACT_INT <= {var} <= EXACT_INT: return None",
                "    elif t is float:",
                f"        if not -INF < {var} < INF: return None",
                f"        {var} = int({var})",
                "    elif t is str:",
                f"        if RFC3339({var}) is None: return None",
                f"        try: {var} = (fromisoformat({var}) - EPOCH) // MS",
                "        except ValueError: return None",
                "    else: return None",
            ]
            continue
        if rule == _STR:
            bad = f"type({var}) is not str or not {lo} <= len({var}) <= {hi}"
            fix = None
        elif rule == _LOWER:  # strip and lower-case do the same in Python and pydantic here
            bad = (f"type({var}) is not str or len({var}) > {hi} or ({var} and (not "
                   f"{var}.isascii() or {var}[0] <= ' ' or {var}[-1] <= ' '))")  # fmt: skip
            fix = f"{var} = {var}.lower()"
        elif rule == _CURRENCY:
            bad = (f"type({var}) is not str or len({var}) != 3 or not {var}.isascii() "
                   f"or not {var}.isalpha()")  # fmt: skip
            fix = None
        elif rule == _BOOL:
            bad = f"type({var}) is not bool"
            fix = None
        else:  # _MONEY
            bad = (f"not (type({var}) is float and 0.0 <= {var} < INF or type({var}) is int "
                   f"and 0 <= {var} <= EXACT_INT)")  # fmt: skip
            fix = f"{var} = float({var})"
        if required and not nullable:
            lines.append(f"    if {bad}: return None")
        else:
            lines.append(f"    if {var} is not None:")
            lines.append(f"        if {bad}: return None")
            if required:
                lines.append(f"    elif {name!r} not in body: return None")
            elif not nullable:
                lines.append(f"    elif {name!r} in body: return None")
        if fix:
            lines.append(f"    {'    ' if not required or nullable else ''}{fix}")
    have = {f[0] for f in fields}
    read = [money or "None" if n == "" else f"f_{n}" if n in have else "None" for n in _READ]
    got = dict(zip(_READ, read, strict=True))
    micros = "round(m * 1_000_000)"
    spend, revenue = ("0", micros) if kind == "order" else (micros, "0")
    new = f"bool({got['new_customer']})" if got["new_customer"] != "None" else "False"
    dedup_key = f"f_order_id or {got['event_id']}" if got["order_id"] != "None" else got["event_id"]
    lines += [
        f"    rate = default_rate if {got['currency']} is None else "
        f"rates.get({got['currency']}.upper())",
        "    if rate is None or not MIN_TS <= f_ts < MAX_TS or f_ts > now_ms + skew:",
        f"        return slow(now_ms, {kind!r}, {', '.join(read)})",
        f"    m = ({got['']} or 0.0) * rate",
        "    if not m < MAX_MONEY:",
        f"        return slow(now_ms, {kind!r}, {', '.join(read)})",
        f"    return Event({kind!r}, {got['event_id']}, {dedup_key}, f_ts, {got['campaign_id']}, "
        f"{got['channel']} or 'unknown', {got['click_id']}, {spend}, {revenue}, {new}, "
        f"{got['customer_id']})",
    ]
    # One more level of indentation for the inner function, which the factory returns.
    inner = ["    " + line for line in lines[2:]]
    return "\n".join([lines[0], "    def fast(body, now_ms):", *inner, "    return fast"]) + "\n"


FastEvent = Callable[[dict[str, Any], int], Event | Rejection | None]
"""A type's fast path: (body, now_ms) -> its event, its rejection, or None (the models')."""
FastMaker = Callable[[Callable[..., Event | Rejection], dict[str, float], float, int], FastEvent]
"""(``EventParser._event``, rates, the reporting currency's rate, future skew) -> fast path."""


def _compile_fast() -> dict[str, FastMaker]:
    namespace: dict[str, Any] = {
        "EXACT_INT": _EXACT_INT, "INF": _INF, "RFC3339": _RFC3339.fullmatch,
        "fromisoformat": datetime.fromisoformat, "EPOCH": _EPOCH, "MS": _MS,
        "MIN_TS": _MIN_TS_MS, "MAX_TS": _MAX_TS_MS, "MAX_MONEY": MAX_MONEY, "Event": Event,
    }  # fmt: skip
    for kind, fields in _FAST_FIELDS.items():
        exec(_fast_source(kind, fields), namespace)
    return {kind: namespace[f"make_{kind}"] for kind in _FAST_FIELDS}


_FAST_MAKERS = _compile_fast()
"""Per type: the factory of its fast path (source: ``_fast_source``), bound per parser."""
