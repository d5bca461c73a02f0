"""The targets file: KPI goals and daily budgets per segment, checked and reloaded live.

Marketing teams steer by goals ("CAC under 40", "ROAS above 3", "at most 2,000 a
day on search"), so the file says them per segment::

    global:
      kpis: {cac: {max: 40}, roas: {min: 3}}
      budget: {daily: 10000}
    channels:
      search:
        kpis: {ctr: {min: 0.02}}
        budget: {daily: 2000, curve: own}
    campaigns:
      c7: {budget: {daily: 300}}
      "brand_*": {channel: search, kpis: {cpc: {max: 1.5}}}

A goal holds for the series of its own scope only: a ``global`` goal is the
global series' goal, a channel's goal its channel series' (budgets above all
must not spread: a channel's 2,000 is not each campaign's). To hold every
campaign to a goal, say so with a pattern (``"*"``). A campaign series takes
each KPI's goal from the most specific entry that sets that KPI: its exact id
before any pattern; among patterns, one restricted to the campaign's channel
before one that is not, then the one with more literal characters (``brand_eu_*``
before ``brand_*`` before ``*``), then the first in the file. Budgets belong to
exact ids, channels and global only: on a pattern it would be unclear whether
each campaign or the group may spend it, so the check refuses it.

The file is checked like the rules file (every problem at ``FILE:LINE:COL``,
``kpimon targets check FILE``), and :class:`TargetsWatcher` reloads it on change,
keeping the last good one when a new version is invalid. Pure module.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from alerts.yamlfile import (
    FileError,
    Issue,
    dotted,
    locate,
    number_hint,
    one_of,
    pydantic_issue,
    read_text,
    read_yaml,
    validation_issues,
)
from stream.kpis import RATIOS

log = logging.getLogger("kpimon.targets")

Bound = Literal["min", "max"]
Number = Annotated[float, BeforeValidator(number_hint)]
HOURS = 24
RATE_KPIS = frozenset(k.name for k in RATIOS if k.kind == "rate")
_GLOB = re.compile(r"[*?\[]")
_CHANNEL = re.compile(r"^[^A-Z]+$")


def kpi_table() -> Mapping[str, str]:
    """KPI name -> its bad direction, for the ratio KPIs of the catalogue (``stream.kpis``)."""
    return {k.name: k.bad for k in RATIOS}


class TargetsError(FileError):
    """An invalid targets file; ``str()`` is one ``FILE:LINE:COL: path: message`` per issue."""


class Goal(BaseModel):
    """A KPI's goal: ``min`` (at least), ``max`` (at most) or both (a range).

    Either bound may be set whatever the KPI's bad direction: ``roas: {min: 3}`` is
    the usual goal, ``roas: {max: 20}`` a sanity bound (tracking counting orders twice).
    """

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)

    min: Number | None = None
    max: Number | None = None

    @model_validator(mode="after")
    def _some_bound(self) -> Goal:
        if self.min is None and self.max is None:
            raise PydanticCustomError("goal", "a goal needs min, max or both, e.g. {max: 40}")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise PydanticCustomError(
                "goal",
                "min ({min}) must not exceed max ({max})",
                {"min": self.min, "max": self.max},
            )
        return self

    def bounds(self) -> dict[Bound, float]:
        out: dict[Bound, float] = {}
        if self.min is not None:
            out["min"] = self.min
        if self.max is not None:
            out["max"] = self.max
        return out


Curve = Literal["own", "flat"] | Annotated[list[Number], Field(strict=False)]


class Budget(BaseModel):
    """A daily budget in the reporting currency and the intraday curve spend should follow.

    ``curve``: ``own`` (default: the segment's own spend shape over the past week,
    flat while that history is thin), ``flat``, or 24 non-negative weights, one per
    local hour from midnight (only their proportions matter).
    """

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)

    daily: Annotated[Number, Field(gt=0)]
    curve: Curve = "own"

    @field_validator("curve")
    @classmethod
    def _curve(cls, value: Any) -> Any:
        if isinstance(value, list):
            if len(value) != HOURS:
                raise PydanticCustomError(
                    "curve",
                    "a curve has 24 weights, one per local hour, got {n}",
                    {"n": len(value)},
                )
            if any(w < 0 for w in value) or sum(value) <= 0:
                raise PydanticCustomError("curve", "curve weights must be >= 0, not all 0")
            return tuple(value)
        return value

    def weights(self) -> tuple[float, ...] | None:
        """The configured hourly weights, or None for ``own``; ``flat`` is all ones."""
        if self.curve == "flat":
            return (1.0,) * HOURS
        if isinstance(self.curve, tuple | list):
            return tuple(float(w) for w in self.curve)
        return None


def _goal_model(kpi: str) -> type[Goal]:
    """Goal of one KPI with its plausible range: rates are fractions, ROI is above -1."""
    if kpi in RATE_KPIS:
        bound: Any = Annotated[Number | None, Field(ge=0, le=1)]
    elif kpi == "roi":
        bound = Annotated[Number | None, Field(ge=-1)]
    else:
        bound = Annotated[Number | None, Field(ge=0)]
    model: type[Goal] = create_model(
        f"Goal_{kpi}", __base__=Goal, min=(bound, None), max=(bound, None)
    )
    return model


KpiGoals: type[BaseModel] = create_model(  # type: ignore[call-overload]
    "KpiGoals",
    __config__=ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False),
    **{kpi: (_goal_model(kpi) | None, None) for kpi in kpi_table()},
)
"""One optional goal per KPI of the catalogue; any other key is an unknown KPI."""


def _channel_name(value: str) -> str:
    if not _CHANNEL.match(value):
        raise PydanticCustomError(
            "channel_case", "channels are lower-case in events, so {v} never matches",
            {"v": repr(value)},
        )  # fmt: skip
    return value


ChannelName = Annotated[str, AfterValidator(_channel_name)]


class Segment(BaseModel):
    """Goals and budget of a global or channel segment."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)

    kpis: KpiGoals | None = None
    budget: Budget | None = None

    def goals(self) -> dict[str, Goal]:
        """KPI -> its goal, for the KPIs this segment sets."""
        if self.kpis is None:
            return {}
        return {k: g for k, g in self.kpis if g is not None}


