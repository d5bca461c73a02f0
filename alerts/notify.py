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
from stream.kpis import KPI

KPI_TITLE = {name: k.title for name, k in KPI.items()}

MAX_BLOCKS = 50
MAX_HEADER = 150
MAX_SECTION = 3000
MAX_FIELDS = 10
MAX_FIELD = 2000
MAX_FALLBACK = 3000
MAX_BUTTON_TEXT = 75
MAX_URL = 3000
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


def _buttons(record: Mapping[str, Any], silence_url: str | None) -> dict[str, Any] | None:
    """The "Silence 2h" (Alertmanager's new-silence form, pre-filled) and "Dashboard" buttons."""
    annotations = record.get("annotations") or {}
    links = [("Silence 2h", silence_url, "silence"),
             ("Dashboard", annotations.get("dashboard_url"), "dashboard")]  # fmt: skip
    elements = [
        {"type": "button", "text": {"type": "plain_text", "text": clip(label, MAX_BUTTON_TEXT)},
         "url": str(url), "action_id": action}
        for label, url, action in links
        if _link(url, label) and len(str(url)) <= MAX_URL
    ]  # fmt: skip
    return {"type": "actions", "elements": elements} if elements else None


def slack_payload(
    record: Mapping[str, Any], *, silence_url: str | None = None, note: str | None = None
) -> dict[str, Any]:
    """One Block Kit message for a firing, repeat or resolved alert.

    ``note`` (mrkdwn, e.g. how long an incident lasted) goes under the summary;
    ``silence_url`` adds the "Silence 2h" button next to "Dashboard".
    """
    firing = record["status"] == "firing"
    icon = ":rotating_light:" if firing else ":white_check_mark:"
    kpi = str(record["kpi"])
    place = where(record["scope"], record["channel"], record["campaign"])
    summary = str(record["summary"])
    incident = record.get("incident")
    count = len(incident.get("members") or []) if isinstance(incident, Mapping) else 0
    related = f" (+{count - 1} related)" if count > 1 else ""
    header = clip(f"{'' if firing else 'Resolved: '}{kpi.upper()} alert: {place}{related}",
                  MAX_HEADER)  # fmt: skip
    change = record.get("change")
    p_value = record.get("p_value")
    fields = [
        f"*{'Projected' if record.get('baseline_kind') == 'budget' else 'Value'}*\n"
        f"{format_value(kpi, record.get('value'))}",
        _against(record, kpi),
        f"*Change*\n{'n/a' if change is None else f'{change:+.0%}'}",
        f"*Confidence*\n{_sure(record, p_value)}",
        f"*Window*\n{record['window']}",
        f"*Since*\n{record['starts_at']}"
        + (f" (ended {record['ends_at']})" if record.get("ends_at") else ""),
        f"*Rule*\n{record['rule']} ({record['severity']})",
    ]  # fmt: skip
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": header, "emoji": True}},
        {"type": "section", "text": {"type": "mrkdwn",
                                      "text": clip(f"{icon} {_escape(summary)}"
                                                   + (f"\n{note}" if note else ""), MAX_SECTION)}},
        {"type": "section", "fields": [
            {"type": "mrkdwn", "text": clip(_escape(f), MAX_FIELD)} for f in fields[:MAX_FIELDS]
        ]},
    ]  # fmt: skip
    contributors = list(record.get("contributors") or [])
    if contributors and firing:
        lines = [
            f"• {_escape(where(c['scope'], c['channel'], c['campaign']))}: "
            f"{format_value(c.get('kpi', kpi), c.get('value'))} vs "
            f"{format_value(c.get('kpi', kpi), c.get('baseline'))}"
            + (f" ({c['change']:+.0%})" if c.get("change") is not None else "")
            + (f", {c['share']:.0%} of the move" if c.get("share") else "")
            for c in contributors
        ]
        text = clip("*Contributing most*\n" + "\n".join(lines), MAX_SECTION)
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": text}})
    affected = _affected(record)
    if affected:
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": affected}})
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
    buttons = _buttons(record, silence_url)
    if buttons:
        blocks.append(buttons)
    return {"text": clip(f"{icon} {summary}", MAX_FALLBACK), "blocks": blocks[:MAX_BLOCKS]}


def _sure(record: Mapping[str, Any], p_value: float | None) -> str:
    if p_value is not None:
        return f"p = {p_value:.1e}"
    return "spent: a fact" if record.get("baseline_kind") == "budget" else "volume floors met"


