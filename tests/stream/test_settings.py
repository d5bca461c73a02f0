"""Settings come from KPIMON_* variables and fail fast with one clear message."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from stream.settings import URL_FIELDS, ConfigError, Settings, load_settings
from tests.helpers import REPO


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("KPIMON_KAFKA_BOOTSTRAP", "KPIMON_METRICS_PORT", "KPIMON_SHARED_TOPICS"):
        monkeypatch.delenv(var, raising=False)
    settings = load_settings()
    assert settings.kafka_bootstrap == "127.0.0.1:9092"
    assert settings.metrics_port == 9108
    assert settings.type_topics["click"] == "events.clicks"
    assert settings.dlq_topic == "kpimon.dlq"
    assert settings.shared_topics == []
    assert settings.shutdown_timeout_seconds == 10.0


def test_env_lists_and_rates(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KPIMON_SHARED_TOPICS", "events.all, events.more")
    monkeypatch.setenv("KPIMON_CURRENCY_RATES", "eur=1.08, GBP=1.27")
    monkeypatch.setenv("KPIMON_REPORTING_CURRENCY", "usd")
    settings = load_settings()
    assert settings.shared_topics == ["events.all", "events.more"]
    assert settings.rates == {"EUR": 1.08, "GBP": 1.27, "USD": 1.0}


@pytest.mark.parametrize(
    ("var", "value", "needle"),
    [
        ("KPIMON_METRICS_PORT", "99999", "KPIMON_METRICS_PORT"),
        ("KPIMON_METRICS_PORT", "http", "KPIMON_METRICS_PORT"),
        ("KPIMON_CURRENCY_RATES", "EUR:1.1", "expected CODE=RATE"),
        ("KPIMON_CURRENCY_RATES", "EUR=-1", "positive"),
        ("KPIMON_REPORTING_CURRENCY", "dollar", "ISO 4217"),
        ("KPIMON_LOG_LEVEL", "loud", "KPIMON_LOG_LEVEL"),
        ("KPIMON_SHARED_TOPICS", "events.clicks", "distinct"),
        ("KPIMON_SHUTDOWN_TIMEOUT_SECONDS", "0", "KPIMON_SHUTDOWN_TIMEOUT_SECONDS"),
        ("KPIMON_SHUTDOWN_TIMEOUT_SECONDS", "soon", "KPIMON_SHUTDOWN_TIMEOUT_SECONDS"),
    ],
)
def test_invalid_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, var: str, value: str, needle: str
) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert needle in str(err.value)


NUMERIC = sorted(
    name for name, field in Settings.model_fields.items() if field.annotation in (int, float)
)


def test_numeric_settings_are_found() -> None:
    # Every int or float setting, a new one included, is covered by the test below.
    assert {"max_future_skew_seconds", "metrics_port", "eval_interval_seconds"} <= set(NUMERIC)
    assert all(isinstance(getattr(Settings(), name), int | float) for name in NUMERIC)


@pytest.mark.parametrize("field", NUMERIC)
@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "NaN", "1e400", "-1", "1e30"])
def test_every_number_is_finite_non_negative_and_bounded(
    monkeypatch: pytest.MonkeyPatch, field: str, value: str
) -> None:
    var = f"KPIMON_{field.upper()}"
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError) as err:
        load_settings()
    lines = str(err.value).splitlines()
    assert lines[0] == "invalid configuration:"
    assert len(lines) == 2 and lines[1].strip().startswith(f"{var}: "), lines


@pytest.mark.parametrize("value", ["EUR=inf", "EUR=nan", "EUR=-inf", "EUR=0"])
def test_currency_rates_are_finite_and_positive(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("KPIMON_CURRENCY_RATES", value)
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert "KPIMON_CURRENCY_RATES" in str(err.value)


BAD_URLS = [
    ("http://127.0.0.1:99999/T0/SECRET123", "port must be a number from 1 to 65535"),
    ("http://127.0.0.1:0/SECRET123", "port must be a number from 1 to 65535"),
    ("http://hooks.example:80x/SECRET123", "port must be a number from 1 to 65535"),
    ("http:///T0/SECRET123", "must name a host"),
    ("https://:443/SECRET123", "must name a host"),
    ("http://user:SECRET123@/x", "must name a host"),
    ("ftp://hooks.example/SECRET123", "must be an http:// or https:// URL"),
    ("hooks.example/SECRET123", "must be an http:// or https:// URL"),
    ("http://hooks example/SECRET123", "must not contain spaces"),
    ("http://hooks.exa\tmple/SECRET123", "must not contain spaces"),
    ("http://hooks..example/SECRET123", "invalid host name"),
    ("http://hooks!example/SECRET123", "invalid host name"),
    ("http://[::1/SECRET123", "is not a valid URL"),
    ("http://[fe80::zz]/SECRET123", "not a valid URL"),
]
GOOD_URLS = [
    "https://hooks.slack.com/services/T000/B000/XXXX",
    "http://127.0.0.1:9093",
    "http://alertmanager:9093/",
    "http://[::1]:9093/",
    "https://user:pw@grafana.example.com:3000/grafana/",
    "http://kpimon_alertmanager_1:65535",
    "https://bücher.example/runbooks/",
]


@pytest.mark.parametrize("field", URL_FIELDS)
@pytest.mark.parametrize(("url", "why"), BAD_URLS)
def test_every_url_setting_is_checked_and_never_echoed(
    monkeypatch: pytest.MonkeyPatch, field: str, url: str, why: str
) -> None:
    var = f"KPIMON_{field.upper()}"
    monkeypatch.setenv(var, url)
    with pytest.raises(ConfigError) as err:
        load_settings()
    message = str(err.value)
    assert f"{var}: " in message and why in message, message
    assert "SECRET123" not in message
    assert url not in message


@pytest.mark.parametrize("field", URL_FIELDS)
@pytest.mark.parametrize("url", GOOD_URLS)
def test_valid_urls_are_accepted(monkeypatch: pytest.MonkeyPatch, field: str, url: str) -> None:
    monkeypatch.setenv(f"KPIMON_{field.upper()}", url)
    value = getattr(load_settings(), field)
    assert (value.get_secret_value() if field == "slack_webhook_url" else value) == url


def test_secret_never_in_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KPIMON_SLACK_WEBHOOK_URL", "https://hooks.example/T000/SECRET123")
    monkeypatch.setenv("KPIMON_METRICS_PORT", "0")
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert "SECRET123" not in str(err.value)
    monkeypatch.setenv("KPIMON_METRICS_PORT", "9108")
    settings = load_settings()
    assert "SECRET123" not in repr(settings)
    assert settings.slack_webhook_url is not None
    assert settings.slack_webhook_url.get_secret_value().endswith("SECRET123")


def _worker(**env: str) -> subprocess.CompletedProcess[str]:
    """``kpimon worker`` with only ``env`` set; expected to refuse to start."""
    return subprocess.run(
        [sys.executable, "-m", "stream.cli", "worker"],
        cwd=REPO,
        env={**env, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_worker_refuses_invalid_config() -> None:
    proc = _worker(KPIMON_METRICS_PORT="70000")
    assert proc.returncode == 2
    assert "invalid configuration" in proc.stderr
    assert "KPIMON_METRICS_PORT" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("value", ["inf", "nan"])
def test_worker_refuses_a_non_finite_number(value: str) -> None:
    proc = _worker(KPIMON_MAX_FUTURE_SKEW_SECONDS=value)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "invalid configuration:",
        f"  KPIMON_MAX_FUTURE_SKEW_SECONDS: Input should be a finite number (got '{value}')",
    ]


def test_worker_refuses_a_bad_webhook_without_echoing_it() -> None:
    proc = _worker(KPIMON_SLACK_WEBHOOK_URL="http://127.0.0.1:99999/services/SECRET123")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "invalid configuration:",
        "  KPIMON_SLACK_WEBHOOK_URL: port must be a number from 1 to 65535",
    ]


def test_worker_refuses_an_invalid_rules_file(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yml"
    rules.write_text("rules:\n  - name: x\n    kpi: ctrr\n")
    proc = _worker(KPIMON_RULES=str(rules))
    assert proc.returncode == 2
    assert "invalid rules file" in proc.stderr
    assert f"{rules}:3:" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
