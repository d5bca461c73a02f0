"""The rules in a real Prometheus scraping a real worker; the runbooks' queries and silences.

``scope:kpimon_kpi:ratio`` (recomputed in PromQL from the window sums) must
equal the worker's own ``kpimon_kpi`` for every series, and be absent exactly
where the worker's KPI is absent.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import subprocess
import time
import urllib.error
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from stream.simulate import SimConfig, Simulator
from stream.windows import WINDOWS
from tests.conftest import require_binary
from tests.helpers import (
    REPO,
    WorkerProcess,
    get_json,
    group_lag,
    produce,
    prom_query,
    run,
    wait_for,
)
from tests.kpis import KPI_RATIOS

pytestmark = pytest.mark.integration

TOPIC_ENV = {"impression": "KPIMON_TOPIC_IMPRESSIONS", "click": "KPIMON_TOPIC_CLICKS",
             "lead": "KPIMON_TOPIC_LEADS", "order": "KPIMON_TOPIC_ORDERS",
             "spend": "KPIMON_TOPIC_SPEND"}  # fmt: skip
RUNBOOKS = REPO / "docs" / "runbooks"
Series = dict[frozenset[tuple[str, str]], float]


def _series(result: list[dict[str, Any]]) -> Series:
    """Instant-vector samples keyed by their labels, without name, job and instance."""
    drop = {"__name__", "job", "instance"}
    return {
        frozenset((k, v) for k, v in item["metric"].items() if k not in drop): float(
            item["value"][1]
        )
        for item in result
    }


def _messages(env: dict[str, str], now_s: float) -> list[tuple[str, bytes | None, bytes | None]]:
    """Three minutes of simulated traffic ending two minutes ago, one complete funnel, and a
    campaign on its own channel with impressions only (no clicks, no cost), whose other KPIs
    must be absent."""
    sim = Simulator(SimConfig(seed=5, campaigns=6, rate=30))
    messages: list[tuple[str, bytes | None, bytes | None]] = []
    for kind, event in sim.events(now_s - 300, 180):
        key = event.get("campaign_id")
        messages.append((env[TOPIC_ENV[kind]], key and key.encode(), json.dumps(event).encode()))
    ts = int((now_s - 150) * 1000)
    # One complete funnel (two orders, one from a new customer, one in EUR): every KPI has
    # a value, and cac (spend / new customers) differs from cpa (spend / orders).
    funnel: list[tuple[str, dict[str, Any]]] = [
        ("impression", {"event_id": "f-i", "cost": 0.5}),
        ("click", {"event_id": "f-k1", "click_id": "f-k1", "cost": 0.75}),
        ("click", {"event_id": "f-k2", "click_id": "f-k2", "cost": 0.25}),
        ("lead", {"event_id": "f-l", "click_id": "f-k1", "user_id": "u1"}),
        ("order", {"event_id": "f-o", "order_id": "A-1", "click_id": "f-k2", "revenue": 30.0,
                   "currency": "EUR", "customer_id": "u2", "new_customer": True}),
        ("order", {"event_id": "f-o2", "order_id": "A-2", "click_id": "f-k1", "revenue": 12.5,
                   "customer_id": "u1", "new_customer": False}),
        ("spend", {"event_id": "f-s", "amount": 4.0}),
    ]  # fmt: skip
    for kind, fields in funnel:
        body = {"ts": ts, "campaign_id": "c-funnel", "channel": "search", **fields}
        messages.append((env[TOPIC_ENV[kind]], b"c-funnel", json.dumps(body).encode()))
    for i in range(40):
        body = {"event_id": f"imp-only-{i}", "ts": ts, "campaign_id": "c-imp", "channel": "print"}
        messages.append((env[TOPIC_ENV["impression"]], b"c-imp", json.dumps(body).encode()))
    return messages


def _label(key: frozenset[tuple[str, str]], name: str) -> str:
    return dict(key).get(name, "")


def _query_of(url: str, expr: str) -> Callable[[], list[dict[str, Any]]]:
    return lambda: prom_query(url, expr)


def _consumed(worker: WorkerProcess) -> float:
    samples = worker.scrape() or {}
    return sum(
        v
        for (name, _), v in samples.items()
        if name in {"kpimon_events_total", "kpimon_events_rejected_total"}
    )


def test_recorded_kpis_equal_the_worker_kpis(
    start_worker: Callable[..., WorkerProcess],
    start_prometheus: Callable[..., str],
    worker_env: dict[str, str],
) -> None:
    # Windows end at the current minute (no settle delay) and are re-rendered every second,
    # so events from 2-5 minutes ago stay inside every window for the whole test.
    worker = start_worker(KPIMON_EVAL_INTERVAL_SECONDS="1", KPIMON_SETTLE_SECONDS="0")
    worker.wait_ready()
    url = start_prometheus([f"127.0.0.1:{worker.env['KPIMON_METRICS_PORT']}"], interval="1s")
    # Scraped before any event, so the counters' rates see them arrive.
    wait_for(_query_of(url, 'kpimon_events_total{type="click"} == 0'), timeout=30, what="scrape")
    messages = _messages(worker_env, time.time())
    run(produce(worker_env["KPIMON_KAFKA_BOOTSTRAP"], messages))
    # Counted and committed at ingest; the routed and partials hops to the scopes are waited
    # for below (both special campaigns present).
    bootstrap, group = worker_env["KPIMON_KAFKA_BOOTSTRAP"], worker_env["KPIMON_GROUP_ID"]
    topics = [worker_env[v] for v in TOPIC_ENV.values()]

    def through() -> bool:
        return _consumed(worker) >= len(messages) and run(group_lag(bootstrap, group, topics)) == 0

    wait_for(through, timeout=120, what="every event through the pipeline")
    funnel_cac = frozenset({"kpi": "cac", "scope": "campaign", "channel": "search",
                            "campaign": "c-funnel", "window": "5m"}.items())  # fmt: skip
    # Both special campaigns, which reach the segment stage in different partials records.
    imp_ctr = frozenset({"kpi": "ctr", "scope": "campaign", "channel": "print",
                         "campaign": "c-imp", "window": "5m"}.items())  # fmt: skip

    mismatch: list[Any] = []

    def equal() -> tuple[Series, Series] | None:
        at = time.time()
        exported = _series(prom_query(url, "kpimon_kpi", at))
        recorded = _series(prom_query(url, "scope:kpimon_kpi:ratio", at))
        mismatch[:] = [
            sorted(dict(k).items() for k in exported.keys() ^ recorded.keys())[:5],
            [
                (dict(k), v, recorded[k])
                for k, v in exported.items()
                if k in recorded and not math.isclose(v, recorded[k], rel_tol=1e-12)
            ][:5],
        ]
        complete = funnel_cac in exported and imp_ctr in exported
        if complete and exported.keys() == recorded.keys() and not mismatch[1]:
            return exported, recorded
        return None

    try:
        exported, recorded = wait_for(equal, timeout=90, what="recorded KPIs = worker KPIs")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; only in one of them, then unequal: {mismatch}") from None

    def values(label: str) -> set[str]:
        return {dict(key)[label] for key in recorded}

    assert values("kpi") == set(KPI_RATIOS)
    assert values("window") == set(WINDOWS)
    assert values("scope") == {"global", "channel", "campaign"}
    assert all(math.isfinite(v) for v in recorded.values())
    assert len(recorded) > 100
    # Impressions only: CTR is a real 0; clicks, spend, leads, orders are 0, so every other
    # KPI is absent, for the campaign and for its channel alike.
    for scope, campaign in (("campaign", "c-imp"), ("channel", "")):
        only = {
            dict(key)["kpi"]: v
            for key, v in recorded.items()
            if _label(key, "channel") == "print"
            and _label(key, "scope") == scope
            and _label(key, "campaign") == campaign
        }
        assert only == {"ctr": 0.0}, (scope, only)
    assert len([k for k in exported if _label(k, "channel") == "print"]) == 2 * len(WINDOWS)

    # The window sums and the rate rules are recorded too, and every rule evaluates cleanly.
    # (Prometheus drops empty labels: channel and campaign of the global scope.)
    sums = _series(prom_query(url, 'scope:kpimon_window_measure:sum{scope="global",window="5m"}'))
    key = frozenset({"measure": "impressions", "scope": "global", "window": "5m"}.items())
    assert sums[key] > 40
    rates = wait_for(
        lambda: _series(prom_query(url, "type:kpimon_events:rate5m > 0")),
        timeout=30, what="type:kpimon_events:rate5m",
    )  # fmt: skip
    assert {dict(k)["type"] for k in rates} >= {"impression", "click"}
    for rule in ("channel:kpimon_measure:rate5m", "global:kpimon_measure:rate5m",
                 "reason:kpimon_events_rejected:rate5m"):  # fmt: skip
        wait_for(_query_of(url, rule), timeout=30, what=rule)
    groups = get_json(f"{url}/api/v1/rules")["data"]["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert {r["name"] for r in rules} >= {"scope:kpimon_kpi:ratio", "KpimonNoEvents"}
    bad = [(r["name"], r["health"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert not bad


# --------------------------------------------------------------------------- runbooks


def _code_blocks(language: str) -> Iterator[tuple[str, str]]:
    """(page, command) for every command in the runbooks' ``language`` code blocks."""
    fence = re.compile(rf"^[ \t]*```{language}\n(.*?)^[ \t]*```", re.M | re.S)  # in lists too
    for page in sorted(RUNBOOKS.glob("*.md")):
        for block in fence.findall(page.read_text()):
            for line in block.replace("\\\n", " ").splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    yield page.name, line.strip()


