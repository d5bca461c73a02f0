"""The alert engine: rules x segments -> verdicts -> lifecycle -> alert records.

Pure code shared by the live worker and ``kpimon backtest``: it reads window
sums from a :class:`~stream.aggregate.ScopeStore`, judges every rule for every
segment of its scopes against the rule's baseline, steps each rule's alert
state machine in event time, and turns notifications into the alert object of
SPEC.md (what moved, where, by how much, against which baseline, how sure,
since when, which child segments contribute most, links).
"""

from __future__ import annotations

import copy
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from alerts.detectors import Thresholds, Verdict, bonferroni, judge
from alerts.lifecycle import AlertKey, Notification, RuleAlerts, Timing
from alerts.rules import Rule, RulesFile
from stream.aggregate import OTHER, ScopeStore, SeriesKey
from stream.windows import KPI_BAD_DIRECTION, MEASURES, SeriesBuckets, Totals

DAY, WEEK = 1440, 7 * 1440
KPI_NAMES = {
    "ctr": "CTR",
    "conversion_rate": "Conversion rate",
    "lead_rate": "Lead rate",
    "cpc": "CPC",
    "cpl": "CPL",
    "cpa": "CPA",
    "cac": "CAC",
    "roas": "ROAS",
    "roi": "ROI",
    "aov": "AOV",
    "impressions": "Impressions",
    "clicks": "Clicks",
    "leads": "Leads",
    "orders": "Orders",
}
PERCENT_KPIS = frozenset({"ctr", "conversion_rate", "lead_rate", "roi"})
DASHBOARD_UID = "kpimon-campaign"


def iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def format_value(kpi: str, value: float | None) -> str:
    if value is None:
        return "n/a"
    if kpi in PERCENT_KPIS:
        return f"{value * 100:.2f}%"
    if kpi in MEASURES:
        return f"{value:,.0f}"
    return f"{value:,.2f}"


def where(scope: str, channel: str, campaign: str) -> str:
    if scope == "global":
        return "all traffic"
    if scope == "channel":
        return f"channel {channel}"
    return f"campaign {campaign} on {channel}"


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


def _history_start(buckets: SeriesBuckets) -> int:
    """First minute of the first hour with data: a segment is judged only once its history
    covers its baseline. A baseline that mostly predates the series is not a baseline: with
    spend reported in lumps, its first minutes hold clicks whose cost has not been reported
    yet, and CPC would "rise" on every fresh start and every new campaign."""
    hours = [*buckets.blocks, *buckets.coarse]
    return min(hours) * 60 if hours else 2**62


def _worse_by(verdict: Verdict) -> float:
    """How far the change went in the bad direction (negative: it improved)."""
    if verdict.change is None:
        return 0.0
    return (
        -verdict.change if KPI_BAD_DIRECTION.get(verdict.kpi, "down") == "down" else verdict.change
    )


def _children(key: SeriesKey, series: Iterable[SeriesKey]) -> list[SeriesKey]:
    scope, channel, _ = key
    if scope == "global":
        return [k for k in series if k[0] == "channel"]
    if scope == "channel":
        return [k for k in series if k[0] == "campaign" and k[1] == channel and k[2] != OTHER]
    return []


