"""Detectors: did a KPI move in its bad direction by enough, and are we sure?

Pure statistics over window sums (see ``stream.windows``), no I/O, so that the
live rule engine and the offline backtest reach the same verdicts. Three kinds:

- rates (ctr, conversion_rate, lead_rate): two-proportion z-test, one-sided in
  the bad direction, only above the textbook volume floor (n·p, n·(1-p) >= 10);
- counts (impressions, clicks, leads, orders): one-sided Poisson test of the
  current count against the baseline scaled to the current window, which also
  catches a stream going silent;
- cost ratios (cpc … aov): minimum spend and conversions (the ratios are
  heavy-tailed: a few conversions more or less swing them), plus a z-test of
  the conversions behind them: conversions per unit spend are Poisson, so a
  cost per conversion (cpc, cpl, cpa, cac) compares two Poisson rates with
  spend as exposure (the conditional binomial test); revenue (roas, roi, aov)
  is a compound Poisson sum whose order values are assumed to vary with a
  coefficient of variation of ``ORDER_VALUE_CV``.

Every verdict needs both a material move (``min_change``) and significance:
with large volumes anything is significant, with small ones any move is
plausible noise. Floors alone are not enough for cost ratios: with 30 orders a
window (floor 20) against a baseline of six windows, chance alone raises CPA by
40% in one window out of twenty, so fixed floors with a fixed ``min_change``
fired many times a day at low volume and were needlessly deaf at high volume.
What the tests cannot see is noise in spend itself (platforms report it in
lumps): ``min_change`` and the rule's ``for`` cover that.

Tail probabilities are computed here (no scipy) and stay accurate far into the
tails and for counts in the billions.

The count test takes the expected count as exact. A baseline that is itself
noisy (one window of the same length, ``baseline_scale`` 1) doubles the
variance, and the test alone then fires ~1.3% of the time at p 0.001 on
stationary traffic (~0.25% at scale 1/4); ``min_change`` 0.25 brings that to
~0.2% at the 200-count floor and to nothing from ~1000. Prefer baselines of
several windows for counts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from stream.kpis import (
    KPI,
    MEASURES,
    N_MEASURES,
    ORDERS,
    REVENUE,
    SPEND,
    Kpi,
    measure_value,
    unshifted,
)
from stream.windows import kpis

# Coefficient of variation of one order's revenue, assumed by the revenue tests (window sums
# carry no sum of squares). Baskets are right-skewed: 1.0 is a lognormal with sigma 0.83, more
# spread than most shops (the simulator draws sigma 0.6, i.e. 0.66); heavier tails need larger
# floors or min_change rather than a different test.
ORDER_VALUE_CV = 1.0
MIN_EXPECTED_COUNT = 5  # below this a Poisson test cannot reach any useful significance
TEXTBOOK_FLOOR = 10  # n·p and n·(1-p) for the normal approximation of a proportion

_EPS = 1e-15
_CHANGE_TOLERANCE = 1e-9  # 4 -> 3 is a 25% drop even if float division says 24.99...%
_TINY = 1e-300
_MAX_ITER = 100_000
# Above this shape the exact incomplete-gamma loops get long (O(sqrt(a)) steps, ~1k here).
# Wilson-Hilferty is then within 1e-4 relative at p ~ 1e-3 and 1e-2 at p ~ 1e-20: ample
# for a decision at p < 0.001, and O(1) for counts in the billions.
_ASYMPTOTIC_SHAPE = 10_000.0


@dataclass(frozen=True)
class Thresholds:
    """What counts as a bad move, and how much data is needed to say so."""

    min_change: float  # relative change in the bad direction needed (e.g. 0.25)
    p_value: float = 0.001  # one-sided significance of every test (rates, counts, cost ratios)
    min_volume: int = 200  # rates: min denominator in both windows; counts: min expected count
    min_conversions: int = 10  # cost ratios: min count of the conversion measure in both
    min_spend: float = 50.0  # cost ratios: min spend (reporting currency) in both windows

    def __post_init__(self) -> None:
        if not (math.isfinite(self.min_change) and self.min_change >= 0):
            raise ValueError(f"min_change must be a finite number >= 0, got {self.min_change}")
        if not 0 < self.p_value <= 1:
            raise ValueError(f"p_value must be in (0, 1], got {self.p_value}")
        if self.min_volume < 0 or self.min_conversions < 0:
            raise ValueError("min_volume and min_conversions must be >= 0")
        if not (math.isfinite(self.min_spend) and self.min_spend >= 0):
            raise ValueError(f"min_spend must be a finite number >= 0, got {self.min_spend}")


@dataclass(frozen=True)
class Verdict:
    """One KPI's comparison of a current window against its baseline."""

    kpi: str
    kind: str  # "rate" | "count" | "cost"
    value: float | None  # current KPI value (or count)
    baseline: float | None  # baseline KPI value (or expected count, scaled to the current window)
    change: float | None  # relative change (value - baseline) / |baseline|, signed
    bad: bool  # moved in the bad direction by >= min_change, significant, with enough volume
    statistic: float | None  # z for rates and cost ratios (signed like the change), else None
    p_value: float | None  # one-sided p in the bad direction
    enough_data: bool  # volume floors met (when False, bad is False: "cannot tell")
    reason: str  # short human explanation


