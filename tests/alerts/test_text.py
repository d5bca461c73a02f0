"""How values read to people (``alerts.text``)."""

from __future__ import annotations

import pytest

from alerts.text import format_value


@pytest.mark.parametrize(
    ("kpi", "value", "shown"),
    [
        ("orders", 0.0, "0.00/min"),
        ("orders", 0.85, "0.85/min"),  # a small shop's rate is not rounded to 1
        ("clicks", 12.34, "12.3/min"),
        ("impressions", 3605.4, "3,605/min"),
        ("ctr", 0.0123, "1.23%"),
        ("cpa", 52.104, "52.10"),
        ("roas", None, "n/a"),
    ],
)
def test_values_read_in_their_unit(kpi: str, value: float | None, shown: str) -> None:
    assert format_value(kpi, value) == shown
