"""The alert engine: rules x segments -> sequential detectors -> lifecycle -> alert records.

Pure code shared by the live worker and ``kpimon backtest``: it reads window sums only
through a :class:`~stream.segments.SegmentView` of one scope snapshot (never the buckets
behind it). Every evaluation adds the newest settled minute of every segment of every
rule's scopes to that rule's CUSUMs (``alerts.detectors``) against the segment's baseline
(``alerts.baselines``), steps each rule's alert state machine in event time, and turns
notifications into the alert object of SPEC.md (what moved, where, by how much, against
which baseline, how sure, since when, which child segments contribute most, links).
Rules against goals and budgets (``against: goal|budget``) are judged by ``alerts.goals``
on the same view and step the same lifecycles and incidents.

Minutes are added once: an evaluation repeated within a minute adds nothing (each
detector keeps the last minute it added), and after a pause (a held backlog, a restart)
the minutes missed are added in order, up to ``CATCH_UP_MINUTES``. A minute restated by
events later than the settle delay is not added again: its evidence was counted as it
stood when it settled, and re-adding would count it twice (the baselines read the
restated sums from then on). Alerts wait while the stream replays a backlog
(``replaying``): half-applied data must not be judged.
"""

from __future__ import annotations

import copy
import math
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from alerts import goals as goal_rules
from alerts.baselines import (
    FREEZE_HISTORY,
    FREEZE_MINUTES,
    Expected,
    Floats,
    Recent,
    block_starts,
    block_sums,
    blocks,
    expected,
)
from alerts.detectors import (
    MIN_BLOCKS,
    Cusum,
    Detectors,
    Evidence,
    Plan,
    block_evidence,
    evidence,
    judge,
    kpi_value,
    multipliers,
    plan,
    threshold,
)
from alerts.goals import Goals
from alerts.incidents import IncidentNote, Incidents, Seen, gap
from alerts.lifecycle import Alert, AlertKey, AlertState, Notification, RuleAlerts, Timing
from alerts.rules import Rule, RulesFile
from alerts.text import iso, summary
from stream.aggregate import OTHER, UNATTRIBUTED, SeriesKey
from stream.kpis import KPI
from stream.segments import SegmentView

DASHBOARD_UID = "kpimon-campaign"
INCIDENTS = "@incidents"
"""Key of the incident state in :meth:`AlertEngine.to_dict` (rule names cannot start so)."""
SEVERITY_RANK = {"page": 0, "ticket": 1, "info": 2}
CATCH_UP_MINUTES = 60
"""Minutes missed (a held backlog, a stopped worker) added at most at once: older ones
are skipped, not judged late, so a long outage of the worker costs one tick, not hours.
A new detector (a fresh deployment over recorded history, a new rule) starts this far
back too, where its segment's history holds a baseline: it judges the last hour at once."""
STATE_VERSION = 2
"""Version of :meth:`AlertEngine.to_dict` (1: a bare map of rule lifecycles)."""

MATERIAL = 0.75
"""Share of ``min_change`` a move must measure for its evidence to alert (see _alarm)."""

BaselineKey = tuple[str, str, str, str, str]
"""(kpi, scope, channel, campaign, window) of an exported baseline."""


@dataclass(frozen=True)
class Judged:
    """A rule's view of one segment at the newest minute: its baseline, and the span of
    the current excursion (or of the display window when there is none)."""

    base: Expected
    since: int
    end: int