# --- distributions ---------------------------------------------------------------------------


def normal_sf(z: float) -> float:
    """P(Z >= z) for a standard normal; erfc keeps the far upper tail accurate (no 1 - cdf)."""
    if math.isnan(z):
        raise ValueError("z is NaN")
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def two_proportion_z(x1: int, n1: int, x2: int, n2: int) -> float:
    """Pooled two-proportion z for p1 - p2 (current vs baseline).

    0.0 when there is no evidence either way: an empty sample, or a pooled rate
    of 0 or 1 (no variance), so callers never see NaN or inf.
    """
    if min(x1, n1, x2, n2) < 0 or x1 > n1 or x2 > n2:
        raise ValueError(f"not two proportions: {x1}/{n1} vs {x2}/{n2}")
    if n1 == 0 or n2 == 0:
        return 0.0
    pooled = (x1 + x2) / (n1 + n2)
    variance = pooled * (1.0 - pooled) * (1.0 / n1 + 1.0 / n2)
    if variance <= 0.0:
        return 0.0
    return (x1 / n1 - x2 / n2) / math.sqrt(variance)


def _gamma_prefactor(a: float, x: float) -> float:
    """x^a e^-x / Gamma(a), in logs so that huge a and x neither overflow nor underflow early."""
    return math.exp(a * math.log(x) - x - math.lgamma(a))


def _lower_gamma_series(a: float, x: float) -> float:
    """Regularized lower incomplete gamma P(a, x) by its series (fast for x < a + 1)."""
    term = total = 1.0 / a
    denominator = a
    for _ in range(_MAX_ITER):
        denominator += 1.0
        term *= x / denominator
        total += term
        if abs(term) < abs(total) * _EPS:
            break
    return min(1.0, total * _gamma_prefactor(a, x))


def _upper_gamma_fraction(a: float, x: float) -> float:
    """Regularized upper incomplete gamma Q(a, x) by its continued fraction (x >= a + 1).

    Modified Lentz's method, as in Numerical Recipes' ``gcf``.
    """
    b = x + 1.0 - a
    c = 1.0 / _TINY
    d = 1.0 / b
    h = d
    for i in range(1, _MAX_ITER):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        if abs(d) < _TINY:
            d = _TINY
        c = b + an / c
        if abs(c) < _TINY:
            c = _TINY
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < _EPS:
            break
    return min(1.0, h * _gamma_prefactor(a, x))


def _wilson_hilferty_z(a: float, x: float) -> float:
    """z with P(Gamma(a) <= x) ~ Phi(z): the cube root of a gamma variable is nearly normal."""
    return (math.cbrt(x / a) - 1.0 + 1.0 / (9.0 * a)) * 3.0 * math.sqrt(a)


def _gamma_pq(a: float, x: float) -> tuple[float, float]:
    """(P(a, x), Q(a, x)): the small tail is summed directly, never taken as 1 - the other."""
    if x <= 0.0:
        return 0.0, 1.0
    if a >= _ASYMPTOTIC_SHAPE:
        z = _wilson_hilferty_z(a, x)
        return normal_sf(-z), normal_sf(z)
    if x < a + 1.0:
        p = _lower_gamma_series(a, x)
        return p, 1.0 - p
    q = _upper_gamma_fraction(a, x)
    return 1.0 - q, q


def _check_mu(mu: float) -> None:
    if not (math.isfinite(mu) and mu >= 0):
        raise ValueError(f"Poisson mean must be finite and >= 0, got {mu}")


def poisson_cdf(k: int, mu: float) -> float:
    """P(X <= k) for X ~ Poisson(mu), as Q(k + 1, mu): exact for small k, stable for huge."""
    _check_mu(mu)
    if k < 0:
        return 0.0
    return _gamma_pq(k + 1.0, mu)[1]


def poisson_sf(k: int, mu: float) -> float:
    """P(X >= k) for X ~ Poisson(mu), as P(k, mu)."""
    _check_mu(mu)
    if k <= 0:
        return 1.0
    return _gamma_pq(float(k), mu)[0]