class CampaignSegment(Segment):
    """A campaign id or pattern; ``channel`` narrows it to the campaigns of one channel."""

    channel: ChannelName | None = None


class TargetsFile(BaseModel):
    """A whole targets file; every part is optional (an empty file sets nothing)."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)

    global_: Segment | None = Field(None, alias="global")
    channels: dict[ChannelName, Segment] = Field(default_factory=dict)
    campaigns: dict[str, CampaignSegment] = Field(default_factory=dict)

    @field_validator("campaigns")
    @classmethod
    def _campaigns(cls, value: dict[str, CampaignSegment]) -> dict[str, CampaignSegment]:
        for issue in _pattern_budgets(value):
            raise issue
        return value


def _pattern_budgets(campaigns: Any) -> list[PydanticCustomError]:
    """One error per campaign pattern that sets a budget (raw or validated entries)."""
    errors = []
    for name, segment in campaigns.items() if isinstance(campaigns, Mapping) else ():
        budget = segment.get("budget") if isinstance(segment, Mapping) else None
        if isinstance(segment, CampaignSegment):
            budget = segment.budget
        if isinstance(name, str) and _GLOB.search(name) and budget is not None:
            errors.append(
                PydanticCustomError(
                    "pattern_budget",
                    "a budget on a pattern is ambiguous (each campaign or the group?): set it "
                    "per campaign id, or on the channel",
                    {"at": ("campaigns", name, "budget")},
                )
            )
    return errors


SeriesKey = tuple[str, str, str]
"""(scope, channel, campaign), as the scope state keys its series."""


@dataclass(frozen=True)
class Resolved:
    """What the targets say of one series: goals by KPI and the budget, if any."""

    goals: dict[str, Goal] = field(default_factory=dict)
    budget: Budget | None = None

    def empty(self) -> bool:
        return not self.goals and self.budget is None


_NOTHING = Resolved()


class Targets:
    """A validated targets file, answering "what holds for this series" (memoised)."""

    def __init__(self, spec: TargetsFile | None = None, source: str = "<none>") -> None:
        self.spec = spec if spec is not None else TargetsFile()
        self.source = source
        self._memo: dict[SeriesKey, Resolved] = {}
        exact, patterns = [], []
        for order, (name, segment) in enumerate(self.spec.campaigns.items()):
            if _GLOB.search(name):
                literal = len(_GLOB.sub("", name))
                patterns.append(((segment.channel is None, -literal, order), name, segment))
            else:
                exact.append((name, segment))
        self._exact = exact
        self._patterns = [(name, seg) for _, name, seg in sorted(patterns, key=lambda p: p[0])]

    def empty(self) -> bool:
        spec = self.spec
        return spec.global_ is None and not spec.channels and not spec.campaigns

    def resolve(self, key: SeriesKey) -> Resolved:
        """Goals and budget of the series ``key`` (see the module docstring for precedence)."""
        found = self._memo.get(key)
        if found is None:
            found = self._memo[key] = self._resolve(*key) or _NOTHING
        return found

    def _resolve(self, scope: str, channel: str, campaign: str) -> Resolved | None:
        if scope == "global":
            segment = self.spec.global_
            return Resolved(segment.goals(), segment.budget) if segment else None
        if scope == "channel":
            segment = self.spec.channels.get(channel)
            return Resolved(segment.goals(), segment.budget) if segment else None
        ranked = [
            seg for name, seg in self._exact
            if name == campaign and seg.channel in (None, channel)
        ]  # fmt: skip
        budget = ranked[0].budget if ranked else None
        ranked += [
            seg for name, seg in self._patterns
            if seg.channel in (None, channel) and fnmatch.fnmatchcase(campaign, name)
        ]  # fmt: skip
        goals: dict[str, Goal] = {}
        for seg in ranked:
            for kpi, goal in seg.goals().items():
                goals.setdefault(kpi, goal)
        return Resolved(goals, budget) if goals or budget else None


def _issue(root: yaml.Node | None, kind: str, loc: tuple[int | str, ...], message: str) -> Issue:
    """A pydantic error in the words of this file (unknown KPIs, channel names)."""
    if loc[:1] == ("global_",):
        loc = ("global", *loc[1:])
    if kind == "less_than_equal" and loc[-2:-1] in {(k,) for k in RATE_KPIS}:
        message += " (a rate is a fraction: 2% is 0.02)"
    if kind == "channel_case" and loc[-1:] == ("[key]",):
        line, column = locate(root, loc, key=True)
        return Issue(line, column, dotted(loc[:-1]), message)
    if kind == "extra_forbidden" and len(loc) >= 2 and loc[-2] == "kpis":
        line, column = locate(root, loc, key=True)
        options = one_of(list(kpi_table()))
        return Issue(line, column, dotted(loc), f"unknown KPI {loc[-1]!r}; use {options}")
    if kind == "extra_forbidden" and loc[-1:] == ("channel",):
        line, column = locate(root, loc, key=True)
        return Issue(line, column, dotted(loc), "'channel' narrows campaigns only")
    return pydantic_issue(root, kind, loc, message, key_message="names must be strings")


def parse_targets(text: str, source: str = "<string>") -> Targets:
    """Validate a targets file from YAML text; raise TargetsError listing every problem."""
    try:
        root, data, issues = read_yaml(text, source, None)
    except FileError as exc:
        raise TargetsError(exc.issues, source) from None
    if data is None:  # only comments: no targets at all
        data = {}
    try:
        spec = TargetsFile.model_validate(data)
    except ValidationError as exc:
        issues.extend(validation_issues(exc, root, _issue))
        # Reported even when other campaign entries are invalid (the model check then never runs).
        for error in _pattern_budgets(data.get("campaigns") if isinstance(data, Mapping) else None):
            at = (error.context or {})["at"]
            issue = _issue(root, error.type, at, error.message())
            if issue not in issues:
                issues.append(issue)
    else:
        if not issues:
            return Targets(spec, source)
    raise TargetsError(issues, source)


def load_targets(path: Path) -> Targets:
    """Read and validate a targets file; an unreadable file is a TargetsError too."""
    try:
        text = read_text(path)
    except FileError as exc:
        raise TargetsError(exc.issues, str(path)) from None
    return parse_targets(text, str(path))


class TargetsWatcher:
    """Reloads the targets file when it changes; keeps the last good one when it is invalid.

    :meth:`poll` is called by the runtime once per evaluation: one ``stat`` when
    nothing changed; when the modification time, size or inode moved, the file is
    read and hashed, and parsed only when its content changed. A bad version is
    logged once (one line: the file, the number of problems and the first) and
    counted, like Prometheus' own ``prometheus_config_last_reload_successful``.
    """

    def __init__(self, path: Path, targets: Targets, now_s: float = 0.0) -> None:
        self.path = path
        self.targets = targets
        self.reload_errors = 0
        self.last_success = True
        self.last_success_s = now_s
        self._stat = self._signature()
        self._digest = self._hash()

    @classmethod
    def load(cls, path: Path, now_s: float = 0.0) -> TargetsWatcher:
        """Start from ``path``; raise TargetsError when it is invalid (fail fast)."""
        return cls(path, load_targets(path), now_s)

    def _signature(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _hash(self) -> bytes | None:
        try:
            return hashlib.sha256(self.path.read_bytes()).digest()
        except OSError:
            return None

    def poll(self, now_s: float) -> Targets:
        """The targets in force: reloaded first if the file changed since the last poll."""
        signature = self._signature()
        if signature == self._stat:
            return self.targets
        self._stat = signature
        digest = self._hash()
        if digest is not None and digest == self._digest:
            return self.targets  # touched, same content
        self._digest = digest
        try:
            targets = load_targets(self.path)
        except TargetsError as exc:
            self.reload_errors += 1
            self.last_success = False
            first = exc.issues[0].format(exc.source) if exc.issues else exc.source
            more = f" (and {len(exc.issues) - 1} more)" if len(exc.issues) > 1 else ""
            log.error("targets file not reloaded, keeping the previous one: %s%s", first, more)
            return self.targets
        self.targets = targets
        self.last_success = True
        self.last_success_s = now_s
        log.info("targets file reloaded from %s", self.path)
        return targets

    def exposition(self) -> str:
        """``kpimon_targets_reload_errors_total`` and the last reload's outcome and time."""
        return (
            "# HELP kpimon_targets_reload_errors_total Reloads of the targets file that failed "
            "(the previous targets stay in force)\n"
            "# TYPE kpimon_targets_reload_errors_total counter\n"
            f"kpimon_targets_reload_errors_total {float(self.reload_errors)!r}\n"
            "# HELP kpimon_targets_last_reload_success 1 if the last load of the targets file "
            "succeeded, 0 if it failed\n"
            "# TYPE kpimon_targets_last_reload_success gauge\n"
            f"kpimon_targets_last_reload_success {1.0 if self.last_success else 0.0}\n"
            "# HELP kpimon_targets_last_reload_success_timestamp_seconds When the targets in "
            "force were loaded\n"
            "# TYPE kpimon_targets_last_reload_success_timestamp_seconds gauge\n"
            f"kpimon_targets_last_reload_success_timestamp_seconds {float(self.last_success_s)!r}\n"
        )
