"""Rules files: the default rules, strict validation and line-precise errors, the CLI."""

from __future__ import annotations

import argparse
import itertools
import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError

from alerts.cli import add_rules_parser, cmd_rules
from alerts.rules import (
    DEFAULT_RULES,
    Rule,
    RuleIssue,
    RulesError,
    RulesFile,
    load_rules,
    parse_rules,
)
from tests.kpis import COUNT_KPIS as VOLUME_MEASURES
from tests.kpis import KPI_BAD_DIRECTION, KPI_RATIOS

RULE = """\
  - name: {name}
    kpi: ctr
    scopes: [global, campaign]
    budget_share: 1
    min_change: 0.3
    runbook_url: docs/runbooks/rate-drop.md
"""


def rules_text(*extra: str, names: tuple[str, ...] = ("first", "second")) -> str:
    """Two valid rules, then ``extra`` rule blocks (dedented, indented as list items)."""
    blocks = [RULE.format(name=n) for n in names]
    blocks += [textwrap.indent(textwrap.dedent(e), "  ") for e in extra]
    return "rules:\n" + "".join(blocks)


def issues_of(text: str) -> list[RuleIssue]:
    with pytest.raises(RulesError) as err:
        parse_rules(text, "r.yml")
    return err.value.issues


def line_of(text: str, needle: str) -> int:
    """1-based line of the only line containing ``needle`` (guards the test itself)."""
    lines = [i for i, line in enumerate(text.splitlines(), 1) if needle in line]
    assert len(lines) == 1, (needle, lines)
    return lines[0]


# ---------------------------------------------------------------- default rules


def test_default_rules_cover_every_kpi_and_volume_measure_at_every_scope() -> None:
    rules = load_rules(DEFAULT_RULES).rules
    covered = {(r.kpi, scope) for r in rules for scope in r.scopes}
    wanted = set(
        itertools.product([*KPI_RATIOS, *VOLUME_MEASURES], ["global", "channel", "campaign"])
    )
    assert wanted - covered == set()
    assert len({r.name for r in rules}) == len(rules)


def test_default_rules_are_tuned_quiet_and_have_family_runbooks() -> None:
    """The invariants of the tuning explained in rules.yml (figures: bench/detection)."""
    families = {"rate": "rate-drop", "count": "volume-drop"}
    default = load_rules(DEFAULT_RULES)
    assert default.false_alerts_per_week == 1  # the issue's budget for the whole file
    rules = [r for r in default.rules if r.against == "baseline"]  # goals: tests/alerts/test_goals
    for rule in rules:
        family = families.get(rule.kind) or (
            "cost-rise" if rule.direction == "up" else "value-drop"
        )
        assert rule.runbook_url == f"docs/runbooks/{family}.md", rule.name
        assert rule.budget_share == 1 and rule.for_seconds == 0, rule.name  # evidence waits
        if rule.severity == "page":
            assert rule.scopes == ("global",), rule.name
        if rule.kind == "rate":
            # CTR follows clicks at once; conversions and leads trail them by minutes
            assert rule.window == ("5m" if rule.kpi == "ctr" else "1h"), rule.name
            assert 0.2 <= rule.min_change <= 0.3, rule.name
        elif rule.kind == "cost":
            assert rule.window == "1h" and rule.min_change >= 0.2, rule.name
        else:
            assert rule.min_change >= 0.5, rule.name
            assert rule.window == ("5m" if rule.kpi in ("impressions", "clicks") else "1h")
    by_name = {rule.name: rule for rule in rules}
    for rule in rules:  # campaigns (many small series) are judged at least as strictly
        broad = by_name.get(rule.name.removesuffix("_campaign"))
        if rule.name.endswith("_campaign") and broad is not None:
            assert rule.min_change >= broad.min_change, rule.name


def test_default_rules_file_has_a_comment_for_every_rule() -> None:
    lines = DEFAULT_RULES.read_text().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("  - name:")]
    assert starts
    for i in starts:
        assert lines[i - 1].strip().startswith("#"), lines[i]
    assert all(len(line) <= 100 for line in lines)


