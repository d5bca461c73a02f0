"""Detectors: tail probabilities against known numbers, verdicts against simulated traffic.

The statistical properties are checked by simulation with seeded generators
(and derandomized hypothesis), so they are reproducible: stationary traffic
rarely alerts, large drops always do, good moves and thin data never do.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from alerts.detectors import (
    ORDER_VALUE_CV,
    Thresholds,
    Verdict,
    bonferroni,
    judge,
    normal_sf,
    poisson_cdf,
    poisson_sf,
    two_proportion_z,
)
from stream.windows import (
    CLICKS,
    IMPRESSIONS,
    MEASURES,
    MICROS,
    ORDERS,
    REVENUE,
    SPEND,
)
from tests.kpis import COST_KPIS, COUNT_KPIS, KPI_BAD_DIRECTION, KPI_RATIOS, RATE_KPIS

ALL_KPIS = sorted(RATE_KPIS | set(COUNT_KPIS) | COST_KPIS)
DRAWS = 2000
# Lax thresholds: nothing but the bad direction itself can stop a verdict from being bad.
LAX = Thresholds(min_change=0.0, p_value=1.0, min_volume=0, min_conversions=0, min_spend=0.0)
# Simulations: reproducible, and not shrunk (each example is 2000 verdicts; a failure says enough).
statistical = settings(
    max_examples=8, derandomize=True, deadline=None, phases=[Phase.explicit, Phase.generate]
)


def totals(
    impressions: int = 0,
    clicks: int = 0,
    leads: int = 0,
    orders: int = 0,
    new_customers: int = 0,
    revenue: float = 0.0,
    spend: float = 0.0,
) -> list[int]:
    """Window sums in MEASURES order, money given in currency and stored in micros."""
    money = [round(revenue * MICROS), round(spend * MICROS)]
    return [impressions, clicks, leads, orders, new_customers, *money]


def one(index: int, value: int) -> list[int]:
    row = [0] * len(MEASURES)
    row[index] = value
    return row


def assert_finite(verdict: Verdict) -> None:
    for field in (verdict.value, verdict.baseline, verdict.change, verdict.statistic):
        assert field is None or math.isfinite(field), verdict
    assert verdict.p_value is None or 0.0 <= verdict.p_value <= 1.0, verdict
    assert verdict.enough_data or not verdict.bad, verdict


# --- known numbers -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("z", "expected"),
    [
        (0.0, 0.5),
        (1.96, 0.024997895148220435),
        (-1.96, 0.9750021048517795),
        (3.090232306167813, 0.001),
        (5.0, 2.866515718791939e-07),
        (10.0, 7.619853024160527e-24),
        (30.0, 4.906713927148187e-198),  # far tail: erfc, not 1 - cdf (which gives 0)
    ],
)
def test_normal_sf_known_values(z: float, expected: float) -> None:
    assert normal_sf(z) == pytest.approx(expected, rel=1e-12)


def test_normal_sf_limits_and_nan() -> None:
    assert normal_sf(math.inf) == 0.0
    assert normal_sf(-math.inf) == 1.0
    with pytest.raises(ValueError):
        normal_sf(math.nan)


def test_two_proportion_z_known_values() -> None:
    # 12% of 1000 vs 10% of 1000: pooled 0.11, se = sqrt(0.11 * 0.89 * 0.002)
    assert two_proportion_z(120, 1000, 100, 1000) == pytest.approx(1.4293008498232, rel=1e-12)
    # 1.2% of 20k vs 2% of 80k
    assert two_proportion_z(240, 20_000, 1600, 80_000) == pytest.approx(-7.5296327066, rel=1e-10)
    assert two_proportion_z(100, 1000, 120, 1000) == -two_proportion_z(120, 1000, 100, 1000)


def test_two_proportion_z_degenerate_inputs() -> None:
    assert two_proportion_z(0, 0, 5, 10) == 0.0
    assert two_proportion_z(5, 10, 0, 0) == 0.0
    assert two_proportion_z(0, 100, 0, 100) == 0.0  # pooled rate 0: no variance
    assert two_proportion_z(100, 100, 50, 50) == 0.0  # pooled rate 1
    with pytest.raises(ValueError):
        two_proportion_z(11, 10, 5, 10)
    with pytest.raises(ValueError):
        two_proportion_z(-1, 10, 5, 10)


def direct_poisson_cdf(k: int, mu: float) -> float:
    """Reference: sum of pmf terms in logs (only the terms that matter, for large k)."""
    start = max(0, int(k - 40 * math.sqrt(mu) - 40))
    logs = [i * math.log(mu) - mu - math.lgamma(i + 1) for i in range(start, k + 1)]
    top = max(logs)
    return math.exp(top) * math.fsum(math.exp(v - top) for v in logs)


@pytest.mark.parametrize("mu", [0.1, 1.0, 2.5, 7.0, 20.0, 150.0])
def test_poisson_small_cases_match_a_direct_sum(mu: float) -> None:
    pmf = [math.exp(-mu)]  # by the recurrence p(i) = p(i - 1) * mu / i, far into the upper tail
    for i in range(1, int(mu + 40 * math.sqrt(mu) + 40)):
        pmf.append(pmf[-1] * mu / i)
    for k in range(int(mu * 3) + 5):
        lower, upper = math.fsum(pmf[: k + 1]), math.fsum(pmf[k + 1 :])
        assert poisson_cdf(k, mu) == pytest.approx(lower, rel=1e-11, abs=1e-300)
        assert poisson_sf(k + 1, mu) == pytest.approx(upper, rel=1e-11, abs=1e-300)


def test_poisson_exact_values_and_edges() -> None:
    assert poisson_cdf(0, 1.0) == pytest.approx(math.exp(-1), rel=1e-14)
    assert poisson_cdf(2, 2.0) == pytest.approx(5 * math.exp(-2), rel=1e-14)
    assert poisson_sf(1, 1e-8) == pytest.approx(-math.expm1(-1e-8), rel=1e-12)  # no cancellation
    assert poisson_cdf(0, 700.0) == pytest.approx(math.exp(-700), rel=1e-10)
    assert poisson_cdf(0, 1e9) == 0.0  # a silent stream at huge volume underflows, no NaN
    assert poisson_cdf(-1, 5.0) == 0.0
    assert poisson_sf(0, 5.0) == 1.0
    assert poisson_cdf(0, 0.0) == 1.0
    assert poisson_sf(1, 0.0) == 0.0
    for bad_mu in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError):
            poisson_cdf(3, bad_mu)


@pytest.mark.parametrize("mu", [1e3, 9e3, 1.2e4, 1e5, 1e6])
@pytest.mark.parametrize("sds", [-6.0, -4.5, -3.09, -2.0, -0.5])
def test_poisson_large_counts_lower_tail(mu: float, sds: float) -> None:
    """Exact below 10k and Wilson-Hilferty above: both close to the direct sum."""
    k = int(mu + sds * math.sqrt(mu))
    assert poisson_cdf(k, mu) == pytest.approx(direct_poisson_cdf(k, mu), rel=2e-3)
    assert poisson_sf(k + 1, mu) == pytest.approx(1.0 - direct_poisson_cdf(k, mu), rel=1e-6)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 3_000_000), st.floats(0.0, 3e6))
def test_poisson_tails_are_probabilities_that_add_up(k: int, mu: float) -> None:
    cdf, sf_next = poisson_cdf(k, mu), poisson_sf(k + 1, mu)
    assert 0.0 <= cdf <= 1.0 and 0.0 <= sf_next <= 1.0
    assert cdf + sf_next == pytest.approx(1.0, abs=1e-9)
    assert poisson_cdf(k + 1, mu) >= cdf - 1e-12  # monotone in k
    assert poisson_cdf(k, mu * 1.01 + 1) <= cdf + 1e-12  # and in mu


def test_bonferroni() -> None:
    assert bonferroni(0.001, 500) == pytest.approx(2e-6)
    assert bonferroni(0.01, 1) == 0.01
    assert bonferroni(0.01, 0) == 0.01
    with pytest.raises(ValueError):
        bonferroni(0.0, 10)
    with pytest.raises(ValueError):
        bonferroni(0.01, -1)


def test_thresholds_reject_nonsense() -> None:
    for kwargs in (
        {"min_change": -0.1},
        {"min_change": math.nan},
        {"min_change": 0.2, "p_value": 0.0},
        {"min_change": 0.2, "p_value": 1.5},
        {"min_change": 0.2, "min_volume": -1},
        {"min_change": 0.2, "min_spend": -5.0},
    ):
        with pytest.raises(ValueError):
            Thresholds(**kwargs)  # type: ignore[arg-type]


def test_judge_rejects_bad_calls() -> None:
    th = Thresholds(min_change=0.25)
    with pytest.raises(ValueError):
        judge("ctr", [1, 2, 3], totals(), 1.0, th)
    with pytest.raises(ValueError):
        judge("ctr", totals(), totals(), 0.0, th)
    with pytest.raises(ValueError):
        judge("bounce_rate", totals(), totals(), 1.0, th)


# --- verdicts on fixed examples --------------------------------------------------------------


def test_rate_verdict_fields() -> None:
    th = Thresholds(min_change=0.25)
    verdict = judge("ctr", totals(20_000, 240), totals(80_000, 1600), 0.25, th)
    assert verdict.kind == "rate"
    assert verdict.value == pytest.approx(0.012)
    assert verdict.baseline == pytest.approx(0.02)
    assert verdict.change == pytest.approx(-0.4)
    assert verdict.statistic == pytest.approx(-7.5296327066, rel=1e-10)
    assert verdict.p_value == pytest.approx(normal_sf(7.5296327066), rel=1e-9)
    assert verdict.bad and verdict.enough_data
    assert verdict.reason.startswith("ctr 1.20% vs 2.00% (-40%), z=-7.5, p=2.5e-14")


def test_count_verdict_scales_the_baseline_and_catches_silence() -> None:
    th = Thresholds(min_change=0.25)
    verdict = judge("clicks", one(CLICKS, 240), one(CLICKS, 1600), 0.25, th)
    assert verdict.kind == "count" and verdict.baseline == 400.0
    assert verdict.change == pytest.approx(-0.4)
    assert verdict.p_value == pytest.approx(direct_poisson_cdf(240, 400.0), rel=1e-9)
    assert verdict.bad and verdict.statistic is None
    silent = judge("orders", one(ORDERS, 0), one(ORDERS, 12_000), 1 / 12, th)
    assert silent.bad and silent.value == 0.0 and silent.change == -1.0
    assert silent.reason.startswith("orders 0 vs expected 1000.0 (-100%)")
    steady = judge("orders", one(ORDERS, 990), one(ORDERS, 12_000), 1 / 12, th)
    assert steady.enough_data and not steady.bad


def test_cost_floors_are_each_enforced() -> None:
    # p 1: only the floors (and min_change) can stop these verdicts
    th = Thresholds(min_change=0.25, p_value=1.0, min_conversions=10, min_spend=50.0)
    baseline = totals(clicks=100, orders=20, spend=100.0, revenue=400.0)
    worse = totals(clicks=100, orders=20, spend=200.0, revenue=400.0)  # cpa, cpc x2; roas /2
    for kpi in ("cpa", "cpc", "roas", "roi"):
        verdict = judge(kpi, worse, baseline, 1.0, th)
        assert verdict.enough_data and verdict.bad, verdict
        assert verdict.statistic is not None and verdict.p_value is not None
    thin = [
        totals(clicks=100, orders=20, spend=49.0, revenue=98.0),  # spend under the floor
        totals(clicks=100, orders=9, spend=200.0, revenue=400.0),  # orders under the floor
    ]
    for current in thin:
        for kpi in ("cpa", "roas"):
            for pair in ((current, baseline), (baseline, current)):  # either window
                verdict = judge(kpi, *pair, 1.0, th)
                assert not verdict.enough_data and not verdict.bad, verdict
    # cpc counts clicks, not orders, as its conversions: 9 orders do not matter there
    assert judge("cpc", totals(clicks=100, orders=9, spend=200.0), baseline, 1.0, th).bad


def test_roi_is_judged_as_the_relative_change_of_roas() -> None:
    th = Thresholds(min_change=0.25, min_conversions=1, min_spend=1.0)
    baseline = totals(orders=10, revenue=50.0, spend=100.0)  # roi -0.5
    worse = judge("roi", totals(orders=10, revenue=0.0, spend=100.0), baseline, 1.0, th)
    assert worse.value == pytest.approx(-1.0) and worse.change == pytest.approx(-1.0)
    assert worse.bad
    better = judge("roi", totals(orders=10, revenue=80.0, spend=100.0), baseline, 1.0, th)
    assert better.change == pytest.approx(0.6) and not better.bad
    break_even = totals(orders=10, revenue=100.0, spend=100.0)  # roi 0, roas 1
    zero = judge("roi", totals(orders=10, spend=100.0), break_even, 1.0, th)
    assert zero.baseline == 0.0 and zero.change == pytest.approx(-1.0) and zero.bad
    nothing = totals(orders=10, revenue=0.0, spend=100.0)  # roi -1: roas 0, no relative change
    lost = judge("roi", nothing, nothing, 1.0, th)
    assert lost.change is None and not lost.enough_data and not lost.bad


def test_rate_whose_numerator_exceeds_its_denominator_is_not_judged() -> None:
    # orders attributed without a tracked click: conversion "rate" above 1
    th = Thresholds(min_change=0.25)
    verdict = judge(
        "conversion_rate",
        totals(clicks=1000, orders=1500),
        totals(clicks=4000, orders=2000),
        0.25,
        th,
    )
    assert not verdict.enough_data and not verdict.bad and verdict.statistic is None
    assert_finite(verdict)


# --- (1) stationary traffic rarely alerts --------------------------------------------------------


def rate_false_alarms(
    rate: float, n: int, windows: int, seed: int, th: Thresholds
) -> tuple[int, int]:
    """(bad, enough_data) over DRAWS ctr comparisons with the same true rate in both windows."""
    rng = np.random.default_rng(seed)
    n_base = n * windows
    current = rng.binomial(n, rate, DRAWS)
    base = rng.binomial(n_base, rate, DRAWS)
    verdicts = [
        judge("ctr", totals(n, int(x1)), totals(n_base, int(x2)), 1 / windows, th)
        for x1, x2 in zip(current, base, strict=True)
    ]
    return sum(v.bad for v in verdicts), sum(v.enough_data for v in verdicts)


@statistical
@given(
    rate=st.floats(0.02, 0.3),
    n=st.integers(2000, 100_000),
    windows=st.sampled_from([1, 4, 7, 12]),
    seed=st.integers(0, 2**32 - 1),
)
def test_stationary_rates_rarely_alert(rate: float, n: int, windows: int, seed: int) -> None:
    # min_change 0: only the z-test stands between noise and an alert (expected 2 of 2000)
    bad, enough = rate_false_alarms(rate, n, windows, seed, Thresholds(0.0, p_value=0.001))
    assert enough >= 0.99 * DRAWS  # the test really ran
    assert bad <= 8


def test_rate_test_is_calibrated_not_just_silent() -> None:
    """At p 0.05 about 5% of stationary comparisons must fire: the test is not inert."""
    bad, _ = rate_false_alarms(0.02, 20_000, 4, 7, Thresholds(0.0, p_value=0.05))
    assert 60 <= bad <= 140


def count_false_alarms(
    mu: float, windows: int, seed: int, th: Thresholds, *, noisy_baseline: bool
) -> int:
    rng = np.random.default_rng(seed)
    current = rng.poisson(mu, DRAWS)
    if noisy_baseline:
        base = rng.poisson(mu * windows, DRAWS)
    else:
        base = np.full(DRAWS, round(mu * windows))
    verdicts = [
        judge("impressions", one(IMPRESSIONS, int(c)), one(IMPRESSIONS, int(b)), 1 / windows, th)
        for c, b in zip(current, base, strict=True)
    ]
    assert sum(v.enough_data for v in verdicts) >= 0.99 * DRAWS  # the test really ran
    return sum(v.bad for v in verdicts)


@statistical
@given(
    mu=st.floats(200.0, 1e6),
    windows=st.sampled_from([1, 4, 12]),
    seed=st.integers(0, 2**32 - 1),
)
def test_stationary_counts_rarely_alert(mu: float, windows: int, seed: int) -> None:
    # the Poisson test alone (min_change 0) against a well-known baseline rate
    th = Thresholds(0.0, p_value=0.001)
    assert count_false_alarms(mu, windows, seed, th, noisy_baseline=False) <= 8


@statistical
@given(
    mu=st.floats(250.0, 1e5),
    windows=st.sampled_from([4, 7, 12]),
    seed=st.integers(0, 2**32 - 1),
)
def test_stationary_counts_with_a_noisy_baseline_rarely_alert(
    mu: float, windows: int, seed: int
) -> None:
    # The Poisson test treats the baseline as exact; a baseline of several windows plus the
    # minimum change keeps its own noise from firing (a one-window baseline at the volume
    # floor would fire ~0.2%: see the module docs).
    th = Thresholds(0.25, p_value=0.001)
    assert count_false_alarms(mu, windows, seed, th, noisy_baseline=True) <= 8


def test_count_test_is_calibrated_not_just_silent() -> None:
    bad = count_false_alarms(5000.0, 4, 11, Thresholds(0.0, p_value=0.05), noisy_baseline=False)
    assert 60 <= bad <= 140


def cost_false_alarms(
    kpi: str, orders: float, windows: int, seed: int, th: Thresholds, cv: float = ORDER_VALUE_CV
) -> tuple[int, int]:
    """(bad, enough_data) over DRAWS stationary comparisons of a cost ratio.

    Same funnel in both windows: orders are Poisson around ``orders`` (new customers a
    third of them, clicks 20x, leads 3x), spend is proportional to the window length,
    and each order's revenue is lognormal with coefficient of variation ``cv``.
    """
    rng = np.random.default_rng(seed)
    sigma = math.sqrt(math.log(1 + cv * cv))
    rows: list[tuple[list[int], list[int]]] = []
    for _ in range(DRAWS):
        pair = []
        for k in (1, windows):
            n = int(rng.poisson(orders * k))
            revenue = float(rng.lognormal(math.log(50) - sigma * sigma / 2, sigma, n).sum())
            pair.append(totals(
                clicks=int(rng.poisson(20 * orders * k)), leads=int(rng.poisson(3 * orders * k)),
                orders=n, new_customers=int(rng.binomial(n, 1 / 3)), revenue=revenue,
                spend=25.0 * orders * k,
            ))  # fmt: skip
        rows.append((pair[0], pair[1]))
    verdicts = [judge(kpi, current, base, 1 / windows, th) for current, base in rows]
    return sum(v.bad for v in verdicts), sum(v.enough_data for v in verdicts)


@statistical
@given(
    kpi=st.sampled_from(sorted(COST_KPIS)),
    orders=st.floats(30.0, 2000.0),
    windows=st.sampled_from([1, 4, 6]),
    seed=st.integers(0, 2**32 - 1),
)
def test_stationary_cost_ratios_rarely_alert(
    kpi: str, orders: float, windows: int, seed: int
) -> None:
    # min_change 0 and floors at 10: only the test stands between noise and an alert
    th = Thresholds(0.0, p_value=0.001, min_volume=0, min_conversions=10, min_spend=0.0)
    bad, enough = cost_false_alarms(kpi, orders, windows, seed, th)
    assert enough >= 0.5 * DRAWS  # the test really ran (cac's new customers are a third)
    assert bad <= 8


@pytest.mark.parametrize("kpi", ["cpa", "cac", "roas", "aov"])
def test_cost_test_is_calibrated_not_just_silent(kpi: str) -> None:
    """At p 0.05 about 5% of stationary comparisons fire when order values vary as assumed."""
    lax = Thresholds(0.0, p_value=0.05, min_volume=0, min_conversions=0, min_spend=0.0)
    bad, _ = cost_false_alarms(kpi, 200.0, 6, 5, lax)
    assert 60 <= bad <= 140


def test_fixed_floors_alone_would_not_do() -> None:
    """The old gate (20 orders, +40%, no test) fires on noise; the test stops it.

    30 orders a window against six windows: chance alone raises CPA by 40% in one
    window out of twenty (the old rules' false alerts at low volume)."""
    floors = Thresholds(0.4, p_value=1.0, min_conversions=20, min_spend=0.0)
    noisy, _ = cost_false_alarms("cpa", 30.0, 6, 3, floors)
    tested, _ = cost_false_alarms("cpa", 30.0, 6, 3, replace(floors, p_value=0.001))
    assert noisy >= 0.03 * DRAWS and tested == 0


# --- (2) large drops at typical volume always alert ------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    drop=st.floats(0.4, 1.0),
    n=st.integers(20_000, 2_000_000),
    rate=st.floats(0.02, 0.2),
    windows=st.integers(1, 12),
)
def test_large_rate_drops_are_bad(drop: float, n: int, rate: float, windows: int) -> None:
    # even at a Bonferroni threshold for 500 campaigns x 10 KPIs
    th = Thresholds(min_change=0.25, p_value=bonferroni(0.001, 5000))
    current = totals(n, round(n * rate * (1 - drop)))
    base = totals(n * windows, round(n * windows * rate))
    verdict = judge("ctr", current, base, 1 / windows, th)
    assert verdict.enough_data and verdict.bad, verdict


