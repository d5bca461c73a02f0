"""Exposition of the alert engine's state: firing alerts and the baselines rules compare with.

Rendered once per tick next to the windows' exposition (``stream.metrics``), in the same
hand-written text format and with its helpers, so a scrape reads both as one page.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from stream.aggregate import Evaluation
from stream.metrics import escape, family

FiringLabels = tuple[str, str, str, str, str]
"""(rule, severity, scope, channel, campaign) of one firing alert."""


def render_alerts(
    firing: Iterable[FiringLabels],
    baselines: Mapping[tuple[str, str, str, str, str], float],
    evaluation: Evaluation,
) -> bytes:
    """``kpimon_alerts_firing`` and ``kpimon_kpi_baseline`` of the scope owner's alert engine.

    Baselines are shown for the series ``kpimon_kpi`` shows (campaigns folded by
    the cardinality guard have none), keyed like it: kpi, scope, channel, campaign, window.
    """
    out: list[str] = []
    family(out, "kpimon_alerts_firing", "gauge", "1 for each firing KPI alert")
    for rule, severity, scope, channel, campaign in sorted(firing):
        out.append(
            f'kpimon_alerts_firing{{rule="{escape(rule)}",severity="{escape(severity)}",'
            f'scope="{scope}",channel="{escape(channel)}",campaign="{escape(campaign)}"}} 1.0\n'
        )
    family(out, "kpimon_kpi_baseline", "gauge",
            "The baseline the alert rules compare the KPI with")  # fmt: skip
    for (kpi, scope, channel, campaign, window), value in sorted(baselines.items()):
        if (scope, channel, campaign) not in evaluation.series:
            continue
        out.append(
            f'kpimon_kpi_baseline{{kpi="{kpi}",scope="{scope}",channel="{escape(channel)}",'
            f'campaign="{escape(campaign)}",window="{window}"}} {float(value)!r}\n'
        )
    return "".join(out).encode()