# ---------------------------------------------------------------- model semantics


def test_kind_direction_defaults_and_durations() -> None:
    ctr = Rule.model_validate({"name": "a", "kpi": "ctr", "scopes": ["global"], "runbook_url": "x"})
    assert (ctr.kind, ctr.direction, ctr.window) == ("rate", "down", "5m")
    assert (ctr.min_change, ctr.budget_share) == (0.2, 1.0)
    assert (ctr.for_seconds, ctr.keep_firing_for_seconds) == (0.0, 600.0)
    assert ctr.repeat_interval_seconds == 14400.0
    assert ctr.severity == "ticket"

    cac = Rule.model_validate(
        {"name": "b", "kpi": "cac", "scopes": ["campaign"], "min_change": 0.5,
         "for": "1h30m", "runbook_url": "x"}
    )  # fmt: skip
    assert (cac.kind, cac.direction, cac.window, cac.for_seconds) == ("cost", "up", "1h", 5400.0)

    orders = Rule.model_validate(
        {"name": "c", "kpi": "orders", "scopes": ["global"], "runbook_url": "x"}
    )
    assert (orders.kind, orders.direction, orders.window) == ("count", "down", "1h")
    for kpi, bad in KPI_BAD_DIRECTION.items():
        rule = ctr.model_copy(update={"kpi": kpi})
        assert rule.direction == bad


def test_python_construction_is_validated_too() -> None:
    base = {"name": "a", "kpi": "ctr", "scopes": ["global"], "runbook_url": "x"}
    with pytest.raises(ValidationError, match="budget_share"):
        Rule.model_validate({**base, "budget_share": 0})
    with pytest.raises(ValidationError, match="window"):
        Rule.model_validate({**base, "window": "15m"})  # replaced by sequential detection
    with pytest.raises(ValidationError, match="duplicate rule name 'a'"):
        RulesFile.model_validate({"rules": [base, base]})
    with pytest.raises(ValidationError):
        Rule.model_validate({**base, "direction": "up"})  # not configurable


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("min_change", "3e-1", "is text in YAML, not a number; write 0.3"),
        ("budget_share", '"2"', "'2' is text in YAML, not a number; write 2"),
        ("budget_share", "0", "greater than 0"),
        ("min_change", "1.5", "can fall by at most 100%"),
        ("labels", "{rule: mine}", "label 'rule' is set by kpimon"),
        ("labels", "{bad-name: x}", "must match"),
        ("for", "5 minutes", "is not a duration"),
        ("repeat_interval", "10s", "at least 1m"),
        ("scopes", "[global, global]", "must not repeat"),
        ("severity", "urgent", "'page', 'ticket' or 'info'"),
        ("name", "Ctr-Drop", "[a-z0-9_]"),
    ],
)
def test_strict_values(key: str, value: str, needle: str) -> None:
    fields = {"name": "third", "kpi": "ctr", "scopes": "[global]", "budget_share": "1"}
    fields |= {"runbook_url": "x", key: value}  # replaces the base value of ``key``
    block = "".join(f"  {k}: {v}\n" for k, v in fields.items())
    text = rules_text("- " + block[2:])
    (issue,) = issues_of(text)
    assert needle in issue.message
    assert issue.line == line_of(text, f"{key}: {value}")


def test_roi_may_fall_by_more_than_100_percent() -> None:
    text = rules_text("- name: r\n  kpi: roi\n  scopes: [global]\n  budget_share: 1\n"
                      "  min_change: 1.5\n  runbook_url: x\n")  # fmt: skip
    assert parse_rules(text).rules[2].min_change == 1.5


# ---------------------------------------------------------------- line-precise errors


