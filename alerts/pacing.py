"""Budget pacing and goal breaches: pure maths over minute sums, no clock, no Kafka.

Everything takes the time it judges (epoch minutes) and a ``SpendSum`` callable,
``spend(start_minute, end_minute)`` -> spend over minutes [start, end) in the
reporting currency, so it plugs into the live scope state, a backtest or a test's
array alike. It lives in ``alerts`` (not the stream core) because it judges
against targets and reuses the detectors' tests (``target_breach``); the core
must not import ``alerts``, and the runtime may import both.

Days are local days of a time zone: from local midnight to the next, 23 or 25
hours on daylight-saving days. A day is cut into *pieces*, one per local hour
(the repeated hour of a 25-hour day is one 120-minute piece, the skipped hour of
a 23-hour day is absent), so intraday curves are weights per local hour.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta, tzinfo
from functools import lru_cache
from typing import Literal

from alerts.detectors import (
    MIN_EXPECTED_COUNT,
    ORDER_VALUE_CV,
    TEXTBOOK_FLOOR,
    normal_sf,
    poisson_cdf,
    poisson_sf,
)
from stream.kpis import KPI, KPIS, ORDERS, REVENUE, SPEND, measure_value

SpendSum = Callable[[int, int], float]
"""``spend(start_minute, end_minute)``: spend over epoch minutes [start, end)."""
HOURS = 24
FLAT: tuple[float, ...] = (1.0,) * HOURS

HISTORY_DAYS = 7
"""Past days the default ("own") curve is learnt from."""
MIN_HISTORY_DAYS = 3
"""History is *thin* below this many of the past days with any spend: the curve is flat."""
FLAT_MIX = 0.1
"""Share of a flat curve mixed into a learnt one, so no hour expects exactly nothing."""
RECENT_MINUTES = 120
"""The trailing part of today whose spend rate projects the rest of the day."""
DEFAULT_LUMPS = 100
"""Without history, spend is taken to arrive as if in this many equal lumps a day."""
MIN_LUMPS = 10_000
"""The dispersion is never below budget / this, however smooth history looked."""
Z = 3.0
"""Half-width of the projection interval in standard errors (one-sided ~0.13%)."""
MARGIN = 0.2


# --- days ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Day:
    """One local day: epoch minutes [start, end) and its local-hour pieces."""

    date: date
    start: int
    end: int
    pieces: tuple[tuple[int, int, int], ...]
    """(local hour, first minute, end minute) in time order; none is empty."""

    @property
    def hours(self) -> float:
        return (self.end - self.start) / 60


def _minute(d: date, hour: int, tz: tzinfo) -> int:
    """Epoch minute of local ``d hour:00`` (the first occurrence; in a gap, as if before it)."""
    return int(datetime(d.year, d.month, d.day, hour, tzinfo=tz).timestamp()) // 60


@lru_cache(maxsize=4096)
def day_of(d: date, tz: tzinfo) -> Day:
    """The local day ``d`` in ``tz``: 1440 minutes, or 1380/1500 on daylight-saving days."""
    bounds = [_minute(d, h, tz) for h in range(HOURS)] + [_minute(d + timedelta(days=1), 0, tz)]
    pieces = tuple((h, bounds[h], bounds[h + 1]) for h in range(HOURS) if bounds[h + 1] > bounds[h])
    return Day(d, bounds[0], bounds[-1], pieces)


def local_day(minute: int, tz: tzinfo) -> Day:
    """The local day containing epoch minute ``minute``."""
    d = datetime.fromtimestamp(minute * 60, tz).date()
    day = day_of(d, tz)
    if minute < day.start:  # midnight itself skipped by a transition
        day = day_of(d - timedelta(days=1), tz)
    elif minute >= day.end:
        day = day_of(d + timedelta(days=1), tz)
    return day


def spend_today(spend: SpendSum, day: Day, now: int) -> float:
    """Spend from local midnight up to (excluding) minute ``now``."""
    return spend(day.start, min(max(now, day.start), day.end))


# --- curves ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """An intraday spend curve and what is known of spend's noise around it.

    ``weights``: relative spend rate per local hour. ``dispersion`` (phi, in the
    reporting currency): variance / mean of spend over any stretch, as for a
    compound Poisson process whose lumps have E[X^2]/E[X] = phi; None when unknown.
    """

    weights: tuple[float, ...]
    source: Literal["own", "flat", "file"]
    days: int = 0
    dispersion: float | None = None


def expected_share(day: Day, weights: Sequence[float], now: int) -> float:
    """Share of the day's spend the curve expects before minute ``now`` (0 to 1)."""
    total = done = 0.0
    for hour, start, end in day.pieces:
        total += weights[hour] * (end - start)
        if now > start:
            done += weights[hour] * (min(now, end) - start)
    if total <= 0:
        return min(max((now - day.start) / (day.end - day.start), 0.0), 1.0)
    return min(max(done / total, 0.0), 1.0)


