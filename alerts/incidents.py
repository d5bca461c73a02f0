"""Incidents: the alerts of one cause, grouped, with one lifecycle and one notification.

Pure, like :mod:`alerts.lifecycle`: no clock (every call gets ``now``, event-time
seconds), no I/O, and a versioned JSON-safe state that is validated on load. The
per-alert lifecycle (pending, ``for``, hysteresis, resolve) stays in ``RuleAlerts``;
this layer takes its *firing* alerts and decides what people are told.

Two firing alerts have one cause (are *related*) when

(a) they are on the same segment and some measure, moving one way, pushes both KPIs
    their bad way: the catalogue's numerator and denominator of each KPI, with
    ``new_customers`` and ``revenue`` counted as ``orders`` (they arrive with orders).
    An order outage (orders down) so relates orders, conversion_rate, CPA, CAC, ROAS,
    ROI and AOV; a spend spike relates every cost KPI; a click drop relates CTR and CPC;
(b) one's segment is the direct parent of the other's (global over a channel, a channel
    over its campaigns), their KPIs relate as in (a), and the child *explains* the
    parent: its share of the parent's gap is at least ``explain_share`` (default 0.5).
    The gap of a KPI in a segment is how far the window's numerator is from what the
    baseline ratio predicts, signed so that worse is positive: ``(value - baseline) x
    denominator sum`` (a count: ``value - baseline``). The engine computes it from the
    segments' window sums, parent and child alike, and puts ``share = child gap /
    parent gap`` in the parent's ``contributors``.

An incident is a connected component of this relation. The components of a set do not
depend on the order its alerts are seen in, and ids and roots are computed from the
sets, so grouping is stable under the order of evaluation. Membership is sticky: an
alert stays in its incident until it resolves; a new firing alert joins the oldest
open incident its component touches (existing incidents are never merged or split, so
an incident's id, Slack message and Alertmanager labels never move under people).

The incident fires when it opens, repeats at the shortest repeat interval of its
firing members' rules, and resolves when its last member has resolved. Alerts that
join it later (late joiners: the channel a campaign drags, the cost KPIs of an order
outage) are told in an *update* naming every alert that joined since the incident's
last message. Alerts present when it opens are in the firing note; an update comes
at least ``spacing`` after the last firing, repeat or update note (the shorter of
``update_every``, default ``UPDATE_EVERY``, and a sixth of the repeat interval), so
joins in between coalesce and a growing incident makes one message every few minutes
at most; a repeat due within that spacing carries the joiners instead (a repeat
names every member). Each member notes whether it was told, so the next note says
exactly who joined, across restarts.

The *root* is chosen when it opens, among its first members: the deepest segment
(the cause: a campaign over the channel it drags), then the most direct KPI (a count,
then a rate, then a cost ratio), then the largest move. It keeps that role for the
incident's life, so ``incident_role`` labels (which Alertmanager inhibition keys on)
never change.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from alerts.lifecycle import AlertKey
from stream.kpis import KPI

STATE_VERSION = 2
"""Version of the ``Incidents.to_dict`` layout; bumped on incompatible changes
(2: members' ``told`` and incidents' ``last_update_at``; version 1 still loads)."""
UPDATE_EVERY = 300.0
"""Longest spacing (seconds) of an incident's messages before a late joiner is told."""
EXPLAIN_SHARE = 0.5
"""A child explains its parent's move when it makes at least this share of its gap."""
FAMILY: Mapping[str, str] = {"new_customers": "orders", "revenue": "orders"}
"""Measures that arrive with another: an order outage takes its revenue and new customers."""
SCOPE_DEPTH: Mapping[str, int] = {"global": 0, "channel": 1, "campaign": 2}
KIND_RANK: Mapping[str, int] = {"count": 0, "rate": 1, "cost": 2}

UNRELATED_KPIS = frozenset({"spend"})
"""Alerted on but not in the catalogue: spend against its budget (``alerts.goals``). Such
an alert relates to nothing: it is its own incident."""

Role = Literal["root", "member"]
IncidentKind = Literal["firing", "repeat", "update", "resolved"]
Cause = tuple[str, str]
"""(measure family, direction): a move of one measure."""