@pytest.mark.parametrize(
    ("key", "value", "replaced_by"),
    [
        ("window", "15m", "sequential"),
        ("baseline", "trailing", "daily and weekly shape"),
        ("baseline_windows", "4", "fixed per kind"),
        ("p_value", "0.001", "false_alerts_per_week"),
        ("min_volume", "200", "no floor"),
        ("min_conversions", "10", "conversions are what is judged"),
        ("min_spend", "50", "spend is the exposure"),
        ("resolve_change", "0.1", "half the threshold"),
    ],
)
def test_keys_of_the_window_rules_say_what_replaced_them(
    key: str, value: str, replaced_by: str
) -> None:
    """A rules file of the window tests is rejected at each old key, with what replaced it."""
    text = rules_text(f"- name: third\n  kpi: ctr\n  scopes: [global]\n  {key}: {value}\n"
                      "  runbook_url: x\n")  # fmt: skip
    with pytest.raises(RulesError) as err:
        parse_rules(text, "rules.yml")
    line = line_of(text, f"{key}: {value}")
    (message,) = str(err.value).splitlines()
    assert message.startswith(f"rules.yml:{line}:5: rules[2].{key}: '{key}' was removed: ")
    assert replaced_by in message


def test_unknown_kpi() -> None:
    text = rules_text("- name: third\n  kpi: ctrr\n  scopes: [global]\n  budget_share: 1\n"
                      "  runbook_url: x\n")  # fmt: skip
    (issue,) = issues_of(text)
    assert (issue.line, issue.column, issue.path) == (line_of(text, "ctrr"), 10, "rules[2].kpi")
    assert "'ctr'" in issue.message and "'orders'" in issue.message


def test_unknown_key_points_at_the_key() -> None:
    text = rules_text("- name: third\n  kpi: ctr\n  scopes: [global]\n  budget_share: 1\n"
                      "  direction: up\n  runbook_url: x\n")  # fmt: skip
    (issue,) = issues_of(text)
    assert (issue.line, issue.column) == (line_of(text, "direction: up"), 5)
    assert (issue.path, issue.message) == ("rules[2].direction", "unknown key")


def test_missing_runbook_points_at_the_rule() -> None:
    text = rules_text("- name: third\n  kpi: ctr\n  scopes: [global]\n  budget_share: 1\n")
    (issue,) = issues_of(text)
    assert (issue.line, issue.column) == (line_of(text, "name: third"), 5)
    assert (issue.path, issue.message) == ("rules[2].runbook_url", "Field required")


def test_yaml_syntax_error_has_its_line() -> None:
    text = rules_text("- name: third\n  kpi: ctr\n  scopes: [global\n  min_change: 0.5\n")
    (issue,) = issues_of(text)
    assert issue.line == line_of(text, "min_change: 0.5")
    assert "flow sequence" in issue.message


def test_tab_indentation_is_a_yaml_error_with_its_line() -> None:
    text = rules_text() + "\t- name: x\n"
    (issue,) = issues_of(text)
    assert issue.line == len(text.splitlines())


def test_duplicate_name_points_at_the_second_name() -> None:
    text = rules_text(names=("ctr_drop", "other", "ctr_drop"))
    (issue,) = issues_of(text)
    second = [i for i, line in enumerate(text.splitlines(), 1) if "ctr_drop" in line][1]
    assert (issue.line, issue.column, issue.path) == (second, 11, "rules[2].name")
    assert "duplicate rule name 'ctr_drop' (first used by rules[0])" in issue.message


def test_duplicate_name_is_reported_even_when_a_rule_is_invalid() -> None:
    text = rules_text("- name: first\n  kpi: ctr\n  scopes: [global]\n  min_change: -1\n"
                      "  runbook_url: x\n")  # fmt: skip
    issues = issues_of(text)
    assert [(i.path, i.line) for i in issues] == [
        ("rules[2].name", line_of(text, "min_change: -1") - 3),
        ("rules[2].min_change", line_of(text, "min_change: -1")),
    ]


def test_duplicate_yaml_key_is_an_error() -> None:
    text = rules_text("- name: third\n  kpi: ctr\n  kpi: cpc\n  scopes: [global]\n"
                      "  budget_share: 1\n  runbook_url: x\n")  # fmt: skip
    (issue,) = issues_of(text)
    assert (issue.line, issue.path) == (line_of(text, "kpi: cpc"), "rules[2]")
    assert issue.message == "duplicate key 'kpi'"