@settings(max_examples=60, deadline=None)
@given(
    drop=st.floats(0.4, 1.0),
    expected=st.floats(200.0, 1e9),
    windows=st.integers(1, 12),
    kpi=st.sampled_from(sorted(COUNT_KPIS)),
)
def test_large_count_drops_are_bad(drop: float, expected: float, windows: int, kpi: str) -> None:
    index = COUNT_KPIS[kpi]
    base_count = math.ceil(expected * windows)
    observed = math.floor(base_count / windows * (1 - drop))
    verdict = judge(
        kpi, one(index, observed), one(index, base_count), 1 / windows, Thresholds(min_change=0.25)
    )
    assert verdict.enough_data and verdict.bad, verdict


def worsened(kpi: str, base: list[int], factor: float) -> list[int]:
    """``base`` with ``kpi`` made worse by ``factor`` (relative), moving the money only."""
    current = list(base)
    if KPI_BAD_DIRECTION[kpi] == "up":
        current[SPEND] = round(base[SPEND] * (1 + factor))
    else:
        current[REVENUE] = round(base[REVENUE] * (1 - factor))
    return current


@settings(max_examples=60, deadline=None)
@given(
    kpi=st.sampled_from(sorted(COST_KPIS)),
    factor=st.floats(0.4, 0.95),
    conversions=st.integers(1000, 100_000),
    spend=st.floats(50.0, 1e6),
    roas=st.floats(0.5, 8.0).filter(lambda r: abs(r - 1) > 0.05),  # revenue stays >= 0
)
def test_large_cost_moves_are_bad(
    kpi: str, factor: float, conversions: int, spend: float, roas: float
) -> None:
    base = totals(
        conversions * 50,
        conversions * 5,
        conversions,
        conversions,
        conversions,
        revenue=spend * roas,
        spend=spend,
    )
    # even at a Bonferroni threshold for 500 campaigns
    th = Thresholds(min_change=0.25, p_value=bonferroni(1e-5, 500))
    verdict = judge(kpi, worsened(kpi, base, factor), base, 1.0, th)
    assert verdict.enough_data and verdict.bad, verdict
    assert verdict.change is not None
    sign = 1 if KPI_BAD_DIRECTION[kpi] == "up" else -1
    assert sign * verdict.change == pytest.approx(factor, rel=1e-4)