def bonferroni(p_value: float, comparisons: int) -> float:
    """Per-test threshold keeping the family-wise false-alarm rate at ``p_value``.

    Hundreds of segments x KPIs are judged at once; each one at ``p_value``
    would fire somewhere almost every evaluation. No comparisons count as one.
    """
    if not 0 < p_value <= 1:
        raise ValueError(f"p_value must be in (0, 1], got {p_value}")
    if comparisons < 0:
        raise ValueError(f"comparisons must be >= 0, got {comparisons}")
    return p_value / max(comparisons, 1)


# --- judging ---------------------------------------------------------------------------------


def judge(
    kpi: str,
    current: Sequence[int],
    baseline: Sequence[int],
    baseline_scale: float,
    th: Thresholds,
) -> Verdict:
    """Judge one KPI from the current and baseline window sums (MEASURES order, money in micros).

    ``baseline_scale`` is current window length / baseline span length; it turns
    baseline counts into expected counts (rates and cost ratios are scale-free).
    Zeros anywhere give a verdict with ``enough_data`` False, never an exception;
    ValueError only for a malformed call (unknown kpi, wrong length, scale <= 0).
    """
    if len(current) != N_MEASURES or len(baseline) != N_MEASURES:
        raise ValueError(f"expected {N_MEASURES} measures, got {len(current)} and {len(baseline)}")
    if not (math.isfinite(baseline_scale) and baseline_scale > 0):
        raise ValueError(f"baseline_scale must be finite and > 0, got {baseline_scale}")
    known = KPI.get(kpi)
    if known is None:
        raise ValueError(f"unknown kpi {kpi!r}")
    if known.kind == "rate":
        return _judge_rate(known, current, baseline, th)
    if known.kind == "count":
        index = known.num
        return _judge_count(known, current[index], baseline[index], baseline_scale, th)
    return _judge_cost(known, current, baseline, th)


def _is_bad_move(kpi: Kpi, change: float | None, th: Thresholds) -> bool:
    if change is None:
        return False
    worse = kpi.worse_by(change)
    return worse > 0 and worse >= th.min_change - _CHANGE_TOLERANCE


def _cannot_tell(kpi: str, kind: str, value: float | None, base: float | None, why: str) -> Verdict:
    """A verdict without a test: the data cannot support one, so never bad."""
    return Verdict(kpi, kind, value, base, None, False, None, None, False, f"{kpi}: {why}")


def _moved(change: float | None) -> str:
    return f" ({change:+.0%})" if change is not None else ""


def _judge_rate(
    known: Kpi, current: Sequence[int], baseline: Sequence[int], th: Thresholds
) -> Verdict:
    kpi, num, den = known.name, known.num, known.den
    x1, n1, x2, n2 = int(current[num]), int(current[den]), int(baseline[num]), int(baseline[den])
    value = x1 / n1 if n1 > 0 else None
    base = x2 / n2 if n2 > 0 else None
    if value is None or base is None:
        missing = "current" if value is None else "baseline"
        return _cannot_tell(kpi, "rate", value, base, f"no {MEASURES[den]} in the {missing} window")
    if min(x1, x2) < 0 or x1 > n1 or x2 > n2:  # e.g. orders without tracked clicks
        why = f"{MEASURES[num]} exceed {MEASURES[den]}, not a proportion"
        return _cannot_tell(kpi, "rate", value, base, why)
    change = (value - base) / base if base > 0 else None
    z = two_proportion_z(x1, n1, x2, n2)
    p = normal_sf(known.worse_by(z))  # one-sided: z signed like the change
    pooled = (x1 + x2) / (n1 + n2)
    n_min = min(n1, n2)
    enough = (
        n_min >= th.min_volume
        and n_min * pooled >= TEXTBOOK_FLOOR
        and n_min * (1.0 - pooled) >= TEXTBOOK_FLOOR
    )
    bad = enough and _is_bad_move(known, change, th) and p < th.p_value
    reason = f"{kpi} {value:.2%} vs {base:.2%}{_moved(change)}, z={z:.1f}, p={p:.2g}"
    if not enough:
        reason += f"; not enough data ({MEASURES[den]} {n1} / {n2}, {MEASURES[num]} {x1} / {x2})"
    return Verdict(kpi, "rate", value, base, change, bad, z, p, enough, reason)


def _judge_count(
    known: Kpi, observed: int, base_count: int, scale: float, th: Thresholds
) -> Verdict:
    kpi = known.name
    observed, base_count = int(observed), int(base_count)
    expected = base_count * scale
    if observed < 0 or expected <= 0:
        why = f"{observed} vs expected {expected:.1f}, no baseline volume"
        return _cannot_tell(kpi, "count", float(observed), expected, why)
    change = (observed - expected) / expected
    p = poisson_cdf(observed, expected)  # a volume drop is the bad direction of every count
    floor = max(th.min_volume, MIN_EXPECTED_COUNT)
    enough = expected >= floor
    bad = enough and _is_bad_move(known, change, th) and p < th.p_value
    reason = f"{kpi} {observed} vs expected {expected:.1f}{_moved(change)}, p={p:.2g}"
    if not enough:
        reason += f"; not enough data (expected < {floor})"
    return Verdict(kpi, "count", float(observed), expected, change, bad, None, p, enough, reason)


