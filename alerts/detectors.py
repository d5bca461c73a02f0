"""Detectors: did a KPI move in its bad direction? Judged minute by minute, at the limit.

Pure statistics, no clock and no I/O, so the live worker and the offline backtest reach the
same verdicts. Every rule watches every segment of its scopes with a CUSUM (Page): each
settled minute adds its log-likelihood ratio "moved by the rule's ``min_change``" against
"as the baseline expects", the sum is floored at 0, and the alert fires when it reaches the
threshold ``h``. Among all procedures with the same rate of false alarms (one every ~e^h
minutes per detector) it has the least worst-case delay, ~h / KL minutes (Lorden): a large
move fires in a minute or two at any volume, a small one once the evidence suffices, and a
segment with little traffic is watched too, accumulating evidence slowly. No floor needed.

What is judged is a count given what it is exposed to, derived from the catalogue's fields
(never from KPI names):

- counts (impressions ... orders): Poisson against the baseline's expected count;
- rates whose measures arrive together (CTR): binomial, clicks given the minute's
  impressions;
- rates whose numerator trails its denominator (orders, leads after their clicks):
  Poisson, given the clicks of the last ``MATURING_MINUTES`` (the exposure that has had
  time to convert; the click-to-order delay is spread over minutes, and the mean of the
  last ten minutes' clicks is that convolution for delays spread evenly over ten). Cohorts
  (orders by the minute of their click) would be exact, but the minute sums keep an order
  at its own time, and a cohort matures only after the longest delay: a lagged exposure
  judges every minute at once, and errs only while clicks themselves move fast;
- money per spend (CPC ... CAC: conversions per unit spend; ROAS, ROI: revenue per spend).
  Spend arrives in lumps (a report per period, minutes late): one minute of it is mostly
  lump or none. A count paid for as it comes (clicks: CPC) is judged in whole reporting
  blocks (``SPEND_BLOCK_MINUTES``, clock-aligned, as platforms report): each block's
  clicks against the block's spend at the past blocks' rate, in units of their dispersion
  given the spend, *fitted* to the segment's own last blocks (``fit``: 6 h of them, each
  half against its own ratio) and widened for the chance of that fit (``allowance``: a
  fit that happened to be low would make ordinary blocks look like a price rise). Where
  prices are steady, clicks given spend hardly vary, so a price rise shows in a block or
  two. Silence (no click at all) is judged no finer than a Poisson count. A
  block's spend is trimmed of its largest minutes (``alerts.baselines.block_sums``), its
  reports' minutes, in every block alike: a report that came with the wrong block (late,
  early, twice) does not move it, while a price rise raises every minute. Conversions that
  trail their clicks (CPL, CPA, CAC; revenue for ROAS, ROI) are their own noise (at least
  Poisson whatever the spend): each minute's against the spend of the last
  ``LUMP_MINUTES``, several reports, with a report's uncertainty (``LUMP_SD``) counted; so
  is CPC until a segment has ``MIN_BLOCKS`` blocks of history. Slow for a price rise (it
  ramps in over the hour), which the CPC finds; these are for the conversions' side;
- revenue is counted in units of ``aov * (1 + cv^2)`` (a compound Poisson sum: orders at
  random, values spread with ``ORDER_VALUE_CV``), which makes it Poisson-like; revenue
  per order (AOV) given the minute's orders in units of ``aov * cv^2``.

Several magnitudes: a CUSUM is designed for one move, and is slow for much larger ones. So
each rule runs three: ``min_change``, twice it, and silence (the judged count gone: a
tracking outage, or a conversion stream lost), the first to reach its threshold alerts.
A CUSUM for a move r also gathers evidence from moves about half as large (its drift turns
positive where r and "no move" are equally far in KL), quickly at high volume; so an alarm
also needs the move measured over its excursion (judged count seen / expected) to reach
three quarters of ``min_change`` (``alerts.engine.MATERIAL``): the rule's promise.

Thresholds: one false-alarm budget for the whole rules file (``false_alerts_per_week``,
default 1), split over its N detectors and their M magnitudes: each gets a mean time to a
false alarm of N x M x 10,080 / budget minutes, and since a CUSUM's is at least e^h,
``h = ln(N x M x 10,080 / budget)`` (rules weigh their share with ``budget_share``). So
adding campaigns costs a little threshold (ln: 10x the segments is +2.3), never noise.
N is counted at each evaluation: when segments come, h rises a little, when they go it
falls; a statistic is capped at and compared with the threshold of the minute it was last
added at, so nothing is re-judged. A new segment starts at 0 (judged from its first
minutes of history); a segment that goes (expired, or folded into ``__other__``) loses
its statistics with it.

The baseline is estimated, not known: a change of its estimate by chance looks like a move.
Each minute's evidence for a magnitude is discounted by the ratio of the variance it takes
to reach h (the ~h / c(r) counts) to that plus what the baseline adds (those counts squared
over the baseline's own counts): weight ``1 / (1 + h / (c(r) x counts))``. A short
baseline (a fresh deployment) judges at once, but only moves that are clear beyond its
own uncertainty.

The statistic is capped at its threshold: evidence beyond it would only delay the resolve
by as long as the move lasted. An alert is "still bad" (hysteresis) while the statistic
stays above half its threshold, and resolves once it falls below (plus ``keep_firing_for``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from alerts.baselines import LEVEL_MINUTES, RATE_MINUTES, RATIO_MINUTES
from stream.kpis import LUMPY, MICROS, MONEY, TRAILING, Kpi

# Coefficient of variation of one order's revenue, assumed by the revenue tests (window sums
# carry no sum of squares). Baskets are right-skewed: 1.0 is a lognormal with sigma 0.83, more
# spread than most shops (the simulator draws sigma 0.6, i.e. 0.66); heavier tails make the
# revenue detectors fire more often than budgeted, and call for a higher cv here.
ORDER_VALUE_CV = 1.0
MIN_EXPECTED_COUNT = 5  # below this a Poisson test cannot reach any useful significance
TEXTBOOK_FLOOR = 10  # n·p and n·(1-p) for the normal approximation of a proportion
MATURING_MINUTES = 10
"""Minutes of clicks a trailing conversion is judged against (see the module text)."""
LUMP_MINUTES = 60
"""Minutes of spend a conversion per unit spend is judged against: several reports."""
SPEND_INFORMATION_PER_MINUTE = 5.0
"""Spend is not a count: its baseline's information (1 / relative variance) is taken as 5
per minute of span, i.e. a three-hour baseline known within ~3% (18 reports +-1 of which
about half the spend comes in lumps)."""
LUMP_SD = 0.1
"""Relative spread of an hour's spend from its lumps (six reports, give or take one, of
a share of the spend): it persists for minutes, so it is counted like the baseline's own
uncertainty. This is what makes small moves of cost KPIs slow to tell at any volume."""
SPEND_BLOCK_MINUTES = 10
"""Minutes of a reporting block: the period of ad platforms' spend reports (10-15 min is
common; with longer periods the fitted dispersion is larger and detection slower, never
noisier). Blocks are aligned to the clock, as the periods are."""
MIN_BLOCKS = 6
"""Blocks of history before spend is judged in blocks: a dispersion from fewer is a guess."""
DISPERSION_MINUTES = 2 * RATIO_MINUTES
"""Past reporting blocks a dispersion is fitted to (``fit``): 6 h, 36 blocks in two groups
of ``RATIO_MINUTES``, each against its own ratio: 34 degrees of freedom, where the ratio's
3 h alone give 17, whose chance lows call for an allowance of ~3.0x the fit
(``allowance``) against ~1.7x. Longer fits would add time-of-day changes of the campaign
mix."""
MIN_UNIT = 0.01
"""Floor of the fitted dispersion of clicks given their spend: a history of identical
blocks must not make the next one exact."""
WEEK_MINUTES = 7 * 24 * 60
SILENCE = 0.0
"""The multiplier of a stream gone silent."""

_EPS = 1e-15
_TINY = 1e-300
_MAX_ITER = 100_000
# Above this shape the exact incomplete-gamma loops get long (O(sqrt(a)) steps, ~1k here).
# Wilson-Hilferty is then within 1e-4 relative at p ~ 1e-3 and 1e-2 at p ~ 1e-20: ample
# for a decision at p < 0.001, and O(1) for counts in the billions.
_ASYMPTOTIC_SHAPE = 10_000.0


# --- distributions ---------------------------------------------------------------------------


def normal_sf(z: float) -> float:
    """P(Z >= z) for a standard normal; erfc keeps the far upper tail accurate (no 1 - cdf)."""
    if math.isnan(z):
        raise ValueError("z is NaN")
    return 0.5 * math.erfc(z / math.sqrt(2.0))


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


# --- what is judged --------------------------------------------------------------------------

Floats = npt.NDArray[np.float64]
Sums = Sequence[int] | Sequence[float] | npt.NDArray[np.int64] | Floats


@dataclass(frozen=True)
class Plan:
    """How one KPI is judged: which count, per what exposure, over how many minutes of it."""

    kpi: Kpi
    judged: int
    """Index of the measure judged: the count the KPI moves with (or against)."""
    exposure: int | None
    """Index of the measure it is judged per; None: judged against the baseline level."""
    lag: int
    """Minutes of exposure a minute's count is judged against (1: the same minute)."""
    binomial: bool
    """The judged count is out of the exposure's trials, in the same minute (CTR)."""
    inverse: bool
    """The judged count is the KPI's denominator (a cost per conversion moves against it)."""
    value_cv2: float | None
    """Money judged (revenue): counted in units of the value per conversion times this."""
    block: int = 1
    """Minutes judged at once once the history allows (spend's reporting blocks); 1: each
    minute on its own."""

    @property
    def span(self) -> int:
        """The trailing baseline span: an hour for volumes, three for ratios, six for
        proportions judged in their own minute (CTR)."""
        if self.exposure is None:
            return LEVEL_MINUTES
        return RATE_MINUTES if self.binomial else RATIO_MINUTES

    @property
    def history(self) -> int:
        """Minutes of past blocks a block is judged against (the dispersion's fit), else
        the span."""
        return DISPERSION_MINUTES if self.block > 1 else self.span