def _against(record: Mapping[str, Any], kpi: str) -> str:
    """The field of what the value is compared with: a trend's baseline, a goal (rules
    against goals: ``goal (min)``), or a budget."""
    kind, value = str(record.get("baseline_kind") or "baseline"), record.get("baseline")
    if kind == "budget":
        return f"*Budget*\n{format_value(kpi, value)} today"
    if kind.startswith("goal"):
        least = "min" in kind
        return f"*Goal*\n{'at least' if least else 'at most'} {format_value(kpi, value)}"
    return f"*Baseline*\n{format_value(kpi, value)} ({kind})"


def _members(record: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The member alerts of an incident record (a record without members: itself)."""
    incident = record.get("incident")
    members = incident.get("members") if isinstance(incident, Mapping) else None
    if not members:
        return [record]
    if record["status"] != "resolved":
        return list(members)
    # The incident resolved: every member ends, at the latest when the incident did.
    return [{**m, "status": "resolved", "ends_at": m.get("ends_at") or record.get("ends_at")}
            for m in members]  # fmt: skip


def _affected(record: Mapping[str, Any]) -> str | None:
    """The incident's other member alerts, one line each (none for a lone alert)."""
    incident = record.get("incident")
    members = list(incident.get("members") or []) if isinstance(incident, Mapping) else []
    if len(members) < 2:
        return None
    lines = []
    new = {_identity(j) for j in joined(record)}
    for m in members[1:]:
        change = m.get("change")
        moved = "" if change is None else f" {change:+.0%}"
        done = " (resolved)" if m.get("status") == "resolved" else ""
        done += " (new)" if _identity(m) in new and not done else ""
        place = _escape(where(m["scope"], m["channel"], m["campaign"]))
        lines.append(f"• {KPI_TITLE.get(m['kpi'], m['kpi'])}{moved}: {place}{done}")
    head = f"*Same incident ({len(members)} alerts)*\n"
    text = head + "\n".join(lines)
    if len(text) > MAX_SECTION:  # cut whole lines, say how many were left out
        kept: list[str] = []
        for line in lines:
            if len(head) + len("\n".join([*kept, line])) + 40 > MAX_SECTION:
                break
            kept.append(line)
        text = head + "\n".join(kept) + f"\n… and {len(lines) - len(kept)} more"
    return text


def _identity(m: Mapping[str, Any]) -> tuple[str, str, str, str]:
    return (str(m.get("rule")), str(m.get("scope")), str(m.get("channel")),
            str(m.get("campaign")))  # fmt: skip


def joined(record: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The member records a notification names first (an update's late joiners)."""
    incident = record.get("incident")
    if not isinstance(incident, Mapping):
        return []
    wanted = {_identity(j) for j in incident.get("joined") or [] if isinstance(j, Mapping)}
    return [m for m in incident.get("members") or [] if _identity(m) in wanted]


def _kpi_at(m: Mapping[str, Any]) -> str:
    """``CTR of channel search``: a member alert in words."""
    kpi = str(m["kpi"])
    return f"{KPI_TITLE.get(kpi, kpi)} of {where(m['scope'], m['channel'], m['campaign'])}"


MAX_JOINED = 10
"""Late joiners named one by one in a short message; the rest are counted."""
MAX_JOINED_PART = 200
"""Characters of one joiner's name: ten of them and the count stay within one section."""


def joined_text(record: Mapping[str, Any]) -> str | None:
    """``CTR of channel search, -35%; Orders of all traffic, -60%``: who joined (plain)."""
    found = joined(record)
    if not found:
        return None
    parts = []
    for m in found[:MAX_JOINED]:
        change = m.get("change")
        moved = "" if change is None else f", {change:+.0%}"
        parts.append(clip(f"{_kpi_at(m)}{moved}", MAX_JOINED_PART))
    more = f" and {len(found) - MAX_JOINED} more" if len(found) > MAX_JOINED else ""
    return "; ".join(parts) + more


def slack_update_message(
    record: Mapping[str, Any], *, silence_url: str | None = None
) -> dict[str, Any]:
    """Webhook mode's short message when alerts join an open incident (no message to edit).

    One line of what joined, one naming the incident it joined (its root and id, so it
    reads next to the firing message), and the links: no fields, no contributors."""
    also = joined_text(record) or "more alerts"
    incident = record.get("incident")
    ident = str(incident.get("id")) if isinstance(incident, Mapping) else ""
    root = _kpi_at(record)
    text = f":heavy_plus_sign: Also affected: {also}"
    context = f"Same incident as {root} ({ident}), firing since {record.get('starts_at')}"
    annotations = record.get("annotations") or {}
    links = [x for x in (_link(annotations.get("dashboard_url"), "Dashboard"),
                         _link(annotations.get("runbook_url"), "Runbook")) if x]  # fmt: skip
    blocks: list[dict[str, Any]] = [
        {"type": "section", "text": {"type": "mrkdwn", "text": clip(_escape(text), MAX_SECTION)}},
        {"type": "context", "elements": [
            {"type": "mrkdwn", "text": clip(" · ".join([_escape(context), *links]), MAX_SECTION)}
        ]},
    ]  # fmt: skip
    buttons = _buttons(record, silence_url)
    if buttons:
        blocks.append(buttons)
    return {"text": clip(f"{text} ({root})", MAX_FALLBACK), "blocks": blocks}


def alertmanager_alerts(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Alertmanager API v2 ``POST /api/v2/alerts`` body: firing ones re-sent, resolved ended.

    An incident is one Alertmanager alert per member, each with its own labels (rule,
    segment, severity) plus ``incident`` (the id: Alertmanager groups by it) and
    ``incident_role`` (``root`` or ``member``: the root inhibits the others), so
    routing and silences by campaign or rule keep working and on-call sees one group.
    """
    out = []
    for record in (m for r in records for m in _members(r)):
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


def duration_text(seconds: float) -> str:
    """``42 min``, ``3 h 05 min``, ``2 d 4 h``: how long an incident lasted."""
    minutes = max(0, round(seconds / 60))
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes:02d} min"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h"


def _now_line(record: Mapping[str, Any]) -> str:
    kpi, change = str(record["kpi"]), record.get("change")
    moved = "" if change is None else f" ({change:+.0%})"
    return (
        f"{kpi.upper()} now {format_value(kpi, record.get('value'))} vs "
        f"{format_value(kpi, record.get('baseline'))}{moved}"
    )


def slack_incident_message(
    record: Mapping[str, Any], *, silence_url: str | None, worst: float | None, updates: int,
    duration_s: float | None,
) -> dict[str, Any]:  # fmt: skip
    """The one living message of an incident (Web API mode): edited in place at every
    repeat and at the resolve, which says how long it lasted and where the KPI is now."""
    kpi = str(record["kpi"])
    bits = []
    if record["status"] == "resolved":
        if duration_s is not None:
            bits.append(f"*Resolved after {duration_text(duration_s)}*")
        bits.append(_escape(_now_line(record)))
    if worst is not None:
        bits.append(f"worst {worst:+.0%}")
    if updates:
        bits.append(f"{updates} update{'s' if updates > 1 else ''} in the thread")
    note = " · ".join(bits) if bits else None
    payload = slack_payload(record, silence_url=silence_url, note=note)
    if record["status"] == "firing" and record.get("notification") == "repeat":
        now = format_value(kpi, record.get("value"))
        payload["text"] = clip(f"{payload['text']} (still firing, {kpi.upper()} {now})",
                               MAX_FALLBACK)  # fmt: skip
    return payload


def slack_thread_note(record: Mapping[str, Any], *, duration_s: float | None) -> dict[str, Any]:
    """A short reply in the incident's thread for a repeat, an update or the resolve.

    An update says what joined (``:heavy_plus_sign: Also affected: CTR of channel
    search, -35%``); a repeat that names late joiners adds that line to its own."""
    also = joined_text(record) if record["status"] == "firing" else None
    if record["status"] == "resolved":
        lasted = f" after {duration_text(duration_s)}" if duration_s is not None else ""
        text = f":white_check_mark: Resolved{lasted}: {_now_line(record)}"
    elif record.get("notification") == "update":
        text = f":heavy_plus_sign: Also affected: {also or 'more alerts'}"
        also = None
    else:
        text = f":repeat: Still firing: {_now_line(record)}"
    contributors = list(record.get("contributors") or [])
    if contributors and record["status"] == "firing" and record.get("notification") != "update":
        text += "; most from " + ", ".join(
            where(c["scope"], c["channel"], c["campaign"]) for c in contributors[:5]
        )
    if also:
        text += f"\n:heavy_plus_sign: Also affected: {also}"
    return {
        "text": clip(text, MAX_FALLBACK),
        "blocks": [{"type": "section",
                    "text": {"type": "mrkdwn", "text": clip(_escape(text), MAX_SECTION)}}],
    }  # fmt: skip