def causes(kpi: str) -> frozenset[Cause]:
    """The measure moves that push ``kpi`` its bad way (from the KPI catalogue)."""
    if kpi in UNRELATED_KPIS:
        return frozenset()
    k = KPI[kpi]
    num_way, den_way = ("up", "down") if k.bad == "up" else ("down", "up")
    found = {(FAMILY.get(k.numerator, k.numerator), num_way)}
    if k.denominator is not None:
        found.add((FAMILY.get(k.denominator, k.denominator), den_way))
    return frozenset(found)


def gap(kpi: str, value: float | None, baseline: float | None, denominator: float) -> float:
    """How far a window is from its baseline in numerator units, worse positive.

    Additive over segments for one KPI (a parent's denominator is its children's sum),
    which makes ``child gap / parent gap`` a share of the parent's move.
    """
    if value is None or baseline is None:
        return 0.0
    k = KPI[kpi]
    scale = 1.0 if k.denominator is None else float(denominator)
    return k.worse_by(value - baseline) * scale


@dataclass(frozen=True)
class Seen:
    """A firing alert as the incident layer sees it."""

    key: AlertKey
    kpi: str
    active_since: float
    fired_at: float
    details: Mapping[str, object]

    @property
    def segment(self) -> tuple[str, str, str]:
        return (self.key[1], self.key[2], self.key[3])


@dataclass
class Member:
    """One alert of an incident (one alert cycle: a re-fired alert is a new member)."""

    key: AlertKey
    kpi: str
    role: Role
    active_since: float
    fired_at: float
    resolved_at: float | None
    details: dict[str, object]
    told: bool = True
    """Named in a note already (firing, repeat, update); False for a late joiner."""

    @property
    def firing(self) -> bool:
        return self.resolved_at is None

    def to_dict(self) -> dict[str, object]:
        return {
            "key": list(self.key), "kpi": self.kpi, "role": self.role,
            "active_since": self.active_since, "fired_at": self.fired_at,
            "resolved_at": self.resolved_at, "details": copy.deepcopy(self.details),
            "told": self.told,
        }  # fmt: skip

    @classmethod
    def from_dict(cls, d: Mapping[str, object], told: bool | None = None) -> Member:
        """``told``: given for a version 1 record (which has none); else read and checked."""
        key = _field(d, "key")
        if not (isinstance(key, list) and len(key) == 4 and all(isinstance(p, str) for p in key)):
            raise ValueError(f"member key must be 4 strings, got {key!r}")
        kpi, role, details = _field(d, "kpi"), _field(d, "role"), _field(d, "details")
        if not isinstance(kpi, str) or (kpi not in KPI and kpi not in UNRELATED_KPIS):
            raise ValueError(f"unknown member kpi {kpi!r}")
        if role not in ("root", "member"):
            raise ValueError(f"member role must be root or member, got {role!r}")
        if not (isinstance(details, dict) and all(isinstance(k, str) for k in details)):
            raise ValueError(f"member details must be an object, got {details!r}")
        if told is None:
            stored = _field(d, "told")
            if not isinstance(stored, bool):
                raise ValueError(f"member told must be true or false, got {stored!r}")
            told = stored
        return cls((key[0], key[1], key[2], key[3]), kpi, "root" if role == "root" else "member",
                   _number(d, "active_since"), _number(d, "fired_at"),
                   _optional_number(d, "resolved_at"), copy.deepcopy(details), told)  # fmt: skip