def plan(kpi: Kpi) -> Plan:
    """The judged count of ``kpi`` and its exposure, from the catalogue's fields."""
    if kpi.denominator is None:
        return Plan(kpi, kpi.num, None, 1, False, False, None)
    num, den = kpi.num, kpi.den
    exposure = num if num in LUMPY else den
    judged = den if exposure == num else num
    if exposure in LUMPY:
        lag = LUMP_MINUTES
    elif judged in TRAILING and exposure not in TRAILING:
        lag = MATURING_MINUTES
    else:
        lag = 1
    binomial = lag == 1 and judged not in MONEY and exposure not in MONEY
    cv2 = None
    if judged in MONEY:  # given the conversions: their values' spread; else compound Poisson
        given = exposure == kpi.volume_index
        cv2 = ORDER_VALUE_CV**2 + (0.0 if given else 1.0)
    block = SPEND_BLOCK_MINUTES if exposure in LUMPY and judged not in TRAILING else 1
    return Plan(kpi, judged, exposure, lag, binomial, judged == den, cv2, block)


def multipliers(p: Plan, min_change: float) -> tuple[float, ...]:
    """The judged count's mean, relative to the baseline, under the moves a rule looks for:
    its ``min_change`` in the bad direction, twice that, and silence (0)."""
    out: list[float] = []
    for move in (min_change, 2 * min_change):
        factor = 1 - move if p.kpi.bad == "down" else 1 + move  # of the KPI (ROI: of ROAS)
        if factor <= 0:
            continue  # a fall of 100% or more: silence
        r = 1 / factor if p.inverse else factor
        if not 0 < r < 1:
            raise ValueError(f"{p.kpi.name}: a bad move must lower the judged count")
        if r not in out:
            out.append(r)
    out.append(SILENCE)
    return tuple(out)


