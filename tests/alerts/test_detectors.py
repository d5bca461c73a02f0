"""Detectors: tail probabilities against known numbers, and the sequential detectors against
their theory: what each KPI judges (from the catalogue), the log-likelihood ratios, the
thresholds from the budget, the CUSUM's false-alarm rate and delay against the information
bound, and its state through a JSON round trip.

Simulations use seeded generators, so they are reproducible.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alerts.baselines import FREEZE_MINUTES, block_sums, blocks
from alerts.detectors import (
    LUMP_MINUTES,
    MATURING_MINUTES,
    MIN_BLOCKS,
    MIN_UNIT,
    ORDER_VALUE_CV,
    SILENCE,
    SPEND_BLOCK_MINUTES,
    WEEK_MINUTES,
    Cusum,
    Detectors,
    Evidence,
    block_evidence,
    discount,
    evidence,
    information_bound,
    judge,
    kl_per_count,
    llr,
    multipliers,
    normal_sf,
    plan,
    poisson_cdf,
    poisson_sf,
    threshold,
    unit,
    weighted,
)
from stream.kpis import CLICKS, IMPRESSIONS, KPI, KPIS, LUMPY, ORDERS, SPEND, TRAILING
from stream.segments import SegmentView
from stream.windows import Retention, SeriesBuckets
from tests.kpis import COST_KPIS, COUNT_KPIS, RATE_KPIS

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


# --- what each KPI judges ----------------------------------------------------------------------


@pytest.mark.parametrize("kpi", [k.name for k in KPIS])
def test_every_kpi_is_judged_on_a_count_its_bad_move_lowers(kpi: str) -> None:
    known = KPI[kpi]
    p = plan(known)
    rs = multipliers(p, 0.3)
    assert rs[-1] == SILENCE and all(0 < r < 1 for r in rs[:-1])
    if kpi in COUNT_KPIS:
        assert (p.judged, p.exposure, p.lag, p.binomial) == (COUNT_KPIS[kpi], None, 1, False)
        return
    assert {p.judged, p.exposure} == {known.num, known.den}
    assert p.inverse == (p.judged == known.den)
    if p.exposure in LUMPY:  # spend: several reports, conversions per unit spend
        assert p.lag == LUMP_MINUTES and kpi in COST_KPIS and p.exposure == SPEND
    elif p.judged in TRAILING and p.exposure not in TRAILING:  # conversions after clicks
        assert p.lag == MATURING_MINUTES and not p.binomial
    else:
        assert p.lag == 1
    assert p.binomial == (kpi in RATE_KPIS and p.lag == 1)


def test_the_plans_say_what_the_module_text_says() -> None:
    names = ("ctr", "conversion_rate", "cpa", "roas", "aov")
    ctr, conversion, cpa, roas, aov = (plan(KPI[k]) for k in names)
    assert ctr.binomial and ctr.lag == 1
    assert (conversion.binomial, conversion.lag) == (False, MATURING_MINUTES)
    assert (cpa.judged, cpa.exposure, cpa.inverse) == (KPI["cpa"].den, SPEND, True)
    assert roas.value_cv2 == pytest.approx(ORDER_VALUE_CV**2 + 1)  # compound Poisson
    assert aov.value_cv2 == pytest.approx(ORDER_VALUE_CV**2)  # given the orders
    assert multipliers(ctr, 0.25) == (0.75, 0.5, SILENCE)
    assert multipliers(cpa, 0.3) == pytest.approx((1 / 1.3, 1 / 1.6, SILENCE))
    assert multipliers(plan(KPI["orders"]), 0.6) == (0.4, SILENCE)  # 120% is silence


def test_evidence_of_a_minute() -> None:
    rate = np.array([150.0, 6.0, 0.6, 0.85, 0.25, 60e6 * 0.85, 10e6])
    counts = np.full(7, 1000.0)
    minute = [140, 5, 1, 2, 0, 100_000_000, 9_000_000]
    ctr = evidence(plan(KPI["ctr"]), minute, minute, rate, counts, 180)
    assert ctr is not None and (ctr.x, ctr.trials) == (5.0, 140.0)
    assert ctr.p0 == pytest.approx(0.04)
    exposed = [0, 70, 0, 0, 0, 0, 600_000_000]  # 10 min of clicks, 60 of spend
    conversion = evidence(plan(KPI["conversion_rate"]), minute, exposed, rate, counts, 180)
    assert conversion is not None and conversion.mu == pytest.approx(0.85 / 6 * 7)
    cpa = evidence(plan(KPI["cpa"]), minute, exposed, rate, counts, 180)
    assert cpa is not None and cpa.x == 2 and cpa.mu == pytest.approx(0.085 * 10)
    assert cpa.counts < 1000  # spend's own uncertainty is counted
    aov = evidence(plan(KPI["aov"]), minute, minute, rate, counts, 180)
    assert aov is not None and aov.mu == pytest.approx(2 / ORDER_VALUE_CV**2)
    assert aov.x == pytest.approx(100 / (60 * ORDER_VALUE_CV**2))
    assert evidence(plan(KPI["orders"]), minute, minute, rate * 0, counts, 180) is None


# --- log-likelihood ratios ---------------------------------------------------------------------


def _expected_llr(mu: float, truth: float, r: float) -> float:
    """E[llr] when the count is Poisson(mu x truth), summed exactly over its pmf."""
    total, pmf = 0.0, math.exp(-mu * truth)
    for x in range(int(mu * truth + 40 * math.sqrt(mu * truth + 1) + 40)):
        if x:
            pmf *= mu * truth / x
        total += pmf * llr(Evidence(float(x), mu, None, 0.0, math.inf), r)
    return total


@pytest.mark.parametrize("mu", [0.85, 7.5, 68.0])
@pytest.mark.parametrize("r", [0.8, 0.5, 0.1])
def test_poisson_evidence_drifts_down_without_a_move_and_up_by_kl_with_it(
    mu: float, r: float
) -> None:
    assert _expected_llr(mu, r, r) == pytest.approx(mu * kl_per_count(r), rel=1e-6)
    assert _expected_llr(mu, 1.0, r) == pytest.approx(-mu * (math.log(1 / r) + r - 1), rel=1e-6)


def test_silence_and_binomial_evidence() -> None:
    quiet = Evidence(0.0, 0.85, None, 0.0, 100.0)
    assert llr(quiet, SILENCE) == 0.85
    assert llr(Evidence(1.0, 0.85, None, 0.0, 100.0), SILENCE) == -math.inf
    n, p0 = 150.0, 0.04
    halved = sum(
        math.comb(150, x) * 0.02**x * 0.98 ** (150 - x) * llr(Evidence(x, n * p0, n, p0, 1e9), 0.5)
        for x in range(151)
    )
    kl = n * (0.02 * math.log(0.5) + 0.98 * math.log(0.98 / 0.96))
    assert halved == pytest.approx(kl, rel=1e-9)
    assert llr(Evidence(0.0, 0.0, 0.0, p0, 1e9), 0.5) == 0.0  # no trials, no evidence
    assert llr(Evidence(0.0, 150 * p0, 150.0, p0, 1e9), SILENCE) == pytest.approx(
        -150 * math.log(0.96)
    )


# --- thresholds --------------------------------------------------------------------------------


def test_threshold_splits_one_budget_over_every_detector() -> None:
    # 240 detectors x 3 magnitudes, one false alert a week: h = ln(240 x 3 x 10,080)
    assert threshold(240, 1, 3, 1.0) == pytest.approx(math.log(240 * 3 * WEEK_MINUTES))
    assert threshold(240, 1, 3, 1.0) == pytest.approx(15.8, abs=0.05)
    assert threshold(2400, 1, 3, 1.0) - threshold(240, 1, 3, 1.0) == pytest.approx(math.log(10))
    assert threshold(240, 2, 3, 1.0) == pytest.approx(threshold(240, 1, 3, 1.0) - math.log(2))
    assert threshold(240, 1, 3, 10.0) == pytest.approx(threshold(24, 1, 3, 1.0))
    assert threshold(0, 1, 3, 1.0) == pytest.approx(math.log(3 * WEEK_MINUTES))  # one alone
    with pytest.raises(ValueError):
        threshold(10, 0, 3, 1.0)


def test_a_short_baseline_discounts_the_evidence() -> None:
    assert discount(15, 0.5, math.inf) == 1.0
    assert discount(15, 0.5, 0) == 0.0
    weights = [discount(15, 0.5, k) for k in (10, 100, 1000, 10_000)]
    assert weights == sorted(weights) and weights[-1] > 0.99 and weights[0] < 0.1
    assert discount(15, SILENCE, 100) > discount(15, 0.8, 100)  # silence needs fewer counts
    assert weighted(-math.inf, 0.0) == 0.0 and weighted(-math.inf, 0.5) == -math.inf
    assert information_bound(12, 0.5, 7.5) == pytest.approx(12 / (7.5 * kl_per_count(0.5)))


# --- the CUSUM ---------------------------------------------------------------------------------


def _run(rng: np.random.Generator, mu: float, truth: float, r: float, h: float, minutes: int,
         ) -> list[int]:  # fmt: skip
    """Minutes at which a CUSUM for ``r`` (exact baseline ``mu``) alarms on Poisson counts
    at ``truth`` x ``mu``; restarted after each alarm."""
    cusum, alarms = Cusum.empty(1), []
    for minute, x in enumerate(rng.poisson(mu * truth, minutes)):
        ev = Evidence(float(x), mu, None, 0.0, math.inf)
        cusum.add(minute, ev, [llr(ev, r)], [h])
        if cusum.alarms():
            alarms.append(minute)
            cusum = Cusum.empty(1)
            cusum.last = minute
    return alarms


@pytest.mark.parametrize("mu", [0.05, 0.85, 7.5, 150.0])
@pytest.mark.parametrize("r", [0.75, 0.5, SILENCE])
def test_stationary_counts_alarm_at_most_at_the_budgeted_rate(mu: float, r: float) -> None:
    """A CUSUM's mean time to a false alarm is at least e^h (Lorden): at h = 5 (one in
    ~150 minutes), 60,000 stationary minutes over three seeds raise at most that many."""
    h, minutes = 5.0, 20_000
    alarms = sum(len(_run(np.random.default_rng(seed), mu, 1.0, r, h, minutes))
                 for seed in range(3))  # fmt: skip
    assert alarms <= 1.2 * 3 * minutes / math.exp(h), alarms


@pytest.mark.parametrize(
    ("mu", "r"),
    [(7.5, 0.5), (68.0, 0.5), (0.85, SILENCE), (4.6, 0.5), (150.0, 0.8), (0.85, 0.5)],
)
def test_a_large_change_fires_within_one_and_a_half_bounds(mu: float, r: float) -> None:
    """The issue's worked examples at h = 15: CTR halving at 7.5 clicks a minute, a 50% CTR
    drop at 68, orders going silent at 0.85 a minute, a 50% conversion drop at 4.6 ..."""
    h = 15.0
    bound = information_bound(h, r, mu)
    delays = []
    for seed in range(40):
        rng = np.random.default_rng(seed)
        cusum, minute = Cusum.empty(1), 0
        while not cusum.alarms():
            x = float(rng.poisson(mu * r))
            ev = Evidence(x, mu, None, 0.0, math.inf)
            cusum.add(minute, ev, [llr(ev, r)], [h])
            minute += 1
        delays.append(minute)
    assert float(np.median(delays)) <= 1.5 * bound + 1, (np.median(delays), bound)
    assert float(np.median(delays)) >= 0.5 * bound  # not faster than information allows


def test_a_minute_is_added_once_and_the_statistic_is_capped() -> None:
    cusum = Cusum.empty(2)
    quiet = Evidence(0.0, 2.0, None, 0.0, math.inf)
    cusum.add(10, quiet, [3.0, 30.0], [12.0, 12.0])
    assert cusum.stats == [3.0, 12.0] and cusum.starts == [10, 10] and cusum.since == 10
    assert cusum.alarms() == [1] and cusum.ratio(1) == 0.0 and cusum.expected == [2.0, 2.0]
    with pytest.raises(ValueError, match="already added"):
        cusum.add(10, quiet, [1.0, 1.0], [12.0, 12.0])
    cusum.add(11, quiet, [-5.0, -1.0], [12.0, 12.0])
    assert cusum.stats == [0.0, 11.0] and cusum.starts == [None, 10]
    assert cusum.alarms() == [] and cusum.still_bad()
    cusum.add(12, quiet, [0.0, -6.0], [12.0, 12.0])
    assert not cusum.still_bad() and cusum.since == 10


def _stepped(seed: int) -> Detectors:
    detectors = Detectors((0.75, 0.5, SILENCE))
    rng = np.random.default_rng(seed)
    for minute in range(50):
        for key in (("global", "", ""), ("campaign", "search", "c1")):
            ev = Evidence(float(rng.poisson(3.0)), 4.0, None, 0.0, 500.0)
            ratios = [llr(ev, r) for r in detectors.multipliers]
            detectors.get(key).add(minute, ev, ratios, [6.0, 6.0, math.inf])
    return detectors


def test_detector_state_round_trips_exactly_through_json() -> None:
    detectors = _stepped(3)
    data = json.loads(json.dumps(detectors.to_dict()))
    restored = Detectors.from_dict(detectors.multipliers, data)
    assert restored.to_dict() == detectors.to_dict()
    assert restored.by_segment.keys() == detectors.by_segment.keys()
    for key, cusum in detectors.by_segment.items():  # at rest: no threshold is kept
        again = restored.by_segment[key]
        assert (again.stats, again.starts, again.last) == (cusum.stats, cusum.starts, cusum.last)
        if any(cusum.stats):
            assert again == cusum
    assert data["quiet"] or data["segments"]
    fresh = Detectors.from_dict((0.7, 0.4, SILENCE), data)  # the rule's min_change changed
    assert fresh.by_segment == {}


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("version", 9),
        ("multipliers", "x"),
        ("segments", {}),
        ("quiet", [[3, [["global", ""]]]]),
        ("quiet", [["x", []]]),
        ("entry", ["global", "", ""]),
        ("key", [1, "", "", 3, [None] * 3, [0.0] * 3, [1.0] * 3, [0.0] * 3, [0.0] * 3]),
        ("entry", ["global", "", "", 3, [None] * 3, [-1.0, 0, 0], [1.0] * 3, [0.0] * 3, [0.0] * 3]),
        ("entry", ["global", "", "", 3, [None] * 3, [2.0, 0, 0], [1.0] * 3, [0.0] * 3, [0.0] * 3]),
        (
            "entry",
            ["global", "", "", 3, [5, None, None], [0.0] * 3, [1.0] * 3, [0.0] * 3, [0.0] * 3],
        ),
        ("entry", ["global", "", "", True, [None] * 3, [0.0] * 3, [1.0] * 3, [0.0] * 3, [0.0] * 3]),
        (
            "entry",
            ["global", "", "", 3, [None] * 3, [0.0] * 3, [1.0] * 3, [0.0] * 3, [math.nan] * 3],
        ),
    ],
)
def test_malformed_detector_state_is_refused(path: str, value: object) -> None:
    data = _stepped(1).to_dict()
    if path in ("entry", "key"):
        data["segments"] = [value]
    else:
        data[path] = value
    with pytest.raises(ValueError):
        Detectors.from_dict((0.75, 0.5, SILENCE), data)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 50), st.floats(0.01, 50)), min_size=1, max_size=30))
def test_any_evidence_keeps_the_statistics_finite_and_consistent(
    minutes: list[tuple[float, float]],
) -> None:
    detectors = Detectors((0.75, 0.5, SILENCE))
    cusum = detectors.get(("global", "", ""))
    for minute, (x, mu) in enumerate(minutes):
        ev = Evidence(x, mu, None, 0.0, 50.0)
        cusum.add(minute, ev, [weighted(llr(ev, r), discount(12, r, 50.0))
                               for r in detectors.multipliers], [12.0] * 3)  # fmt: skip
        assert all(0 <= s <= 12.0 for s in cusum.stats)
    data = json.loads(json.dumps(detectors.to_dict()))
    assert Detectors.from_dict(detectors.multipliers, data).to_dict() == detectors.to_dict()


# --- spend in reporting blocks -----------------------------------------------------------------


def _shop_minutes(
    rng: np.random.Generator, minutes: int, *, impressions: float = 300.0, ctr: float = 0.04,
    cpc: float = 1.5, fee_cpm: float = 12.0, price: float = 1.0, rise_from: int | None = None,
    late: float = 0.02,
) -> np.ndarray:  # fmt: skip
    """Minute sums (measures of ``stream.kpis``; spend in micros) of a segment priced like
    ``kpimon simulate``'s: clicks at a CPC varying +-20% each, impression costs, and fees
    accrued per impression but reported in one lump per clock-aligned 10-minute period, up
    to 3 minutes after it; a share ``late`` of reports is stamped 1-5 minutes earlier (a
    late event: two lumps in one block, none in the next). Prices are times ``price`` from
    minute ``rise_from`` on."""
    out = np.zeros((minutes, 7))
    shown = rng.poisson(impressions, minutes)
    clicks = rng.binomial(shown, ctr)
    scale = np.ones(minutes)
    if rise_from is not None:
        scale[rise_from:] = price
    for m in range(minutes):
        per_click = cpc * rng.uniform(0.8, 1.2, clicks[m]).sum()
        out[m, IMPRESSIONS], out[m, CLICKS] = shown[m], clicks[m]
        out[m, ORDERS] = rng.poisson(clicks[m] * 0.05)
        out[m, SPEND] += (shown[m] * 4.0 / 1000 + per_click) * scale[m] * 1e6
    fees = shown * fee_cpm / 1000 * scale * 1e6
    for end in range(10, minutes, 10):
        due = end + int(rng.integers(0, 4))
        if rng.random() < late:
            due -= int(rng.integers(1, 6))
        if due < minutes:
            out[due, SPEND] += fees[end - 10 : end].sum()
    return out


def _blocked_run(kpi: str, sums: np.ndarray, h: float, start: int) -> int | None:
    """Minute of the first alarm of ``kpi``'s block CUSUM over ``sums`` from ``start`` (the
    engine's way, through a segment view: trimmed blocks, the plan's history of blocks
    before each block, frozen at the start of an excursion), or None."""
    p = plan(KPI[kpi])
    rs = multipliers(p, 0.2)
    cusum = Cusum.empty(len(rs))
    key = ("channel", "display", "")
    buckets = SeriesBuckets(Retention())
    for m in range(start):
        buckets.add(m, [int(v) for v in sums[m]])
    for end in range(start + p.block, len(sums) + 1, p.block):
        for m in range(end - p.block, end):
            buckets.add(m, [int(v) for v in sums[m]])
        view = SegmentView({key: buckets})
        until = end - 1 if cusum.since is None else max(cusum.since, end - 1 - FREEZE_MINUTES)
        before = until - until % p.block
        history = blocks(view, key, before, p.history, p.block)
        ev = block_evidence(p, block_sums(view, key, end - p.block, p.block), history)
        assert ev is not None
        cusum.add(end - 1, ev, judge(ev, rs, h), [h] * len(rs))
        if cusum.alarms():
            return end - 1
    return None


def test_cost_kpis_judge_spend_in_reporting_blocks() -> None:
    for known in KPIS:  # counts paid for as they come; conversions trailing them are not
        p = plan(known)
        blocked = p.exposure in LUMPY and p.judged not in TRAILING
        assert p.block == (SPEND_BLOCK_MINUTES if blocked else 1)
    cpc = plan(KPI["cpc"])
    assert (cpc.judged, cpc.exposure, cpc.inverse) == (CLICKS, SPEND, True)


def test_the_dispersion_is_fitted_to_the_blocks_and_floored() -> None:
    rng = np.random.default_rng(7)
    sums = _shop_minutes(rng, 180, late=0.0)
    history = sums.reshape(-1, SPEND_BLOCK_MINUTES, 7).sum(axis=1)
    cpc = plan(KPI["cpc"])
    # Clicks given their spend hardly vary: far below Poisson.
    assert MIN_UNIT <= unit(cpc, history) < 0.5
    steady = np.tile(history[:1], (len(history), 1))  # identical blocks: the floor, not 0
    assert unit(cpc, steady) == MIN_UNIT
    assert block_evidence(cpc, history[0], history[: MIN_BLOCKS - 1]) is None
    ev = block_evidence(cpc, history[-1], history)
    assert (
        ev is not None
        and ev.block
        and ev.x == pytest.approx(history[-1, CLICKS] / unit(cpc, history))
    )
    # A report that came with the wrong block (here: the next block's, early) is trimmed.
    minutes = sums[:SPEND_BLOCK_MINUTES].copy()
    early = minutes.copy()
    early[5, SPEND] += minutes[:, SPEND].max()  # a second report, in a quiet minute
    fake = {("global", "", ""): SeriesBuckets(Retention())}
    for m, row in enumerate(early):
        fake[("global", "", "")].add(m, [int(v) for v in row])
    view = SegmentView(fake)
    trimmed = block_sums(view, ("global", "", ""), 0, SPEND_BLOCK_MINUTES)
    assert trimmed[SPEND] < minutes[:, SPEND].sum() < early[:, SPEND].sum()


def test_lumpy_spend_without_a_price_rise_stays_quiet() -> None:
    """A week of blocks of lumpy spend reports, 5% of them with the wrong block: no alarm
    at a threshold of one false alert a week over ~300 detectors (h ~ 15)."""
    rng = np.random.default_rng(20261202)
    sums = _shop_minutes(rng, 7 * 1440, late=0.05)
    assert _blocked_run("cpc", sums, threshold(300, 1, 3, 1), 180) is None


@pytest.mark.parametrize(("price", "within"), [(1.2, 60), (1.3, 40), (1.5, 10)])
def test_a_price_rise_is_found_in_a_few_blocks(price: float, within: int) -> None:
    """Prices up at unchanged clicks (``spend_spike``) show in CPC within a few blocks at
    12 clicks a minute (~15% of the spend in lumps), a 50% rise in its first block."""
    rng = np.random.default_rng(11)
    onset = 600
    sums = _shop_minutes(rng, onset + 120, price=price, rise_from=onset)
    h = threshold(300, 1, 3, 1)
    assert _blocked_run("cpc", sums[:onset], h, 180) is None
    fired = _blocked_run("cpc", sums, h, 180)
    assert fired is not None and onset <= fired < onset + within


def test_a_ratio_baseline_is_as_sure_as_its_judged_count_given_the_exposure() -> None:
    """Orders given their clicks: the baseline ratio is uncertain by its orders alone (the
    judgement conditions on the clicks); a proportion by (1 - p) / (n p), less than its
    count's. Spend, which is not a count, still adds its own uncertainty."""
    rate = np.array([150.0, 6.0, 0.6, 0.85, 0.25, 60e6 * 0.85, 10e6])
    counts = np.array([27_000.0, 1_080.0, 108.0, 153.0, 45.0, 153.0, 1e9])
    minute = [140, 5, 1, 2, 0, 100_000_000, 9_000_000]
    ctr = evidence(plan(KPI["ctr"]), minute, minute, rate, counts, 180)
    assert ctr is not None and ctr.counts == pytest.approx(1_080 / (1 - 0.04))
    conversion = evidence(plan(KPI["conversion_rate"]), minute, minute, rate, counts, 180)
    assert conversion is not None and conversion.counts == pytest.approx(153.0)
    cpa = evidence(plan(KPI["cpa"]), minute, minute, rate, counts, 180)
    assert cpa is not None and cpa.counts < 153.0


def test_blocks_before_a_segments_traffic_are_not_history() -> None:
    """Empty blocks and a trickle of strays (before the traffic began, after a stray event
    set its first minute) would fit a dispersion of ~0 and make the next block exact:
    they are left out."""
    rng = np.random.default_rng(5)
    real = _shop_minutes(rng, 100, late=0.0).reshape(-1, SPEND_BLOCK_MINUTES, 7).sum(axis=1)
    cpc = plan(KPI["cpc"])
    empty = np.zeros((12, 7))
    empty[::3, CLICKS], empty[1::3, SPEND] = 1, 2e6  # strays
    empty[2::3, CLICKS], empty[2::3, SPEND] = 1, 1e6
    few = np.concatenate([empty, real[: MIN_BLOCKS - 1]])
    assert block_evidence(cpc, real[-1], few) is None
    padded = block_evidence(cpc, real[-1], np.concatenate([empty, real[:-1]]))
    alone = block_evidence(cpc, real[-1], real[:-1])
    assert padded is not None and padded == alone
