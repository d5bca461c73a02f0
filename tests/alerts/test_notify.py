"""Slack Block Kit payloads stay within Slack's limits; Alertmanager alerts are well formed."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from alerts.notify import (
    MAX_BLOCKS,
    MAX_FIELD,
    MAX_FIELDS,
    MAX_HEADER,
    MAX_SECTION,
    alertmanager_alerts,
    slack_payload,
)


def record(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "rule": "ctr_drop_campaign", "status": "firing", "notification": "firing", "kpi": "ctr",
        "scope": "campaign", "channel": "social", "campaign": "c7", "window": "15m",
        "value": 0.012, "baseline": 0.02, "baseline_kind": "previous 60 min", "change": -0.4,
        "statistic": -5.1, "p_value": 2e-7, "severity": "page",
        "starts_at": "2026-11-21T10:00:00Z", "fired_at": "2026-11-21T10:10:00Z", "ends_at": None,
        "summary": "CTR of campaign c7 on social dropped 40% in the last 15 min",
        "contributors": [],
        "labels": {"alertname": "ctr_drop_campaign", "severity": "page", "scope": "campaign",
                   "channel": "social", "campaign": "c7"},
        "annotations": {"summary": "…", "runbook_url": "https://runbooks.example/rate-drop",
                        "dashboard_url": "http://grafana:3000/d/kpimon-campaign?var-campaign=c7"},
    }  # fmt: skip
    return {**base, **overrides}


def check_limits(payload: dict[str, Any]) -> None:
    assert payload["text"]
    blocks = payload["blocks"]
    assert 1 <= len(blocks) <= MAX_BLOCKS
    for block in blocks:
        if block["type"] == "header":
            assert len(block["text"]["text"]) <= MAX_HEADER
        if block["type"] == "section":
            if "text" in block:
                assert len(block["text"]["text"]) <= MAX_SECTION
            fields = block.get("fields", [])
            assert len(fields) <= MAX_FIELDS
            assert all(len(f["text"]) <= MAX_FIELD for f in fields)


def test_firing_message_says_what_where_how_much_and_links() -> None:
    payload = slack_payload(record(contributors=[
        {"scope": "campaign", "channel": "social", "campaign": "c7", "value": 0.01,
         "baseline": 0.02, "change": -0.5}]))  # fmt: skip
    check_limits(payload)
    text = str(payload)
    assert "c7" in payload["text"] and "CTR" in payload["text"]
    for needle in ("1.20%", "2.00%", "-40%", "p = 2.0e-07", "15m", "2026-11-21T10:00:00Z",
                   "Contributing most", "<http://grafana:3000/d/kpimon-campaign",
                   "|Runbook>"):  # fmt: skip
        assert needle in text, needle


def test_resolved_message() -> None:
    payload = slack_payload(record(status="resolved", ends_at="2026-11-21T11:00:00Z",
                                   summary="Resolved: CTR of campaign c7 ..."))  # fmt: skip
    assert payload["blocks"][0]["text"]["text"].startswith("Resolved")
    assert ":white_check_mark:" in payload["text"]
    assert "ended 2026-11-21T11:00:00Z" in str(payload)


@settings(max_examples=60)
@given(
    campaign=st.text(min_size=1, max_size=5000),
    summary=st.text(max_size=10_000),
    contributors=st.integers(0, 200),
)
def test_any_input_stays_within_slack_limits(
    campaign: str, summary: str, contributors: int
) -> None:
    many = [{"scope": "campaign", "channel": "x" * 300, "campaign": campaign, "value": 0.1,
             "baseline": 0.2, "change": -0.5}] * contributors  # fmt: skip
    check_limits(slack_payload(record(campaign=campaign, summary=summary or "s",
                                      contributors=many)))  # fmt: skip


def test_alertmanager_alerts() -> None:
    firing, resolved = alertmanager_alerts(
        [record(), record(status="resolved", ends_at="2026-11-21T11:00:00Z")]
    )
    assert firing["labels"]["alertname"] == "ctr_drop_campaign"
    assert firing["startsAt"] == "2026-11-21T10:00:00Z" and "endsAt" not in firing
    assert resolved["endsAt"] == "2026-11-21T11:00:00Z"
    assert all(isinstance(v, str) for v in firing["labels"].values())
    assert firing["generatorURL"].startswith("http://grafana:3000/")