@dataclass
class Incident:
    """Alerts of one cause: one id, one root, one lifecycle."""

    id: str
    fired_at: float
    last_sent_at: float
    resolved_at: float | None = None
    members: dict[AlertKey, Member] = field(default_factory=dict)
    last_update_at: float | None = None
    """When the last update note went out (None: none yet); spaces the next one."""

    @property
    def root(self) -> Member:
        return next(m for m in self.members.values() if m.role == "root")

    def firing_members(self) -> list[Member]:
        return [m for m in self.members.values() if m.firing]

    def untold(self) -> list[AlertKey]:
        """Firing members no note has named yet (late joiners), by key."""
        return sorted(m.key for m in self.members.values() if m.firing and not m.told)

    @property
    def last_message_at(self) -> float:
        """The last firing, repeat or update note: the next update is spaced from it."""
        return max(self.last_sent_at, self.last_update_at or self.last_sent_at)

    def ordered(self) -> list[Member]:
        """Members, root first, then by segment depth, KPI directness and key."""
        return sorted(self.members.values(), key=lambda m: (m.role != "root", *_rank(m)))

    def to_dict(self) -> dict[str, object]:
        return {
            "id": self.id, "fired_at": self.fired_at, "last_sent_at": self.last_sent_at,
            "resolved_at": self.resolved_at, "last_update_at": self.last_update_at,
            "members": [self.members[k].to_dict() for k in sorted(self.members)],
        }  # fmt: skip

    @classmethod
    def from_dict(cls, d: Mapping[str, object], version: int = STATE_VERSION) -> Incident:
        """Version 1 had no updates: a member counts as told when it fired by the
        incident's last message (it joined in that tick or before), so the alerts that
        joined since are told by the first update after the upgrade."""
        ident = _field(d, "id")
        if not isinstance(ident, str) or not ident:
            raise ValueError(f"incident id must be a string, got {ident!r}")
        raw = _field(d, "members")
        if not isinstance(raw, list) or not all(isinstance(m, dict) for m in raw):
            raise ValueError("incident members must be a list of objects")
        incident = cls(ident, _number(d, "fired_at"), _number(d, "last_sent_at"),
                       _optional_number(d, "resolved_at"))  # fmt: skip
        if version >= 2:
            incident.last_update_at = _optional_number(d, "last_update_at")
        for record in raw:
            told = None
            if version < 2:
                told = _number(record, "fired_at") <= incident.last_sent_at
            member = Member.from_dict(record, told)
            if member.key in incident.members:
                raise ValueError(f"incident {ident}: member {member.key!r} twice")
            incident.members[member.key] = member
        if sum(m.role == "root" for m in incident.members.values()) != 1:
            raise ValueError(f"incident {ident} must have exactly one root member")
        if incident.resolved_at is not None:
            raise ValueError(f"incident {ident} is resolved: resolved incidents are not kept")
        return incident


@dataclass(frozen=True)
class IncidentNote:
    """Something to tell the sinks about an incident; ``incident`` is a snapshot.

    ``joined``: the members this note names for the first time (an update's reason; a
    repeat may carry some too), by key."""

    kind: IncidentKind
    incident: Incident
    at: float
    joined: tuple[AlertKey, ...] = ()


def _rank(m: Member | Seen) -> tuple[int, int, float, AlertKey]:
    """Root preference: deepest segment, most direct KPI, largest move, then the key."""
    change = m.details.get("change")
    known = KPI.get(m.kpi)
    if known is None:  # UNRELATED_KPIS: alone in its incident
        return (-SCOPE_DEPTH[m.key[1]], len(KIND_RANK), 0.0, m.key)
    worse = known.worse_by(change if isinstance(change, int | float) else None)
    return (-SCOPE_DEPTH[m.key[1]], KIND_RANK[known.kind], -abs(worse), m.key)


def _share(parent: Member | Seen, child: tuple[str, str, str]) -> float:
    """``child``'s share of ``parent``'s gap, as the engine noted it in the contributors."""
    contributors = parent.details.get("contributors")
    if not isinstance(contributors, list):
        return 0.0
    for c in contributors:
        if isinstance(c, dict) and (c.get("scope"), c.get("channel"), c.get("campaign")) == child:
            share = c.get("share")
            return float(share) if isinstance(share, int | float) else 0.0
    return 0.0


def _is_parent(parent: tuple[str, str, str], child: tuple[str, str, str]) -> bool:
    if parent[0] == "global":
        return child[0] == "channel"
    return parent[0] == "channel" and child[0] == "campaign" and child[1] == parent[1]


def related(a: Member | Seen, b: Member | Seen, explain_share: float = EXPLAIN_SHARE) -> bool:
    """Whether two firing alerts have one cause (see the module doc); symmetric."""
    if not causes(a.kpi) & causes(b.kpi):
        return False
    sa, sb = (a.key[1], a.key[2], a.key[3]), (b.key[1], b.key[2], b.key[3])
    if sa == sb:
        return True
    if _is_parent(sa, sb):
        return _share(a, sb) >= explain_share
    if _is_parent(sb, sa):
        return _share(b, sa) >= explain_share
    return False


def incident_id(root: AlertKey, fired_at: float) -> str:
    """Stable id from the root alert and the opening time: the same on every replay."""
    digest = hashlib.sha1(f"{'|'.join(root)}|{fired_at:.3f}".encode()).hexdigest()
    return f"inc-{digest[:12]}"


