"""The demo: its day starts with its history, and its budgets fit the simulator's spend.

``kpimon demo`` runs the simulator at seed 7 with ``alerts/targets.demo.yml``; the
budgets there must be the simulator's usual daily spend, so that pacing reads about 1
on a normal run and the demo's ``budget_overrun`` visibly moves it. Checked here with
the real pacing maths (``alerts.pacing.pace``) on the simulated spend, at a tenth of
the demo's rate against a tenth of the budgets (spend scales with the rate).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from alerts.pacing import FLAT, Shape, local_day, pace
from alerts.targets import load_targets
from stream.cli import (
    DEMO_HISTORY_MINUTES,
    DEMO_SETTLE_SECONDS,
    DEMO_TARGETS,
    demo_day,
    demo_incidents,
    demo_onset,
)
from stream.simulate import Incident, SimConfig, Simulator

MIDNIGHT = 1_796_169_600  # a UTC midnight: the simulated day starts with the run
DEMO_RATE, RATE = 300.0, 30.0
MINUTES = 150


@pytest.mark.parametrize("offset_s", [0, 1, 3599, 4200, 7799, 7800, 40_000, 86_399])
def test_demo_day_starts_at_a_local_midnight_within_the_history(offset_s: int) -> None:
    now = MIDNIGHT + offset_s + 0.5
    zone, midnight = demo_day(now)
    lo, hi = DEMO_HISTORY_MINUTES
    assert lo * 60 <= now - midnight < hi * 60
    local = datetime.fromtimestamp(midnight, ZoneInfo(zone))
    assert (local.hour, local.minute, local.second) == (0, 0, 0)


def _spend_by_minute(config: SimConfig) -> dict[tuple[str, str, str], dict[int, float]]:
    """Spend per series key and epoch minute, as the worker would sum it."""
    out: dict[tuple[str, str, str], dict[int, float]] = defaultdict(lambda: defaultdict(float))
    for kind, body in Simulator(config).events(MIDNIGHT, MINUTES * 60):
        amount = float(str(body.get("amount" if kind == "spend" else "cost", 0)))
        if not amount:
            continue
        ts = body["ts"]
        ms = ts if isinstance(ts, int) else int(datetime.fromisoformat(str(ts)).timestamp() * 1000)
        minute = ms // 60_000
        channel, campaign = str(body["channel"]), str(body["campaign_id"])
        for key in (("global", "", ""), ("channel", channel, ""),
                    ("campaign", channel, campaign)):  # fmt: skip
            out[key][minute] += amount
    return out


def _pacing(config: SimConfig) -> dict[tuple[str, str, str], tuple[float, float]]:
    """(pacing ratio, projection / budget) of every series with a demo budget."""
    targets = load_targets(DEMO_TARGETS)
    now = MIDNIGHT // 60 + MINUTES
    day = local_day(now, UTC)
    out = {}
    for key, minutes in _spend_by_minute(config).items():
        budget = targets.resolve(key).budget
        if budget is None:
            continue

        def spend(start: int, end: int, minutes: dict[int, float] = minutes) -> float:
            return sum(v for m, v in minutes.items() if start <= m < end)

        p = pace(spend, budget.daily * RATE / DEMO_RATE, day, now, Shape(FLAT, "flat"))
        assert p.ratio is not None
        out[key] = (p.ratio, p.projected / p.budget)
    return out


def test_demo_budgets_pace_near_one_and_the_overrun_moves_them() -> None:
    quiet = SimConfig(seed=7, rate=RATE, diurnal=False, duplicate_rate=0, late_rate=0,
                      slightly_late_rate=0, out_of_order_rate=0)  # fmt: skip
    normal = _pacing(quiet)
    c0 = ("campaign", "search", "c0")
    assert {("global", "", ""), ("channel", "search", ""), ("channel", "email", ""), c0,
            ("campaign", "social", "c1")} <= set(normal)  # fmt: skip
    for key, (ratio, _) in normal.items():
        assert 0.85 < ratio < 1.1, (key, ratio)  # on pace (the newest fees are not in yet)
    overrun = Incident.parse("budget_overrun:campaign=c0:at=30m:by=50%")
    over = _pacing(dataclasses.replace(quiet, incidents=[overrun]))
    assert over[c0][0] > normal[c0][0] * 1.3  # (30 + 1.5 x 120) / 150 = 1.4
    assert over[c0][1] > 1.2 * normal[c0][1]  # heading past the +20% margin
    search = ("channel", "search", "")
    assert over[search][0] > normal[search][0] * 1.15  # c0 is most of search's spend
    social = ("channel", "social", "")  # untouched (its own random draws differ)
    assert over[social][0] == pytest.approx(normal[social][0], rel=0.05)


def _c0_ctr(events: list[tuple[str, dict[str, object]]]) -> float:
    clicks = sum(1 for kind, e in events if kind == "click" and e["campaign_id"] == "c0")
    shown = sum(1 for kind, e in events if kind == "impression" and e["campaign_id"] == "c0")
    return clicks / shown


def test_demo_incidents_start_at_their_wall_clock_instants() -> None:
    """The CTR drop starts when the banner says, however long the history took to produce
    (the live traffic catches up on that gap first)."""
    start, onset = float(MIDNIGHT), float(MIDNIGHT + 600)
    incidents = demo_incidents("c0", start_s=start, onset_s=onset, overrun_s=onset + 2040)
    assert [(i.kind, i.at, i.by, i.campaign) for i in incidents] == [
        ("ctr_drop", 600.0, 0.6, "c0"),
        ("budget_overrun", 2640.0, 0.5, "c0"),
    ]
    assert incidents[0].duration == 1800 and incidents[1].duration == float("inf")
    assert demo_incidents("c0", start_s=start, onset_s=onset, overrun_s=None)[1:] == []
    sim = Simulator(SimConfig(seed=7, rate=RATE, diurnal=False, incidents=incidents))
    before = list(sim.events(start, 600))  # the history and the live minutes up to the onset
    after = list(sim.events(onset, 1200))
    assert 0.25 < _c0_ctr(after) / _c0_ctr(before) < 0.6  # a 60% drop: 0.4 expected


@pytest.mark.parametrize("after_s", [0.0, 60.0, 90.0])
@pytest.mark.parametrize("offset_s", [0.0, 0.4, 17.0, 59.9])
def test_the_demo_onset_is_the_first_whole_minute_after_the_wait(
    after_s: float, offset_s: float
) -> None:
    banner = MIDNIGHT + 3600 + offset_s
    onset = demo_onset(banner, after_s)
    assert onset % 60 == 0
    assert banner + after_s <= onset < banner + after_s + 60


def _ms(ts: object) -> int:
    return ts if isinstance(ts, int) else int(datetime.fromisoformat(str(ts)).timestamp() * 1000)


def test_the_demo_settle_judges_minutes_as_the_default_settle_would() -> None:
    """The demo's traffic as its producer sends it (each second's events at that second's
    start): a minute judged DEMO_SETTLE_SECONDS after its end holds all but a sliver of
    what it holds at the default 60 s, so the shorter settle shows no partial minutes."""
    config = SimConfig(seed=7, rate=RATE, diurnal=False)
    sim, start = Simulator(config), MIDNIGHT + 7
    seconds, default_settle = 20 * 60, 60_000
    counted = {DEMO_SETTLE_SECONDS * 1000: 0, default_settle: 0}
    judged = 0  # events of minutes whose default-settle judgement falls within the run
    for tick in range(seconds):
        sent_ms = (start + tick) * 1000
        for _, body in sim.events(start + tick, 1):
            ts = _ms(body["ts"])
            minute_end = (ts // 60_000 + 1) * 60_000
            first_ms, last_ms = start * 1000, (start + seconds) * 1000
            if minute_end - 60_000 < first_ms or minute_end + default_settle > last_ms:
                continue  # a minute not wholly produced and judged within the run
            judged += 1
            for settle in counted:
                counted[settle] += sent_ms <= minute_end + settle
    assert judged > 20_000
    short, default = counted[DEMO_SETTLE_SECONDS * 1000], counted[default_settle]
    assert short <= default
    assert (default - short) / judged < 0.002
    assert default / judged > 0.98  # and the default settle itself misses little
