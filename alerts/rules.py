"""The alert rules file: typed models, validation with line-precise errors, loading.

A rules file is edited by hand by the people who get paged by it, so every
mistake is reported at once with ``FILE:LINE:COL`` pointing at the offending
key or value, and the models are strict: YAML's habit of silently turning
``1e-3`` or ``yes`` into something else must not change what a rule means.

Which KPIs a rule may name, their kind and their bad direction come from the KPI
catalogue (``stream.kpis``); the direction is not configurable, so a rule cannot
alert on a KPI getting better. Volume measures (impressions, clicks, leads,
orders) are KPIs too, bad when down (volume drop, tracking outage).

Pure module: no Kafka and no faust, so ``kpimon rules check`` and the backtest
load quickly.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from alerts.yamlfile import (
    FileError,
    Issue,
    number_hint,
    one_of,
    pydantic_issue,
    read_text,
    read_yaml,
    validation_issues,
)
from stream.durations import parse_duration
from stream.kpis import KPI, LUMPY, RATIOS, TRAILING, Kind
from stream.settings import DEFAULT_RULES as DEFAULT_RULES
from stream.windows import WINDOWS

Scope = Literal["global", "channel", "campaign"]
Severity = Literal["page", "ticket", "info"]
Against = Literal["baseline", "goal", "budget"]
"""What a rule judges a segment against: its own baseline (a trend: the sequential
detectors), the goals of the targets file (a KPI past its goal, ``alerts.goals``) or its
daily budget (spend pacing, ``alerts.goals``)."""
GOAL_KPIS: tuple[str, ...] = tuple(k.name for k in RATIOS)
"""KPIs a goal can be set on (the targets file's): the ratios."""
ONLY_FOR: dict[str, tuple[Against, ...]] = {
    "min_change": ("baseline",),
    "budget_share": ("baseline", "goal"),
    "margin": ("budget",),
}
"""Keys that mean something for some kinds of rule only; elsewhere they are refused."""

RULE_KPIS: tuple[str, ...] = tuple(KPI)
RESERVED_LABELS: frozenset[str] = frozenset(
    {
        "rule",
        "kpi",
        "scope",
        "channel",
        "campaign",
        "window",
        "severity",
        "incident",
        "incident_role",
    }
)
REMOVED_KEYS: dict[str, str] = {
    "window": "'window' was removed: detection is sequential, every settled minute adds its "
    "evidence (delete the key; the dashboards' window follows from the KPI)",
    "baseline": "'baseline' was removed: baselines follow the daily and weekly shape on "
    "their own once history allows (delete the key)",
    "baseline_windows": "'baseline_windows' was removed: the baseline span is fixed per kind "
    "(delete the key)",
    "p_value": "'p_value' was removed: thresholds come from the file's false_alerts_per_week, "
    "split over every detector; weigh a rule with budget_share",
    "min_volume": "'min_volume' was removed: no floor leaves a segment unwatched, a small one "
    "accumulates evidence slowly (delete the key)",
    "min_conversions": "'min_conversions' was removed: the conversions are what is judged "
    "(delete the key)",
    "min_spend": "'min_spend' was removed: spend is the exposure conversions are judged by "
    "(delete the key)",
    "resolve_change": "'resolve_change' was removed: an alert resolves when its evidence "
    "falls to half the threshold (delete the key)",
}
"""Keys of the window-test rules (before sequential detection) and what replaced each: an
old file is rejected at each such key rather than silently meaning something else."""
DISPLAY_WINDOWS: tuple[str, str] = ("5m", "1h")
"""The window dashboards show a KPI over: 5m for impressions and clicks (they arrive at once
and are plentiful), 1h when conversions (minutes after their click, and sparse) or spend
(in lumps) are part of it: a 5-minute CPA or AOV would mostly show noise."""

_DISPLAY_WINDOW: dict[str, str] = {
    k.name: DISPLAY_WINDOWS[1 if {k.num, k.den} & (TRAILING | LUMPY) else 0] for k in KPI.values()
}

_NAME = re.compile(r"^[a-z0-9_]+$")
_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_MAX_DURATION = 7 * 86400.0


def _duration(text: str) -> str:
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise PydanticCustomError("duration", str(exc)) from None
    if seconds > _MAX_DURATION:
        raise PydanticCustomError("duration", "duration must be at most 7d")
    return text


Duration = Annotated[str, Field(min_length=1)]
Number = Annotated[float, BeforeValidator(number_hint)]


class Rule(BaseModel):
    """One alert rule: alert when ``kpi`` moves ``min_change`` in its bad direction.

    Changes are relative to the baseline (0.3 = 30%). ``min_change`` is the smallest move
    worth an alert: the sequential detectors are designed for it (and for twice it, and
    for silence), so smaller moves take long to accumulate evidence and larger ones fire
    fast. ``budget_share`` weighs the rule's share of the file's false-alarm budget per
    detector (2: twice the false alarms of a rule at 1, a lower threshold, faster alerts).

    ``against: goal`` judges ``kpi`` (every ratio KPI when it is left out) against the
    goals of the targets file instead; ``against: budget`` judges spend against the daily
    budgets, with ``margin`` (default 0.2) around the budget (``alerts.goals``).
    """

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)

    name: str = Field(min_length=1, max_length=100)
    against: Against = "baseline"
    kpi: str = Field("", validate_default=True)
    """Empty only for a goal rule (every ratio KPI) and a budget rule (spend)."""
    scopes: Annotated[tuple[Scope, ...], Field(strict=False)]
    min_change: Annotated[Number, Field(gt=0, le=10)] = 0.2
    budget_share: Annotated[Number, Field(gt=0, le=100)] = 1.0
    margin: Annotated[Number, Field(gt=0, lt=1)] = 0.2
    for_: Duration = Field("0s", alias="for")
    keep_firing_for: Duration = "10m"
    repeat_interval: Duration = "4h"
    severity: Severity = "ticket"
    labels: dict[str, str] = Field(default_factory=dict)
    runbook_url: str

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise PydanticCustomError("rule_name", "rule names use only [a-z0-9_]")
        return value

    @field_validator("kpi")
    @classmethod
    def _kpi(cls, value: str, info: ValidationInfo) -> str:
        against = info.data.get("against")
        if "against" not in info.data:
            return value  # `against` itself is wrong: that is the error to read
        if against == "budget":
            if value:
                raise PydanticCustomError(
                    "kpi_budget", "a budget rule judges spend against the daily budgets: "
                    "delete kpi")  # fmt: skip
            return value
        if against == "goal":
            if value and value not in GOAL_KPIS:
                raise PydanticCustomError(
                    "literal_error",
                    f"goals are set on ratio KPIs: {one_of(GOAL_KPIS)} (or leave kpi out: all)",
                )
            return value
        if not value:
            raise PydanticCustomError(
                "missing", f"a rule against its baseline needs kpi: {one_of(RULE_KPIS)}"
            )
        if value not in RULE_KPIS:
            raise PydanticCustomError("literal_error", f"Input should be {one_of(RULE_KPIS)}")
        return value

    @field_validator("min_change", "budget_share", "margin", mode="before")
    @classmethod
    def _only_for(cls, value: Any, info: ValidationInfo) -> Any:
        """A key set on a kind of rule it means nothing for is refused, not ignored."""
        against = info.data.get("against")
        allowed = ONLY_FOR[str(info.field_name)]
        if against is not None and against not in allowed:
            kinds = " or ".join(f"against: {a}" for a in allowed)
            raise PydanticCustomError(
                "only_for", "{key} applies to rules {kinds} only (delete the key)",
                {"key": info.field_name, "kinds": kinds},
            )  # fmt: skip
        return value

    @field_validator("scopes")
    @classmethod
    def _scopes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise PydanticCustomError("scopes", "at least one scope is needed")
        if len(set(value)) != len(value):
            raise PydanticCustomError("scopes", "scopes must not repeat")
        return value

    @field_validator("for_", "keep_firing_for", "repeat_interval")
    @classmethod
    def _durations(cls, value: str, info: ValidationInfo) -> str:
        _duration(value)
        if info.field_name == "repeat_interval" and parse_duration(value) < 60:
            raise PydanticCustomError("duration", "repeat_interval must be at least 1m")
        return value

    @field_validator("min_change")
    @classmethod
    def _reachable(cls, value: float, info: ValidationInfo) -> float:
        """A non-negative KPI cannot fall by more than 100%: such a rule would never fire."""
        kpi = info.data.get("kpi")
        known = KPI.get(kpi) if isinstance(kpi, str) else None
        if value > 1 and known is not None and known.nonnegative and known.bad == "down":
            raise PydanticCustomError(
                "unreachable",
                "{kpi} can fall by at most 100%, so min_change must be <= 1 (it is relative: "
                "0.3 means 30%)",
                {"kpi": kpi},
            )
        return value

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if not _LABEL.match(key) or key.startswith("__"):
                raise PydanticCustomError(
                    "label_name",
                    "label name {key} must match [a-zA-Z_][a-zA-Z0-9_]* without a __ prefix",
                    {"key": repr(key)},
                )
            if key in RESERVED_LABELS:
                raise PydanticCustomError(
                    "label_reserved",
                    "label {key} is set by kpimon and cannot be overridden",
                    {"key": repr(key)},
                )
        return value

    @field_validator("runbook_url")
    @classmethod
    def _runbook(cls, value: str) -> str:
        if not value.strip():
            raise PydanticCustomError("runbook", "runbook_url must not be empty")
        return value

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Without the keys this kind of rule refuses, so a dump validates again."""
        data: dict[str, Any] = handler(self)
        for key, kinds in ONLY_FOR.items():
            if self.against not in kinds:
                data.pop(key, None)
        return data

    @property
    def alertname(self) -> str:
        """The rule's name as users wrote it: ``alerts.goals`` runs a goal or budget rule as
        several (``name:part``, a name no file can hold), which are all this rule."""
        return self.name.partition(":")[0]

    @property
    def kind(self) -> Kind:
        """``rate``, ``count`` or ``cost``: the catalogue's kind of the KPI."""
        return KPI[self.kpi].kind

    @property
    def direction(self) -> Literal["up", "down"]:
        """The bad direction, from the KPI catalogue."""
        return KPI[self.kpi].bad

    @property
    def window(self) -> str:
        """The window dashboards and alert texts show the KPI over (see DISPLAY_WINDOWS); a
        budget rule judges the local day."""
        if self.against == "budget":
            return "1d"
        return _DISPLAY_WINDOW[self.kpi]

    @property
    def window_minutes(self) -> int:
        return WINDOWS.get(self.window, 1440)

    @property
    def for_seconds(self) -> float:
        return parse_duration(self.for_)

    @property
    def keep_firing_for_seconds(self) -> float:
        return parse_duration(self.keep_firing_for)

    @property
    def repeat_interval_seconds(self) -> float:
        return parse_duration(self.repeat_interval)


