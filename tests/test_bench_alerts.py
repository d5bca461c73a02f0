"""Smoke tests of the alert benchmarks on tiny inputs (no broker): they run and print
their figures (CPU of the tick and of a tick within the minute; the backtest's events/s
with the collector as the worker runs it, or with CPython's defaults)."""

from __future__ import annotations

import re

import pytest

from tests.test_bench import run


def test_bench_tick_prints_the_cpu_of_a_tick_and_of_a_tick_within_the_minute() -> None:
    out = run("bench/tick", "--campaigns", "10", "--hours", "1", "--minutes", "1")
    assert out.returncode == 0, out.stderr
    assert re.search(r"^  tick \(median of 1 minutes\): evaluation \d+ ms", out.stdout, re.M)
    assert re.search(
        r"^  CPU \(median\): \d+ ms the tick that adds a minute, \d+ ms a tick within it "
        r"\(collector: worker\)$",
        out.stdout,
        re.M,
    ), out.stdout


@pytest.mark.parametrize("collector", ["worker", "default"])
def test_bench_backtest_prints_events_per_second_and_a_digest(collector: str) -> None:
    out = run("bench/backtest", "--minutes", "3", "--rate", "5", "--campaigns", "2",
              "--gc", collector)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert re.search(rf"\(collector: {collector}\): [\d,]+ lines, [\d,]+ events", out.stdout)
    assert re.search(r"\(digest [0-9a-f]{12}\)$", out.stdout, re.M)
    assert re.search(r"[\d,]+ events/s by CPU \([\d.]+ µs CPU an event\)", out.stdout)
