"""Smoke tests of the benchmark scripts on tiny inputs (no broker): they run, print
their figures, and refuse input too small to time."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.helpers import REPO


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, check=False)  # fmt: skip


def test_bench_stages_prints_cpu_per_event_of_each_stage() -> None:
    out = run("bench/stages", "--events", "3000", "--batch", "1000")
    assert out.returncode == 0, out.stderr
    assert re.search(r"3,000 events in batches of 1,000: [\d.]+ µs CPU/event", out.stdout)
    for stage in ("ingest", "dedup", "segments"):
        assert re.search(rf"^  {stage} +[\d.]+ µs/event$", out.stdout, re.M), out.stdout


def test_bench_throughput_refuses_a_run_too_small_to_time() -> None:
    """With a few thousand events the worker's first transaction covers them all and
    nothing is left to time (it showed 0 events/s and divided by zero)."""
    out = run("bench/throughput", "--events", "5000")
    assert out.returncode == 2
    assert "--events 5,000: at least 20,000 are needed" in out.stderr


def test_bench_demo_alert_model_puts_the_demos_first_alert_within_3_minutes() -> None:
    """The model of ``make demo``'s first alert (the detectors' own functions over c0's
    minutes, seeded): with the demo's onset on a whole minute and its settle, the issue's
    target, at least 97% of first alerts within 3 minutes of the onset."""
    out = run("bench/demo_alert", "--model-only", "--trials", "300")
    assert out.returncode == 0, out.stderr
    demo = re.search(r"onsets on a whole minute, as the demo's: .* within 3 min ([\d.]+)%",
                     out.stdout)  # fmt: skip
    assert demo is not None, out.stdout
    assert float(demo.group(1)) >= 97.0
    assert re.search(r"onsets at a random second, .* within 3 min [\d.]+%", out.stdout)