class RulesFile(BaseModel):
    """A whole rules file: a non-empty list of uniquely named rules."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)

    false_alerts_per_week: Annotated[Number, Field(gt=0, le=10_000)] = 1.0
    """The false-alarm budget of the whole file, split over its detectors."""
    rules: list[Rule]

    @field_validator("rules", mode="before")
    @classmethod
    def _not_empty(cls, value: Any) -> Any:
        if value is None or value == []:
            raise PydanticCustomError("no_rules", "no rules: define at least one rule")
        return value

    @model_validator(mode="after")
    def _unique_names(self) -> RulesFile:
        """Names identify alert state across restarts, so they must be unique."""
        for issue in _duplicate_names([rule.name for rule in self.rules]):
            raise issue
        return self


def _duplicate_names(names: Sequence[object]) -> list[PydanticCustomError]:
    """One error per repeated name; ``at`` locates it (a model validator cannot set ``loc``)."""
    first: dict[str, int] = {}
    errors = []
    for index, name in enumerate(names):
        if not isinstance(name, str):
            continue
        if name in first:
            errors.append(
                PydanticCustomError(
                    "duplicate_name",
                    "duplicate rule name {name} (first used by rules[{first}])",
                    {"name": repr(name), "first": first[name], "at": ("rules", index, "name")},
                )
            )
        else:
            first[name] = index
    return errors


RuleIssue = Issue
"""One problem in a rules file (the shared ``alerts.yamlfile.Issue``)."""


class RulesError(FileError):
    """An invalid rules file; ``str()`` is one ``FILE:LINE:COL: path: message`` per issue."""


def _issue(root: yaml.Node | None, kind: str, loc: tuple[int | str, ...], message: str) -> Issue:
    """A pydantic error as an Issue at its place in the YAML, in the user's words."""
    issue = pydantic_issue(
        root, kind, loc, message, key_message="label names must be strings",
        missing={("rules",): "no rules: define at least one rule under 'rules:'"},
    )  # fmt: skip
    removed = REMOVED_KEYS.get(str(loc[-1])) if len(loc) == 3 else None
    if kind == "extra_forbidden" and removed is not None:
        return Issue(issue.line, issue.column, issue.path, removed)
    return issue


