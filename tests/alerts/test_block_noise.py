"""The noise model of spend judged per reporting block (``alerts.detectors.fit``,
``allowance``, ``block_evidence``, ``judge``): a fitted dispersion is widened for the chance
of its fit, so stationary blocks at any dispersion stay within the false-alarm budget, while
a price rise is still found within a small multiple of its information bound.

Blocks are drawn directly (clicks given their block's spend with a chosen dispersion), with
seeded generators: reproducible.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from alerts.baselines import FREEZE_MINUTES, RATIO_MINUTES
from alerts.detectors import (
    DISPERSION_MINUTES,
    MIN_BLOCKS,
    SILENCE,
    SPEND_BLOCK_MINUTES,
    Cusum,
    allowance,
    block_evidence,
    fit,
    judge,
    kl_per_count,
    llr,
    multipliers,
    plan,
)
from stream.kpis import CLICKS, KPI, SPEND

CPC = plan(KPI["cpc"])
HISTORY = DISPERSION_MINUTES // SPEND_BLOCK_MINUTES
RATIO_BLOCKS = RATIO_MINUTES // SPEND_BLOCK_MINUTES


def _clicks(rng: np.random.Generator, mu: np.ndarray, phi: float) -> np.ndarray:
    """Counts with mean ``mu`` and variance ``phi`` x ``mu``: negative binomial above
    Poisson, binomial below (clicks that pay for much of their spend vary less)."""
    if phi > 1:
        return rng.negative_binomial(mu / (phi - 1), 1 / phi).astype(float)
    if phi < 1:
        p = 1 - phi
        return rng.binomial(np.maximum(np.round(mu / p), 1).astype(np.int64), p).astype(float)
    return rng.poisson(mu).astype(float)


def _blocks(rng: np.random.Generator, n: int, clicks: float, phi: float) -> np.ndarray:
    """``n`` blocks' sums: spend following a day's shape (x0.4 to x1.6 over 144 blocks)
    with 10% noise, clicks at a steady price given it."""
    shape = 1 + 0.6 * np.sin(np.arange(n) / 144 * 2 * np.pi)
    spend = 1e6 * clicks * shape * rng.uniform(0.9, 1.1, n)
    out = np.zeros((n, 7))
    out[:, SPEND] = spend
    out[:, CLICKS] = _clicks(rng, clicks * spend / (1e6 * clicks), phi)
    return out


def _alarms(sums: np.ndarray, h: float, min_change: float) -> list[int]:
    """Blocks at which the block CUSUM alarms (restarting at 0 after each), judged the
    engine's way: each block against the ``HISTORY`` blocks before it, or before the start
    of the current excursion (at most ``FREEZE_MINUTES`` back: a change is not its own
    baseline)."""
    rs = multipliers(CPC, min_change)
    cusum = Cusum.empty(len(rs))
    fired = []
    for b in range(HISTORY, len(sums)):
        since = cusum.since
        until = b if since is None else max(since, b - FREEZE_MINUTES // SPEND_BLOCK_MINUTES)
        ev = block_evidence(CPC, sums[b], sums[max(until - HISTORY, 0) : until])
        assert ev is not None
        cusum.add(b, ev, judge(ev, rs, h), [h] * len(rs))
        if cusum.alarms():
            fired.append(b)
            cusum = Cusum.empty(len(rs))
            cusum.last = b
    return fired


def test_the_allowance_keeps_the_budget_over_the_fits_chance() -> None:
    """(1 + 2 h m / nu)^(-nu / 2) = e^-h: the false-alarm chance averaged over a
    chi-square fit is the budgeted one; wider for fewer degrees of freedom, 1 for many."""
    for h in (6.0, 12.0, 16.2):
        previous = math.inf
        for dof in (5.0, 16.0, 34.0, 200.0, 1e6):
            m = allowance(h, dof)
            assert (dof / 2) * math.log1p(2 * h * m / dof) == pytest.approx(h, rel=1e-9)
            assert 1 < m < previous
            previous = m
        assert allowance(h, 1e6) == pytest.approx(1, abs=1e-3)
    # One standard error, the margin before, is far short of it at 3 h of blocks.
    assert allowance(16.2, 17) > 2 * (1 + math.sqrt(2 / 17))
    assert allowance(16.2, 0) == math.inf


def test_the_fit_is_unbiased_and_each_group_has_its_own_ratio() -> None:
    """The dispersion fitted to many stationary histories averages the true one, at any
    dispersion; a price step between the two groups of a history is not scatter."""
    rng = np.random.default_rng(3)
    for phi in (0.3, 1.0, 2.5):
        fits = [fit(CPC, _blocks(rng, HISTORY, 20.0, phi)) for _ in range(400)]
        assert all(dof == HISTORY - 2 for _, dof in fits)
        assert np.mean([u for u, _ in fits]) == pytest.approx(phi, rel=0.08)
    steady = _blocks(rng, HISTORY, 40.0, 0.3)
    stepped = steady.copy()
    stepped[: HISTORY - RATIO_BLOCKS, SPEND] *= 1.5  # the older half at other prices
    assert fit(CPC, stepped)[0] == pytest.approx(fit(CPC, steady)[0], rel=0.3)


def test_blocks_without_a_click_are_history() -> None:
    """A small campaign's blocks without a click are kept (selected by their spend only):
    the ratio is all blocks' own, not the blocks with clicks'."""
    rng = np.random.default_rng(4)
    history = _blocks(rng, HISTORY, 1.0, 1.0)
    assert (history[:, CLICKS] == 0).sum() > 5
    block = history[-1]
    ev = block_evidence(CPC, block, history)
    recent = history[-RATIO_BLOCKS:]
    ratio = recent[:, CLICKS].sum() / recent[:, SPEND].sum()
    assert ev is not None and ev.mu * ev.unit == pytest.approx(ratio * block[SPEND])
    assert block_evidence(CPC, block, history[-(MIN_BLOCKS - 1) :]) is None


def test_silence_is_judged_no_finer_than_a_poisson_count() -> None:
    """A block without a click, judged against a fitted dispersion below Poisson: its
    evidence of silence is at most the Poisson one (mu), not mu / dispersion."""
    rng = np.random.default_rng(5)
    history = _blocks(rng, HISTORY, 3.0, 0.2)
    block = history[-1].copy()
    block[CLICKS] = 0
    ev = block_evidence(CPC, block, history)
    assert ev is not None and ev.unit < 0.5
    rs = multipliers(CPC, 0.3)
    h = 16.0
    judged = judge(ev, rs, h)
    silence = judged[rs.index(SILENCE)]
    assert 0 < silence <= ev.mu * ev.unit
    # The moderate magnitudes are judged in the fitted units, widened by the allowance.
    assert ev.dof is not None
    r = rs[0]
    assert judged[0] <= llr(ev, r) / allowance(h, ev.dof) + 1e-12


@pytest.mark.parametrize(
    ("clicks", "phi"), [(1.0, 1.0), (3.0, 1.0), (3.0, 2.5), (40.0, 0.3), (40.0, 1.5)]
)
def test_stationary_blocks_stay_within_the_budget(clicks: float, phi: float) -> None:
    """Stationary blocks at realistic dispersions (a few clicks a block to forty; clicks
    below Poisson where they pay for most of the spend, above where the mix moves), over
    many seeds: alarms at most at the budgeted rate, one per e^h blocks and magnitude (a
    CUSUM's mean time to a false alarm is at least e^h steps). At a low threshold so that
    the rate is measurable (~20x under it here). At a click a block, a history of the
    blocks with clicks only (as before) is over the budget (0.037 a block against 0.020):
    its ratio is too high by the share of blocks without one."""
    h, n, seeds = 5.0, 600, 40
    rate_budget = len(multipliers(CPC, 0.3)) * math.exp(-h)
    judged = fired = 0
    for seed in range(seeds):
        sums = _blocks(np.random.default_rng(1000 + seed), n, clicks, phi)
        fired += len(_alarms(sums, h, 0.3))
        judged += n - HISTORY
    assert fired / judged <= rate_budget


def test_a_price_rise_is_found_within_its_bound() -> None:
    """A 50% price rise (clicks at 1/1.5 of the spend's) at ~45 clicks a block, 0.3x
    Poisson: found in its first blocks, within 2.5x the information bound (h / KL per
    block with the noise known) and a block: the allowance for a fit on 34 degrees of
    freedom is 1.67x, and the CUSUMs are designed for 30% and 60%, not 50%."""
    rng = np.random.default_rng(6)
    h = 16.2
    n, onset = HISTORY + 60, HISTORY + 30
    sums = _blocks(rng, n, 40.0, 0.3)
    risen = sums.copy()
    risen[onset:, CLICKS] = _clicks(rng, 40.0 * sums[onset:, SPEND] / 40e6 / 1.5, 0.3)
    assert not [b for b in _alarms(sums, h, 0.3) if b < onset]
    fired = [b for b in _alarms(risen, h, 0.3) if b >= onset]
    mu = float(sums[onset, SPEND]) / 1e6
    bound = h / (kl_per_count(1 / 1.5) * mu / 0.3)
    assert fired and fired[0] - onset + 1 <= 2.5 * bound + 1