def own_shape(
    spend: SpendSum, day: Day, tz: tzinfo, *, days: int = HISTORY_DAYS,
    min_days: int = MIN_HISTORY_DAYS,
) -> Shape:  # fmt: skip
    """The segment's spend shape over the ``days`` local days before ``day``.

    Hour weights are the mean spend per minute at each local hour, over the past
    days that had any spend (a paused day says nothing about the shape), mixed
    with ``FLAT_MIX`` of a flat curve. History is *thin* when fewer than
    ``min_days`` days had spend: the shape is then flat and the dispersion unknown.

    The dispersion phi is Pearson's: sum of (x - mu)^2 / mu over the hour pieces
    of those days, where mu is the day's own total spread by the curve, divided by
    the degrees of freedom (pieces - days - 23). It measures how lumpy spend is
    around the curve at the hour scale, reporting lags and drifts included.
    """
    history: list[tuple[Day, list[float]]] = []
    for back in range(1, days + 1):
        past = day_of(day.date - timedelta(days=back), tz)
        sums = [max(spend(start, end), 0.0) for _, start, end in past.pieces]
        if sum(sums) > 0:
            history.append((past, sums))
    if len(history) < min_days:
        return Shape(FLAT, "flat", len(history))
    amount = [0.0] * HOURS
    minutes = [0] * HOURS
    for past, sums in history:
        for (hour, start, end), x in zip(past.pieces, sums, strict=True):
            amount[hour] += x
            minutes[hour] += end - start
    rates = [a / m if m else 0.0 for a, m in zip(amount, minutes, strict=True)]
    mean = sum(rates) / sum(1 for m in minutes if m) or 1.0
    weights = tuple((1 - FLAT_MIX) * r / mean + FLAT_MIX for r in rates)
    chi2, pieces = 0.0, 0
    for past, sums in history:
        scale = sum(weights[h] * (e - s) for h, s, e in past.pieces)
        total = sum(sums)
        for (hour, start, end), x in zip(past.pieces, sums, strict=True):
            mu = total * weights[hour] * (end - start) / scale
            if mu > 0:
                chi2 += (x - mu) ** 2 / mu
                pieces += 1
    dof = max(pieces - len(history) - (HOURS - 1), 1)
    return Shape(weights, "own", len(history), chi2 / dof)


# --- pacing ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pacing:
    """Where today's spend stands against a daily budget, and where it is heading."""

    budget: float
    spend: float
    """Spend so far today."""
    share: float
    """Share of the day's spend the curve expects by now."""
    ratio: float | None
    """spend / (budget x share); None before the curve expects any spend."""
    projected: float
    """Expected spend by the end of the local day."""
    stderr: float
    low: float
    high: float
    """projected -/+ z standard errors; low is never below the spend so far."""


