"""Minute spend of one segment over days, shaped like ``kpimon simulate``'s, fast (numpy).

A week of the simulator's own events is ~100M events; pacing needs only the spend per
minute, so this draws it directly with the same structure: impressions (Poisson, diurnal
in UTC, ``stream.simulate.diurnal_factor``) at a CPM, clicks at a CTR with a CPC that
varies +/-20%, and fees accrued per impression but reported in one lump per 10-minute
period, up to 3 minutes after it ends.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from stream.simulate import diurnal_factor


@dataclass(frozen=True)
class SpendWeek:
    """Spend per epoch minute from ``start``; ``spend(a, b)`` sums minutes [a, b)."""

    start: int
    minutes: npt.NDArray[np.float64]

    def __post_init__(self) -> None:
        object.__setattr__(self, "_cum", np.concatenate([[0.0], np.cumsum(self.minutes)]))

    def spend(self, a: int, b: int) -> float:
        cum: npt.NDArray[np.float64] = self.__dict__["_cum"]
        n = len(self.minutes)
        lo, hi = min(max(a - self.start, 0), n), min(max(b - self.start, 0), n)
        return float(cum[hi] - cum[lo]) if hi > lo else 0.0


def simulate_spend(
    start: int, days: int, *, impressions_per_min: float = 1500.0, cpm: float = 4.0,
    fee_cpm: float = 12.0, ctr: float = 0.025, cpc: float = 1.0, seed: int = 1,
    boost_from: int | None = None, boost: float = 1.5,
) -> SpendWeek:  # fmt: skip
    """``days`` of minute spend from epoch minute ``start``; from minute ``boost_from`` on
    every cost is multiplied by ``boost`` (the simulator's ``spend_spike``)."""
    rng = np.random.default_rng(seed)
    n = days * 1440
    minute = start + np.arange(n)
    factor = np.array([diurnal_factor(float(m) * 60 + 30) for m in minute])
    impressions = rng.poisson(impressions_per_min * factor).astype(np.float64)
    clicks = rng.binomial(impressions.astype(np.int64), ctr).astype(np.float64)
    # sum of `clicks` costs each cpc * U(0.8, 1.2): mean cpc, sd cpc * 0.4 / sqrt(12) per click
    click_cost = clicks * cpc + rng.normal(0, 1, n) * np.sqrt(clicks) * cpc * 0.4 / math.sqrt(12)
    scale = np.ones(n)
    if boost_from is not None:
        scale[minute >= boost_from] = boost
    spend = (impressions * cpm / 1000 + np.maximum(click_cost, 0)) * scale
    fees = impressions * fee_cpm / 1000 * scale
    for period_end in range(10 - start % 10, n + 1, 10):  # clock-aligned 10-minute periods
        lump = fees[max(period_end - 10, 0) : period_end].sum()
        due = min(period_end + int(rng.integers(0, 4)), n - 1)
        spend[due] += lump
    return SpendWeek(start, spend)
