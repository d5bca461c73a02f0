"""Typed worker configuration read from ``KPIMON_*`` environment variables.

Everything the worker needs is validated once, at start-up, so a typo in a port
or a currency table stops the process with one clear message instead of
surfacing as a crash hours later. Secrets are ``SecretStr`` and never appear in
error messages or logs.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from alerts.rules import DEFAULT_RULES

EVENT_TYPES: tuple[str, ...] = ("impression", "click", "lead", "order", "spend")
_CURRENCY = re.compile(r"^[A-Z]{3}$")


class ConfigError(Exception):
    """Invalid configuration; the message is safe to print (no secret values)."""


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

    model_config = SettingsConfigDict(
        env_prefix="KPIMON_", extra="ignore", validate_default=True, frozen=True
    )

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
    max_future_skew_seconds: float = Field(300.0, ge=0)

    eval_interval_seconds: float = Field(10.0, gt=0, le=3600)
    settle_seconds: float = Field(60.0, ge=0, le=3600)
    allowed_lateness_seconds: float = Field(600.0, ge=0, le=7 * 86400)
    max_campaigns: int = Field(500, ge=1, le=100_000)
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
    slack_webhook_url: SecretStr | None = None
    alertmanager_url: str | None = None
    grafana_url: str | None = None
    runbook_base_url: str | None = None
    console_alerts: bool = False
    notify_min_interval_seconds: float = Field(1.0, ge=0, le=60)
    notify_max_backoff_seconds: float = Field(60.0, gt=0, le=3600)
    alertmanager_resend_seconds: float = Field(60.0, gt=0, le=3600)
    log_level: str = "INFO"

    _split_topics = field_validator("shared_topics", mode="before")(_split_csv)

    @field_validator(
        "slack_webhook_url", "alertmanager_url", "grafana_url", "runbook_base_url", mode="before"
    )
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        """``KPIMON_SLACK_WEBHOOK_URL=`` (e.g. compose's ``${VAR:-}``) means no webhook."""
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("slack_webhook_url", "alertmanager_url", "grafana_url", "runbook_base_url")
    @classmethod
    def _http_url(cls, value: Any) -> Any:
        raw = value.get_secret_value() if isinstance(value, SecretStr) else value
        if raw is not None and not str(raw).startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
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
            if not rate > 0 or rate == float("inf"):
                raise ValueError(f"rate for {code} must be a positive number")
        return rates

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
    def rates(self) -> dict[str, float]:
        """Currency -> rate into the reporting currency (which is always 1)."""
        return {**self.currency_rates, self.reporting_currency: 1.0}


def _format_errors(exc: ValidationError) -> str:
    lines = ["invalid configuration:"]
    for err in exc.errors(include_url=False, include_input=False):
        loc = err.get("loc") or ()
        field = str(loc[0]) if loc else ""
        name = f"KPIMON_{field.upper()}" if field else "(settings)"
        raw = os.environ.get(name)
        secret = "webhook" in field or "secret" in field or "password" in field
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
