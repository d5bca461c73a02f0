"""The Alertmanager routing tree (prometheus/alertmanager.yml), offline with amtool.

``amtool config routes test --verify.receivers`` for each kind of alert kpimon sends or
Prometheus raises, with the labels the worker really puts on an incident's members;
the inhibition of an incident's members is tested against a real Alertmanager in
tests/integration/test_incident_inhibition.py.
"""

from __future__ import annotations

import subprocess
from typing import Any

import pytest
import yaml

from alerts.notify import alertmanager_alerts
from tests.alerts.test_engine_incidents import order_outage_repeat
from tests.conftest import require_binary
from tests.helpers import REPO

CONFIG = REPO / "prometheus" / "alertmanager.yml"


def route(labels: dict[str, str], receiver: str) -> subprocess.CompletedProcess[str]:
    """``amtool config routes test``: exit 0 only if ``labels`` reach exactly ``receiver``."""
    require_binary("amtool")
    args = [f"{k}={v}" for k, v in sorted(labels.items())]
    return subprocess.run(
        ["amtool", "config", "routes", "test", f"--config.file={CONFIG}",
         f"--verify.receivers={receiver}", *args],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("labels", "receiver"),
    [
        ({"source": "kpimon-worker", "severity": "ticket", "incident": "inc-1",
          "incident_role": "root"}, "kpimon-incidents"),
        ({"source": "kpimon-worker", "severity": "info", "incident": "inc-1",
          "incident_role": "member"}, "kpimon-incidents"),
        ({"source": "kpimon-worker", "severity": "page", "incident": "inc-2",
          "incident_role": "member"}, "kpimon-page"),
        ({"alertname": "KpimonNoWorkers", "severity": "page"}, "kpimon-page"),
        ({"alertname": "KpimonEventsRejected", "severity": "ticket"}, "kpimon-oncall"),
    ],
)  # fmt: skip
def test_each_kind_of_alert_reaches_its_receiver(labels: dict[str, str], receiver: str) -> None:
    routed = route(labels, receiver)
    assert routed.returncode == 0, routed.stdout + routed.stderr


def test_the_check_fails_on_a_wrong_receiver() -> None:
    """The routing test can fail: a KPI ticket is not a page, nor a pipeline ticket."""
    labels = {"source": "kpimon-worker", "severity": "ticket", "incident": "inc-1"}
    for wrong in ("kpimon-page", "kpimon-oncall"):
        routed = route(labels, wrong)
        assert routed.returncode != 0 and "did not match" in routed.stdout + routed.stderr


def test_the_worker_s_incident_alerts_route_as_one_group() -> None:
    """An order outage's member alerts, as the worker posts them: the root and ticket
    members to the incident receiver, grouped by incident only; the paging root pages."""
    record = order_outage_repeat()
    alerts = alertmanager_alerts([record])
    assert len(alerts) >= 5
    for alert in alerts:
        labels: dict[str, Any] = alert["labels"]
        expected = "kpimon-page" if labels["severity"] == "page" else "kpimon-incidents"
        routed = route(labels, expected)
        assert routed.returncode == 0, (labels, routed.stdout + routed.stderr)
    config = yaml.safe_load(CONFIG.read_text())
    (incidents,) = [r for r in config["route"]["routes"] if r["receiver"] == "kpimon-incidents"]
    assert incidents["group_by"] == ["incident"], "one group, one notification per incident"
    assert all("group_by" not in r for r in incidents["routes"]), "pages keep the grouping"


def test_inhibition_is_within_one_incident_from_its_root_to_its_members() -> None:
    config = yaml.safe_load(CONFIG.read_text())
    rules = [r for r in config["inhibit_rules"] if "incident_role" in str(r)]
    assert len(rules) == 2
    for rule in rules:
        assert rule["equal"] == ["incident"]
        assert 'incident_role="root"' in rule["source_matchers"]
        assert 'incident_role="member"' in rule["target_matchers"]
