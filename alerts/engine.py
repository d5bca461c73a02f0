"""The alert engine: rules x segments -> verdicts -> lifecycle -> alert records.

Pure code shared by the live worker and ``kpimon backtest``: it reads window
sums only through a :class:`~stream.segments.SegmentView` of one scope snapshot
(never the buckets behind it), judges every rule for every
segment of its scopes against the rule's baseline, steps each rule's alert
state machine in event time, and turns notifications into the alert object of
SPEC.md (what moved, where, by how much, against which baseline, how sure,
since when, which child segments contribute most, links).
"""

from __future__ import annotations

import copy
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from alerts.detectors import Thresholds, Verdict, bonferroni, judge
from alerts.incidents import IncidentNote, Incidents, Seen, gap
from alerts.lifecycle import Alert, AlertKey, AlertState, Notification, RuleAlerts, Timing
from alerts.rules import Rule, RulesFile
from alerts.text import iso, summary
from stream.aggregate import OTHER, SeriesKey
from stream.kpis import KPI
from stream.segments import SegmentView

DAY, WEEK = 1440, 7 * 1440
DASHBOARD_UID = "kpimon-campaign"
INCIDENTS = "@incidents"
"""Key of the incident state in :meth:`AlertEngine.to_dict` (rule names cannot start so)."""
SEVERITY_RANK = {"page": 0, "ticket": 1, "info": 2}


@dataclass(frozen=True)
class Baseline:
    """Minutes [start, end) the baseline sums cover, and its length relative to the window."""

    start: int
    end: int
    scale: float
    kind: str


def baseline_span(rule: Rule, end: int, has_data: bool = True) -> Baseline:
    """The baseline of ``rule`` for windows ending at minute ``end``.

    Same time yesterday / last week fall back to the trailing baseline while the
    history is short (``has_data`` False for the seasonal span).
    """
    w = rule.window_minutes
    if rule.baseline == "yesterday" and has_data:
        return Baseline(end - DAY - w, end - DAY, 1.0, "same time yesterday")
    if rule.baseline == "last_week" and has_data:
        return Baseline(end - WEEK - w, end - WEEK, 1.0, "same time last week")
    k = rule.baseline_windows
    return Baseline(end - w - k * w, end - w, 1.0 / k, f"previous {k * w} min")


def thresholds(rule: Rule, segments: int = 1) -> Thresholds:
    """The rule's thresholds for one of ``segments`` tests (Bonferroni).

    A rule's ``p_value`` is its false-alarm budget per evaluation across all its
    segments: 500 campaigns tested at 0.001 each would alarm somewhere every other
    evaluation, so each is tested at p_value / segments.
    """
    return Thresholds(
        min_change=rule.min_change,
        p_value=bonferroni(rule.p_value, segments),
        min_volume=rule.min_volume,
        min_conversions=rule.min_conversions,
        min_spend=rule.min_spend,
    )


def _covers(segments: SegmentView, key: SeriesKey, span: Baseline) -> bool:
    """Whether the segment's history covers the baseline: a segment is judged only then.

    A baseline that mostly predates the series is not a baseline: with spend reported in
    lumps, its first minutes hold clicks whose cost has not been reported yet, and CPC
    would "rise" on every fresh start and every new campaign.
    """
    start = segments.history_start(key)
    return start is not None and start <= span.start