class AlertEngine:
    """Evaluates a rules file over segment views, tick by tick; holds every rule's alert
    lifecycles and detector statistics."""

    def __init__(
        self,
        rules: RulesFile,
        *,
        grafana_url: str | None = None,
        runbook_base_url: str | None = None,
        top: int = 3,
    ) -> None:
        self.rules = [run for r in rules.rules for run in goal_rules.expand(r)]
        self.trend = [r for r in self.rules if r.against == "baseline"]
        self.goal_rules = [r for r in self.rules if r.against != "baseline"]
        """Rules against goals and budgets, as they run (``alerts.goals.expand``)."""
        self.budget = rules.false_alerts_per_week
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
        self.plans: dict[str, Plan] = {r.name: plan(KPI[r.kpi]) for r in self.trend}
        self.detectors = {
            r.name: Detectors(multipliers(self.plans[r.name], r.min_change)) for r in self.trend
        }
        self.baselines: dict[BaselineKey, float] = {}
        self._expected: dict[tuple[SeriesKey, int, int, int], Expected | None] = {}
        self._history: dict[tuple[SeriesKey, int, int, int], Floats] = {}
        self._block_sums: dict[tuple[SeriesKey, int, int], Floats] = {}
        self._recent = Recent()
        """Baselines by their sums, across ticks (a cache, not state: clones share it)."""
        self._shared: set[tuple[str, SeriesKey]] | None = None
        """After a clone, the detectors this engine has made its own (the others it shares
        with its clones, copied before their first change); None: all are its own."""
        self._stored: dict[str, dict[str, object]] = {}
        """``Detectors.to_dict`` of the rules whose detectors did not change since: a tick
        within the minute changes none, and ~7,000 detectors need not be listed again."""
        self.incidents = Incidents({r.name: r.repeat_interval_seconds for r in self.rules})

    def evaluate(
        self, segments: SegmentView, end_minute: int, now_s: float, *, replaying: bool = False,
        goals: Goals | None = None,
    ) -> list[dict[str, Any]]:  # fmt: skip
        """One tick over one snapshot's segments: incident records (firing, repeat, resolved).

        Each rule's alerts step their own lifecycle; what is notified is the incident
        layer's (``alerts.incidents``): the alerts of one cause make one record. Rules
        against goals and budgets judge by ``goals`` (the targets in force; none: nothing)."""
        # Folded segments change members when the guard promotes or demotes: a
        # promoted id's future leaves ``__other__``, which would read as a drop. Nor is
        # ``unattributed`` judged: orders leave it when their click comes (good news, not a
        # drop), it has no clicks or spend for ratios, and a loss shows in its channel.
        keys = {
            r.name: [k for k in segments if k[0] in r.scopes and OTHER not in k
                     and k[2] != UNATTRIBUTED]
            for r in self.trend
        }  # fmt: skip
        weight = sum(r.budget_share * len(keys[r.name]) for r in self.trend)
        baselines: dict[BaselineKey, float] = {}
        resolved: dict[AlertKey, dict[str, object]] = {}
        self._recent.next_tick()
        try:
            for rule in self.trend:
                h = threshold(weight, rule.budget_share,
                              len(self.detectors[rule.name].multipliers), self.budget)  # fmt: skip
                notes = self._evaluate_rule(
                    rule, keys[rule.name], h, segments, end_minute, now_s, replaying, baselines
                )
                resolved.update(
                    {n.alert.key: n.alert.details for n in notes if n.kind == "resolved"}
                )
        finally:  # the tick's memos hold its segments' sums: none outlives the tick
            self._expected, self._history, self._block_sums = {}, {}, {}
        self.baselines = baselines
        if replaying:  # nothing was judged: incidents hold too (no repeat, no resolve)
            return []
        resolved.update(self._evaluate_goals(segments, end_minute, now_s, goals))
        return [self.incident_record(n) for n in self.incidents.step(now_s, self._seen(), resolved)]

    def _evaluate_goals(
        self, segments: SegmentView, end: int, now_s: float, goals: Goals | None
    ) -> dict[AlertKey, dict[str, object]]:
        """Step the goal and budget rules' lifecycles (``alerts.goals``); the details of
        the alerts that resolved, as things stand now."""
        tracked = {r.name: [a.key for a in self.states[r.name].alerts()] for r in self.goal_rules}
        if (goals is None or goals.targets.empty()) and not any(tracked.values()):
            return {}  # no targets: nothing to judge, nothing to resolve
        seen = goal_rules.observe(self.goal_rules, goals, segments, end, tracked, self.budget)
        resolved: dict[AlertKey, dict[str, object]] = {}
        for rule in self.goal_rules:
            o = seen[rule.name]
            for note in self.states[rule.name].update(now_s, o.bad, o.still_bad, o.evaluated):
                if note.kind == "resolved":
                    note.alert.details.update(o.current.get(note.alert.key, {}))
                    resolved[note.alert.key] = note.alert.details
        return resolved

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
        keys: list[SeriesKey],
        h: float,
        segments: SegmentView,
        end: int,
        now_s: float,
        replaying: bool,
        baselines: dict[BaselineKey, float],
    ) -> list[Notification]:
        bad: dict[AlertKey, dict[str, object]] = {}
        still_bad: set[AlertKey] = set()
        evaluated: set[AlertKey] = set()
        now_at: dict[AlertKey, Expected] = {}
        detectors = self.detectors[rule.name]
        newest = end - 1
        by_segment, own = detectors.by_segment, self._shared
        gone = by_segment.keys() - set(keys)
        for key in gone:
            del by_segment[key]  # expired or folded: its evidence goes with it
        changed = bool(gone)
        known, span, window = KPI[rule.kpi], self.plans[rule.name].span, rule.window_minutes
        for key in keys:
            cusum = by_segment.get(key)
            if cusum is None:
                cusum = detectors.get(key)
                changed = True
                if own is not None:
                    own.add((rule.name, key))
            if not replaying and (cusum.last is None or cusum.last < newest):
                if own is not None and (rule.name, key) not in own:
                    cusum = by_segment[key] = cusum.copy()  # shared with a clone
                    own.add((rule.name, key))
                self._add_minutes(rule, h, segments, key, cusum, newest)
                changed = True
            # The baseline of the newest minute: exported, and what an alert compares with.
            until = self._baseline_end(segments, key, cusum, newest)
            base = self._base(segments, key, newest, until, span)
            if base is None:
                continue
            value = kpi_value(known, base.rate * window)
            if value is not None:
                baselines[(rule.kpi, *key, rule.window)] = value
            if replaying or cusum.last != newest:
                continue  # held, or judged nothing yet
            alert_key: AlertKey = (rule.name, *key)
            evaluated.add(alert_key)
            now_at[alert_key] = base
            if not any(cusum.stats):
                continue  # at rest: no alarm, not still bad (thresholds are > 0)
            alarm = self._alarm(rule, cusum)
            if alarm is not None:
                since = cusum.since if cusum.since is not None else end - window
                judged = Judged(base, since, end)
                bad[alert_key] = self._details(rule, key, cusum, alarm, judged, segments)
            elif cusum.still_bad():
                still_bad.add(alert_key)
        if changed:
            self._stored.pop(rule.name, None)
        notes = self.states[rule.name].update(now_s, bad, still_bad, evaluated)
        for note in notes:
            if note.kind == "resolved":  # say where the KPI is now, not where it was worst
                where, base = note.alert.key[1:], now_at[note.alert.key]
                value, baseline, change = self._compare(rule, segments, where, end - window,
                                                        end, base)  # fmt: skip
                note.alert.details.update(value=value, baseline=baseline, change=change)
        return notes

    def _alarm(self, rule: Rule, cusum: Cusum) -> int | None:
        """The magnitude that alarms: at its threshold, with a material move.

        A CUSUM for a move r also gathers evidence from moves about half as large (its
        drift is positive from the point where r and the baseline are equally far, in KL
        terms), and at high volume quickly: so an alarm also needs the move measured over
        its excursion to reach MATERIAL x ``min_change``, as the rule promises.
        """
        p = self.plans[rule.name]
        for i in cusum.alarms():
            ratio = cusum.ratio(i)
            if ratio is None:
                continue
            factor = (1 / ratio if ratio > 0 else math.inf) if p.inverse else ratio
            move = KPI[rule.kpi].worse_by(factor - 1)
            if move >= MATERIAL * rule.min_change:
                return i
        return None

    # -- evidence ---------------------------------------------------------------------
    def _base(
        self, segments: SegmentView, key: SeriesKey, minute: int, until: int, span: int
    ) -> Expected | None:
        """The baseline of ``key`` at ``minute`` from history before ``until``, once a tick
        (rules on the same segment share it)."""
        memo = (key, minute, until, span)
        if memo not in self._expected:
            self._expected[memo] = expected(segments, key, minute, until, span, self._recent)
        return self._expected[memo]

    def _blocks(
        self, segments: SegmentView, key: SeriesKey, until: int, span: int, block: int
    ) -> Floats:
        """Past reporting blocks of ``key`` before ``until``, once a tick (memo)."""
        memo = (key, until, span, block)
        if memo not in self._history:
            self._history[memo] = blocks(segments, key, until, span, block, self._block_sums)
        return self._history[memo]

    @staticmethod
    def _baseline_end(segments: SegmentView, key: SeriesKey, cusum: Cusum, minute: int) -> int:
        """Where the baseline of ``minute`` stops: before it, or at the start of the
        current excursion (so a change is not its own baseline), at most FREEZE_MINUTES
        back (so a lasting change becomes the new normal). A baseline of less than
        FREEZE_HISTORY minutes is not frozen: a fresh deployment's first minutes are too
        few to hold a level (and an excursion from them may be its own short baseline's
        error), so it goes on learning."""
        since = cusum.since
        if since is None:
            return minute
        first = segments.first_minute(key)
        if first is None or since - first < FREEZE_HISTORY:
            return minute
        return max(min(since, minute), minute - FREEZE_MINUTES)

    def _evidence(
        self, p: Plan, segments: SegmentView, key: SeriesKey, minute: int, cusum: Cusum
    ) -> Evidence | None:
        until = self._baseline_end(segments, key, cusum, minute)
        if p.block > 1:  # spend's reporting blocks, once the history holds enough of them
            before = until - until % p.block  # ... and not the block judged
            starts = block_starts(segments.first_minute(key), before, p.span, p.block)
            if len(starts) >= MIN_BLOCKS:
                if (minute + 1) % p.block:
                    return None  # judged with its block
                history = self._blocks(segments, key, before, p.history, p.block)
                block = block_sums(segments, key, minute + 1 - p.block, p.block)
                return block_evidence(p, block, history)
        base = self._base(segments, key, minute, until, p.span)
        if base is None:
            return None
        exposed = segments.sum(key, minute + 1 - p.lag, minute + 1)
        current = segments.sum(key, minute, minute + 1)
        return evidence(
            p, current, exposed, base.rate, base.counts, base.minutes, base.ratio_counts
        )

    def _add_minutes(
        self, rule: Rule, h: float, segments: SegmentView, key: SeriesKey, cusum: Cusum,
        newest: int,
    ) -> None:  # fmt: skip
        """Add every settled minute this detector has not added yet, in order (a new one:
        the last CATCH_UP_MINUTES its history holds a baseline for)."""
        first = newest - CATCH_UP_MINUTES + 1
        if cusum.last is not None:
            first = max(first, cusum.last + 1)
        p, rs = self.plans[rule.name], self.detectors[rule.name].multipliers
        for minute in range(first, newest + 1):
            ev = self._evidence(p, segments, key, minute, cusum)
            if ev is None:  # nothing to judge by yet: the minute passes unjudged
                cusum.last = minute
                continue
            ratios = judge(ev, rs, h)
            cusum.add(minute, ev, ratios, [h] * len(rs))

    def _compare(
        self, rule: Rule, segments: SegmentView, key: SeriesKey, start: int, end: int,
        base: Expected,
    ) -> tuple[float | None, float | None, float | None]:  # fmt: skip
        """The KPI over minutes [start, end) against its baseline (counts: per minute)."""
        known = KPI[rule.kpi]
        minutes = max(end - start, 1)
        sums = segments.sum(key, start, end).astype(np.float64)
        if known.denominator is None:
            value: float | None = float(sums[known.num]) / minutes
            baseline: float | None = float(base.rate[known.num])
        else:
            value, baseline = kpi_value(known, sums), kpi_value(known, base.rate * minutes)
        return value, baseline, known.change(value, baseline)

    def _details(
        self, rule: Rule, key: SeriesKey, cusum: Cusum, alarm: int, judged: Judged,
        segments: SegmentView,
    ) -> dict[str, object]:  # fmt: skip
        known = KPI[rule.kpi]
        start, end = cusum.starts[alarm] or judged.since, judged.end
        value, baseline, change = self._compare(rule, segments, key, start, end, judged.base)
        # Each child's share of this segment's gap (alerts.incidents: a child explains it).
        whole = gap(rule.kpi, value, baseline, float(segments.sum(key, start, end)[known.den]))
        contributors = []
        p = self.plans[rule.name]
        for child in segments.children(key):
            base = self._base(segments, child, end - 1, start, p.span)
            if base is None:
                continue
            v, b, c = self._compare(rule, segments, child, start, end, base)
            if c is None or v is None:
                continue
            weight = segments.sum(child, start, end)
            volume = int(weight[known.volume_index])
            part = gap(rule.kpi, v, b, float(weight[known.den]))
            contributors.append(
                {
                    "scope": child[0],
                    "channel": child[1],
                    "campaign": child[2],
                    "value": v,
                    "baseline": b,
                    "change": c,
                    "impact": known.worse_by(c) * max(volume, 1),
                    "share": part / whole if whole > 0 else 0.0,
                }
            )
        contributors.sort(key=lambda c: -float(c["impact"]))  # type: ignore[arg-type]
        top = [c for c in contributors if float(c["impact"]) > 0][: self.top]  # type: ignore[arg-type]
        r = self.detectors[rule.name].multipliers[alarm]
        move = "silence" if r == 0 else f"a {abs((1 / r if p.inverse else r) - 1):.0%} move"
        statistic, limit = cusum.stats[alarm], cusum.limits[alarm]
        shown = [f"{x:.4g}" if x is not None else "n/a" for x in (value, baseline)]
        moved = f" ({change:+.0%})" if change is not None else ""
        reason = (
            f"{rule.kpi} {shown[0]} vs {shown[1]} over {end - start} min{moved}: evidence "
            f"{statistic:.1f} reached the threshold {limit:.1f} of the CUSUM for {move}"
        )
        return {
            "value": value,
            "baseline": baseline,
            "change": change,
            "statistic": statistic,
            "threshold": limit,
            # Ville: a likelihood ratio (discounted: a supermartingale) exceeds e^S by
            # chance with probability at most e^-S, per excursion of a stationary segment
            "p_value": math.exp(-statistic),
            "reason": reason,
            "baseline_kind": judged.base.kind,
            "window_start": start * 60,
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
        text = (summary if rule.against == "baseline" else goal_rules.summary)(
            rule, scope, channel, campaign, d, resolved=status == "resolved"
        )
        record: dict[str, Any] = {
            "rule": rule.alertname,
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
                "alertname": rule.alertname,
                "rule": rule.alertname,
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
        return sorted(
            {  # the KPIs of one goal rule share its name: one series per segment
                (by_name[name].alertname, by_name[name].severity, *alert.key[1:])
                for name, state in self.states.items()
                for alert in state.firing()
            }
        )

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
        member alerts, each with its own labels for Alertmanager, and ``joined``: the
        members this notification names first, which an ``update`` is about) and the
        contributors of all members."""
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
                "joined": [
                    {k: m[k] for k in ("rule", "kpi", "scope", "channel", "campaign")}
                    for m in members
                    if (m["rule"], m["scope"], m["channel"], m["campaign"]) in note.joined
                ],
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
        # The detectors are shared, and copied by whichever engine changes one first (a
        # tick within the minute changes none; one that adds a minute, each once).
        twin.detectors = {name: Detectors(d.multipliers, dict(d.by_segment))
                          for name, d in self.detectors.items()}  # fmt: skip
        self._shared, twin._shared = set(), set()
        twin._stored = dict(self._stored)
        twin.baselines = dict(self.baselines)
        twin.incidents = self.incidents.clone()
        return twin

    # -- state for restarts -----------------------------------------------------------
    def to_dict(self) -> dict[str, object]:
        return {
            "version": STATE_VERSION,
            "alerts": {name: state.to_dict() for name, state in self.states.items()},
            "detectors": {name: self._detector_state(name) for name in self.detectors},
            "incidents": self.incidents.to_dict(),
        }

    def _detector_state(self, rule: str) -> dict[str, object]:
        """``to_dict`` of one rule's detectors, listed again only once they changed (the
        dict is shared with later calls: do not change it)."""
        stored = self._stored.get(rule)
        if stored is None:
            stored = self._stored[rule] = self.detectors[rule].to_dict()
        return stored

    def load(self, data: Mapping[str, Any]) -> None:
        """Restore ``to_dict`` output (ValueError on malformed state, and nothing changes).
        Version 1 (before sequential detection) restores the lifecycles; the statistics
        start at zero. A state without incidents adopts what fires, telling nobody again."""
        alerts: Any = data
        detectors: Any = {}
        incidents_state: Any = data.get(INCIDENTS)
        if "version" in data and data["version"] == STATE_VERSION:
            alerts, detectors = data.get("alerts"), data.get("detectors")
            incidents_state = data.get("incidents")
            if not isinstance(alerts, Mapping) or not isinstance(detectors, Mapping):
                raise ValueError("alert state needs 'alerts' and 'detectors' objects")
        elif "version" in data:
            raise ValueError(f"unsupported alert engine state version {data['version']!r}")
        states, restored = dict(self.states), dict(self.detectors)
        for rule in self.rules:
            if rule.name in alerts:
                states[rule.name] = RuleAlerts.from_dict(
                    rule.name, self.states[rule.name].timing, alerts[rule.name]
                )
            if rule.name in detectors:
                stored = detectors[rule.name]
                if not isinstance(stored, Mapping):
                    raise ValueError(f"detector state of {rule.name!r} must be an object")
                restored[rule.name] = Detectors.from_dict(
                    self.detectors[rule.name].multipliers, stored
                )
        intervals = {r.name: r.repeat_interval_seconds for r in self.rules}
        if incidents_state is not None:
            incidents = Incidents.from_dict(incidents_state, intervals)
            incidents.retain(intervals)
        else:
            previous, self.states = self.states, states
            try:
                seen = self._seen()
            finally:
                self.states = previous
            incidents = Incidents(intervals)
            if seen:
                incidents.step(max(s.fired_at for s in seen), seen)
        self.states, self.detectors, self.incidents = states, restored, incidents
        self._shared, self._stored = None, {}  # restored: its own, and not listed yet


def _place(record: Mapping[str, Any]) -> str:
    """A member's segment, short: ``c1``, ``search``, ``global``."""
    return str(record["campaign"] or record["channel"] or record["scope"])
