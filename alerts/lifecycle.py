"""Alert lifecycle: the pure, per-rule state machine behind every notification.

Modelled on Prometheus alerting rules: inactive → pending → firing (after ``for``) → resolved,
one alert per segment, ``keep_firing_for`` against flapping, resolved alerts retained for a while
so their resolve notice can still be delivered, and re-sends while firing. It does no I/O and
reads no clock: every call receives ``now`` (event-time seconds), so the live worker and the
offline backtest take identical decisions and tests drive time explicitly. The whole state is a
JSON-safe dict, so a restarted worker resumes without duplicate or lost notifications.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Set
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

AlertKey = tuple[str, str, str, str]
"""(rule, scope, channel, campaign): one alert per rule and segment."""

NotificationKind = Literal["firing", "repeat", "update", "resolved"]
"""A rule's alerts fire, repeat and resolve; ``update`` is an incident's (alerts joined it)."""

STATE_VERSION = 1
"""Version of the ``RuleAlerts.to_dict`` layout; bumped on incompatible changes."""


class AlertState(StrEnum):
    """Lifecycle state. INACTIVE alerts are not stored: a segment without an alert is inactive."""

    INACTIVE = "inactive"
    PENDING = "pending"
    FIRING = "firing"
    RESOLVED = "resolved"


@dataclass
class Alert:
    """One alert of one rule for one segment, with the timestamps its decisions depend on."""

    key: AlertKey
    state: AlertState
    active_since: float
    fired_at: float | None
    resolved_at: float | None
    last_bad_at: float
    last_sent_at: float | None
    details: dict[str, object]

    def to_dict(self) -> dict[str, object]:
        """JSON-safe form (the key becomes a list); ``from_dict`` restores it exactly."""
        return {
            "key": list(self.key),
            "state": self.state.value,
            "active_since": self.active_since,
            "fired_at": self.fired_at,
            "resolved_at": self.resolved_at,
            "last_bad_at": self.last_bad_at,
            "last_sent_at": self.last_sent_at,
            "details": copy.deepcopy(self.details),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> Alert:
        """Rebuild from ``to_dict`` output; raises ValueError on a malformed record."""
        raw_key = _field(d, "key")
        if not (
            isinstance(raw_key, list | tuple)
            and len(raw_key) == 4
            and all(isinstance(part, str) for part in raw_key)
        ):
            raise ValueError(f"alert key must be 4 strings, got {raw_key!r}")
        state = _field(d, "state")
        if not isinstance(state, str):
            raise ValueError(f"alert state must be a string, got {state!r}")
        details = _field(d, "details")
        if not (isinstance(details, dict) and all(isinstance(k, str) for k in details)):
            raise ValueError(f"alert details must be an object, got {details!r}")
        return cls(
            key=(raw_key[0], raw_key[1], raw_key[2], raw_key[3]),
            state=AlertState(state),
            active_since=_number(d, "active_since"),
            fired_at=_optional_number(d, "fired_at"),
            resolved_at=_optional_number(d, "resolved_at"),
            last_bad_at=_number(d, "last_bad_at"),
            last_sent_at=_optional_number(d, "last_sent_at"),
            details=copy.deepcopy(details),
        )


@dataclass(frozen=True)
class Timing:
    """Durations in seconds that govern one rule's lifecycle."""

    for_seconds: float
    keep_firing_for: float
    repeat_interval: float
    resolved_retention: float = 900.0

    def __post_init__(self) -> None:
        for name in ("for_seconds", "keep_firing_for", "resolved_retention"):
            value = getattr(self, name)
            if math.isnan(value) or value < 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        # Zero would re-send on every tick; math.inf disables repeats.
        if math.isnan(self.repeat_interval) or self.repeat_interval <= 0:
            raise ValueError(f"repeat_interval must be > 0, got {self.repeat_interval!r}")


@dataclass(frozen=True)
class Notification:
    """Something to tell the sinks; ``alert`` is a snapshot, safe from later updates."""

    kind: NotificationKind
    alert: Alert
    at: float