class AlertEngine:
    """Evaluates a rules file over segment views, tick by tick; holds every rule's alert state."""

    def __init__(
        self,
        rules: RulesFile,
        *,
        grafana_url: str | None = None,
        runbook_base_url: str | None = None,
        top: int = 3,
    ) -> None:
        self.rules = list(rules.rules)
        self.grafana_url = grafana_url.rstrip("/") if grafana_url else None
        self.runbook_base_url = runbook_base_url
        self.top = top
        self.states = {
            r.name: RuleAlerts(
                r.name,
                Timing(r.for_seconds, r.keep_firing_for_seconds, r.repeat_interval_seconds),
            )
            for r in self.rules
        }
        self.baselines: dict[tuple[str, str, str, str, str], float] = {}
        self.incidents = Incidents({r.name: r.repeat_interval_seconds for r in self.rules})

    def evaluate(
        self, segments: SegmentView, end_minute: int, now_s: float, *, replaying: bool = False
    ) -> list[dict[str, Any]]:
        """One tick over one snapshot's segments: incident records (firing, repeat, resolved).

        Each rule's alerts step their own lifecycle; what is notified is the incident
        layer's (``alerts.incidents``): the alerts of one cause make one record."""
        baselines: dict[tuple[str, str, str, str, str], float] = {}
        resolved: dict[AlertKey, dict[str, object]] = {}
        for rule in self.rules:
            notes = self._evaluate_rule(rule, segments, end_minute, now_s, replaying, baselines)
            resolved.update({n.alert.key: n.alert.details for n in notes if n.kind == "resolved"})
        self.baselines = baselines
        if replaying:  # nothing was judged: incidents hold too (no repeat, no resolve)
            return []
        return [self.incident_record(n) for n in self.incidents.step(now_s, self._seen(), resolved)]

    def _seen(self) -> list[Seen]:
        """Every firing alert, as the incident layer takes it."""
        return [
            Seen(alert.key, rule.kpi, alert.active_since, alert.fired_at or alert.active_since,
                 alert.details)
            for rule in self.rules
            for alert in self.states[rule.name].firing()
        ]  # fmt: skip

    def _evaluate_rule(
        self,
        rule: Rule,
        segments: SegmentView,
        end: int,
        now_s: float,
        replaying: bool,
        baselines: dict[tuple[str, str, str, str, str], float],
    ) -> list[Notification]:
        # Folded segments change members when the guard promotes or demotes: a
        # promoted id's future leaves ``__other__``, which would read as a drop.
        keys = [k for k in segments if k[0] in rule.scopes and OTHER not in k]
        th = thresholds(rule, len(keys))
        bad: dict[AlertKey, dict[str, object]] = {}
        still_bad: set[AlertKey] = set()
        evaluated: set[AlertKey] = set()
        now_at: dict[AlertKey, Verdict] = {}
        for key in keys:
            verdict, span = self._judge(rule, th, segments, key, end)
            if verdict.baseline is not None:
                baselines[(rule.kpi, *key, rule.window)] = verdict.baseline
            if not verdict.enough_data or replaying or not _covers(segments, key, span):
                continue
            alert_key: AlertKey = (rule.name, *key)
            evaluated.add(alert_key)
            now_at[alert_key] = verdict
            if verdict.bad:
                bad[alert_key] = self._details(rule, key, verdict, span, segments, end)
            elif KPI[rule.kpi].worse_by(verdict.change) >= rule.resolve_change:
                still_bad.add(alert_key)
        notes = self.states[rule.name].update(now_s, bad, still_bad, evaluated)
        for note in notes:
            if note.kind == "resolved":  # say where the KPI is now, not where it was worst
                v = now_at[note.alert.key]
                note.alert.details.update(value=v.value, baseline=v.baseline, change=v.change)
        return notes

    @staticmethod
    def _judge(
        rule: Rule, th: Thresholds, segments: SegmentView, key: SeriesKey, end: int
    ) -> tuple[Verdict, Baseline]:
        w = rule.window_minutes
        current = segments.sum(key, end - w, end)
        span = baseline_span(rule, end)
        base = segments.sum(key, span.start, span.end)
        if span.kind.startswith("same time") and not base.any():
            span = baseline_span(rule, end, has_data=False)
            base = segments.sum(key, span.start, span.end)
        verdict = judge(rule.kpi, current.tolist(), base.tolist(), span.scale, th)
        return verdict, span

    def _details(
        self, rule: Rule, key: SeriesKey, verdict: Verdict, span: Baseline,
        segments: SegmentView, end: int,
    ) -> dict[str, object]:  # fmt: skip
        th = thresholds(rule)
        known, w = KPI[rule.kpi], rule.window_minutes
        # Each child's share of this segment's gap (alerts.incidents: a child explains it).
        whole = gap(rule.kpi, verdict.value, verdict.baseline,
                    float(segments.sum(key, end - w, end)[known.den]))  # fmt: skip
        contributors = []
        for child in segments.children(key):
            v, _ = self._judge(rule, th, segments, child, end)
            if v.change is None or v.value is None:
                continue
            weight = segments.sum(child, end - w, end)
            volume = int(weight[known.volume_index])
            part = gap(rule.kpi, v.value, v.baseline, float(weight[known.den]))
            contributors.append(
                {
                    "scope": child[0],
                    "channel": child[1],
                    "campaign": child[2],
                    "value": v.value,
                    "baseline": v.baseline,
                    "change": v.change,
                    "impact": known.worse_by(v.change) * max(volume, 1),
                    "share": part / whole if whole > 0 else 0.0,
                }
            )
        contributors.sort(key=lambda c: -float(c["impact"]))  # type: ignore[arg-type]
        top = [c for c in contributors if float(c["impact"]) > 0][: self.top]  # type: ignore[arg-type]
        return {
            "value": verdict.value,
            "baseline": verdict.baseline,
            "change": verdict.change,
            "statistic": verdict.statistic,
            "p_value": verdict.p_value,
            "reason": verdict.reason,
            "baseline_kind": span.kind,
            "window_start": (end - rule.window_minutes) * 60,
            "window_end": end * 60,
            "contributors": top,
        }

    def record(self, rule: Rule, note: Notification) -> dict[str, Any]:
        """The alert object of SPEC.md for one notification."""
        alert = note.alert
        _, scope, channel, campaign = alert.key
        d: Mapping[str, Any] = alert.details
        status = "resolved" if note.kind == "resolved" else "firing"
        change = d.get("change")
        text = summary(rule, scope, channel, campaign, d, resolved=status == "resolved")
        record: dict[str, Any] = {
            "rule": rule.name,
            "status": status,
            "notification": note.kind,
            "kpi": rule.kpi,
            "scope": scope,
            "channel": channel,
            "campaign": campaign,
            "window": rule.window,
            "value": d.get("value"),
            "baseline": d.get("baseline"),
            "baseline_kind": d.get("baseline_kind"),
            "change": change,
            "statistic": d.get("statistic"),
            "p_value": d.get("p_value"),
            "severity": rule.severity,
            "starts_at": iso(alert.active_since),
            "fired_at": iso(alert.fired_at) if alert.fired_at is not None else None,
            "ends_at": iso(alert.resolved_at) if alert.resolved_at is not None else None,
            "notified_at": iso(note.at),
            "summary": text,
            "contributors": d.get("contributors", []),
            "labels": {
                "alertname": rule.name,
                "rule": rule.name,
                "kpi": rule.kpi,
                "scope": scope,
                "channel": channel,
                "campaign": campaign,
                "window": rule.window,
                "severity": rule.severity,
                "source": "kpimon-worker",
                **rule.labels,
            },
            "annotations": {
                "summary": text,
                "description": str(d.get("reason", "")),
                "runbook_url": self.runbook(rule.runbook_url),
                "dashboard_url": self.dashboard_url(
                    scope, channel, campaign, alert.active_since, note.at
                ),
            },
        }
        return record

    def runbook(self, url: str) -> str:
        """A repository path (``docs/runbooks/x.md``) made a link under the base URL."""
        if self.runbook_base_url is None or url.startswith(("http://", "https://")):
            return url
        return urllib.parse.urljoin(self.runbook_base_url.rstrip("/") + "/", url.rsplit("/", 1)[-1])

    def dashboard_url(
        self, scope: str, channel: str, campaign: str, since: float, now: float
    ) -> str | None:
        if self.grafana_url is None:
            return None
        params = {
            "from": str(int((since - 3600) * 1000)),
            "to": str(int((now + 900) * 1000)),
            "var-channel": channel or "All",
            "var-campaign": campaign or "All",
        }
        return f"{self.grafana_url}/d/{DASHBOARD_UID}?{urllib.parse.urlencode(params)}"

    def firing_labels(self) -> list[tuple[str, str, str, str, str]]:
        """(rule, severity, scope, channel, campaign) of every firing alert."""
        by_name = {r.name: r for r in self.rules}
        return [
            (name, by_name[name].severity, *alert.key[1:])
            for name, state in self.states.items()
            for alert in state.firing()
        ]

    def firing_records(self, now_s: float) -> list[dict[str, Any]]:
        """Records of every open incident, for sinks that want active alerts re-sent."""
        return [
            self.incident_record(IncidentNote("repeat", incident, now_s))
            for incident in self.incidents.open()
        ]

    def incident_record(self, note: IncidentNote) -> dict[str, Any]:
        """The alert object of SPEC.md for one incident notification.

        The root member's record (what moved, where, by how much...), with the incident's
        status, times and severity, ``incident`` (id, root, affected KPIs and segments, the
        member alerts, each with its own labels for Alertmanager) and the contributors of
        all members."""
        incident, by_name = note.incident, {r.name: r for r in self.rules}
        resolved = note.kind == "resolved"
        members = []
        for m in incident.ordered():
            rule = by_name.get(m.key[0])
            if rule is None:  # its rule was removed: it resolved with it
                continue
            state = AlertState.FIRING if m.firing else AlertState.RESOLVED
            alert = Alert(m.key, state, m.active_since, m.fired_at, m.resolved_at, m.fired_at,
                          m.fired_at, dict(m.details))  # fmt: skip
            kind = note.kind if m.firing or resolved else "resolved"
            member = self.record(rule, Notification(kind, alert, note.at))
            member["role"] = m.role
            member["labels"].update(incident=incident.id, incident_role=m.role)
            members.append(member)
        if not members:
            raise ValueError(f"incident {incident.id}: no member has a rule any more")
        record = dict(members[0])
        record.pop("role")
        record["labels"] = dict(members[0]["labels"])
        severity = min((m["severity"] for m in members), key=lambda s: SEVERITY_RANK.get(s, 9))
        others = members[1:]
        if others:
            also = ", ".join(f"{m['kpi']} ({_place(m)})" for m in others[:8])
            more = f" and {len(others) - 8} more" if len(others) > 8 else ""
            record["summary"] = f"{record['summary']}; with {also}{more}"
            record["annotations"] = {**record["annotations"], "summary": record["summary"]}
        record.update(
            status="resolved" if resolved else "firing",
            notification=note.kind,
            severity=severity,
            starts_at=iso(min(m.active_since for m in incident.members.values())),
            fired_at=iso(incident.fired_at),
            ends_at=iso(incident.resolved_at) if incident.resolved_at is not None else None,
            contributors=self._contributors(members),
            incident={
                "id": incident.id,
                "root": {k: record[k] for k in ("rule", "kpi", "scope", "channel", "campaign")},
                "kpis": sorted({m["kpi"] for m in members}),
                "segments": [
                    {"scope": s, "channel": c, "campaign": p}
                    for s, c, p in dict.fromkeys(
                        (m["scope"], m["channel"], m["campaign"]) for m in members
                    )
                ],
                "members": members,
            },
        )
        record["labels"]["severity"] = severity
        return record

    def _contributors(self, members: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The members' contributors, one per segment (its largest share), largest first."""
        best: dict[tuple[str, str, str], dict[str, Any]] = {}
        for member in members:
            for c in member.get("contributors") or []:
                where = (c["scope"], c["channel"], c["campaign"])
                if where not in best or c.get("share", 0) > best[where].get("share", 0):
                    best[where] = {**c, "kpi": member["kpi"]}
        ranked = sorted(best.values(), key=lambda c: (-float(c.get("share", 0)),
                                                      -float(c.get("impact", 0))))  # fmt: skip
        return ranked[: self.top]

    def clone(self) -> AlertEngine:
        """An engine in the same state (rules and settings shared), to step elsewhere.

        The worker steps a clone off the event loop and puts it in place only once
        the tick's transaction committed: the engine in place is never changed, so
        the loop may read it meanwhile and a discarded tick leaves no trace.
        """
        twin = copy.copy(self)
        twin.states = {name: state.clone() for name, state in self.states.items()}
        twin.baselines = dict(self.baselines)
        twin.incidents = self.incidents.clone()
        return twin

    # -- state for restarts -----------------------------------------------------------
    def to_dict(self) -> dict[str, object]:
        state: dict[str, object] = {name: s.to_dict() for name, s in self.states.items()}
        state[INCIDENTS] = self.incidents.to_dict()
        return state

    def load(self, data: Mapping[str, Any]) -> None:
        """Restore ``to_dict`` output; raises ValueError (and changes nothing) if it is bad."""
        states = dict(self.states)
        for rule in self.rules:
            if rule.name in data:
                states[rule.name] = RuleAlerts.from_dict(
                    rule.name, self.states[rule.name].timing, data[rule.name]
                )
        intervals = {r.name: r.repeat_interval_seconds for r in self.rules}
        if INCIDENTS in data:
            incidents = Incidents.from_dict(data[INCIDENTS], intervals)
            incidents.retain(intervals)
        else:  # a state from before incidents: adopt what fires, telling nobody again
            incidents = Incidents(intervals)
            self.states = states
            seen = self._seen()
            if seen:
                incidents.step(max(s.fired_at for s in seen), seen)
        self.states, self.incidents = states, incidents


def _place(record: Mapping[str, Any]) -> str:
    """A member's segment, short: ``c1``, ``search``, ``global``."""
    return str(record["campaign"] or record["channel"] or record["scope"])
