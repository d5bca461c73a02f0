"""The targets file: line-precise errors, which goal wins, reload keeping the last good file."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest

from alerts.targets import (
    TargetsError,
    TargetsWatcher,
    load_targets,
    parse_targets,
)
from alerts.targets_export import render_targets
from stream.cli import main
from stream.settings import DEFAULT_TARGETS

DEMO = DEFAULT_TARGETS.with_name("targets.demo.yml")


def issues(text: str) -> list[str]:
    with pytest.raises(TargetsError) as info:
        parse_targets(text, "t.yml")
    return str(info.value).splitlines()


def test_shipped_files_are_valid_and_the_default_sets_nothing() -> None:
    assert load_targets(DEFAULT_TARGETS).empty()
    demo = load_targets(DEMO)
    assert demo.resolve(("channel", "search", "")).budget is not None
    assert parse_targets("# only comments\n").empty()


def test_every_problem_at_its_line_and_column() -> None:
    text = (
        "global:\n"
        "  kpis:\n"
        "    cacx: {max: 1}\n"  # 3:5 unknown KPI, at its name
        "    roas: {min: 3}\n"
        "channels:\n"
        "  Search:\n"  # 6:3 upper case never matches
        "    kpis: {ctr: {min: 2}}\n"  # 7:23 a rate above 1
        "  social:\n"
        "    budget: {daily: 1e3, curve: flat}\n"  # 9:21 YAML text, not a number
        "campaigns:\n"
        "  'brand_*': {budget: {daily: 3}}\n"  # 11:15 budget on a pattern
        "  c1: {kpis: {cpa: {min: 5, max: 2}}}\n"  # 12:15 min above max
        "  c2: {chanel: search}\n"  # 13:8 unknown key
    )
    found = issues(text)
    where = [line.split(" ", 1)[0] for line in found]
    assert where == ["t.yml:3:5:", "t.yml:6:3:", "t.yml:7:23:", "t.yml:9:21:", "t.yml:11:15:",
                     "t.yml:12:15:", "t.yml:13:8:"], found  # fmt: skip
    assert "unknown KPI 'cacx'" in found[0] and "'roas'" in found[0]
    assert "lower-case" in found[1]
    assert "2% is 0.02" in found[2]
    assert "write 1000" in found[3]
    assert "ambiguous" in found[4]
    assert "must not exceed max" in found[5]
    assert "unknown key" in found[6]


def test_syntax_errors_duplicates_and_curves() -> None:
    assert issues("global: [\n")[0].startswith("t.yml:2:1:")
    dup = issues("channels:\n  search: {}\n  search: {}\n")
    assert dup == ["t.yml:3:3: channels: duplicate key 'search'"]
    curve = issues("global:\n  budget: {daily: 5, curve: [1, 2]}\n")
    assert curve[0].startswith("t.yml:2:22:") and "24 weights" in curve[0]
    assert "not all 0" in issues(f"global:\n  budget: {{daily: 5, curve: {[0] * 24}}}\n")[0]
    assert "goal needs min, max" in issues("global: {kpis: {cac: {}}}\n")[0]
    assert "narrows campaigns only" in issues("global: {channel: search}\n")[0]


def test_most_specific_goal_wins_per_kpi() -> None:
    targets = parse_targets(
        "global: {kpis: {cac: {max: 50}}, budget: {daily: 100}}\n"
        "channels: {search: {kpis: {cac: {max: 45}}}}\n"
        "campaigns:\n"
        "  '*': {kpis: {cac: {max: 40}, roas: {min: 2}, ctr: {min: 0.01}}}\n"
        "  'brand_*': {kpis: {cac: {max: 30}}}\n"
        "  'brand_eu_*': {kpis: {cac: {max: 20}}}\n"
        "  'b*': {channel: search, kpis: {roas: {min: 4}}}\n"
        "  brand_eu_1: {kpis: {cac: {max: 10}}, budget: {daily: 7}}\n"
    )

    def goal(key: tuple[str, str, str], kpi: str) -> dict[Any, float]:
        return dict(targets.resolve(key).goals[kpi].bounds())

    assert goal(("campaign", "search", "brand_eu_1"), "cac") == {"max": 10}  # exact id
    assert goal(("campaign", "search", "brand_eu_2"), "cac") == {"max": 20}  # longest pattern
    assert goal(("campaign", "social", "brand_us"), "cac") == {"max": 30}
    assert goal(("campaign", "social", "other"), "cac") == {"max": 40}  # "*"
    assert goal(("campaign", "search", "brand_us"), "roas") == {"min": 4}  # narrowed to channel
    assert goal(("campaign", "social", "brand_us"), "roas") == {"min": 2}
    assert goal(("campaign", "social", "brand_us"), "ctr") == {"min": 0.01}  # merged per KPI
    # scopes do not spread: channel and global goals are their own series'
    assert goal(("channel", "search", ""), "cac") == {"max": 45}
    assert goal(("global", "", ""), "cac") == {"max": 50}
    assert targets.resolve(("channel", "social", "")).empty()
    # budgets: exact ids only, never from a pattern or a coarser scope
    budget = targets.resolve(("campaign", "search", "brand_eu_1")).budget
    assert budget is not None and budget.daily == 7
    assert targets.resolve(("campaign", "search", "brand_eu_2")).budget is None


def test_watcher_reloads_and_keeps_the_last_good_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "targets.yml"
    path.write_text("global: {budget: {daily: 100}}\n")
    watcher = TargetsWatcher.load(path, now_s=1.0)

    def daily() -> float:
        budget = watcher.targets.resolve(("global", "", "")).budget
        assert budget is not None
        return budget.daily

    assert watcher.poll(2.0) is watcher.targets and daily() == 100
    path.write_text("global: {budget: {daily: 200}}\n")
    os.utime(path, ns=(1, 10**18))  # a new mtime even on coarse file-system clocks
    watcher.poll(3.0)
    assert daily() == 200 and watcher.last_success and watcher.last_success_s == 3.0
    path.write_text("global: {budget: {daily: -5}}\n")
    os.utime(path, ns=(1, 2 * 10**18))
    with caplog.at_level(logging.ERROR, logger="kpimon.targets"):
        watcher.poll(4.0)
        watcher.poll(5.0)  # unchanged since: neither counted nor logged again
    assert daily() == 200
    assert watcher.reload_errors == 1 and not watcher.last_success
    assert [r.getMessage() for r in caplog.records] == [
        f"targets file not reloaded, keeping the previous one: {path}:1:26: "
        "global.budget.daily: Input should be greater than 0"
    ]
    page = watcher.exposition()
    assert "kpimon_targets_reload_errors_total 1.0" in page
    assert "kpimon_targets_last_reload_success 0.0" in page
    path.unlink()
    watcher.poll(6.0)
    assert daily() == 200 and watcher.reload_errors == 2
    path.write_text("global: {budget: {daily: 300}}\n")
    watcher.poll(7.0)
    assert daily() == 300 and watcher.last_success


def test_render_shows_goals_and_budgets_of_known_series_only() -> None:
    targets = parse_targets(
        "global: {kpis: {roas: {min: 3, max: 30}}, budget: {daily: 1440}}\n"
        "campaigns: {'*': {kpis: {cac: {max: 40}}}}\n"
    )
    from zoneinfo import ZoneInfo

    spends = {key: (lambda a, b: float(b - a)) for key in [
        ("global", "", ""), ("campaign", "search", 'c "1"'), ("campaign", "search", "__other__"),
    ]}  # fmt: skip
    page = render_targets(targets, 1440 * 20000 + 720, spends, ZoneInfo("UTC"))
    glob = 'scope="global",channel="",campaign=""'
    assert f'kpimon_kpi_target{{kpi="roas",{glob},bound="max"}} 30.0' in page
    assert 'campaign="c \\"1\\"",bound="max"} 40.0' in page
    assert "__other__" not in page
    assert 'kpimon_budget_daily{scope="global",channel="",campaign=""} 1440.0' in page
    assert 'kpimon_spend_today{scope="global",channel="",campaign=""} 720.0' in page
    assert 'kpimon_spend_pacing_ratio{scope="global",channel="",campaign=""} 1.0' in page


def test_cli_check(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["targets", "check", str(DEMO)]) == 0
    assert "OK" in capsys.readouterr().out
    bad = tmp_path / "bad.yml"
    bad.write_text("channels:\n  search: {budget: {daily: 0}}\n")
    assert main(["targets", "check", str(bad)]) == 1
    assert capsys.readouterr().err.startswith(f"{bad}:2:28: channels.search.budget.daily:")
