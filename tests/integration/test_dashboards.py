"""Every dashboard query, as Grafana would send it, against a real Prometheus.

One scenario (``SCENARIO``): simulated history produced to a real broker before
the worker starts (a backlog it replays), bad input, a CTR incident, live traffic
while the test runs, a targets file with goals for every KPI at every scope and
budgets for global, every channel and the focus campaign (so goal and pacing
panels have series; its day starts within the history, see ``demo_day``), a
producer that starts writing a new campaign id per event once Prometheus watches
(folded by the cardinality guard), the worker scraped every second by a real
Prometheus with the repository's config. Then, for every
panel target and annotation of every committed dashboard, with
``$channel``/``$campaign`` set to a pair that exists, to (channel, All) and to
(All, All) (All is ``.*``, the variables' allValue), and Grafana's
``$__interval``/``$__rate_interval``/``$__range`` substituted: the query must
parse and return at least one finite value. ``offset 7d`` cannot have data in a
fresh Prometheus: such a query must parse, and the same query without the offset
must return data. The folded-ids panel must show the folded ids themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from alerts.rules import DEFAULT_RULES, parse_rules
from alerts.targets import parse_targets
from stream.cli import demo_day
from stream.devstack import free_port, prometheus_process
from stream.durations import parse_duration
from stream.kpis import RATIOS
from stream.simulate import CHANNELS, Incident, SimConfig, Simulator, produce_to_kafka
from tests.conftest import require_binary
from tests.grafana.walk import Query, by_uid, load_dashboards, queries, variables
from tests.helpers import WorkerProcess, create_topics, produce, run, wait_for

pytestmark = pytest.mark.integration

TOPIC_ENV = {"impression": "KPIMON_TOPIC_IMPRESSIONS", "click": "KPIMON_TOPIC_CLICKS",
             "lead": "KPIMON_TOPIC_LEADS", "order": "KPIMON_TOPIC_ORDERS",
             "spend": "KPIMON_TOPIC_SPEND"}  # fmt: skip


def _targets() -> str:
    """A goal for every KPI (in its good direction, one a range) at every scope, and
    budgets for global, every channel and the focus campaign."""
    goals: dict[str, dict[str, float]] = {
        k.name: {"max": 1000.0} if k.bad == "up" else {"min": -0.5 if k.shift else 0.0001}
        for k in RATIOS
    }
    goals["ctr"] = {"min": 0.001, "max": 0.5}
    return yaml.safe_dump({
        "global": {"kpis": goals, "budget": {"daily": 50000}},
        "channels": {ch: {"kpis": goals, "budget": {"daily": 10000}} for ch in CHANNELS},
        "campaigns": {"c0": {"budget": {"daily": 5000}}, "*": {"kpis": goals}},
    })  # fmt: skip


@dataclass(frozen=True)
class Scenario:
    """The traffic the dashboards are checked against: adjust it here."""

    seed: int = 11
    campaigns: int = 8
    rate: float = 60.0  # events/s
    history: str = "150m"  # produced before the worker starts: 1h windows and their baselines
    # Counted from the start of the history: c0's CTR drops 8 min before live traffic
    # starts and stays down, so a KPI alert can fire while the test runs.
    focus: str = "c0"  # the biggest campaign; the incident's, so its drill-down has alerts
    incidents: tuple[str, ...] = ("ctr_drop:campaign=c0:at=+142m:by=70%",)
    bad_input: tuple[bytes, ...] = (b"{oops", b"\xff\xfe", b"[]")
    worker_env: dict[str, str] = field(
        default_factory=lambda: {"KPIMON_EVAL_INTERVAL_SECONDS": "1"}
    )
    targets: str = field(default_factory=_targets)
    # The simulation's campaign ids (at most 14 with the unattributed ones) fit under
    # the guard; then a producer writes its click ids into campaign_id: they fill the
    # guard and the rest are folded into __other__ of this channel.
    max_campaigns: int = 16
    new_ids: int = 24
    folding_channel: str = "search"
    # The default rules (every KPI's baseline is exported) plus a quick one, so the
    # incident fires within the test, not after 10 min.
    rules: str = (
        DEFAULT_RULES.read_text()
        + """
  - name: ctr_drop_fast
    kpi: ctr
    scopes: [global, channel, campaign]
    min_change: 0.2
    budget_share: 100
    for: 0s
    severity: ticket
    runbook_url: docs/runbooks/rate-drop.md
