"""Smoke test of bench/detection: ``--quick`` (three campaigns, 1.75 hours, one onset)
runs through the backtest and prints its table with the information bound beside every
incident; and the bound's maths gives the worked examples of issue 12."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "detection"


def _bench() -> ModuleType:
    """The script as a module (no ``.py``, so through its loader); main() does not run."""
    loader = importlib.machinery.SourceFileLoader("bench_detection", str(SCRIPT))
    spec = importlib.util.spec_from_loader("bench_detection", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    try:
        loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def _table(lines: list[str], header_start: str) -> tuple[list[str], list[list[str]]]:
    """The markdown table whose header starts with ``header_start``: columns and rows."""
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    columns = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return columns, rows


def test_quick_run_prints_the_bound_beside_each_incident() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    columns, rows = _table(lines, "| scenario | incident")
    assert {"detected", "median min", "bound min", "time/bound", "KL/min"} <= set(columns)
    kinds = {row[columns.index("incident")] for row in rows}
    assert kinds == {"ctr_drop", "conversion_drop", "spend_spike", "tracking_outage"}
    for row in rows:
        bound = float(row[columns.index("bound min")].replace(",", ""))
        assert 1 < bound < 10_000, row  # h/KL at 150 impressions a minute, plus the settle
        found, trials = row[columns.index("detected")].split("/")
        assert 0 <= int(found) <= int(trials) == 1
    false_columns, false_rows = _table(lines, "| scenario | simulated")
    assert [r[0] for r in false_rows] == ["tiny"]
    assert float(false_rows[0][false_columns.index("per week")]) >= 0
    goal_columns, goal_rows = _table(lines, "| goal scenario | incident")
    assert [r[0] for r in goal_rows] == ["breach_quick"]
    found, trials = goal_rows[0][goal_columns.index("detected")].split("/")
    assert 0 <= int(found) <= int(trials) == 1


def test_bound_maths_gives_the_worked_examples_of_issue_12() -> None:
    bench = _bench()
    # Poisson counts: CTR halving at 7.5 clicks a minute, silence at 0.85 orders, 50% drops
    # at 68 clicks and at 4.6 orders.
    assert bench.kl_poisson(7.5, 3.75) == pytest.approx(1.15, abs=0.01)
    assert bench.kl_poisson(0.85, 0.0) == pytest.approx(0.85)
    assert bench.kl_poisson(68, 34) == pytest.approx(10.4, abs=0.05)
    assert bench.kl_poisson(4.6, 2.3) == pytest.approx(0.71, abs=0.01)
    # A binomial rate with a rare success is the Poisson count of its successes.
    assert bench.kl_binomial(1e6, 7.5e-6, 3.75e-6) == pytest.approx(1.15, abs=0.01)
    assert bench.kl_binomial(150, 0.05, 0.025) > bench.kl_poisson(7.5, 3.75)
    # Spend up 50% on 70 clicks a minute: 70 (0.5 - ln 1.5) per minute.
    assert bench.kl_spend_spike(70, 0.5) == pytest.approx(70 * (0.5 - math.log(1.5)))
    # One false alert a week over 300 detectors evaluated every minute.
    assert bench.threshold(300) == pytest.approx(math.log(300 * 10_080))
    assert 12 < bench.threshold(300) < 15
