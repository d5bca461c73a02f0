"""Pipeline health, for on-call: is data flowing, complete and on time, and do alerts go out.

Counters are summed across workers (each exports its own share); the scope
owner's gauges (watermark, latency) come from one worker at a time, hence max.
Panels that match a runbook link to it; a text panel lists them all.
"""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import text
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models.text import TextMode

from grafana.panels import (
    PIPELINE_UID,
    REFRESH,
    RUNBOOKS,
    TAGS,
    TITLES,
    Runbooks,
    dashboard_links,
    finish,
    override,
    query,
    stat_panel,
    timeseries_panel,
    value_map,
)
from grafana.wall import FRESH_STEPS

RATE = "[$__rate_interval]"
LATENCY = "kpimon_event_to_metric_latency_seconds_bucket"


def _runbook_panel(runbooks: Runbooks) -> text.Panel:
    rows = "\n".join(
        f"| {purpose} | [{name}]({runbooks.url(name)}) |" for name, purpose in RUNBOOKS.items()
    )
    content = (
        "| when | runbook |\n|---|---|\n" + rows + "\n\n"
        "Alerts carry their runbook too (`runbook_url`)."
    )
    return (
        text.Panel().title("Runbooks").mode(TextMode.MARKDOWN).content(content).span(12).height(10)
    )