def _issues(exc: ValidationError, root: yaml.Node | None, data: object) -> list[Issue]:
    issues = validation_issues(exc, root, _issue)
    # The uniqueness check only runs once every rule is valid; report duplicates anyway.
    if isinstance(data, Mapping) and isinstance(data.get("rules"), list):
        names = [r.get("name") if isinstance(r, Mapping) else None for r in data["rules"]]
        for dup in _duplicate_names(names):
            at = (dup.context or {})["at"]
            issue = _issue(root, dup.type, at, dup.message())
            if issue not in issues:
                issues.append(issue)
    return issues


def parse_rules(text: str, source: str = "<string>") -> RulesFile:
    """Validate rules from YAML text; raise RulesError listing every problem."""
    try:
        root, data, issues = read_yaml(text, source, "no rules: the file is empty")
    except FileError as exc:
        raise RulesError(exc.issues, source) from None
    try:
        rules = RulesFile.model_validate(data)
    except ValidationError as exc:
        issues.extend(_issues(exc, root, data))
    else:
        if not issues:
            return rules
    raise RulesError(issues, source)


def load_rules(path: Path) -> RulesFile:
    """Read and validate a rules file; unreadable files are a RulesError too."""
    try:
        text = read_text(path)
    except FileError as exc:
        raise RulesError(exc.issues, str(path)) from None
    return parse_rules(text, str(path))
