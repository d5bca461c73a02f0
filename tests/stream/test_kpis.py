"""The KPI catalogue: consistent rows, one notion of "worse", ROI judged through ROAS."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stream.kpis import KPI, KPIS, MEASURES, RATIOS, Kpi, unshifted
from stream.settings import DEFAULT_RULES
from stream.windows import kpis


def test_rows_are_consistent_and_names_unique() -> None:
    assert len(KPI) == len(KPIS)
    assert [k.name for k in RATIOS] == list(kpis([1] * len(MEASURES)))  # what windows export
    for kpi in KPIS:
        assert kpi.volume_measure in MEASURES
        if kpi.kind == "rate":
            assert kpi.volume_measure == kpi.denominator  # the trials of the proportion
        if kpi.kind == "count":
            assert kpi.volume_measure == kpi.numerator == kpi.name


@pytest.mark.parametrize(
    ("row", "needle"),
    [
        (dict(numerator="visits"), "unknown measures"),
        (dict(kind="count"), "no denominator"),
        (dict(kind="cost"), "name conversions"),
        (dict(conversions="orders"), "name conversions"),
    ],
)  # fmt: skip
def test_inconsistent_rows_are_refused(row: dict[str, str], needle: str) -> None:
    base = dict(name="x", title="X", kind="rate", numerator="clicks", denominator="impressions",
                bad="down", unit="percent")  # fmt: skip
    with pytest.raises(ValueError, match=needle):
        Kpi(**{**base, **row})  # type: ignore[arg-type]


@given(st.floats(-10, 10, allow_nan=False))
def test_worse_is_the_change_signed_by_the_bad_direction(change: float) -> None:
    assert KPI["cpa"].worse_by(change) == change  # a cost is bad when it rises
    assert KPI["ctr"].worse_by(change) == -change  # a rate is bad when it falls
    assert KPI["clicks"].worse_by(change) == -change  # a volume is bad when it falls
    assert KPI["roi"].worse_by(None) == 0.0


@given(
    st.integers(0, 10**6), st.integers(1, 10**6), st.integers(0, 10**6), st.integers(1, 10**6)
)  # fmt: skip
def test_roi_changes_are_roas_changes(rev1: int, spend1: int, rev0: int, spend0: int) -> None:
    roi, roas = KPI["roi"], KPI["roas"]
    assert unshifted(roi) is roas and unshifted(roas) is roas
    now = [0, 0, 0, 0, 0, rev1, spend1]
    then = [0, 0, 0, 0, 0, rev0, spend0]
    roi_change = roi.change(kpis(now)["roi"], kpis(then)["roi"])
    roas_change = roas.change(kpis(now)["roas"], kpis(then)["roas"])
    if roas_change is None:
        assert rev0 == 0 and roi_change is None  # ROAS 0 (ROI -1): no relative change
    else:
        assert roi_change == pytest.approx(roas_change, rel=1e-9, abs=1e-12)


def test_plain_changes_are_relative_to_the_baseline() -> None:
    assert KPI["cpc"].change(3.0, 2.0) == 0.5
    assert KPI["cpc"].change(3.0, 0.0) is None
    assert KPI["cpc"].change(None, 2.0) is None
    assert KPI["roi"].change(0.0, -1.0) is None
    assert KPI["roi"].change(-0.5, 0.0) == -0.5  # ROAS 1 -> 0.5
    assert KPI["roi"].nonnegative is False and KPI["roas"].nonnegative is True


def test_every_kpi_has_a_default_rule() -> None:
    """Rules may name exactly the catalogue's KPIs, and the shipped rules cover them all."""
    from alerts.rules import RULE_KPIS, load_rules

    assert tuple(KPI) == RULE_KPIS
    assert {r.kpi for r in load_rules(DEFAULT_RULES).rules if r.against == "baseline"} == set(KPI)
