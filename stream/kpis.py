"""The KPI catalogue: the measures kpimon sums and every KPI derived from them, written once.

Each KPI is one row of :data:`KPIS`, and everything else derives from it: the window
KPIs (``stream.windows.kpis``), which KPIs rules may name and their kind
(``alerts.rules``), the test each kind gets (``alerts.detectors``), alert text
(``alerts.text``) and the dashboards' PromQL (``grafana.kpis``). So adding or changing a
KPI is one edit here, and the modules cannot disagree about it.

Pure module, no imports from the rest of kpimon: the stream core and ``alerts`` both read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

MEASURES: tuple[str, ...] = (
    "impressions", "clicks", "leads", "orders", "new_customers", "revenue", "spend",
)  # fmt: skip
IMPRESSIONS, CLICKS, LEADS, ORDERS, NEW_CUSTOMERS, REVENUE, SPEND = range(len(MEASURES))
MONEY = frozenset({REVENUE, SPEND})
TRAILING = frozenset({LEADS, ORDERS, NEW_CUSTOMERS, REVENUE})
"""Measures that trail the clicks they follow (a lead or an order comes minutes after its
click): a ratio of one to clicks is only meaningful over clicks that have had time to
convert."""
LUMPY = frozenset({SPEND})
"""Measures reported in lumps (ad platforms report spend per period, after the fact): a
minute of it says little, a window holding several reports says how much was spent."""
MICROS = 1_000_000
N_MEASURES = len(MEASURES)

Kind = Literal["rate", "cost", "count"]
Direction = Literal["up", "down"]
Unit = Literal["percent", "currency", "ratio", "count"]


def measure_value(index: int, raw: int) -> float:
    """A measure in its exported unit (money in reporting currency, counts as is)."""
    return raw / MICROS if index in MONEY else float(raw)


@dataclass(frozen=True)
class Kpi:
    """One KPI: what it is a ratio of, which way is bad, and how it is judged and shown.

    ``kind`` picks the detector's test: ``rate`` (a proportion: two-proportion test),
    ``cost`` (a heavy-tailed ratio of money: volume floors plus a test of the counts
    behind it) or ``count`` (a measure itself: Poisson).
    """

    name: str  # the ``kpi`` label value and the name rules use
    title: str
    kind: Kind
    numerator: str  # a measure
    denominator: str | None  # a measure; None for a count (the numerator itself)
    bad: Direction  # the direction that alerts; not configurable per rule
    unit: Unit
    conversions: str | None = None
    """Cost KPIs: the count behind the ratio, which ``min_conversions`` gates (ROAS and
    ROI are driven by the orders behind the revenue, not by the spend they divide by)."""
    shift: float = 0.0
    """Added to the ratio (ROI = revenue / spend - 1). A shifted KPI hovers around 0,
    where a relative change means nothing, so its changes are relative to the ratio."""

    def __post_init__(self) -> None:
        measures = [self.numerator, self.denominator, self.conversions]
        unknown = [m for m in measures if m is not None and m not in MEASURES]
        if unknown:
            raise ValueError(f"KPI {self.name}: unknown measures {unknown}")
        if (self.kind == "count") != (self.denominator is None):
            raise ValueError(f"KPI {self.name}: counts, and only counts, have no denominator")
        if (self.kind == "cost") != (self.conversions is not None):
            raise ValueError(f"KPI {self.name}: cost KPIs, and only they, name conversions")

    @property
    def num(self) -> int:
        """Index of the numerator in :data:`MEASURES`."""
        return MEASURES.index(self.numerator)

    @property
    def den(self) -> int:
        """Index of the denominator in :data:`MEASURES` (a count: its own index)."""
        return MEASURES.index(self.denominator or self.numerator)

    @property
    def volume_measure(self) -> str:
        """The count a rule's volume floor applies to: a rate's trials (its denominator),
        a count itself, a cost KPI's conversions."""
        if self.kind == "rate":
            assert self.denominator is not None
            return self.denominator
        return self.conversions or self.numerator

    @property
    def volume_index(self) -> int:
        """Index of :attr:`volume_measure` in :data:`MEASURES`."""
        return MEASURES.index(self.volume_measure)

    @property
    def nonnegative(self) -> bool:
        """Never below 0 (ratios and counts of non-negative sums), so it cannot fall >100%."""
        return self.shift >= 0

    def worse_by(self, change: float | None) -> float:
        """``change`` signed so that positive means worse (negative: it improved; 0: none)."""
        if change is None:
            return 0.0
        return change if self.bad == "up" else -change

    def relative_to(self, base: float) -> float | None:
        """What a change from ``base`` is relative to: ``|base|``, or for a shifted KPI the
        ratio it is shifted from (ROI judged as ROAS = 1 + ROI); None when that is 0."""
        if self.shift:
            ratio = base - self.shift
            return ratio if ratio > 0 else None
        return abs(base) if base else None

    def change(self, value: float | None, base: float | None) -> float | None:
        """Relative change from ``base`` to ``value``; None when there is no relative change."""
        if value is None or base is None:
            return None
        scale = self.relative_to(base)
        return None if scale is None else (value - base) / scale


KPIS: tuple[Kpi, ...] = (
    Kpi("ctr", "CTR", "rate", "clicks", "impressions", "down", "percent"),
    Kpi("conversion_rate", "Conversion rate", "rate", "orders", "clicks", "down", "percent"),
    Kpi("lead_rate", "Lead rate", "rate", "leads", "clicks", "down", "percent"),
    Kpi("cpc", "CPC", "cost", "spend", "clicks", "up", "currency", "clicks"),
    Kpi("cpl", "CPL", "cost", "spend", "leads", "up", "currency", "leads"),
    Kpi("cpa", "CPA", "cost", "spend", "orders", "up", "currency", "orders"),
    Kpi("cac", "CAC", "cost", "spend", "new_customers", "up", "currency", "new_customers"),
    Kpi("roas", "ROAS", "cost", "revenue", "spend", "down", "ratio", "orders"),
    Kpi("roi", "ROI", "cost", "revenue", "spend", "down", "percent", "orders", shift=-1.0),
    Kpi("aov", "AOV", "cost", "revenue", "orders", "down", "currency", "orders"),
    # Volume measures: a drop is a volume loss or a tracking outage.
    Kpi("impressions", "Impressions", "count", "impressions", None, "down", "count"),
    Kpi("clicks", "Clicks", "count", "clicks", None, "down", "count"),
    Kpi("leads", "Leads", "count", "leads", None, "down", "count"),
    Kpi("orders", "Orders", "count", "orders", None, "down", "count"),
)
"""Every KPI, ratios first (the order of exported series and of error messages)."""

KPI: dict[str, Kpi] = {k.name: k for k in KPIS}
RATIOS: tuple[Kpi, ...] = tuple(k for k in KPIS if k.denominator is not None)
"""The KPIs computed from a window's sums and exported as ``kpimon_kpi``."""


def unshifted(kpi: Kpi) -> Kpi:
    """The plain ratio a shifted KPI is shifted from (ROI -> ROAS); the KPI itself if none."""
    if not kpi.shift:
        return kpi
    (plain,) = [
        k for k in RATIOS if (k.num, k.den) == (kpi.num, kpi.den) and not k.shift
    ]  # fmt: skip
    return plain
