"""Settings come from KPIMON_* variables and fail fast with one clear message."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from stream.settings import ConfigError, load_settings
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


def test_worker_refuses_an_invalid_rules_file(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yml"
    rules.write_text("rules:\n  - name: x\n    kpi: ctrr\n")
    proc = _worker(KPIMON_RULES=str(rules))
    assert proc.returncode == 2
    assert "invalid rules file" in proc.stderr
    assert f"{rules}:3:" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