def _judge_cost(
    known: Kpi, current: Sequence[int], baseline: Sequence[int], th: Thresholds
) -> Verdict:
    kpi = known.name
    value = kpis(current).get(kpi)
    base = kpis(baseline).get(kpi)
    # ROI hovers around 0, where a relative change means nothing (-3% -> -12% is "-300%"):
    # a shifted KPI is judged by the relative change of its ratio (ROAS = 1 + ROI) instead.
    change = known.change(value, base)
    conversion = known.volume_index
    short: list[str] = []
    for label, totals in (("current", current), ("baseline", baseline)):
        spend = measure_value(SPEND, int(totals[SPEND]))
        conversions = int(totals[conversion])
        if spend < th.min_spend:
            short.append(f"{label} spend {spend:.2f} < {th.min_spend:g}")
        if conversions < th.min_conversions:
            short.append(f"{label} {MEASURES[conversion]} {conversions} < {th.min_conversions}")
    if value is None or base is None:
        short.append(f"undefined in the {'current' if value is None else 'baseline'} window")
    elif known.relative_to(base) is None:
        ratio = unshifted(known)
        short.append("baseline is 0" if ratio is known else f"baseline {ratio.title} is 0")
    enough = not short
    z = cost_z(kpi, current, baseline) if value is not None and base is not None else None
    p = None if z is None else normal_sf(known.worse_by(z))  # z signed like the change
    bad = enough and _is_bad_move(known, change, th) and p is not None and p < th.p_value
    shown = [f"{v:.4g}" if v is not None else "n/a" for v in (value, base)]
    reason = f"{kpi} {shown[0]} vs {shown[1]}{_moved(change)}"
    if z is not None and p is not None:
        reason += f", z={z:.1f}, p={p:.2g}"
    if short:
        reason += "; not enough data (" + ", ".join(short) + ")"
    return Verdict(kpi, "cost", value, base, change, bad, z, p, enough, reason)


def _conditional_z(x1: float, x2: float, exposure1: float, exposure2: float) -> float:
    """z of x1 given x1 + x2, for two Poisson counts with rates proportional to their exposures.

    Under "same rate per unit exposure" x1 | x1 + x2 is binomial with p =
    e1 / (e1 + e2): the exact way to compare two Poisson rates, here by its
    normal approximation (the volume floors keep the counts large enough).
    Positive when x1 is above what its exposure predicts; 0.0 without variance.
    """
    total, exposure = x1 + x2, exposure1 + exposure2
    if total <= 0 or exposure <= 0:
        return 0.0
    share = exposure1 / exposure
    variance = total * share * (1.0 - share)
    if variance <= 0.0:
        return 0.0
    return (x1 - total * share) / math.sqrt(variance)


def cost_z(kpi: str, current: Sequence[int], baseline: Sequence[int]) -> float:
    """z of a cost ratio's change, signed like the change (positive: the KPI rose).

    - cpc, cpl, cpa, cac (spend per conversion): the conversions are Poisson
      with the window's spend as exposure; fewer per unit spend is a higher cost.
    - roas, roi (revenue per spend): revenue is a compound Poisson sum of order
      values, whose variance is its mean times ``aov * (1 + cv^2)``; counted in
      units of that size it is Poisson-like, then compared as above.
    - aov (revenue per order): given the orders, each window's revenue has mean
      ``orders * aov`` and variance ``orders * (cv * aov)^2``.
    0.0 when the windows carry no evidence either way.
    """
    known = KPI[kpi]
    spend1, spend2 = float(current[SPEND]), float(baseline[SPEND])
    revenue1, revenue2 = float(current[REVENUE]), float(baseline[REVENUE])
    orders1, orders2 = float(current[ORDERS]), float(baseline[ORDERS])
    cv2 = ORDER_VALUE_CV**2
    if known.num == REVENUE:
        if orders1 + orders2 <= 0 or revenue1 + revenue2 <= 0:
            return 0.0
        aov = (revenue1 + revenue2) / (orders1 + orders2)
        if known.den == ORDERS:
            if orders1 <= 0 or orders2 <= 0:
                return 0.0
            sd = math.sqrt(cv2) * aov * math.sqrt(1.0 / orders1 + 1.0 / orders2)
            return (revenue1 / orders1 - revenue2 / orders2) / sd
        unit = aov * (1.0 + cv2)
        return _conditional_z(revenue1 / unit, revenue2 / unit, spend1, spend2)
    conversions = known.volume_index
    return -_conditional_z(
        float(current[conversions]), float(baseline[conversions]), spend1, spend2
    )