@dataclass(frozen=True)
class Evidence:
    """One minute of the judged count against what the baseline expects of it."""

    x: float
    """The judged count (money in its units)."""
    mu: float
    """Its expected value (Poisson); for a binomial, ``trials`` x ``p0``."""
    trials: float | None
    p0: float
    counts: float
    """Information of the baseline behind ``mu`` (1 / its relative variance)."""
    block: bool = False
    """A whole reporting block (``block_evidence``), not one minute."""
    dof: float | None = None
    """Degrees of freedom of the dispersion ``x`` and ``mu`` are counted in, when it was
    fitted (``fit``; None: a model's, e.g. Poisson): judged with its ``allowance``."""
    unit: float = 1.0
    """That dispersion: counts per unit of ``x`` and ``mu``."""


def evidence(
    p: Plan,
    minute: Sums,
    exposed: Sums | None,
    rate: Floats,
    counts: Floats,
    span: int,
    ratio_counts: Floats | None = None,
) -> Evidence | None:
    """One minute's evidence; None when the baseline expects nothing to judge by.

    ``minute``: the minute's sums; ``exposed``: the sums over the ``p.lag`` minutes ending
    with it; ``rate``/``counts``: the baseline per minute and its information
    (``alerts.baselines.Expected``) over ``span`` minutes; ``ratio_counts``: the trailing
    level's information alone, which a ratio is known from (the day's factor cancels in
    it; None: ``counts``).
    """
    j = p.judged
    if p.exposure is None:
        mu = float(rate[j])
        if mu <= 0:
            return None
        return Evidence(float(minute[j]), mu, None, 0.0, float(counts[j]))
    e = p.exposure
    if rate[j] <= 0 or rate[e] <= 0:
        return None
    ratio = float(rate[j] / rate[e])
    conversions = p.kpi.volume_index
    if ratio_counts is not None:
        counts = ratio_counts
    info_j = counts[conversions] if j in MONEY else counts[j]
    if e in LUMPY:
        info_e = 1.0 / (1.0 / (SPEND_INFORMATION_PER_MINUTE * span) + LUMP_SD**2)
        info = 0.0 if min(info_j, info_e) <= 0 else 1.0 / (1.0 / info_j + 1.0 / info_e)
    else:
        # The exposure is a count seen with the judged one, and judged given: the
        # baseline ratio is uncertain by its judged count alone (orders given their
        # clicks), not by the exposure's own chance (which the judgement conditions on);
        # a proportion's by (1 - p) / (n p), less than its count's.
        info = float(info_j) if counts[e] > 0 else 0.0
        if p.binomial and ratio < 1:
            info /= 1.0 - ratio
    x = float(minute[j])
    if p.binomial:
        if ratio >= 1:
            return None  # not a proportion (e.g. more orders than tracked clicks)
        trials = float(minute[e])
        return Evidence(x, trials * ratio, trials, ratio, float(info))
    assert exposed is not None
    mu = ratio * float(exposed[e]) / p.lag
    if p.value_cv2 is not None:
        if rate[conversions] <= 0:
            return None
        unit = float(rate[j] / rate[conversions]) * p.value_cv2
        x, mu = x / unit, mu / unit
    return Evidence(x, mu, None, 0.0, float(info))


