"""One duration grammar for rules (``for: 1h30m``) and the simulator (``at=+10m``)."""

from __future__ import annotations

import pytest

from stream.durations import parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30.0), ("5m", 300.0), ("1h30m", 5400.0), ("1d", 86400.0), ("1.5h", 5400.0),
     ("+10m", 600.0), ("+1h", 3600.0), (" 2h ", 7200.0), ("0s", 0.0), ("1d2h3m4s", 93784.0)],
)  # fmt: skip
def test_both_call_sites_formats(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text", ["", "5", "m", "5 minutes", "-5m", "+", "++5m", "1h-30m", "5M", "1w", "soon"]
)
def test_anything_else_is_refused_with_an_example(text: str) -> None:
    with pytest.raises(ValueError, match="is not a duration like 30s, 5m, 1h or 1h30m"):
        parse_duration(text)
