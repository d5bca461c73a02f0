"""Pacing verdicts on simulated spend: false verdicts over a normal week, time to a
confident 'over' at 150% spend from 10:00. Pure maths, seconds to run:

    .venv/bin/python bench/pacing.py
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from alerts.pacing import local_day, own_shape, pace, pacing_verdict
from tests.alerts.spendsim import simulate_spend

TZ = ZoneInfo("UTC")
START = int(datetime(2026, 3, 2, tzinfo=UTC).timestamp()) // 60


def main() -> None:
    print("volume (impressions/min) | daily spend | false over/under (minutes, days) "
          "| minutes from 10:00 to confident over at 150%")  # fmt: skip
    for volume in (100.0, 1500.0, 15000.0):
        for seed in (1, 2, 3):
            sim = simulate_spend(START, 14, impressions_per_min=volume, seed=seed)
            budget = float(sim.minutes[: 7 * 1440].sum()) / 7
            false_minutes, false_days = 0, set()
            for d in range(7, 14):
                day = local_day(START + d * 1440, TZ)
                shape = own_shape(sim.spend, day, TZ)
                for now in range(day.start + 1, day.end + 1):
                    v = pacing_verdict(pace(sim.spend, budget, day, now, shape))
                    if v.confident and v.status in ("over", "under"):
                        false_minutes += 1
                        false_days.add(d)
            spike = simulate_spend(START, 8, impressions_per_min=volume, seed=seed + 100,
                                   boost_from=START + 7 * 1440 + 600)  # fmt: skip
            day = local_day(START + 7 * 1440, TZ)
            shape = own_shape(spike.spend, day, TZ)
            delay = None
            for now in range(day.start + 600, day.end + 1):
                v = pacing_verdict(pace(spike.spend, budget, day, now, shape))
                if v.confident and v.status == "over":
                    delay = now - day.start - 600
                    break
            print(f"{volume:>8g} seed {seed} | {budget:>11,.0f} | {false_minutes:>5} "
                  f"{len(false_days):>3} | {delay}")  # fmt: skip


if __name__ == "__main__":
    main()