def test_every_error_is_reported_in_line_order() -> None:
    text = textwrap.dedent("""\
        rules:
          - name: a
            kpi: ctr
            scopes: [global, region]
            budget_share: 1
            runbook_url: x
          - name: b
            kpi: cpc
            scopes: [global]
            budget_share: 1
            min_change: 0.2
            p_value: 0.2
            severity: urgent
          - name: a
            kpi: volume
            scopes: [campaign]
            budget_share: 1
            runbook_url: x
        """)
    with pytest.raises(RulesError) as err:
        parse_rules(text, "f.yml")
    assert [(i.line, i.path) for i in err.value.issues] == [
        (4, "rules[0].scopes[1]"),
        (7, "rules[1].runbook_url"),
        (12, "rules[1].p_value"),
        (13, "rules[1].severity"),
        (14, "rules[2].name"),
        (15, "rules[2].kpi"),
    ]
    lines = str(err.value).splitlines()
    assert len(lines) == 6
    assert (
        lines[0]
        == "f.yml:4:22: rules[0].scopes[1]: Input should be 'global', 'channel' or 'campaign'"
    )


@pytest.mark.parametrize(
    ("text", "line"),
    [("", 1), ("# only a comment\n", 1), ("rules: []\n", 1), ("\nrules:\n", 2), ("{}\n", 1)],
)
def test_no_rules_is_an_error(text: str, line: int) -> None:
    (issue,) = issues_of(text)
    assert issue.message.startswith("no rules")
    assert issue.line == line


def test_top_level_must_be_a_mapping_with_only_rules() -> None:
    (issue,) = issues_of("- name: a\n")
    assert issue.message == "expected a mapping of key: value"
    text = rules_text() + "defaults:\n  min_change: 0.5\n"
    (issue,) = issues_of(text)
    assert (issue.path, issue.line) == ("defaults", line_of(text, "defaults:"))


def test_unreadable_file_is_a_rules_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yml"
    with pytest.raises(RulesError) as err:
        load_rules(missing)
    assert str(err.value).startswith(f"{missing}: cannot read")


# ---------------------------------------------------------------- CLI


def test_cmd_rules_ok(capsys: pytest.CaptureFixture[str]) -> None:
    code = cmd_rules(argparse.Namespace(file=str(DEFAULT_RULES)))
    out, err = capsys.readouterr()
    count = len(load_rules(DEFAULT_RULES).rules)
    assert (code, out, err) == (0, f"{DEFAULT_RULES}: {count} rules OK\n", "")


def test_cmd_rules_reports_every_issue(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.yml"
    path.write_text(rules_text(names=("a", "a")).replace("min_change: 0.3", "min_change: 30", 1))
    code = cmd_rules(argparse.Namespace(file=str(path)))
    out, err = capsys.readouterr()
    assert (code, out) == (1, "")
    assert err.splitlines() == [
        f"{path}:6:17: rules[0].min_change: Input should be less than or equal to 10",
        f"{path}:8:11: rules[1].name: duplicate rule name 'a' (first used by rules[0])",
    ]


def test_add_rules_parser_wires_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="kpimon")
    add_rules_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["rules", "check", str(DEFAULT_RULES)])
    assert args.func(args) == 0
    empty = tmp_path / "empty.yml"
    empty.write_text("rules: []\n")
    args = parser.parse_args(["rules", "check", str(empty)])
    assert args.func(args) == 1
    assert "no rules" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["rules"])  # the action is required


def test_the_budget_belongs_to_the_whole_file() -> None:
    assert parse_rules(rules_text()).false_alerts_per_week == 1.0
    text = "false_alerts_per_week: 0\n" + rules_text()
    (issue,) = issues_of(text)
    assert (issue.line, issue.path) == (1, "false_alerts_per_week")
    assert "greater than 0" in issue.message
    assert parse_rules("false_alerts_per_week: 2.5\n" + rules_text()).false_alerts_per_week == 2.5
