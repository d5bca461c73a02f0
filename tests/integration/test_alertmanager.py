"""Alerts built by kpimon are accepted, shown and resolved by a real Alertmanager."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import pytest

from alerts.notify import alertmanager_alerts
from tests.alerts.test_notify import record
from tests.helpers import wait_for

pytestmark = pytest.mark.integration


def _post(url: str, body: Any) -> int:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=5) as resp:
        return int(resp.status)


def _active(url: str, campaign: str) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"{url}/api/v2/alerts?active=true", timeout=5) as resp:
        alerts: list[dict[str, Any]] = json.loads(resp.read())
    return [a for a in alerts if a["labels"].get("campaign") == campaign]


def test_firing_then_resolved(alertmanager_url: str) -> None:
    campaign = "c-am-test"
    firing = record(campaign=campaign, labels={**record()["labels"], "campaign": campaign},
                    starts_at="2026-11-21T10:00:00Z")  # fmt: skip
    assert _post(f"{alertmanager_url}/api/v2/alerts", alertmanager_alerts([firing])) == 200
    shown = wait_for(lambda: _active(alertmanager_url, campaign), timeout=20,
                     what="the alert in Alertmanager")  # fmt: skip
    assert shown[0]["labels"]["alertname"] == "ctr_drop_campaign"
    assert shown[0]["annotations"]["runbook_url"].startswith("https://")
    resolved = {**firing, "status": "resolved", "ends_at": "2026-11-21T10:30:00Z"}
    assert _post(f"{alertmanager_url}/api/v2/alerts", alertmanager_alerts([resolved])) == 200
    wait_for(lambda: not _active(alertmanager_url, campaign), timeout=20,
             what="the alert to resolve")  # fmt: skip