"""
    )


SCENARIO = Scenario()
SCRAPE_S = 1  # the test Prometheus' scrape interval (the datasource's timeInterval)
RANGE_S = 300  # the time range the panels are queried over
MAX_POINTS = 300  # Grafana's maxDataPoints for a panel about this wide


class LiveTraffic:
    """The simulator's stream continued in real time on a background thread."""

    def __init__(self, sim: Simulator, bootstrap: str, topics: dict[str, str], start_s: float):
        self._args = (sim, bootstrap, topics, start_s)
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[int] | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="live-traffic", daemon=True)

    def _run(self) -> None:
        sim, bootstrap, topics, start_s = self._args
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._task = loop.create_task(produce_to_kafka(
            sim, bootstrap=bootstrap, topics=topics, start_s=start_s, seconds=None,
            realtime=True))  # fmt: skip
        self._ready.set()
        try:
            loop.run_until_complete(self._task)
        except asyncio.CancelledError:
            pass
        except BaseException as exc:  # surfaced by stop()
            self._error = exc
        finally:
            loop.close()

    def start(self) -> LiveTraffic:
        self._thread.start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is not None and self._task is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join(30)
        if self._error is not None:
            raise AssertionError(f"live traffic failed: {self._error!r}")


@dataclass(frozen=True)
class Stack:
    prometheus: str
    worker: WorkerProcess
    impressions_topic: str
    bootstrap: str


@pytest.fixture
def dashboard_stack(
    tmp_path: Path,
    kafka_bootstrap: str,
    worker_env: dict[str, str],
    start_worker: Callable[..., WorkerProcess],
    alertmanager_url: str,
) -> Iterator[Stack]:
    """SCENARIO on a real broker, one worker, and a Prometheus scraping it every second."""
    require_binary("prometheus")
    scenario = SCENARIO
    parse_rules(scenario.rules)  # a typo here would silently leave the worker without rules
    rules = tmp_path / "rules.yml"
    rules.write_text(scenario.rules)
    parse_targets(scenario.targets)
    targets = tmp_path / "targets.yml"
    targets.write_text(scenario.targets)
    zone, _ = demo_day(time.time())  # "today" began 70-130 min ago: never an empty day
    topics = {kind: worker_env[env] for kind, env in TOPIC_ENV.items()}
    sim = Simulator(SimConfig(
        seed=scenario.seed, campaigns=scenario.campaigns, rate=scenario.rate,
        incidents=[Incident.parse(spec) for spec in scenario.incidents]))  # fmt: skip
    history = int(parse_duration(scenario.history))
    start = time.time() - history
    run(create_topics(kafka_bootstrap, topics.values()))
    run(produce_to_kafka(sim, bootstrap=kafka_bootstrap, topics=topics, start_s=start,
                         seconds=history, realtime=False))  # fmt: skip
    run(produce(kafka_bootstrap, [(topics["click"], None, raw) for raw in scenario.bad_input]))
    live = LiveTraffic(sim, kafka_bootstrap, topics, start + history).start()
    try:
        worker = start_worker(
            KPIMON_RULES=str(rules), KPIMON_ALERTMANAGER_URL=alertmanager_url,
            KPIMON_MAX_CAMPAIGNS=str(scenario.max_campaigns), KPIMON_TARGETS=str(targets),
            KPIMON_TIMEZONE=zone, **scenario.worker_env,
        )  # fmt: skip
        worker.wait_ready()
        port = free_port()
        prometheus = prometheus_process(
            tmp_path / "prometheus", port=port, alertmanager=None, interval=f"{SCRAPE_S}s",
            scrape_targets=[f"127.0.0.1:{worker.env['KPIMON_METRICS_PORT']}"],
        )  # fmt: skip
        prometheus.start()
        try:
            yield Stack(f"http://127.0.0.1:{port}", worker, topics["impression"], kafka_bootstrap)
        finally:
            prometheus.stop()
    finally:
        live.stop()


# --------------------------------------------------------------------------- Prometheus


def _api(base: str, path: str, params: dict[str, str] | list[tuple[str, str]]) -> Any:
    """Prometheus' HTTP API (queries by POST, like the datasource); errors raise its message."""
    encoded = urllib.parse.urlencode(params)
    post = path.startswith("/api/v1/query")
    url = f"{base}{path}" if post else f"{base}{path}?{encoded}"
    try:
        with urllib.request.urlopen(
            url, data=encoded.encode() if post else None, timeout=10
        ) as resp:
            return json.loads(resp.read())["data"]
    except urllib.error.HTTPError as exc:
        body = json.loads(exc.read() or b"{}")
        raise ValueError(body.get("error", str(exc))) from None