class AlertEngine:
    """Evaluates a rules file over a ScopeStore; holds every rule's alert state."""

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
        self._sums: dict[tuple[SeriesKey, int, int], Totals] = {}

    def evaluate(
        self, store: ScopeStore, end_minute: int, now_s: float, *, replaying: bool = False
    ) -> list[dict[str, Any]]:
        """One tick: returns alert records (firing, repeat, resolved) to send."""
        records: list[dict[str, Any]] = []
        baselines: dict[tuple[str, str, str, str, str], float] = {}
        self._sums.clear()  # the store changed since the last tick
        for rule in self.rules:
            notes = self._evaluate_rule(rule, store, end_minute, now_s, replaying, baselines)
            records += [self.record(rule, note) for note in notes]
        self.baselines = baselines
        return records

    def _evaluate_rule(
        self,
        rule: Rule,
        store: ScopeStore,
        end: int,
        now_s: float,
        replaying: bool,
        baselines: dict[tuple[str, str, str, str, str], float],
    ) -> list[Notification]:
        segments = sum(1 for k in store.series if k[0] in rule.scopes and OTHER not in k)
        th = thresholds(rule, segments)
        bad: dict[AlertKey, dict[str, object]] = {}
        still_bad: set[AlertKey] = set()
        evaluated: set[AlertKey] = set()
        now_at: dict[AlertKey, Verdict] = {}
        for key, buckets in store.series.items():
            # Folded segments change members when the guard promotes or demotes: a
            # promoted id's future leaves ``__other__``, which would read as a drop.
            if key[0] not in rule.scopes or OTHER in key:
                continue
            verdict, span = self._judge(rule, th, self._sum_of(key, buckets), end)
            if verdict.baseline is not None:
                baselines[(rule.kpi, *key, rule.window)] = verdict.baseline
            if not verdict.enough_data or replaying or _history_start(buckets) > span.start:
                continue
            alert_key: AlertKey = (rule.name, *key)
            evaluated.add(alert_key)
            now_at[alert_key] = verdict
            if verdict.bad:
                bad[alert_key] = self._details(rule, key, verdict, span, store, end)
            elif _worse_by(verdict) >= rule.resolve_change:
                still_bad.add(alert_key)
        notes = self.states[rule.name].update(now_s, bad, still_bad, evaluated)
        for note in notes:
            if note.kind == "resolved":  # say where the KPI is now, not where it was worst
                v = now_at[note.alert.key]
                note.alert.details.update(value=v.value, baseline=v.baseline, change=v.change)
        return notes

    def _sum_of(self, key: SeriesKey, buckets: Any) -> Any:
        """``buckets.sum`` memoised for this tick: rules share windows and baselines."""
        cache = self._sums

        def sum_(start: int, end: int) -> Totals:
            totals = cache.get((key, start, end))
            if totals is None:
                totals = cache[(key, start, end)] = buckets.sum(start, end)
            return totals

        return sum_

    @staticmethod
    def _judge(rule: Rule, th: Thresholds, sum_: Any, end: int) -> tuple[Verdict, Baseline]:
        w = rule.window_minutes
        current: Totals = sum_(end - w, end)
        span = baseline_span(rule, end)
        base: Totals = sum_(span.start, span.end)
        if span.kind.startswith("same time") and not base.any():
            span = baseline_span(rule, end, has_data=False)
            base = sum_(span.start, span.end)
        verdict = judge(rule.kpi, current.tolist(), base.tolist(), span.scale, th)
        return verdict, span

    def _details(
        self, rule: Rule, key: SeriesKey, verdict: Verdict, span: Baseline, store: ScopeStore,
        end: int,
    ) -> dict[str, object]:  # fmt: skip
        th = thresholds(rule)
        contributors = []
        for child in _children(key, store.series):
            v, _ = self._judge(rule, th, self._sum_of(child, store.series[child]), end)
            if v.change is None or v.value is None:
                continue
            weight = store.series[child].sum(end - rule.window_minutes, end)
            volume = int(weight[MEASURES.index(rule.volume_measure)])
            contributors.append(
                {
                    "scope": child[0],
                    "channel": child[1],
                    "campaign": child[2],
                    "value": v.value,
                    "baseline": v.baseline,
                    "change": v.change,
                    "impact": _worse_by(v) * max(volume, 1),
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
        summary = self.summary(rule, scope, channel, campaign, d, resolved=status == "resolved")
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
            "summary": summary,
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
                "summary": summary,
                "description": str(d.get("reason", "")),
                "runbook_url": self.runbook(rule.runbook_url),
                "dashboard_url": self.dashboard_url(
                    scope, channel, campaign, alert.active_since, note.at
                ),
            },
        }
        return record

    @staticmethod
    def summary(
        rule: Rule, scope: str, channel: str, campaign: str, d: Mapping[str, Any],
        resolved: bool = False,
    ) -> str:  # fmt: skip
        name = KPI_NAMES.get(rule.kpi, rule.kpi)
        change = d.get("change")
        if resolved:
            now = "n/a" if change is None else f"{change:+.0%}"
            return (
                f"Resolved: {name} of {where(scope, channel, campaign)} is back "
                f"({format_value(rule.kpi, d.get('value'))} vs "
                f"{format_value(rule.kpi, d.get('baseline'))}, {now}, "
                f"{d.get('baseline_kind', 'baseline')})"
            )
        moved = (
            "n/a" if change is None else f"{'rose' if change > 0 else 'dropped'} {abs(change):.0%}"
        )
        value, base = (
            format_value(rule.kpi, d.get("value")),
            format_value(rule.kpi, d.get("baseline")),
        )
        minutes = rule.window_minutes
        span = f"{minutes} min" if minutes < 60 else f"{minutes // 60} h"
        return (
            f"{name} of {where(scope, channel, campaign)} {moved} in the last {span} "
            f"({value} vs {base}, {d.get('baseline_kind', 'baseline')})"
        )

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
        """Alert records of everything firing, for sinks that want active alerts re-sent."""
        by_name = {r.name: r for r in self.rules}
        return [
            self.record(by_name[name], Notification("repeat", alert, now_s))
            for name, state in self.states.items()
            for alert in state.firing()
        ]

    def clone(self) -> AlertEngine:
        """An engine in the same state (rules and settings shared), to step elsewhere.

        The worker steps a clone off the event loop and puts it in place only once
        the tick's transaction committed: the engine in place is never changed, so
        the loop may read it meanwhile and a discarded tick leaves no trace.
        """
        twin = copy.copy(self)
        twin.states = {name: state.clone() for name, state in self.states.items()}
        twin.baselines = dict(self.baselines)
        twin._sums = {}
        return twin

    # -- state for restarts -----------------------------------------------------------
    def to_dict(self) -> dict[str, object]:
        return {name: state.to_dict() for name, state in self.states.items()}

    def load(self, data: Mapping[str, Any]) -> None:
        for rule in self.rules:
            if rule.name in data:
                self.states[rule.name] = RuleAlerts.from_dict(
                    rule.name, self.states[rule.name].timing, data[rule.name]
                )