class Incidents:
    """Open incidents and their lifecycle; one ``step`` per evaluation tick."""

    def __init__(
        self, repeat_interval: Mapping[str, float], *, explain_share: float = EXPLAIN_SHARE,
        update_every: float = UPDATE_EVERY,
    ) -> None:  # fmt: skip
        if not 0 < explain_share <= 1:
            raise ValueError(f"explain_share must be in (0, 1], got {explain_share!r}")
        if not update_every > 0:
            raise ValueError(f"update_every must be > 0, got {update_every!r}")
        self.repeat_interval = dict(repeat_interval)
        """Repeat interval (seconds) by rule name."""
        self.explain_share = explain_share
        self.update_every = float(update_every)
        """Longest spacing of an incident's messages before an update (see the module doc)."""
        self._open: dict[str, Incident] = {}
        self._clock: float | None = None

    # -- stepping -------------------------------------------------------------------------
    def step(
        self,
        now: float,
        firing: Iterable[Seen],
        resolved: Mapping[AlertKey, Mapping[str, object]] | None = None,
    ) -> list[IncidentNote]:
        """One tick: ``firing`` holds every alert firing now (any order), ``resolved`` the
        details (where the KPI is now) of alerts that resolved in this tick. A member that
        is neither firing any more nor listed has resolved too (its rule was removed, or its
        state was lost): an incident never waits for an alert nobody watches."""
        if not math.isfinite(now):
            raise ValueError(f"now must be finite, got {now!r}")
        now = float(now) if self._clock is None else max(float(now), self._clock)
        self._clock = now
        seen = {s.key: s for s in firing}
        resolved = resolved or {}
        self._update_members(now, seen, resolved)
        opened = self._group(now, seen)
        notes: list[IncidentNote] = []
        for ident in sorted(self._open):
            incident = self._open[ident]
            if ident in opened:
                notes.append(IncidentNote("firing", copy.deepcopy(incident), now))
            elif not incident.firing_members():
                incident.resolved_at = max(
                    (m.resolved_at for m in incident.members.values() if m.resolved_at), default=now
                )
                notes.append(IncidentNote("resolved", copy.deepcopy(incident), now))
                del self._open[ident]
            elif now - incident.last_sent_at >= self._interval(incident):
                incident.last_sent_at = now
                joined = _tell(incident)
                notes.append(IncidentNote("repeat", copy.deepcopy(incident), now, joined))
            elif self._update_due(incident, now):
                incident.last_update_at = now
                joined = _tell(incident)
                notes.append(IncidentNote("update", copy.deepcopy(incident), now, joined))
        return notes

    def _interval(self, incident: Incident) -> float:
        return min(self.repeat_interval.get(m.key[0], math.inf) for m in incident.firing_members())

    def spacing(self, incident: Incident) -> float:
        """The least time between an incident's last message and an update."""
        return min(self.update_every, self._interval(incident) / 6)

    def _update_due(self, incident: Incident, now: float) -> bool:
        """Late joiners wait for the spacing, and for a repeat due within it (which
        names them anyway): one message where there would have been two."""
        if not incident.untold():
            return False
        spacing = self.spacing(incident)
        if now - incident.last_message_at < spacing:
            return False
        return incident.last_sent_at + self._interval(incident) - now > spacing

    def _update_members(
        self, now: float, seen: Mapping[AlertKey, Seen],
        resolved: Mapping[AlertKey, Mapping[str, object]],
    ) -> None:  # fmt: skip
        for incident in self._open.values():
            for member in incident.firing_members():
                alert = seen.get(member.key)
                if alert is not None and alert.fired_at == member.fired_at:
                    member.details = copy.deepcopy(dict(alert.details))
                    continue
                member.resolved_at = now
                if member.key in resolved:
                    member.details = copy.deepcopy(dict(resolved[member.key]))

    def _group(self, now: float, seen: Mapping[AlertKey, Seen]) -> set[str]:
        """Place new firing alerts; returns the ids of incidents opened now."""
        owner = {m.key: i.id for i in self._open.values() for m in i.firing_members()}
        fresh = sorted(k for k in seen if k not in owner)
        if not fresh:
            return set()
        nodes: list[Member | Seen] = [
            m for k in sorted(self._open) for m in self._open[k].firing_members()
        ]
        nodes += [seen[k] for k in fresh]
        parent = list(range(len(nodes)))

        def find(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        for i in range(len(nodes)):
            for j in range(i + 1, len(nodes)):
                if related(nodes[i], nodes[j], self.explain_share):
                    parent[find(i)] = find(j)
        components: dict[int, list[Member | Seen]] = {}
        for i, node in enumerate(nodes):
            components.setdefault(find(i), []).append(node)
        opened: set[str] = set()
        for component in components.values():
            new = [n for n in component if isinstance(n, Seen)]
            if not new:
                continue
            touched = [self._open[owner[n.key]] for n in component if isinstance(n, Member)]
            if touched:
                target = min(touched, key=lambda i: (i.fired_at, i.id))
                for alert in new:  # late joiners (or a member firing again): not told
                    previous = target.members.get(alert.key)
                    role: Role = previous.role if previous is not None else "member"
                    target.members[alert.key] = _member(alert, role, told=False)
                continue
            root = min(new, key=_rank)
            ident = incident_id(root.key, now)
            incident = Incident(ident, now, now)
            for alert in new:
                incident.members[alert.key] = _member(alert, "root" if alert is root else "member",
                                                      told=True)  # fmt: skip
            self._open[ident] = incident
            opened.add(ident)
        return opened

    def retain(self, rules: Iterable[str]) -> None:
        """Forget members of rules that no longer exist (the rules file changed across a
        restart): an incident left without its root takes its best-ranked member as root,
        one left empty is dropped (nothing can be said about alerts no rule defines)."""
        keep = set(rules)
        for ident in sorted(self._open):
            incident = self._open[ident]
            incident.members = {k: m for k, m in incident.members.items() if k[0] in keep}
            if not incident.members:
                del self._open[ident]
            elif all(m.role != "root" for m in incident.members.values()):
                min(incident.members.values(), key=_rank).role = "root"

    # -- reading --------------------------------------------------------------------------
    def open(self) -> list[Incident]:
        """Snapshots of the open incidents, by id."""
        return [copy.deepcopy(self._open[k]) for k in sorted(self._open)]

    def clone(self) -> Incidents:
        twin = Incidents(self.repeat_interval, explain_share=self.explain_share,
                         update_every=self.update_every)  # fmt: skip
        twin._open = copy.deepcopy(self._open)
        twin._clock = self._clock
        return twin

    # -- state for restarts ---------------------------------------------------------------
    def to_dict(self) -> dict[str, object]:
        """JSON-safe state; the repeat intervals are configuration, not state."""
        return {
            "version": STATE_VERSION,
            "clock": self._clock,
            "incidents": [self._open[k].to_dict() for k in sorted(self._open)],
        }

    @classmethod
    def from_dict(
        cls, d: Mapping[str, object], repeat_interval: Mapping[str, float], *,
        explain_share: float = EXPLAIN_SHARE, update_every: float = UPDATE_EVERY,
    ) -> Incidents:  # fmt: skip
        """Restore ``to_dict`` output (this version's or version 1's); raises ValueError
        rather than resume from bad state."""
        version = _field(d, "version")
        if version not in (1, STATE_VERSION) or isinstance(version, bool):
            raise ValueError(f"unsupported incident state version {version!r}")
        restored = cls(repeat_interval, explain_share=explain_share, update_every=update_every)
        restored._clock = _optional_number(d, "clock")
        raw = _field(d, "incidents")
        if not isinstance(raw, list) or not all(isinstance(i, dict) for i in raw):
            raise ValueError("incidents must be a list of objects")
        owners: set[AlertKey] = set()
        for record in raw:
            incident = Incident.from_dict(record, int(version))
            firing = {m.key for m in incident.firing_members()}
            if incident.id in restored._open or firing & owners:
                raise ValueError(f"incident {incident.id} repeats an incident or a firing alert")
            owners |= firing
            restored._open[incident.id] = incident
        return restored


def _member(alert: Seen, role: Role, *, told: bool) -> Member:
    return Member(alert.key, alert.kpi, role, alert.active_since, alert.fired_at, None,
                  copy.deepcopy(dict(alert.details)), told)  # fmt: skip


def _tell(incident: Incident) -> tuple[AlertKey, ...]:
    """A note names every member now: the late joiners it names first, by key."""
    joined = tuple(incident.untold())
    for member in incident.members.values():
        member.told = True
    return joined


def _field(d: Mapping[str, object], name: str) -> object:
    if name not in d:
        raise ValueError(f"missing field {name!r}")
    return d[name]


def _number(d: Mapping[str, object], name: str) -> float:
    value = _field(d, name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"field {name!r} must be a finite number, got {value!r}")
    return float(value)


def _optional_number(d: Mapping[str, object], name: str) -> float | None:
    return None if _field(d, name) is None else _number(d, name)