class RuleAlerts:
    """All alerts of one rule, keyed by segment."""

    def __init__(self, rule: str, timing: Timing) -> None:
        self.rule = rule
        self.timing = timing
        self._alerts: dict[AlertKey, Alert] = {}
        # Latest `now` seen: a late tick is taken at this time so timers never run backwards.
        self._clock: float | None = None

    def update(
        self,
        now: float,
        bad: Mapping[AlertKey, dict[str, object]],
        still_bad: Set[AlertKey],
        evaluated: Set[AlertKey],
    ) -> list[Notification]:
        """Apply one evaluation tick of this rule and return its notifications, by key.

        ``bad``: segments past the alert threshold, with their verdict details. ``still_bad``:
        segments inside the hysteresis band (past the resolve threshold only); they keep a
        firing alert firing and a pending one pending. ``evaluated``: segments that had enough
        data this tick; any other segment is held as it is (no fire, no resolve, no repeat),
        even if listed in ``bad``, since nothing was really judged for it (e.g. during replay).
        """
        if not math.isfinite(now):
            raise ValueError(f"now must be finite, got {now!r}")
        foreign = [key for key in bad if key[0] != self.rule]
        if foreign:  # checked before any change, so a bad call leaves the state untouched
            raise ValueError(f"keys {foreign!r} do not belong to rule {self.rule!r}")
        now = float(now) if self._clock is None else max(float(now), self._clock)
        self._clock = now
        notifications: list[Notification] = []
        for key in sorted(self._alerts.keys() | (bad.keys() & evaluated)):
            if key in evaluated:
                note = self._step(key, now, bad, still_bad)
                if note is not None:
                    notifications.append(note)
            self._forget_if_expired(key, now)
        return notifications

    def firing(self) -> list[Alert]:
        """Snapshots of the firing alerts, by key."""
        return [a for a in self.alerts() if a.state is AlertState.FIRING]

    def alerts(self) -> list[Alert]:
        """Snapshots of all tracked alerts (pending, firing, retained resolved), by key."""
        return [copy.deepcopy(self._alerts[key]) for key in sorted(self._alerts)]

    def clone(self) -> RuleAlerts:
        """An independent copy: stepping it leaves this one as it is."""
        twin = RuleAlerts(self.rule, self.timing)
        twin._alerts = copy.deepcopy(self._alerts)
        twin._clock = self._clock
        return twin

    def to_dict(self) -> dict[str, object]:
        """JSON-safe state; timing is configuration, so it is not part of it."""
        return {
            "version": STATE_VERSION,
            "rule": self.rule,
            "clock": self._clock,
            "alerts": [self._alerts[key].to_dict() for key in sorted(self._alerts)],
        }

    @classmethod
    def from_dict(cls, rule: str, timing: Timing, d: Mapping[str, object]) -> RuleAlerts:
        """Restore ``to_dict`` output; raises ValueError rather than resume from bad state."""
        if _field(d, "version") != STATE_VERSION:
            raise ValueError(f"unsupported alert state version {d['version']!r}")
        if _field(d, "rule") != rule:
            raise ValueError(f"state is for rule {d['rule']!r}, not {rule!r}")
        restored = cls(rule, timing)
        restored._clock = _optional_number(d, "clock")
        records = _field(d, "alerts")
        if not isinstance(records, list):
            raise ValueError("alerts must be a list")
        for record in records:
            if not isinstance(record, dict):
                raise ValueError(f"alert record must be an object, got {record!r}")
            alert = Alert.from_dict(record)
            restored._check_restored(alert)
            restored._alerts[alert.key] = alert
        return restored

    def _step(
        self,
        key: AlertKey,
        now: float,
        bad: Mapping[AlertKey, dict[str, object]],
        still_bad: Set[AlertKey],
    ) -> Notification | None:
        """Advance one evaluated segment; at most one notification per segment and tick."""
        alert = self._alerts.get(key)
        if alert is None or alert.state is AlertState.RESOLVED:
            if key not in bad:
                return None  # the hysteresis band alone never starts an alert
            # A new cycle, even within a resolved alert's retention: it must earn `for` again.
            alert = Alert(key, AlertState.PENDING, now, None, None, now, None, {})
            self._alerts[key] = alert
        if key in bad:
            alert.last_bad_at = now
            alert.details = copy.deepcopy(bad[key])
            if alert.state is AlertState.PENDING:
                return self._fire_if_due(alert, now)
        elif key in still_bad:
            if alert.state is AlertState.FIRING:
                alert.last_bad_at = now
        elif alert.state is AlertState.PENDING:
            del self._alerts[key]  # never fired, so nobody is told
            return None
        elif now - alert.last_bad_at >= self.timing.keep_firing_for:
            alert.state = AlertState.RESOLVED
            alert.resolved_at = now
            return Notification("resolved", copy.deepcopy(alert), now)
        if (
            alert.state is AlertState.FIRING
            and alert.last_sent_at is not None
            and now - alert.last_sent_at >= self.timing.repeat_interval
        ):
            alert.last_sent_at = now
            return Notification("repeat", copy.deepcopy(alert), now)
        return None

    def _fire_if_due(self, alert: Alert, now: float) -> Notification | None:
        if now - alert.active_since < self.timing.for_seconds:
            return None
        alert.state = AlertState.FIRING
        alert.fired_at = now
        alert.last_sent_at = now
        return Notification("firing", copy.deepcopy(alert), now)

    def _forget_if_expired(self, key: AlertKey, now: float) -> None:
        """Drop a resolved alert once its resolve notice has had time to be delivered."""
        alert = self._alerts.get(key)
        if (
            alert is not None
            and alert.state is AlertState.RESOLVED
            and alert.resolved_at is not None
            and now - alert.resolved_at >= self.timing.resolved_retention
        ):
            del self._alerts[key]

    def _check_restored(self, alert: Alert) -> None:
        """Reject records this machine could never have produced, so corruption is loud."""
        consistent = {
            AlertState.PENDING: alert.fired_at is None and alert.resolved_at is None,
            AlertState.FIRING: alert.fired_at is not None
            and alert.last_sent_at is not None
            and alert.resolved_at is None,
            AlertState.RESOLVED: alert.fired_at is not None and alert.resolved_at is not None,
        }.get(alert.state, False)
        if alert.key[0] != self.rule or alert.key in self._alerts or not consistent:
            raise ValueError(f"inconsistent alert record for rule {self.rule!r}: {alert!r}")


def _field(d: Mapping[str, object], name: str) -> object:
    if name not in d:
        raise ValueError(f"missing field {name!r}")
    return d[name]


def _number(d: Mapping[str, object], name: str) -> float:
    value = _field(d, name)
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ValueError(f"field {name!r} must be a number, got {value!r}")
    return float(value)


def _optional_number(d: Mapping[str, object], name: str) -> float | None:
    return None if _field(d, name) is None else _number(d, name)
