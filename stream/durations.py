"""Durations as people write them: ``30s``, ``5m``, ``1h30m``, ``1d``, ``+10m``.

One grammar for every place kpimon reads a duration (alert rules' ``for`` and friends,
the simulator's incident offsets and ``--duration``): Prometheus style, units summed,
with an optional leading ``+`` for offsets ("10 minutes from the start").
"""

from __future__ import annotations

import re

_DURATION = re.compile(r"^\+?(?:\d+(?:\.\d+)?[smhd])+$")
_PART = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """``30s``, ``5m``, ``1h30m``, ``1d``, ``+10m`` -> seconds; ValueError otherwise."""
    text = text.strip()
    if not _DURATION.match(text):
        raise ValueError(f"{text!r} is not a duration like 30s, 5m, 1h or 1h30m")
    return sum(float(n) * _UNITS[unit] for n, unit in _PART.findall(text))
