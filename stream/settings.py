"""Typed worker configuration read from ``KPIMON_*`` environment variables.

Everything the worker needs is validated once, at start-up, so a typo in a port
or a currency table stops the process with one clear message instead of
surfacing as a crash hours later. Secrets are ``SecretStr`` and never appear in
error messages or logs.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import socket
import urllib.parse
from pathlib import Path
from typing import Annotated, Any, get_args
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_RULES = Path(__file__).parents[1] / "alerts" / "rules.yml"
"""The rules shipped with kpimon; a path, not an import: the core does not import alerts."""
DEFAULT_TARGETS = Path(__file__).parents[1] / "alerts" / "targets.yml"
"""The shipped targets file (it sets no goal and no budget)."""
_CURRENCY = re.compile(r"^[A-Z]{3}$")


URL_FIELDS: tuple[str, ...] = (
    "slack_webhook_url", "slack_api_url", "alertmanager_url", "alertmanager_ui_url",
    "grafana_url", "runbook_base_url",
)  # fmt: skip
_HOST = re.compile(r"[A-Za-z0-9._-]+")
_SLACK_CHANNEL = re.compile(r"[CGD][A-Z0-9]{6,}|#?[a-z0-9][a-z0-9._-]{0,79}")


class ConfigError(Exception):
    """Invalid configuration; the message is safe to print (no secret values)."""


def check_http_url(url: str) -> None:
    """Raise ValueError unless ``url`` is an http(s) URL with a valid host and port.

    Checked at start-up so that a typo fails there, not at every delivery. The
    messages never quote the URL: it may carry a secret (a webhook path, a password).
    """
    if any(c.isspace() or not c.isprintable() for c in url):
        # urlsplit would silently drop tabs and newlines, so check before it.
        raise ValueError("must not contain spaces or control characters")
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:  # e.g. an unbalanced or invalid [IPv6] host
        raise ValueError("is not a valid URL") from None
    if parts.scheme.lower() not in {"http", "https"}:
        raise ValueError("must be an http:// or https:// URL")
    host = parts.hostname
    if not host:
        raise ValueError("must name a host (http://HOST[:PORT]/...)")
    if parts.netloc.rpartition("@")[2].startswith("["):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError("has an invalid IPv6 host") from None
    else:
        try:
            ascii_host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise ValueError("has an invalid host name") from None
        if not _HOST.fullmatch(ascii_host):
            raise ValueError("has an invalid host name")
    try:
        port = parts.port
    except ValueError:
        port = -1
    if port is not None and not 1 <= port <= 65535:
        raise ValueError("port must be a number from 1 to 65535")


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def _parse_rates(value: Any) -> Any:
    """Accept ``EUR=1.08,GBP=1.27`` (env friendly) as well as a mapping."""
    if isinstance(value, str):
        rates: dict[str, str] = {}
        for part in value.split(","):
            part = part.strip()
            if not part:
                continue
            code, sep, rate = part.partition("=")
            if not sep:
                raise ValueError(f"expected CODE=RATE, got {part!r}")
            rates[code.strip().upper()] = rate.strip()
        return rates
    return value


class Settings(BaseSettings):
    """Worker settings; each field is the env var ``KPIMON_<FIELD>``."""

    # No inf or nan in any number: each must bound a wait, a size or a rate, and
    # ``inf`` passes a lower bound only to crash later (int(inf) at start-up).
    model_config = SettingsConfigDict(
        env_prefix="KPIMON_", extra="ignore", validate_default=True, frozen=True,
        allow_inf_nan=False,
    )  # fmt: skip

    kafka_bootstrap: str = Field("127.0.0.1:9092", min_length=1)
    worker_id: str = Field(default_factory=socket.gethostname, min_length=1, max_length=100)
    group_id: str = Field("kpimon", min_length=1)

    topic_impressions: str = "events.impressions"
    topic_clicks: str = "events.clicks"
    topic_leads: str = "events.leads"
    topic_orders: str = "events.orders"
    topic_spend: str = "events.spend"
    shared_topics: Annotated[list[str], NoDecode] = Field(default_factory=list)
    topic_partitions: int = Field(3, ge=1, le=1000)
    topic_replication_factor: int = Field(1, ge=1, le=10)
    dlq_topic: str = "kpimon.dlq"
    alerts_topic: str = "kpimon.alerts"

    metrics_host: str = "0.0.0.0"
    metrics_port: int = Field(9108, ge=1, le=65535)

    reporting_currency: str = "USD"
    currency_rates: Annotated[dict[str, float], NoDecode] = Field(default_factory=dict)
    max_message_bytes: int = Field(65536, ge=64, le=10 * 1024 * 1024)
    max_future_skew_seconds: float = Field(300.0, ge=0, le=366 * 86400)

    eval_interval_seconds: float = Field(10.0, gt=0, le=3600)
    settle_seconds: float = Field(60.0, ge=0, le=3600)
    # How late an event of each type may be and still be counted: its dedup horizon.
    horizon_impression_seconds: float = Field(3600.0, ge=60, le=7 * 86400)
    horizon_click_seconds: float = Field(3600.0, ge=60, le=7 * 86400)
    horizon_lead_seconds: float = Field(86400.0, ge=60, le=7 * 86400)
    horizon_order_seconds: float = Field(86400.0, ge=60, le=7 * 86400)
    horizon_spend_seconds: float = Field(86400.0, ge=60, le=7 * 86400)
    allowed_lateness_seconds: str | None = Field(None, description="removed; see _removed")
    max_campaigns: int = Field(500, ge=1, le=100_000)
    max_channels: int = Field(50, ge=1, le=10_000)
    max_batch_records: int = Field(50_000, ge=1, le=1_000_000)
    replay_lag_seconds: float = Field(120.0, gt=0, le=86400)
    snapshot_interval_seconds: float = Field(5.0, gt=0, le=3600)
    shutdown_timeout_seconds: float = Field(10.0, ge=1, le=600)

    state_dir: Path = Path(".kpimon")
    dev_kafka_port: int = Field(9092, ge=1, le=65535)
    dev_kafka_controller_port: int = Field(9094, ge=1, le=65535)
    dev_prometheus_port: int = Field(9090, ge=1, le=65535)
    dev_alertmanager_port: int = Field(9093, ge=1, le=65535)
    rules: Path = DEFAULT_RULES
    targets: Path = DEFAULT_TARGETS
    timezone: str = "UTC"
    slack_webhook_url: SecretStr | None = None
    slack_bot_token: SecretStr | None = None
    slack_channel: str | None = None
    slack_api_url: str | None = None
    alertmanager_url: str | None = None
    alertmanager_ui_url: str | None = None
    silences_refresh_seconds: float = Field(30.0, gt=0, le=3600)
    grafana_url: str | None = None
    runbook_base_url: str | None = None
    console_alerts: bool = False
    notify_min_interval_seconds: float = Field(1.0, ge=0, le=60)
    notify_max_backoff_seconds: float = Field(60.0, gt=0, le=3600)
    alertmanager_resend_seconds: float = Field(60.0, gt=0, le=3600)
    log_level: str = "INFO"

    _split_topics = field_validator("shared_topics", mode="before")(_split_csv)

    @field_validator(*URL_FIELDS, mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        """``KPIMON_SLACK_WEBHOOK_URL=`` (e.g. compose's ``${VAR:-}``) means no webhook."""
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator(*URL_FIELDS)
    @classmethod
    def _http_url(cls, value: Any) -> Any:
        if value is not None:
            check_http_url(value.get_secret_value() if isinstance(value, SecretStr) else value)
        return value

    @field_validator("slack_bot_token", "slack_channel", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("slack_bot_token")
    @classmethod
    def _one_slack_mode(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if value is None:
            return None
        token = value.get_secret_value()
        if any(c.isspace() or not c.isprintable() for c in token):
            raise ValueError("must not contain spaces or control characters")
        if info.data.get("slack_webhook_url") is not None:
            raise ValueError("set either it (Web API mode) or KPIMON_SLACK_WEBHOOK_URL, not both")
        return value

    @field_validator("slack_channel")
    @classmethod
    def _slack_channel(cls, value: str | None, info: ValidationInfo) -> str | None:
        has_token = info.data.get("slack_bot_token") is not None
        if value is None:
            if has_token:
                raise ValueError("is required with KPIMON_SLACK_BOT_TOKEN (a channel id, C...)")
            return None
        if not has_token and "slack_bot_token" in info.data:
            raise ValueError("is only used with KPIMON_SLACK_BOT_TOKEN, which is not set")
        if not _SLACK_CHANNEL.fullmatch(value):
            raise ValueError("must be a channel id (C0123ABCD) or a channel name (#kpi-alerts)")
        return value

    _rates = field_validator("currency_rates", mode="before")(_parse_rates)

    @field_validator("reporting_currency")
    @classmethod
    def _currency_code(cls, value: str) -> str:
        value = value.upper()
        if not _CURRENCY.match(value):
            raise ValueError("must be an ISO 4217 code such as USD")
        return value

    @field_validator("currency_rates")
    @classmethod
    def _rates_valid(cls, rates: dict[str, float]) -> dict[str, float]:
        for code, rate in rates.items():
            if not _CURRENCY.match(code):
                raise ValueError(f"{code!r} is not an ISO 4217 code")
            if not rate > 0:  # inf and nan are refused before (allow_inf_nan)
                raise ValueError(f"rate for {code} must be a positive number")
        return rates

    @field_validator("allowed_lateness_seconds")
    @classmethod
    def _removed(cls, value: str | None) -> None:
        if value is not None:
            raise ValueError(
                "was removed: an event is counted as long as its type's dedup horizon covers "
                "it (KPIMON_HORIZON_<TYPE>_SECONDS, e.g. KPIMON_HORIZON_CLICK_SECONDS)"
            )

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        """Days ("spend today", daily budgets) run from midnight in this zone."""
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                "unknown time zone: use an IANA name such as UTC or Europe/Berlin"
            ) from None
        return value

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        value = value.upper()
        if value not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
        return value

    @model_validator(mode="after")
    def _topics_distinct(self) -> Settings:
        topics = [*self.type_topics.values(), *self.shared_topics]
        if len(set(topics)) != len(topics):
            raise ValueError("event topics must be distinct")
        if self.dlq_topic in topics or self.alerts_topic in topics:
            raise ValueError("dlq_topic and alerts_topic must differ from the event topics")
        return self

    @property
    def type_topics(self) -> dict[str, str]:
        """Event type -> its dedicated topic."""
        return {
            "impression": self.topic_impressions,
            "click": self.topic_clicks,
            "lead": self.topic_leads,
            "order": self.topic_orders,
            "spend": self.topic_spend,
        }

    @property
    def horizon_minutes(self) -> dict[str, int]:
        """Event type -> its dedup (and lateness) horizon in whole minutes, rounded up."""
        seconds = {
            "impression": self.horizon_impression_seconds,
            "click": self.horizon_click_seconds,
            "lead": self.horizon_lead_seconds,
            "order": self.horizon_order_seconds,
            "spend": self.horizon_spend_seconds,
        }
        return {kind: math.ceil(s / 60) for kind, s in seconds.items()}

    @property
    def tz(self) -> ZoneInfo:
        """The zone of ``timezone``, in which days start at midnight."""
        return ZoneInfo(self.timezone)

    @property
    def rates(self) -> dict[str, float]:
        """Currency -> rate into the reporting currency (which is always 1)."""
        return {**self.currency_rates, self.reporting_currency: 1.0}


_SECRET_FIELDS = frozenset(
    name
    for name, f in Settings.model_fields.items()
    if SecretStr in (f.annotation, *get_args(f.annotation))
)


def _format_errors(exc: ValidationError) -> str:
    lines = ["invalid configuration:"]
    for err in exc.errors(include_url=False, include_input=False):
        loc = err.get("loc") or ()
        field = str(loc[0]) if loc else ""
        name = f"KPIMON_{field.upper()}" if field else "(settings)"
        raw = os.environ.get(name)
        # URLs are not echoed either: one may hold a password or a token.
        secret = field in URL_FIELDS or field in _SECRET_FIELDS
        shown = "" if raw is None or secret else f" (got {raw!r})"
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        lines.append(f"  {name}: {msg}{shown}")
    return "\n".join(lines)


def load_settings(**overrides: Any) -> Settings:
    """Read settings from the environment; raise ConfigError with a readable message."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc)) from None