def pace(
    spend: SpendSum, budget: float, day: Day, now: int, shape: Shape, *,
    recent: int = RECENT_MINUTES, z: float = Z,
) -> Pacing:  # fmt: skip
    """Spend today against ``budget``, and the end-of-day projection with its uncertainty.

    Model: spend is a compound Poisson process whose rate follows the curve at an
    unknown daily level L (the day's total), with dispersion phi (variance = phi x
    mean over any stretch). Let q be the expected share of the day done by now and
    w the expected share of the *recent* window (the last ``recent`` minutes of
    today) whose spend is S_w. Then

    - the level at the current rate is L^ = S_w / w, with Var(L^) = phi L / w;
    - the rest of the day, R, has mean L (1 - q) and Var(R) = phi L (1 - q);
    - the projection P^ = S + L^ (1 - q) errs by L^ (1 - q) - R, two independent
      parts (disjoint stretches of time), so

          Var(P^ - P) = phi L (1 - q) [ (1 - q) / w + 1 ].

    L in the variance is taken as (S_w + phi) / w: one more lump than seen, so a
    window without spend still leaves room for some. The interval is P^ -/+ z x SE,
    its low end never below the spend so far. A recent window rather than the
    whole day so far makes a change of rate show within about ``recent`` minutes
    (since midnight the projection S / q dilutes a change with the hours before
    it), at the price of a wider interval, which is what the interval then says.
    phi comes from the segment's history (``own_shape``); without it, budget /
    ``DEFAULT_LUMPS``; never below budget / ``MIN_LUMPS``.
    """
    if not (math.isfinite(budget) and budget > 0):
        raise ValueError(f"budget must be a positive number, got {budget}")
    now = min(max(now, day.start), day.end)
    spent = spend(day.start, now)
    share = expected_share(day, shape.weights, now)
    since = max(day.start, now - recent)
    window = share - expected_share(day, shape.weights, since)
    phi = shape.dispersion if shape.dispersion is not None else budget / DEFAULT_LUMPS
    phi = max(phi, budget / MIN_LUMPS)
    ratio = spent / (budget * share) if share > 0 else None
    rest = 1.0 - share
    if rest <= 0:
        return Pacing(budget, spent, share, ratio, spent, 0.0, spent, spent)
    if window <= 0:  # the very start of the day: nothing to go by but the budget
        projected, level = spent + budget * rest, budget
        variance = phi * level * rest + (budget * rest) ** 2
    else:
        recent_spend = spend(since, now)
        projected = spent + recent_spend / window * rest
        level = (recent_spend + phi) / window
        variance = phi * level * rest * (rest / window + 1.0)
    stderr = math.sqrt(variance)
    low = max(spent, projected - z * stderr)
    return Pacing(budget, spent, share, ratio, projected, stderr, low, projected + z * stderr)


Status = Literal["over", "under", "exhausted", "ok"]


@dataclass(frozen=True)
class PacingVerdict:
    """``status`` of a budget today; ``confident`` when the interval supports it."""

    status: Status
    confident: bool
    pacing: Pacing
    margin: float

    @property
    def summary(self) -> str:
        p = self.pacing
        sure = "confident" if self.confident else "not yet confident"
        return (
            f"{self.status} ({sure}): spent {p.spend:,.0f} of {p.budget:,.0f} so far today, "
            f"projected {p.projected:,.0f} ({p.low:,.0f} to {p.high:,.0f}) by midnight"
        )


def pacing_verdict(pacing: Pacing, margin: float = MARGIN) -> PacingVerdict:
    """over / under / exhausted / ok against the budget -/+ ``margin``.

    ``exhausted``: the budget is spent already (a fact, always confident). ``over``
    / ``under``: the projection is beyond budget x (1 +/- margin); confident when
    the whole interval is. ``ok``: confident when the interval lies within the band.
    """
    if not 0 <= margin < 1:
        raise ValueError(f"margin must be in [0, 1), got {margin}")
    p, high_line, low_line = pacing, pacing.budget * (1 + margin), pacing.budget * (1 - margin)
    if p.spend >= p.budget:
        return PacingVerdict("exhausted", True, p, margin)
    if p.projected > high_line:
        return PacingVerdict("over", p.low > high_line, p, margin)
    if p.projected < low_line:
        return PacingVerdict("under", p.high < low_line, p, margin)
    return PacingVerdict("ok", p.low >= low_line and p.high <= high_line, p, margin)


# --- goal breaches ---------------------------------------------------------------------------

RATE_KPIS = frozenset(k.name for k in KPIS if k.kind == "rate")
PER_CONVERSION = frozenset({"cpc", "cpl", "cpa", "cac"})
MIN_ORDERS = 10


