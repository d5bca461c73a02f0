"""The KPI catalogue as the mappings and sets tests compare with: derived, never spelt."""

from __future__ import annotations

from stream.kpis import KPIS, RATIOS, Direction

KPI_RATIOS: dict[str, tuple[int, int]] = {k.name: (k.num, k.den) for k in RATIOS}
"""Ratio KPI -> (numerator, denominator) measure indices."""
KPI_BAD_DIRECTION: dict[str, Direction] = {k.name: k.bad for k in RATIOS}
RATE_KPIS: frozenset[str] = frozenset(k.name for k in KPIS if k.kind == "rate")
COST_KPIS: frozenset[str] = frozenset(k.name for k in KPIS if k.kind == "cost")
COUNT_KPIS: dict[str, int] = {k.name: k.num for k in KPIS if k.kind == "count"}
"""Count KPI -> the measure (index) it counts."""