# --- (3) good-direction moves never alert ------------------------------------------------------

count_st = st.one_of(st.just(0), st.integers(0, 100), st.integers(0, 10**9))
totals_st = st.lists(count_st, min_size=len(MEASURES), max_size=len(MEASURES))


def improved_or_flat(kpi: str, verdict: Verdict) -> bool:
    if verdict.change is None:
        return False
    direction = "down" if kpi in COUNT_KPIS else KPI_BAD_DIRECTION[kpi]
    return verdict.change >= 0 if direction == "down" else verdict.change <= 0


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(current=totals_st, baseline=totals_st, scale=st.sampled_from([1.0, 0.25, 1 / 288]))
def test_good_direction_moves_are_never_bad(
    current: list[int], baseline: list[int], scale: float
) -> None:
    for kpi in ALL_KPIS:
        verdict = judge(kpi, current, baseline, scale, LAX)
        if improved_or_flat(kpi, verdict):
            assert not verdict.bad, verdict


@pytest.mark.parametrize("kpi", ALL_KPIS)
def test_a_large_improvement_is_not_bad_but_its_mirror_is(kpi: str) -> None:
    """The same data read both ways round: exactly one direction is bad."""
    th = Thresholds(min_change=0.25)
    # every KPI differs by a third or more between the two windows
    low = totals(100_000, 2000, 300, 250, 125, revenue=25_000.0, spend=5000.0)
    high = totals(200_000, 6000, 1800, 1500, 750, revenue=300_000.0, spend=5000.0)
    up, down = judge(kpi, high, low, 1.0, th), judge(kpi, low, high, 1.0, th)
    assert up.enough_data and down.enough_data
    assert up.bad != down.bad, (up, down)
    improved, worse = (up, down) if improved_or_flat(kpi, up) else (down, up)
    assert not improved.bad and worse.bad