@dataclass(frozen=True)
class Breach:
    """A KPI judged against one bound of its goal over a window's sums."""

    kpi: str
    bound: Literal["min", "max"]
    goal: float
    value: float | None
    breached: bool
    """Past the goal, significantly, with enough volume to say."""
    p_value: float | None
    """One-sided: chance of a value this far past the goal if the KPI sat exactly on it."""
    enough_data: bool
    reason: str


def target_breach(
    kpi: str, bound: Literal["min", "max"], goal: float, totals: Sequence[int], *,
    p_value: float = 0.001,
) -> Breach:  # fmt: skip
    """Is ``kpi`` over the window ``totals`` (MEASURES order, money in micros) past its goal?

    Null hypothesis: the KPI sits exactly on the goal; breached when the data
    reject it at ``p_value`` in the bound's direction, with the volume floors the
    detectors use (a value past the goal at low volume is noise until it is not):

    - rates: the numerator is Binomial(n, goal), tested as Poisson(n x goal)
      (conservative: the larger variance), needing n p and n (1 - p) >= 10;
    - cost per conversion (cpc, cpl, cpa, cac): at cost G, spend s buys
      Poisson(s / G) conversions: too few is too costly; expected >= 5;
    - roas, roi: revenue is a compound Poisson sum of order values (cv
      ``ORDER_VALUE_CV``), counted in units of aov (1 + cv^2) and compared with the
      goal's revenue for the spend by a normal z; at least 10 orders;
    - aov: revenue given the orders has sd cv x goal x sqrt(orders); >= 10 orders.
    """
    values = [measure_value(i, int(v)) for i, v in enumerate(totals)]
    row = KPI[kpi]
    num, den = row.num, row.den
    value = None
    if values[den] > 0:
        value = values[num] / values[den] + row.shift
    past = value is not None and (value < goal if bound == "min" else value > goal)
    p: float | None = None
    enough = False
    if value is None:
        why = "no data"
    elif kpi in RATE_KPIS:
        x, n = int(totals[num]), int(totals[den])
        expected = n * goal
        enough = expected >= TEXTBOOK_FLOOR and n * (1 - goal) >= TEXTBOOK_FLOOR
        p = poisson_cdf(x, expected) if bound == "min" else poisson_sf(x, expected)
        why = f"{x} of {n} against {expected:.1f} at the goal"
    elif kpi in PER_CONVERSION:
        conversions, spend = int(totals[den]), values[SPEND]
        expected = spend / goal if goal > 0 else math.inf
        enough = math.isfinite(expected) and expected >= MIN_EXPECTED_COUNT
        if math.isfinite(expected):
            # max: too few conversions for the spend (cost too high); min: too many.
            p = poisson_cdf(conversions, expected) if bound == "max" else poisson_sf(
                conversions, expected
            )  # fmt: skip
        why = f"{conversions} conversions for {spend:,.2f} against {expected:.1f} at the goal"
    else:
        orders, revenue, spend = int(totals[ORDERS]), values[REVENUE], values[SPEND]
        enough = orders >= MIN_ORDERS
        cv2 = ORDER_VALUE_CV**2
        if kpi == "aov":
            sd = math.sqrt(cv2) * goal / math.sqrt(max(orders, 1))
            z = (value - goal) / sd if sd > 0 else 0.0
        else:
            roas_goal = goal + 1 if kpi == "roi" else goal
            unit = revenue / max(orders, 1) * (1 + cv2)
            observed, expected = (
                revenue / unit if unit else 0.0,
                roas_goal * spend / unit if unit else 0.0,
            )
            z = (observed - expected) / math.sqrt(expected) if expected > 0 else 0.0
        p = normal_sf(-z) if bound == "min" else normal_sf(z)
        why = f"{orders} orders"
    breached = bool(past and enough and p is not None and p < p_value)
    shown = "n/a" if value is None else f"{value:.4g}"
    reason = f"{kpi} {shown} vs {bound} {goal:g}: {why}"
    if p is not None:
        reason += f", p={p:.2g}"
    if not enough:
        reason += "; not enough data"
    return Breach(kpi, bound, goal, value, breached, p, enough, reason)