def _finite(values: list[list[Any]]) -> bool:
    return any(math.isfinite(float(v)) for _, v in values)


def _has_data(base: str, expr: str, *, instant: bool, now: float) -> bool:
    if instant:
        result = _api(base, "/api/v1/query", {"query": expr, "time": f"{now}"})["result"]
        return any(_finite([s["value"]]) for s in result)
    result = _api(base, "/api/v1/query_range", {
        "query": expr, "start": f"{now - RANGE_S}", "end": f"{now}", "step": f"{_interval()}s",
    })["result"]  # fmt: skip
    return any(_finite(s["values"]) for s in result)


def _interval() -> int:
    """Grafana's $__interval: range / max data points, at least the scrape interval."""
    return max(math.ceil(RANGE_S / MAX_POINTS), SCRAPE_S)


def _rate_interval() -> int:
    """Grafana's $__rate_interval: max($__interval + scrape interval, 4 x scrape interval)."""
    return max(_interval() + SCRAPE_S, 4 * SCRAPE_S)


def _grafana_escape(value: str) -> str:
    """How Grafana's Prometheus datasource puts a chosen value into a regex matcher."""
    return re.sub(r"([\\$^*{}\[\]'+?.()|])", r"\\\\\1", value)


def interpolate(expr: str, selection: dict[str, str]) -> str:
    """The query as Grafana sends it: built-in intervals, then the dashboard variables."""
    expr = re.sub(r"\$__rate_interval\b", f"{_rate_interval()}s", expr)
    expr = re.sub(r"\$__interval\b", f"{_interval()}s", expr)
    expr = re.sub(r"\$__range\b", f"{RANGE_S}s", expr)
    for name, value in selection.items():
        template = value.replace("\\", "\\\\")  # re.sub's replacement is a template
        expr = re.sub(rf"\$(?:{name}\b|\{{{name}\}})", template, expr)
    assert "$" not in expr, f"uninterpolated variable in {expr}"
    return expr


def _label_values(base: str, definition: str, selection: dict[str, str]) -> list[str]:
    """A ``label_values(selector, label)`` variable, resolved as Grafana does."""
    match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", definition)
    assert match, f"unsupported variable query {definition}"
    selector, label = interpolate(match[1], selection), match[2]
    values: list[str] = _api(base, f"/api/v1/label/{label}/values", [("match[]", selector)])
    return values


def _check(base: str, query: Query, selection: dict[str, str], now: float) -> str | None:
    """None when the query parses and has data, else why not."""
    expr = interpolate(query.expr, selection)
    without_offset = re.sub(r"\s+offset\s+\d+[smhdwy]", "", expr)
    try:
        if without_offset != expr:
            _has_data(base, expr, instant=query.instant, now=now)  # must parse
        if _has_data(base, without_offset, instant=query.instant, now=now):
            return None
        problem = "no data"
    except ValueError as exc:
        problem = f"does not parse: {exc}"
    where = ", ".join(f"{k}={v}" for k, v in selection.items()) or "no variables"
    return f"{query.where} [{where}]: {problem}: {expr}"


def _metrics_without_series(base: str, failures: list[str]) -> list[str]:
    existing = set(_api(base, "/api/v1/label/__name__/values", []))
    named = {m for f in failures for m in re.findall(r"\b(kpimon_[a-z_]+)", f)}
    bare = {re.sub(r"_(bucket|count|sum)$", "", m) for m in named}
    return sorted(m for m in bare if m not in existing and f"{m}_bucket" not in existing)


def _vector(base: str, expr: str) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = _api(base, "/api/v1/query", {"query": expr})["result"]
    return result


def _fold_new_ids(stack: Stack, scenario: Scenario) -> None:
    """A producer starts writing a new id per event into campaign_id, once Prometheus has
    seen the channel's folded counter at 0: the guard fills up and folds the rest."""
    prom, channel = stack.prometheus, scenario.folding_channel
    counter = f'kpimon_segments_folded_total{{kind="campaign",channel="{channel}"}}'
    wait_for(lambda: _vector(prom, f"{counter} == 0"), timeout=60, what=f"{counter} at 0")
    now_ms = int(time.time() * 1000)
    events = [
        {"event_id": f"fold-{i}", "ts": now_ms, "campaign_id": f"k-{i}", "channel": channel,
         "cost": 0.002}
        for i in range(scenario.new_ids)
    ]  # fmt: skip
    topic = stack.impressions_topic
    run(produce(stack.bootstrap, [(topic, None, json.dumps(e).encode()) for e in events]))
    # The guard holds: exactly max_campaigns campaign series besides the __other__ ones.
    kept = (
        'count(group by (channel, campaign) (kpimon_window_measure{scope="campaign",'
        'campaign!="__other__",measure="spend",window="5m"}))'
    )
    limit = scenario.max_campaigns
    wait_for(lambda: _vector(prom, f"{kept} == {limit}"), timeout=60,
             what=f"{limit} kept campaign series")  # fmt: skip
    assert not _vector(prom, f"{kept} > {limit}")


