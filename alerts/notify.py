"""Payloads for the alert sinks, built from the SPEC alert record (pure, no I/O).

Slack gets a Block Kit message that always stays within Slack's limits (50
blocks, 150-character header, 3,000-character sections, 10 fields of 2,000
characters) with a plain ``text`` fallback for notifications and screen
readers. Alertmanager gets API v2 alerts whose labels make routing and
silences natural (rule, severity, scope, channel, campaign) and whose
``endsAt`` resolves them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from alerts.text import format_value, where

MAX_BLOCKS = 50
MAX_HEADER = 150
MAX_SECTION = 3000
MAX_FIELDS = 10
MAX_FIELD = 2000
MAX_FALLBACK = 3000
ELLIPSIS = "…"


def clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, marked with an ellipsis when cut."""
    return text if len(text) <= limit else text[: limit - 1] + ELLIPSIS


def _escape(text: str) -> str:
    """Slack mrkdwn control characters."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _link(url: str | None, label: str) -> str | None:
    if not url or not url.startswith(("http://", "https://")):
        return None
    return f"<{url}|{label}>"


def slack_payload(record: Mapping[str, Any]) -> dict[str, Any]:
    """One Block Kit message for a firing, repeat or resolved alert."""
    firing = record["status"] == "firing"
    icon = ":rotating_light:" if firing else ":white_check_mark:"
    kpi = str(record["kpi"])
    place = where(record["scope"], record["channel"], record["campaign"])
    summary = str(record["summary"])
    header = clip(f"{'' if firing else 'Resolved: '}{kpi.upper()} alert: {place}", MAX_HEADER)
    change = record.get("change")
    p_value = record.get("p_value")
    fields = [
        f"*Value*\n{format_value(kpi, record.get('value'))}",
        f"*Baseline*\n{format_value(kpi, record.get('baseline'))} "
        f"({record.get('baseline_kind') or 'baseline'})",
        f"*Change*\n{'n/a' if change is None else f'{change:+.0%}'}",
        f"*Confidence*\n{'volume floors met' if p_value is None else f'p = {p_value:.1e}'}",
        f"*Window*\n{record['window']}",
        f"*Since*\n{record['starts_at']}"
        + (f" (ended {record['ends_at']})" if record.get("ends_at") else ""),
        f"*Rule*\n{record['rule']} ({record['severity']})",
    ]  # fmt: skip
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": header, "emoji": True}},
        {"type": "section", "text": {"type": "mrkdwn",
                                      "text": clip(f"{icon} {_escape(summary)}", MAX_SECTION)}},
        {"type": "section", "fields": [
            {"type": "mrkdwn", "text": clip(_escape(f), MAX_FIELD)} for f in fields[:MAX_FIELDS]
        ]},
    ]  # fmt: skip
    contributors = list(record.get("contributors") or [])
    if contributors and firing:
        lines = [
            f"• {_escape(where(c['scope'], c['channel'], c['campaign']))}: "
            f"{format_value(kpi, c.get('value'))} vs {format_value(kpi, c.get('baseline'))}"
            + (f" ({c['change']:+.0%})" if c.get("change") is not None else "")
            for c in contributors
        ]
        text = clip("*Contributing most*\n" + "\n".join(lines), MAX_SECTION)
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": text}})
    annotations = record.get("annotations") or {}
    links = [
        _link(annotations.get("dashboard_url"), "Dashboard"),
        _link(annotations.get("runbook_url"), "Runbook"),
    ]
    runbook = annotations.get("runbook_url")
    context = [x for x in links if x]
    if runbook and not _link(runbook, ""):
        context.append(f"Runbook: {_escape(str(runbook))}")
    if context:
        blocks.append({"type": "context", "elements": [
            {"type": "mrkdwn", "text": clip(" · ".join(context), MAX_SECTION)}
        ]})  # fmt: skip
    return {"text": clip(f"{icon} {summary}", MAX_FALLBACK), "blocks": blocks[:MAX_BLOCKS]}


def alertmanager_alerts(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Alertmanager API v2 ``POST /api/v2/alerts`` body: firing ones re-sent, resolved ended."""
    out = []
    for record in records:
        labels = {str(k): str(v) for k, v in (record.get("labels") or {}).items() if v != ""}
        annotations = {str(k): str(v) for k, v in (record.get("annotations") or {}).items() if v}
        alert: dict[str, Any] = {
            "labels": labels,
            "annotations": annotations,
            "startsAt": record["starts_at"],
        }
        if record["status"] == "resolved" and record.get("ends_at"):
            alert["endsAt"] = record["ends_at"]
        url = annotations.get("dashboard_url")
        if url:
            alert["generatorURL"] = url
        out.append(alert)
    return out