def build(runbooks: Runbooks) -> dm.Dashboard:
    up = stat_panel(
        "Workers",
        [query('up{job="kpimon"}', "{{instance}}")],
        unit="none",
        steps=[(None, "red"), (1.0, "green")],
        mappings=[value_map(**{"0": ("DOWN", "red"), "1": ("UP", "green")})],
        sparkline=False,
        text_mode=common.BigValueTextMode.VALUE_AND_NAME,
        span=6,
        height=5,
        description="Prometheus' scrape of each worker's /metrics (up == 0: down).",
    ).links([runbooks.link("worker-down")])
    last_event = stat_panel(
        "Last event, by type",
        [query("time() - max by (type) (kpimon_last_event_timestamp_seconds)", "{{type}}")],
        unit="s",
        steps=FRESH_STEPS,
        decimals=0,
        sparkline=False,
        text_mode=common.BigValueTextMode.VALUE_AND_NAME,
        span=10,
        height=5,
        description="Seconds since the event time of the newest valid event of each type.",
    ).links([runbooks.link("no-events")])
    watermark = stat_panel(
        "Watermark lag",
        [query("max(kpimon_watermark_lag_seconds)", "watermark lag")],
        unit="s",
        steps=[(None, "green"), (120.0, "orange"), (600.0, "red")],
        decimals=0,
        span=4,
        height=5,
        description="Wall clock minus the event-time watermark the windows end at.",
    ).links([runbooks.link("watermark-lag")])
    mode = stat_panel(
        "Mode",
        [query("max(kpimon_replaying) + 2 * max(kpimon_restating)", "mode")],
        unit="none",
        steps=[(None, "green"), (1.0, "orange")],
        mappings=[
            value_map(
                **{
                    "0": ("live", "green"),
                    "1": ("replaying", "orange"),
                    "2": ("restating", "orange"),
                    "3": ("replaying, restating", "orange"),
                }
            )
        ],
        sparkline=False,
        span=4,
        height=5,
        description=(
            "Replaying: a worker works through a backlog; restating: late events rewrite "
            "minutes already shown while a worker works through them. Alerts are held in both."
        ),
    )
    events = timeseries_panel(
        "Events / s, by type",
        [query(f"sum by (type) (rate(kpimon_events_total{RATE}))", "{{type}}")],
        unit="cps",
        span=12,
        height=8,
        description="Valid events consumed (before dedup), all workers.",
    )
    rejected = timeseries_panel(
        "Rejected / s, by reason",
        [query(f"sum by (reason) (rate(kpimon_events_rejected_total{RATE}))", "{{reason}}")],
        unit="cps",
        span=12,
        height=8,
        description="Inputs sent to the dead-letter topic (kpimon.dlq), by reason.",
    ).links([runbooks.link("events-rejected")])
    late_dup = timeseries_panel(
        "Out of order, too late and duplicate / s",
        [
            query(
                f"sum by (type) (rate(kpimon_events_out_of_order_total{RATE}))",
                "out of order {{type}}",
            ),
            query(f"sum by (type) (rate(kpimon_events_late_total{RATE}))", "too late {{type}}"),
            query(
                f"sum by (type) (rate(kpimon_events_duplicate_total{RATE}))", "duplicate {{type}}"
            ),
        ],
        unit="cps",
        span=12,
        height=8,
        description=(
            "Out of order: counted into a minute already shown (its windows restated). "
            "Too late: older than its type's dedup horizon against the watermark, not counted, "
            "dead-lettered as too_late. Duplicate: same dedup key within its horizon."
        ),
    )
    transactions = timeseries_panel(
        "Kafka transactions / s",
        [
            query(f"sum(rate(kpimon_transactions_total{RATE}))", "committed"),
            query(f"sum(rate(kpimon_transactions_aborted_total{RATE}))", "aborted"),
        ],
        unit="cps",
        span=12,
        height=8,
        description="Each worker loop is one transaction; aborted ones are redone.",
    ).override_by_name(*override("aborted", {"color": {"mode": "fixed", "fixedColor": "red"}}))
    lag = timeseries_panel(
        "Watermark lag",
        [
            query("max(kpimon_watermark_lag_seconds)", "watermark lag"),
            query("max(kpimon_replaying)", "replaying"),
        ],
        unit="s",
        span=8,
        height=8,
        description="Lag of the windows behind the wall clock; replaying (0/1) on the right.",
    ).override_by_name(
        *override("replaying", {"custom.axisPlacement": "right", "unit": "none", "max": 1})
    )
    consumer_lag = timeseries_panel(
        "Consumer lag (records), by topic",
        [query("sum by (topic) (kpimon_consumer_lag_records)", "{{topic}}")],
        unit="short",
        span=6,
        height=8,
        description="Records of the input topics not yet consumed by the workers.",
    ).links([runbooks.link("consumer-lag")])
    stalled = stat_panel(
        "Stalled partitions",
        # 0 (not "no data") while workers are up and none is stalled.
        [
            query(
                'count(kpimon_partition_stalled > 0) or 0 * count(up{job="kpimon"} == 1)',
                "stalled",
            )
        ],
        unit="none",
        steps=[(None, "green"), (1.0, "red")],
        decimals=0,
        span=4,
        height=8,
        description="Partitions paused on a record batch a worker cannot read (codec "
        "missing, corrupt): their events wait, the KPIs wait for them.",
    ).links([runbooks.link("partition-stalled")])
    latency = timeseries_panel(
        "Event → metric latency",
        [
            query(f"histogram_quantile({q}, sum by (le) (rate({LATENCY}{RATE})))", f"p{q * 100:g}")
            for q in (0.5, 0.9, 0.99)
        ],
        unit="s",
        span=6,
        height=8,
        description="From an event's append to its topic to its arrival in the KPI state.",
    )
    folded = timeseries_panel(
        "Folded ids / h, by kind and channel",
        # What KpimonSegmentsFolded judges: increase() also rides over the counter
        # moving to a new scope owner (a new series) and restored after a restart.
        [
            query(
                "sum by (kind, channel) (increase(kpimon_segments_folded_total[1h]))",
                "{{kind}} {{channel}}",
            )
        ],
        unit="short",
        span=16,
        height=8,
        description=(
            "New ids folded into __other__ in the last hour because the cardinality guard "
            "was full (KPIMON_MAX_CAMPAIGNS, KPIMON_MAX_CHANNELS): for campaigns, by the "
            "channel they came from. Their events still count in every sum."
        ),
    ).links([runbooks.link("cardinality")])
    kept = stat_panel(
        "Series kept, by scope",
        # group by: while the scope moves between workers both export it for a scrape.
        [
            query(
                "count by (scope) (group by (scope, channel, campaign) "
                '(kpimon_window_measure{measure="spend",window="5m"}))',
                "{{scope}}",
            )
        ],
        unit="none",
        steps=[(None, "blue")],
        decimals=0,
        text_mode=common.BigValueTextMode.VALUE_AND_NAME,
        span=8,
        height=8,
        description=(
            "Series with KPIs: the global one, channels and campaigns (each channel's "
            "__other__ included). Memory, evaluation time and scrape size grow with them."
        ),
    ).links([runbooks.link("cardinality")])
    failures = stat_panel(
        "Notification errors",
        # 0 (not "no data") when notifications exist and none failed; nothing when none exist.
        [
            query(
                'sum(increase(kpimon_notifications_total{outcome="error"}[$__range])) '
                "or 0 * sum(increase(kpimon_notifications_total[$__range]))",
                "errors",
                instant=True,
            )
        ],
        unit="none",
        steps=[(None, "green"), (1.0, "red")],
        decimals=0,
        sparkline=False,
        span=6,
        height=8,
        description="Failed deliveries to Slack, Alertmanager or Kafka in the time range.",
    ).links([runbooks.link("notification-failures")])
    notifications = timeseries_panel(
        "Notifications / min",
        [
            query(
                f"sum by (channel, outcome) (rate(kpimon_notifications_total{RATE})) * 60",
                "{{channel}} {{outcome}}",
            )
        ],
        unit="short",
        span=10,
        height=8,
        description="Alert notifications by sink and outcome (sent, rate_limited, error).",
    ).links([runbooks.link("notification-failures")])
    outbox = timeseries_panel(
        "Outbox pending",
        [query("sum by (channel) (kpimon_outbox_pending)", "{{channel}}")],
        unit="short",
        span=8,
        height=8,
        description="Notifications waiting for delivery (a sink outage never drops them).",
    ).links([runbooks.link("notification-failures")])
    scrape = timeseries_panel(
        "Scrape duration",
        [query('scrape_duration_seconds{job="kpimon"}', "{{instance}}")],
        unit="s",
        span=12,
        height=10,
        description="How long Prometheus takes to scrape each worker's /metrics.",
    )
    board = (
        db.Dashboard(TITLES[PIPELINE_UID])
        .uid(PIPELINE_UID)
        .description("On-call view of the kpimon pipeline: flow, quality, lag, alert delivery.")
        .tags(TAGS)
        .readonly()
        .time("now-3h", "now")
        .refresh(REFRESH)
        .tooltip(dm.DashboardCursorSync.CROSSHAIR)
        .links(dashboard_links(PIPELINE_UID))
        .with_panel(up)
        .with_panel(last_event)
        .with_panel(watermark)
        .with_panel(mode)
        .with_row(db.Row("Events"))
        .with_panel(events)
        .with_panel(rejected)
        .with_panel(late_dup)
        .with_panel(transactions)
        .with_row(db.Row("Lag and latency"))
        .with_panel(lag)
        .with_panel(consumer_lag)
        .with_panel(stalled)
        .with_panel(latency)
        .with_row(db.Row("Cardinality"))
        .with_panel(folded)
        .with_panel(kept)
        .with_row(db.Row("Alert delivery"))
        .with_panel(failures)
        .with_panel(notifications)
        .with_panel(outbox)
        .with_row(db.Row("Prometheus and runbooks"))
        .with_panel(scrape)
        .with_panel(_runbook_panel(runbooks))
    )
    return finish(board)