# --------------------------------------------------------------------------- the test


def test_every_dashboard_query_returns_data(dashboard_stack: Stack) -> None:
    prom = dashboard_stack.prometheus
    scenario = SCENARIO

    def ready() -> bool:
        now = time.time()
        return all(_has_data(prom, expr, instant=True, now=now) for expr in (
            'kpimon_window_measure{scope="campaign",measure="new_customers",window="1h"} > 0',
            f"rate(kpimon_event_to_metric_latency_seconds_count[{_rate_interval()}s]) > 0",
            f"rate(kpimon_events_total[{_rate_interval()}s]) > 0",
        ))  # fmt: skip

    wait_for(ready, timeout=120, what="Prometheus to scrape window sums and live traffic")
    _fold_new_ids(dashboard_stack, scenario)

    # The drill-down's variables, resolved like Grafana: channel, then campaigns of it.
    drill = variables(by_uid()["kpimon-campaign"])
    channels = _label_values(prom, drill["channel"]["query"], {})
    assert len(channels) >= 2, channels
    # The drill-down opens on the incident's campaign, as its alert's link would.
    focus_query = (
        f'kpimon_window_measure{{scope="campaign",campaign="{scenario.focus}",'
        'measure="new_customers",window="1h"} > 0'
    )
    focus = wait_for(
        lambda: _api(prom, "/api/v1/query", {"query": focus_query})["result"],
        timeout=60, what=f"campaign {scenario.focus} with new customers",
    )  # fmt: skip
    channel, campaign = (focus[0]["metric"][k] for k in ("channel", "campaign"))
    assert channel in channels
    of_channel = _label_values(prom, drill["campaign"]["query"], {"channel": channel})
    of_all = _label_values(prom, drill["campaign"]["query"], {"channel": ".*"})
    assert campaign in of_channel and set(of_channel) < set(of_all)

    selections = [
        {"channel": _grafana_escape(channel), "campaign": _grafana_escape(campaign)},
        {"channel": _grafana_escape(channel), "campaign": ".*"},
        {"channel": ".*", "campaign": ".*"},
    ]
    todo = [
        (query, selection if "$" in query.expr.replace("$__", "") else {})
        for board in load_dashboards().values()
        for query in queries(board)
        for selection in (selections if variables(board) else [{}])
    ]
    todo = list({(q.where, q.expr, tuple(s.items())): (q, s) for q, s in todo}.values())
    assert len(todo) > 100

    # Series appear one scrape at a time: retry what failed, for a bounded while.
    problems: list[str] = []

    def all_have_data() -> bool:
        nonlocal todo, problems
        now = time.time()
        checked = [(q, s, _check(prom, q, s, now)) for q, s in todo]
        todo = [(q, s) for q, s, why in checked if why]
        problems = [why for _, _, why in checked if why]
        return not problems

    with contextlib.suppress(AssertionError):  # the message below says more than a timeout
        # The global baselines come last: the detectors judge a segment once its baseline
        # has history, which the worker reaches after replaying the backlog (slower in CI).
        wait_for(all_have_data, timeout=120, interval=2, what="every query to return data")
    missing = _metrics_without_series(prom, problems) if problems else []
    assert not problems, (
        f"{len(problems)} dashboard queries without data "
        f"(metrics with no series at all: {', '.join(missing) or 'none'}):\n" + "\n".join(problems)
    )

    # The folded-ids panel shows the producer's new ids (not only zeros), by channel.
    (folded,) = [q for q in queries(by_uid()["kpimon-pipeline"]) if "Folded ids" in q.where]
    least = scenario.new_ids - scenario.max_campaigns + scenario.campaigns  # real ids came first
    shown = wait_for(lambda: _vector(prom, f"{folded.expr} >= {least}"), timeout=30,
                     what=f"at least {least} folded ids on the panel")  # fmt: skip
    assert [s["metric"] for s in shown] == [
        {"kind": "campaign", "channel": scenario.folding_channel}
    ]