def fit(p: Plan, history: Floats) -> tuple[float, float]:
    """The dispersion of ``p``'s judged count given its exposure, per expected count, fitted
    to past blocks (``history``: one row of sums per block, oldest first), and its degrees
    of freedom.

    The blocks are taken in groups of ``RATIO_MINUTES`` from the newest, each group's
    counts set against its exposure at the group's own ratio (a slow drift of prices over
    the day is not scatter, and costs one degree of freedom per group). Unbiased where the
    variance is proportional to the expected count: a residual's expected square is
    ``phi mu (1 - mu / group's sum of mu)``, and that is what the squares are divided by.
    At least ``MIN_UNIT``; infinite (no degrees of freedom) when nothing can be fitted.
    """
    j, e = p.judged, p.exposure
    assert e is not None
    per_group = max(RATIO_MINUTES // p.block, 1)
    group = (len(history) - 1 - np.arange(len(history))) // per_group
    squares = expected = dof = 0.0
    for g in np.unique(group):
        x, s = history[group == g, j], history[group == g, e]
        if len(x) < 2 or s.sum() <= 0 or x.sum() <= 0:
            continue
        mu = s * (x.sum() / s.sum())
        squares += float(((x - mu) ** 2).sum())
        expected += float(mu.sum() - (mu**2).sum() / mu.sum())
        dof += len(x) - 1
    if dof <= 0 or expected <= 0:
        return math.inf, 0.0
    return max(squares / expected, MIN_UNIT), dof


def unit(p: Plan, history: Floats) -> float:
    """The fitted dispersion of ``p``'s judged count given its exposure (``fit``)."""
    return fit(p, history)[0]


def allowance(h: float, dof: float) -> float:
    """The factor a dispersion fitted with ``dof`` degrees of freedom is widened by, so that
    a CUSUM judged in its units keeps its false-alarm rate at threshold ``h``.

    In units of the true dispersion phi, a CUSUM on a quasi-likelihood ratio reaches h by
    chance with probability about e^-h per excursion. Counted in units of a fit a x phi
    widened by m, reaching h takes h a m in true units: e^-(h a m). The fit is a
    chi-square over its degrees of freedom nu (a ~ chi2_nu / nu), and it stays for hours,
    so an excursion sees one draw of it: averaged over it, the chance is
    E[e^-(h a m)] = (1 + 2 h m / nu)^(-nu / 2). This is e^-h for
    m = nu / (2 h) x (e^(2 h / nu) - 1): ~1.7 for 34 degrees of freedom at h = 16.2, ~3.0
    for 17, and 1 + h / nu for many. The margin this replaces, one standard error of a
    variance from 18 blocks (x1.5), holds the chance at e^-11.5 instead of e^-16.2 (~100
    times the budget): the fits that happened to be low (a steady few hours) carry most of
    the false alarms.
    """
    if dof <= 0:
        return math.inf
    x = 2.0 * h / dof
    return math.expm1(x) / x if x < 700 else math.inf


def block_evidence(p: Plan, block: Sums, history: Floats) -> Evidence | None:
    """One reporting block's evidence: its judged count against its exposure at the ratio
    of the last ``RATIO_MINUTES`` of past blocks, both in units of the dispersion fitted to
    up to ``DISPERSION_MINUTES`` of them (``fit``; widened at judgement by ``allowance``
    for its degrees of freedom), so that the Poisson log-likelihood ratio of ``llr``
    applies (a quasi-likelihood). The ratio is the trimmed blocks' own
    (``alerts.baselines.block_sums``: a trimmed block is set against trimmed ones), and
    known from their judged count in the same units.

    ``block``: the block's sums; ``history``: past blocks' sums, oldest first (``MIN_BLOCKS``
    or more). None when the history has nothing to judge by.
    """
    j, e = p.judged, p.exposure
    assert e is not None and p.block > 1
    # Blocks before the segment's traffic (its first minute may be a stray's: a trickle of
    # late events) say nothing of its prices, and would fit a dispersion of ~0: a block
    # counts with a quarter of the largest one's exposure or more (the day's shape moves
    # traffic far less within the span). Selected by their exposure only, which the count
    # is judged given: leaving out blocks by their count (e.g. those without a click, a
    # third of a small campaign's at night) would raise the ratio above the blocks' own
    # and narrow their scatter, and every block after would look like a price rise.
    exposure = history[:, e]
    history = history[(exposure > 0) & (exposure >= exposure.max(initial=0.0) / 4)]
    recent = history[-max(RATIO_MINUTES // p.block, 1) :]
    if len(recent) < MIN_BLOCKS:
        return None
    seen, exposed = float(recent[:, j].sum()), float(recent[:, e].sum())
    u, dof = fit(p, history)
    if not (seen > 0 and exposed > 0 and math.isfinite(u) and u > 0):
        return None
    x, mu = float(block[j]) / u, seen / exposed * float(block[e]) / u
    return Evidence(x, mu, None, 0.0, seen / u, block=True, dof=dof, unit=u)


def judge(ev: Evidence, rs: Sequence[float], h: float) -> list[float]:
    """The log-likelihood ratios of ``ev`` for magnitudes ``rs``, each weighted by the
    baseline's certainty at threshold ``h`` (``discount``).

    Evidence in the units of a fitted dispersion (``Evidence.dof``) is judged in units
    widened by its ``allowance`` at ``h`` (the count and the baseline's alike: both were
    counted in the fitted units). Silence, in units no finer than a Poisson count's: a
    fitted dispersion describes the scatter of clicks around their spend where both move
    together (a block's clicks pay for much of its spend), a second moment; it says nothing
    of the chance of a block with no click at all, which is at least a Poisson count's
    (e^-mu). In finer units a small campaign's quiet night, a few clicks a block, would
    read a run of three empty blocks as an outage.
    """
    if ev.dof is None:
        return [weighted(llr(ev, r), discount(h, r, ev.counts)) for r in rs]
    widen = 1.0 / allowance(h, ev.dof)
    out = []
    for r in rs:
        scale = min(widen, ev.unit) if r == SILENCE else widen
        out.append(weighted(llr(ev, r) * scale, discount(h, r, ev.counts * scale)))
    return out


def llr(ev: Evidence, r: float) -> float:
    """Log-likelihood ratio of one minute: the judged mean at ``r`` x the baseline vs at it."""
    x = ev.x
    if ev.trials is not None:
        n, p0 = ev.trials, ev.p0
        if n <= 0 or x > n:
            return 0.0
        if r == SILENCE:
            return -math.inf if x > 0 else -n * math.log1p(-p0)
        p1 = p0 * r
        return x * math.log(r) + (n - x) * (math.log1p(-p1) - math.log1p(-p0))
    if r == SILENCE:
        return -math.inf if x > 0 else ev.mu
    return x * math.log(r) - (r - 1.0) * ev.mu


def kl_per_count(r: float) -> float:
    """KL information per expected count of a Poisson mean moving by ``r``: r ln r - r + 1."""
    return 1.0 if r == SILENCE else r * math.log(r) - r + 1.0


def information_bound(h: float, r: float, mu: float) -> float:
    """Minutes a CUSUM at threshold ``h`` needs, on average, for a move ``r`` at ``mu`` a
    minute (Lorden's h / KL): what detection delays are measured against."""
    return h / (kl_per_count(r) * mu)


def threshold(total_weight: float, share: float, magnitudes: int, budget: float) -> float:
    """h of one detector: its budget share of false alerts a week, over its magnitudes.

    ``total_weight``: the sum of ``budget_share`` over every detector of the rules file;
    the detector gets budget x share / total_weight false alerts a week, so a mean time
    to a false alarm of that many weeks' minutes, split over its ``magnitudes`` CUSUMs.
    """
    if not (share > 0 and budget > 0 and magnitudes > 0):
        raise ValueError("share, budget and magnitudes must be > 0")
    return math.log(magnitudes * WEEK_MINUTES * max(total_weight, share) / (budget * share))


def discount(h: float, r: float, counts: float) -> float:
    """The weight of one minute's evidence for magnitude ``r`` against a baseline known
    from ``counts`` (1 for an exact baseline, 0 without one).

    Reaching ``h`` takes ~h / c(r) counts, whose sum has that variance; an estimated
    baseline adds its square over ``counts``. Dividing the evidence by the ratio (a
    variance inflation) keeps a short baseline's chance errors from looking like a move,
    and it is the evidence that is discounted, not the threshold raised, so a statistic
    gathered while the baseline was short is not suddenly past a threshold once it grows.
    """
    if counts <= 0:
        return 0.0
    return 1.0 / (1.0 + h / (kl_per_count(r) * counts))


def weighted(ratio: float, weight: float) -> float:
    """``ratio`` x ``weight``, where no weight leaves no evidence (not -inf x 0 = NaN)."""
    return 0.0 if weight <= 0 else ratio * weight


# --- the statistic ---------------------------------------------------------------------------

DETECTOR_STATE_VERSION = 1
"""Version of :meth:`Detectors.to_dict`; bumped on incompatible changes."""


@dataclass
class Cusum:
    """One rule's CUSUMs for one segment. Per magnitude: a statistic, its threshold, the
    first minute of its current excursion (where the move began, and where the baseline
    stops: a change is not its own baseline) and the judged count seen and expected over
    that excursion (how large the move it measures is). And the last minute added: a
    minute is added once, however often it is evaluated."""

    stats: list[float]
    limits: list[float]
    starts: list[int | None]
    seen: list[float]
    expected: list[float]
    last: int | None = None

    @classmethod
    def empty(cls, n: int) -> Cusum:
        return cls([0.0] * n, [math.inf] * n, [None] * n, [0.0] * n, [0.0] * n)

    def copy(self) -> Cusum:
        return Cusum(list(self.stats), list(self.limits), list(self.starts), list(self.seen),
                     list(self.expected), self.last)  # fmt: skip

    def row(self) -> list[object]:
        """JSON-safe state, as ``_cusum`` reads it back (after the segment key)."""
        limits = [_finite(x) for x in self.limits]
        return [self.last, list(self.starts), list(self.stats), limits, list(self.seen),
                list(self.expected)]  # fmt: skip

    @property
    def since(self) -> int | None:
        """Start of the oldest current excursion; None when every statistic is at 0."""
        return min((s for s in self.starts if s is not None), default=None)

    def add(
        self, minute: int, ev: Evidence, ratios: Sequence[float], limits: Sequence[float]
    ) -> None:
        """Add minute ``minute``'s weighted log-likelihood ratios; capped at the thresholds."""
        if self.last is not None and minute <= self.last:
            raise ValueError(f"minute {minute} was already added (last {self.last})")
        for i, (ratio, limit) in enumerate(zip(ratios, limits, strict=True)):
            s = min(limit, max(0.0, self.stats[i] + ratio)) if math.isfinite(limit) else 0.0
            self.stats[i] = s
            if s <= 0:
                self.starts[i], self.seen[i], self.expected[i] = None, 0.0, 0.0
            else:
                if self.starts[i] is None:
                    self.starts[i] = minute
                self.seen[i] += ev.x
                self.expected[i] += ev.mu
        self.limits = list(limits)
        self.last = minute

    def alarms(self) -> list[int]:
        """Indices of the magnitudes at their thresholds, closest to the threshold first."""
        at = [i for i, (s, limit) in enumerate(zip(self.stats, self.limits, strict=True))
              if math.isfinite(limit) and s >= limit * (1 - 1e-9)]  # fmt: skip
        return sorted(at, key=lambda i: -self.stats[i] / self.limits[i])

    def ratio(self, i: int) -> float | None:
        """The judged count's observed / expected over magnitude ``i``'s excursion."""
        return self.seen[i] / self.expected[i] if self.expected[i] > 0 else None

    def still_bad(self) -> bool:
        """Above half a threshold: the hysteresis that keeps a firing alert firing."""
        return any(
            math.isfinite(limit) and limit > 0 and s >= limit / 2
            for s, limit in zip(self.stats, self.limits, strict=True)
        )


@dataclass
class Detectors:
    """The CUSUMs of one rule, by segment; JSON-safe state restored exactly after restarts."""

    multipliers: tuple[float, ...]
    by_segment: dict[tuple[str, str, str], Cusum] = field(default_factory=dict)

    def get(self, key: tuple[str, str, str]) -> Cusum:
        cusum = self.by_segment.get(key)
        if cusum is None:
            cusum = self.by_segment[key] = Cusum.empty(len(self.multipliers))
        return cusum

    def clone(self) -> Detectors:
        copies = {key: c.copy() for key, c in self.by_segment.items()}
        return Detectors(self.multipliers, copies)

    def to_dict(self) -> dict[str, object]:
        """JSON-safe state. Segments at rest (every statistic at 0) are stored by key and
        last minute only: they are most, and a rule over hundreds of campaigns is written
        to the changelog every minute."""
        active: list[list[object]] = []
        quiet: dict[int | None, list[list[str]]] = {}
        for key, c in sorted(self.by_segment.items()):
            if any(s > 0 for s in c.stats):
                active.append([*key, *c.row()])
            else:
                quiet.setdefault(c.last, []).append(list(key))
        return {
            "version": DETECTOR_STATE_VERSION,
            "multipliers": list(self.multipliers),
            "segments": active,
            "quiet": [[last, keys] for last, keys in sorted(quiet.items(), key=_by_minute)],
        }

    @classmethod
    def from_dict(cls, multipliers: tuple[float, ...], d: Mapping[str, object]) -> Detectors:
        """Restore ``to_dict`` output; a rule whose magnitudes changed starts afresh (its
        statistics measured other moves); malformed state raises ValueError."""
        if d.get("version") != DETECTOR_STATE_VERSION:
            raise ValueError(f"unsupported detector state version {d.get('version')!r}")
        restored = cls(multipliers)
        stored = d.get("multipliers")
        if not isinstance(stored, list) or not all(_is_number(m) for m in stored):
            raise ValueError(f"multipliers must be a list of numbers, got {stored!r}")
        if tuple(float(m) for m in stored) != multipliers:
            return restored
        segments = d.get("segments")
        if not isinstance(segments, list):
            raise ValueError("segments must be a list")
        for entry in segments:
            key, cusum = _cusum(entry, len(multipliers))
            if key in restored.by_segment:
                raise ValueError(f"segment {key!r} appears twice")
            restored.by_segment[key] = cusum
        quiet = d.get("quiet")
        if not isinstance(quiet, list):
            raise ValueError("quiet must be a list")
        for group in quiet:
            if not (isinstance(group, list) and len(group) == 2 and isinstance(group[1], list)
                    and (group[0] is None or _is_minute(group[0]))):  # fmt: skip
                raise ValueError(f"quiet segments must be [last minute, keys], got {group!r}")
            for key in group[1]:
                if not (isinstance(key, list) and len(key) == 3
                        and all(isinstance(part, str) for part in key)):  # fmt: skip
                    raise ValueError(f"segment key must be 3 strings, got {key!r}")
                if tuple(key) in restored.by_segment:
                    raise ValueError(f"segment {key!r} appears twice")
                cusum = Cusum.empty(len(multipliers))  # at rest: no threshold to remember
                cusum.last = group[0]
                restored.by_segment[(key[0], key[1], key[2])] = cusum
        return restored


def _by_minute(item: tuple[int | None, object]) -> int:
    return -1 if item[0] is None else item[0]


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value


def _finite(x: float) -> float | None:
    """JSON has no infinity: an unset threshold is stored as null."""
    return x if math.isfinite(x) else None


def _cusum(entry: object, n: int) -> tuple[tuple[str, str, str], Cusum]:
    """One stored segment: [scope, channel, campaign, last, starts, stats, limits, seen,
    expected]."""
    if not (isinstance(entry, list) and len(entry) == 9):
        raise ValueError(f"detector entry must be a list of 9, got {entry!r}")
    scope, channel, campaign, last, starts, stats, limits, seen, expected = entry
    if not all(isinstance(part, str) for part in (scope, channel, campaign)):
        raise ValueError(f"detector key must be 3 strings, got {entry[:3]!r}")
    if last is not None and not _is_minute(last):
        raise ValueError(f"detector last minute must be a minute or null, got {last!r}")
    before_last = [s is None or (_is_minute(s) and last is not None and s <= last)
                   for s in (starts if isinstance(starts, list) else [])]  # fmt: skip
    if not (isinstance(starts, list) and len(starts) == n and all(before_last)):
        raise ValueError(f"detector excursion starts must be {n} minutes <= last, got {starts!r}")
    if not (isinstance(stats, list) and len(stats) == n and all(
            _is_number(s) and 0 <= s < math.inf for s in stats)):  # fmt: skip
        raise ValueError(f"detector statistics must be {n} numbers >= 0, got {stats!r}")
    if not (isinstance(limits, list) and len(limits) == n and all(
            x is None or (_is_number(x) and x > 0) for x in limits)):  # fmt: skip
        raise ValueError(f"detector thresholds must be {n} numbers > 0 or null, got {limits!r}")
    for name, sums in (("seen", seen), ("expected", expected)):
        if not (isinstance(sums, list) and len(sums) == n and all(
                _is_number(x) and 0 <= x < math.inf for x in sums)):  # fmt: skip
            raise ValueError(f"detector {name} must be {n} numbers >= 0, got {sums!r}")
    cusum = Cusum([float(s) for s in stats], [math.inf if x is None else float(x) for x in limits],
                  list(starts), [float(x) for x in seen], [float(x) for x in expected],
                  last)  # fmt: skip
    for s, start, limit in zip(cusum.stats, cusum.starts, cusum.limits, strict=True):
        if s > limit or (s > 0) != (start is not None):
            raise ValueError(f"inconsistent detector statistics: {entry!r}")
    return (scope, channel, campaign), cusum


def _is_minute(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def kpi_value(kpi: Kpi, sums: Sums) -> float | None:
    """The KPI of (possibly fractional, e.g. expected) sums; None on a 0 denominator."""
    if kpi.denominator is None:
        return float(sums[kpi.num])
    den = float(sums[kpi.den]) / (MICROS if kpi.den in MONEY else 1)
    if den <= 0:
        return None
    num = float(sums[kpi.num]) / (MICROS if kpi.num in MONEY else 1)
    return num / den + kpi.shift