def test_runbook_queries_are_valid_promql(start_prometheus: Callable[..., str]) -> None:
    queries = list(_code_blocks("promql"))
    assert len(queries) > 30
    assert {page for page, _ in queries} == {
        p.name for p in RUNBOOKS.glob("*.md") if p.name != "README.md"
    }
    url = start_prometheus([])
    for page, query in queries:
        assert "kpimon" in query, (page, query)
        try:
            prom_query(url, query)
        except urllib.error.HTTPError as exc:  # 400 on a parse error
            raise AssertionError(f"{page}: {query}: {exc.read().decode()}") from None


def test_runbook_silences_work_and_expire(alertmanager_url: str) -> None:
    require_binary("amtool")
    commands = [
        (page, shlex.split(line))
        for page, line in _code_blocks("sh")
        if line.startswith("amtool") and " silence add " in line
    ]
    assert {page for page, _ in commands} >= {
        p.name for p in RUNBOOKS.glob("*.md") if p.name != "README.md"
    }
    for page, argv in commands:
        assert any(a.startswith("--duration=") for a in argv), (page, "a silence needs an expiry")
        assert any(a.startswith("--comment=") for a in argv), (page, "a silence needs a comment")
        argv = [
            f"--alertmanager.url={alertmanager_url}" if a.startswith("--alertmanager.url=") else a
            for a in argv
        ]
        added = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        assert added.returncode == 0, (page, argv, added.stderr)
        silence_id = added.stdout.strip()
        silence = get_json(f"{alertmanager_url}/api/v2/silence/{silence_id}")
        assert silence["status"]["state"] == "active", page
        assert silence["comment"] and silence["endsAt"] > silence["startsAt"]
        expired = subprocess.run(
            ["amtool", f"--alertmanager.url={alertmanager_url}", "silence", "expire", silence_id],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert expired.returncode == 0, expired.stderr