# --- (4) thin data: cannot tell --------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    n_thin=st.integers(1, 199),
    n_other=st.integers(1, 10**7),
    thin_is_current=st.booleans(),
    kpi=st.sampled_from(sorted(RATE_KPIS)),
)
def test_rates_below_min_volume_cannot_tell(
    n_thin: int, n_other: int, thin_is_current: bool, kpi: str
) -> None:
    num, den = KPI_RATIOS[kpi]
    thin, other = one(den, n_thin), one(den, n_other)
    other[num] = n_other // 2  # a 50% rate: the textbook floor alone would pass
    current, base = (thin, other) if thin_is_current else (other, thin)  # thin: rate 0
    verdict = judge(kpi, current, base, 1.0, Thresholds(min_change=0.25, min_volume=200))
    assert not verdict.enough_data and not verdict.bad, verdict


def test_rates_below_the_textbook_floor_cannot_tell() -> None:
    th = Thresholds(min_change=0.25, min_volume=200)
    # 1% of 500 impressions is 5 clicks: fewer than 10 successes, whatever the drop
    verdict = judge("ctr", totals(500, 0), totals(2000, 20), 0.25, th)
    assert not verdict.enough_data and not verdict.bad
    assert verdict.change == -1.0
    # the same drop with 10x the volume is judged
    assert judge("ctr", totals(5000, 0), totals(20_000, 200), 0.25, th).bad


