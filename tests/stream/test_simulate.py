"""The simulator: deterministic, a realistic funnel, incidents that do what they say."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from stream.events import Event, EventParser
from stream.simulate import Incident, IncidentError, SimConfig, Simulator, load_scenario
from tests.helpers import REPO

START = 1_795_000_000.0


def run_sim(config: SimConfig, seconds: int = 600) -> list[tuple[str, dict[str, object]]]:
    return list(Simulator(config).events(START, seconds))


def test_same_seed_same_stream() -> None:
    a = run_sim(SimConfig(seed=3, rate=50), 120)
    b = run_sim(SimConfig(seed=3, rate=50), 120)
    c = run_sim(SimConfig(seed=4, rate=50), 120)
    assert a == b
    assert a != c


def test_every_event_is_valid_and_the_funnel_is_realistic() -> None:
    events = run_sim(
        SimConfig(seed=1, rate=100, late_rate=0, slightly_late_rate=0, out_of_order_rate=0), 900
    )
    parser = EventParser(rates={"EUR": 1.1}, reporting_currency="USD", max_bytes=65536,
                         max_future_skew_ms=300_000)  # fmt: skip
    kinds: Counter[str] = Counter()
    click_only = 0
    for kind, body in events:
        parsed = parser.parse(json.dumps(body).encode(), topic_type=kind,
                              now_ms=int((START + 900) * 1000))  # fmt: skip
        assert isinstance(parsed, Event), (kind, body, parsed)
        kinds[kind] += 1
        if kind == "order" and "campaign_id" not in body:
            click_only += 1
    assert kinds["impression"] > 50 * 900 * 0.5
    assert 0.01 < kinds["click"] / kinds["impression"] < 0.06
    assert kinds["lead"] > 0 and kinds["order"] > 0 and kinds["spend"] > 0
    assert click_only > kinds["order"] * 0.4


def test_duplicates_and_late_events_are_injected() -> None:
    events = run_sim(SimConfig(seed=2, rate=100, duplicate_rate=0.05, late_rate=0.02), 300)
    ids = Counter((kind, body["event_id"]) for kind, body in events)
    assert sum(1 for n in ids.values() if n > 1) > 0.03 * len(ids)


def clicks_of(events: list[tuple[str, dict[str, object]]], campaign: str, lo: float,
              hi: float) -> int:  # fmt: skip
    def ts(value: object) -> float:
        if isinstance(value, int):
            return value / 1000
        from datetime import datetime

        return datetime.fromisoformat(str(value)).timestamp()

    return sum(
        1 for kind, body in events
        if kind == "click" and body["campaign_id"] == campaign and lo <= ts(body["ts"]) - START < hi
    )  # fmt: skip


def test_ctr_drop_incident_hits_only_its_campaign() -> None:
    base = SimConfig(
        seed=5, rate=200, late_rate=0, slightly_late_rate=0, out_of_order_rate=0, duplicate_rate=0
    )
    incident = Incident.parse("ctr_drop:campaign=c1:at=+10m:by=60%:for=10m")
    normal = run_sim(base, 1200)
    dropped = run_sim(SimConfig(**{**base.__dict__, "incidents": [incident]}), 1200)
    before, during = clicks_of(normal, "c1", 600, 1200), clicks_of(dropped, "c1", 600, 1200)
    assert during < before * 0.6
    assert clicks_of(dropped, "c1", 0, 600) == clicks_of(normal, "c1", 0, 600)


def test_tracking_outage_silences_a_stream() -> None:
    outage = Incident.parse("tracking_outage:type=click:channel=social:at=+2m:for=5m")
    events = run_sim(SimConfig(seed=6, rate=200, incidents=[outage], late_rate=0,
                               slightly_late_rate=0), 600)  # fmt: skip
    social = [b for k, b in events if k == "click" and b["channel"] == "social"]
    assert social
    assert clicks_of(events, "c1", 130, 410) == 0  # c1 is a social campaign
    assert clicks_of(events, "c1", 0, 110) > 0


@pytest.mark.parametrize(
    "spec",
    ["nope:at=1m", "ctr_drop:at=soon", "ctr_drop:by=abc", "ctr_drop:colour=red",
     "ctr_drop:campaign", "ctr_drop:by=150%"],
)  # fmt: skip
def test_bad_incident_specs(spec: str) -> None:
    with pytest.raises(IncidentError):
        Incident.parse(spec)


def test_incident_spec_fields() -> None:
    inc = Incident.parse("spend_spike:channel=search:at=+1h:by=200%:for=30m")
    assert (inc.kind, inc.channel, inc.at, inc.by, inc.duration) == (
        "spend_spike", "search", 3600.0, 2.0, 1800.0,
    )  # fmt: skip


def test_scenario_file(tmp_path: Path) -> None:
    path = tmp_path / "scenario.yml"
    path.write_text("- ctr_drop:campaign=c7:at=+10m:by=40%\n"
                    "- {kind: conversion_drop, channel: email, at: 30m, by: 50%}\n")  # fmt: skip
    kinds = [i.kind for i in load_scenario(path)]
    assert kinds == ["ctr_drop", "conversion_drop"]


def test_cli_writes_json_lines_with_type(tmp_path: Path) -> None:
    out = tmp_path / "events.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "stream.cli", "simulate", "--duration", "2m", "--rate", "20",
         "--seed", "9", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines and all(line["type"] in {"impression", "click", "lead", "order", "spend"}
                         for line in lines)  # fmt: skip
    bad = subprocess.run(
        [sys.executable, "-m", "stream.cli", "simulate", "--incident", "x:y"],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert bad.returncode == 2 and "unknown incident" in bad.stderr


def test_incident_offsets_count_from_the_first_call() -> None:
    """A stream produced in chunks (realtime, files) sees incidents at the right time."""
    base = SimConfig(
        seed=5, rate=200, late_rate=0, slightly_late_rate=0, out_of_order_rate=0, duplicate_rate=0
    )
    incident = Incident.parse("ctr_drop:campaign=c1:at=+10m:by=100%:for=10m")
    sim = Simulator(SimConfig(**{**base.__dict__, "incidents": [incident]}))
    chunked = [e for tick in range(0, 1200, 60) for e in sim.events(START + tick, 60)]
    assert clicks_of(chunked, "c1", 0, 590) > 0
    assert clicks_of(chunked, "c1", 610, 1190) == 0


def spend_reports(events: list[tuple[str, dict[str, object]]]) -> list[dict[str, object]]:
    return [body for kind, body in events if kind == "spend"]


def test_spend_reports_follow_the_clock_not_the_chunking() -> None:
    """Realtime (1 s chunks) and files (60 s chunks) must see the same spend lumps."""
    config = SimConfig(seed=8, rate=50, campaigns=4)
    by_second, by_minute = Simulator(config), Simulator(config)
    seconds = [e for t in range(1800) for e in by_second.events(START + t, 1)]
    minutes = [e for t in range(0, 1800, 60) for e in by_minute.events(START + t, 60)]
    assert seconds == minutes
    reports = spend_reports(minutes)
    # 4 campaigns x one report per 10-minute period (the last one may still be in flight)
    assert 4 * 2 <= len(reports) <= 4 * 3 * 1.1


def test_spend_reports_are_lumps_that_scale_with_traffic_and_spikes() -> None:
    quiet = SimConfig(seed=9, rate=10, campaigns=3, duplicate_rate=0.0, late_rate=0.0,
                      out_of_order_rate=0.0, slightly_late_rate=0.0, diurnal=False)  # fmt: skip
    normal = run_sim(quiet, 3600)
    busy = run_sim(dataclasses.replace(quiet, rate=40), 3600)
    spike = Incident.parse("spend_spike:at=0s:by=100%:for=2h")
    spiked = run_sim(dataclasses.replace(quiet, incidents=[spike]), 3600)

    def reported(events: list[tuple[str, dict[str, object]]]) -> float:
        return sum(float(str(body["amount"])) for body in spend_reports(events))

    def per_event(events: list[tuple[str, dict[str, object]]]) -> float:
        return sum(float(str(body.get("cost", 0))) for _, body in events)

    assert len(spend_reports(normal)) >= 3 * 5  # lumps, not a trickle
    share = reported(normal) / (reported(normal) + per_event(normal))
    assert 0.1 < share < 0.7  # a real part of spend arrives in lumps
    assert 3.5 < reported(busy) / reported(normal) < 4.5  # proportional to traffic served
    assert 1.8 < reported(spiked) / reported(normal) < 2.2


def _seconds(value: object) -> float:
    from datetime import datetime

    if isinstance(value, int):
        return value / 1000
    return datetime.fromisoformat(str(value)).timestamp()


def totals_of(events: list[tuple[str, dict[str, object]]], campaign: str, lo: float,
              hi: float) -> tuple[int, int, float, float]:  # fmt: skip
    """Impressions, clicks, impression cost and click cost of a campaign in event-time
    seconds [lo, hi) of the run."""
    imps = clicks = 0
    imp_cost = click_cost = 0.0
    for kind, body in events:
        if body.get("campaign_id") != campaign or not lo <= _seconds(body["ts"]) - START < hi:
            continue
        if kind == "impression":
            imps, imp_cost = imps + 1, imp_cost + float(str(body["cost"]))
        elif kind == "click":
            clicks, click_cost = clicks + 1, click_cost + float(str(body["cost"]))
    return imps, clicks, imp_cost, click_cost


def test_budget_overrun_buys_more_traffic_at_the_usual_prices() -> None:
    """From the onset on, c1 spends 150% of its usual rate; its CTR and CPC stay put,
    the other campaigns and everything before the onset are untouched."""
    base = SimConfig(seed=5, rate=200, late_rate=0, slightly_late_rate=0, out_of_order_rate=0,
                     duplicate_rate=0, diurnal=False)  # fmt: skip
    overrun = Incident.parse("budget_overrun:campaign=c1:at=+10m:by=50%")
    assert overrun.duration == math.inf  # from the onset on
    normal = run_sim(base, 2400)
    over = run_sim(dataclasses.replace(base, incidents=[overrun]), 2400)
    assert totals_of(over, "c1", 0, 590) == totals_of(normal, "c1", 0, 590)
    (i0, k0, ic0, cc0), (i1, k1, ic1, cc1) = (
        totals_of(run, "c1", 600, 2390) for run in (normal, over)
    )
    assert 1.4 < (ic1 + cc1) / (ic0 + cc0) < 1.6  # spend at 150%
    assert 1.4 < i1 / i0 < 1.6 and 1.3 < k1 / k0 < 1.7  # by buying more traffic
    assert 0.9 < (k1 / i1) / (k0 / i0) < 1.1  # CTR unchanged
    assert 0.95 < (cc1 / k1) / (cc0 / k0) < 1.05  # CPC unchanged
    assert 0.95 < (ic1 / i1) / (ic0 / i0) < 1.05  # CPM unchanged
    other = [totals_of(run, "c2", 600, 2390) for run in (normal, over)]
    assert 0.95 < (other[1][2] + other[1][3]) / (other[0][2] + other[0][3]) < 1.05


def test_budget_overrun_spec() -> None:
    inc = Incident.parse("budget_overrun:channel=social:at=+1h:by=50%:for=2h")
    assert (inc.kind, inc.channel, inc.at, inc.by, inc.duration) == (
        "budget_overrun", "social", 3600.0, 0.5, 7200.0,
    )  # fmt: skip
    with pytest.raises(IncidentError, match="rise"):
        Incident.parse("budget_overrun:by=0%")
