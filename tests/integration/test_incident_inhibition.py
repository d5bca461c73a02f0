"""An incident in a real Alertmanager: its members are grouped and its root inhibits them.

The order outage's incident record (tests/alerts/test_engine_incidents.py), posted as the
worker posts it: one alert per member, sharing the ``incident`` label. The root stays
active; its derived-KPI and parent-segment members are suppressed (inhibited by the
root); a paging member is suppressed only by a paging root; another incident is not
touched; and once the root resolves, its members speak again.
"""

from __future__ import annotations

import copy
import json
import time
import urllib.request
import uuid
from typing import Any

import pytest

from alerts.notify import alertmanager_alerts
from alerts.text import iso
from tests.alerts.test_engine_incidents import order_outage_repeat
from tests.helpers import wait_for

pytestmark = pytest.mark.integration


def _post(url: str, body: Any) -> None:
    req = urllib.request.Request(
        f"{url}/api/v2/alerts", data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.status == 200


def _states(url: str, incident: str) -> dict[tuple[str, str, str], tuple[str, str]]:
    """(kpi, scope, role) -> (state, severity) of one incident's alerts in Alertmanager."""
    with urllib.request.urlopen(f"{url}/api/v2/alerts", timeout=5) as resp:
        alerts: list[dict[str, Any]] = json.loads(resp.read())
    return {
        (a["labels"]["kpi"], a["labels"]["scope"], a["labels"]["incident_role"]):
            (a["status"]["state"], a["labels"]["severity"])
        for a in alerts
        if a["labels"].get("incident") == incident
    }  # fmt: skip


def _as(record: dict[str, Any], ident: str, root_severity: str | None = None) -> dict[str, Any]:
    """The record under another incident id (and its root at another severity)."""
    out = copy.deepcopy(record)
    for member in out["incident"]["members"]:
        member["labels"]["incident"] = ident
        if root_severity and member["role"] == "root":
            member["labels"]["severity"] = root_severity
    return out


def test_the_root_inhibits_its_members_and_only_its_own(alertmanager_url: str) -> None:
    record = order_outage_repeat()
    paged, ticketed = f"inc-{uuid.uuid4().hex[:8]}", f"inc-{uuid.uuid4().hex[:8]}"
    first, second = _as(record, paged), _as(record, ticketed, root_severity="ticket")
    members = len(record["incident"]["members"])
    _post(alertmanager_url, alertmanager_alerts([first, second]))

    def settled(ident: str) -> dict[tuple[str, str, str], tuple[str, str]] | None:
        states = _states(alertmanager_url, ident)
        ready = len(states) == members and all(
            s == "active" or s == "suppressed" for s, _ in states.values()
        )
        suppressed = sum(s == "suppressed" for s, _ in states.values())
        return states if ready and suppressed >= members - 2 else None

    states = wait_for(lambda: settled(paged), timeout=30, what="the paging incident inhibited")
    assert states[("orders", "campaign", "root")] == ("active", "page")
    assert all(s == "suppressed" for k, (s, _) in states.items() if k[2] == "member"), states
    assert ("orders", "channel", "member") in states, "the dragged channel is a member"

    # A ticket root does not silence a paging member of its incident: on-call is paged.
    states = wait_for(lambda: settled(ticketed), timeout=30, what="the ticket incident")
    assert states[("orders", "campaign", "root")] == ("active", "ticket")
    assert states[("orders", "channel", "member")] == ("active", "page")
    assert all(
        s == "suppressed" for k, (s, sev) in states.items() if k[2] == "member" and sev != "page"
    ), states

    # The root resolves first: its members are no longer inhibited.
    root_only = copy.deepcopy(first)
    root_only["incident"]["members"] = [m for m in first["incident"]["members"]
                                        if m["role"] == "root"]  # fmt: skip
    root_only.update(status="resolved", ends_at=iso(time.time()))
    _post(alertmanager_url, alertmanager_alerts([root_only]))

    def freed() -> bool:
        states = _states(alertmanager_url, paged)
        return (
            len(states) == members - 1
            and ("orders", "campaign", "root") not in states
            and all(state == "active" for state, _ in states.values())
        )

    wait_for(freed, timeout=30, what="the members active once the root resolved")