@settings(max_examples=60, deadline=None)
@given(
    expected=st.floats(0.5, 199.0),
    windows=st.integers(1, 12),
    kpi=st.sampled_from(sorted(COUNT_KPIS)),
)
def test_counts_below_min_volume_cannot_tell(expected: float, windows: int, kpi: str) -> None:
    index = COUNT_KPIS[kpi]
    base_count = math.floor(expected * windows)
    verdict = judge(
        kpi,
        one(index, 0),
        one(index, base_count),
        1 / windows,
        Thresholds(min_change=0.25, min_volume=200),
    )
    assert not verdict.enough_data and not verdict.bad, verdict


def test_count_floor_is_at_least_five() -> None:
    th = Thresholds(min_change=0.25, p_value=0.05, min_volume=0)
    assert not judge("orders", one(ORDERS, 0), one(ORDERS, 4), 1.0, th).enough_data
    assert judge("orders", one(ORDERS, 0), one(ORDERS, 5), 1.0, th).bad  # e^-5 < 0.05


# --- (5) zeros and extremes: no crash, no NaN, no inf ----------------------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    current=totals_st,
    baseline=totals_st,
    scale=st.sampled_from([1.0, 0.25, 1 / 7, 1 / 288]),
    min_change=st.sampled_from([0.0, 0.1, 0.25, 0.5]),
    p_value=st.sampled_from([1e-7, 0.001, 0.05, 1.0]),
)
def test_any_sums_give_finite_verdicts(
    current: list[int], baseline: list[int], scale: float, min_change: float, p_value: float
) -> None:
    th = Thresholds(min_change=min_change, p_value=p_value)
    for kpi in ALL_KPIS:
        verdict = judge(kpi, current, baseline, scale, th)
        assert verdict.kpi == kpi
        assert_finite(verdict)
        if kpi in COUNT_KPIS:
            continue
        den = KPI_RATIOS[kpi][1]
        if current[den] == 0:
            assert verdict.value is None and not verdict.enough_data and not verdict.bad
        if baseline[den] == 0:
            assert verdict.baseline is None and not verdict.enough_data and not verdict.bad


@pytest.mark.parametrize("kpi", ALL_KPIS)
def test_all_zero_windows(kpi: str) -> None:
    verdict = judge(kpi, [0] * len(MEASURES), [0] * len(MEASURES), 0.25, LAX)
    assert_finite(verdict)
    assert not verdict.enough_data and not verdict.bad
    assert verdict.change is None
    assert verdict.reason.startswith(kpi)


def test_silent_current_window_of_every_kpi() -> None:
    base = totals(100_000, 4000, 800, 400, 200, revenue=80_000.0, spend=5000.0)
    for kpi in ALL_KPIS:
        verdict = judge(kpi, [0] * len(MEASURES), base, 1.0, Thresholds(min_change=0.25))
        assert_finite(verdict)
        # counts go to 0: the outage itself; a ratio's denominator vanishes: cannot tell
        assert verdict.bad == (kpi in COUNT_KPIS), verdict
