"""Live alerting end to end: real broker, real Alertmanager, a local Slack stand-in.

The simulator backfills half an hour that ends with a CTR drop in one campaign, then
goes on in real time, the drop lasting 3 more minutes. Once the worker has caught up,
the campaign's alert fires and the channel it drags alerts too. One cause, one
incident: one message reaches Slack (through 429 and 500 answers), one record
``kpimon.alerts``, and Alertmanager gets both alerts under one ``incident`` label, the
channel's inhibited by the campaign's (the root). An alert that joins after the firing
message (the channel a tick later, the global CTR) is told in an update: one short
Slack message and one ``kpimon.alerts`` record each, naming it.
The worker is killed while it fires and restarted; the recovered traffic resolves
the incident, once. No other segment alerts.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.alerts.test_notify import check_limits
from tests.helpers import REPO, WorkerProcess, consume_all, run, sample, wait_for

pytestmark = pytest.mark.integration

RATE, SEED, CAMPAIGNS = 150, 5, 12
INCIDENT_CAMPAIGN = "c1"
LIVE_DROP = "3m"


class SlackStandIn:
    """An incoming-webhook receiver: answers from a script, then 200; keeps every body."""

    def __init__(self, script: list[tuple[int, dict[str, str]]]) -> None:
        self.script = list(script)
        self.accepted: list[dict[str, Any]] = []
        self.refused = 0
        self.lock = threading.Lock()
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stand_in.lock:
                    status, headers = stand_in.script.pop(0) if stand_in.script else (200, {})
                    if status == 200:
                        stand_in.accepted.append(body)
                    else:
                        stand_in.refused += 1
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(b"ok" if status == 200 else b"rate_limited")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        # The path stands for the webhook secret: it must never show up in a log.
        self.url = (
            f"http://127.0.0.1:{self.server.server_port}/services/T0/B0/s3cr3t-{uuid.uuid4().hex}"
        )

    def messages(self, status: str) -> list[dict[str, Any]]:
        icon = {"firing": ":rotating_light:", "update": ":heavy_plus_sign:"}.get(
            status, ":white_check_mark:"
        )
        with self.lock:
            return [m for m in self.accepted if m["text"].startswith(icon)]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def slack() -> Iterator[SlackStandIn]:
    # Slack's rate limit first, then two outages: the message must still arrive, once.
    stand_in = SlackStandIn([(429, {"Retry-After": "1"}), (500, {}), (503, {})])
    yield stand_in
    stand_in.close()


def rules_file(path: Path, tag: str) -> Path:
    """CTR at every scope plus conversion, clicks and orders rules: only CTR may fire, in
    c1 and in its channel. The conversion rule waits 10 minutes (``for``): where the
    backfill's simulator stops and the live one starts, orders lag their clicks (the
    backfill's last clicks never convert, the live ones not yet) for a few minutes.

    c1 carries about two thirds of its channel's clicks, so its 80% drop moves the channel's
    CTR 45-55% once the 5-minute window is all inside the incident, and still ~30% with two
    normal minutes in it: past the channel rule's ``min_change`` (0.2) whenever the worker
    has caught up, so the one cause raises two alerts at once, which must make one incident
    (c1 makes all of the channel's gap). A longer drop would sink the trailing baseline.
    """
    path.write_text(f"""
rules:
  - name: e2e_ctr_campaign
    kpi: ctr
    scopes: [campaign]
    min_change: 0.4
    for: 0s
    keep_firing_for: 0s
    severity: ticket
    labels: {{e2e: "{tag}"}}
    runbook_url: docs/runbooks/rate-drop.md
  - name: e2e_ctr
    kpi: ctr
    scopes: [channel]
    min_change: 0.2
    for: 0s
    keep_firing_for: 0s
    severity: ticket
    labels: {{e2e: "{tag}"}}
    runbook_url: docs/runbooks/rate-drop.md
  - name: e2e_conversion
    kpi: conversion_rate
    scopes: [global, channel, campaign]
    min_change: 0.6
    for: 10m
    severity: ticket
    labels: {{e2e: "{tag}"}}
    runbook_url: docs/runbooks/rate-drop.md
  - name: e2e_clicks_global
    kpi: clicks
    scopes: [global]
    min_change: 0.5
    for: 1m
    severity: page
    labels: {{e2e: "{tag}"}}
    runbook_url: docs/runbooks/volume-drop.md
""")
    return path


def simulate(env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "stream.cli", "simulate", "--rate", str(RATE), "--seed",
         str(SEED), "--campaigns", str(CAMPAIGNS), "--late", "0", *args],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


QUICK = {
    "KPIMON_EVAL_INTERVAL_SECONDS": "1",
    "KPIMON_SETTLE_SECONDS": "5",
    "KPIMON_NOTIFY_MIN_INTERVAL_SECONDS": "0.2",
}
"""Worker settings that make a test's alerts decide and go out within seconds."""


def ctr_drop_going_on(env: dict[str, str]) -> subprocess.Popen[bytes]:
    """30 minutes of history whose last 6 minutes have c1's CTR 80% down, then traffic in
    real time (returned: the caller stops it) that keeps it down for LIVE_DROP more.

    The drop goes on while the worker catches up, fires and is killed, however long the
    backfill took on a loaded machine: a drop that ended with the backfill could be
    judged over, and its alert resolved, before the test looked (its minutes are judged
    once, when they settle)."""
    backfill = simulate(
        env, "--start-ago", "30m", "--duration", "30m",
        "--incident", f"ctr_drop:campaign={INCIDENT_CAMPAIGN}:at=24m:by=80%:for=6m",
    )  # fmt: skip
    assert backfill.wait(180) == 0
    return simulate(
        env, "--incident", f"ctr_drop:campaign={INCIDENT_CAMPAIGN}:at=0m:by=80%:for={LIVE_DROP}"
    )


def _am_alerts(url: str, tag: str) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"{url}/api/v2/alerts", timeout=5) as resp:
        alerts: list[dict[str, Any]] = json.loads(resp.read())
    return sorted(
        (a for a in alerts if a["labels"].get("e2e") == tag),
        key=lambda a: (a["labels"]["incident_role"] != "root", a["labels"]["scope"]),
    )


def _grouped(url: str, tag: str) -> list[dict[str, Any]] | None:
    """The incident's alerts once Alertmanager holds the channel's beside the campaign's."""
    shown = _am_alerts(url, tag)
    return shown if any(a["labels"]["scope"] == "channel" for a in shown) else None


@pytest.mark.timeout(900)  # its own waits add up past the default 300 s on a loaded machine
def test_ctr_drop_fires_once_everywhere_survives_a_kill_and_resolves_once(
    start_worker: Callable[..., WorkerProcess],
    worker_env: dict[str, str],
    alertmanager_url: str,
    slack: SlackStandIn,
    tmp_path: Path,
) -> None:
    import os

    tag = uuid.uuid4().hex[:8]
    env = {
        "KPIMON_RULES": str(rules_file(tmp_path / "rules.yml", tag)),
        "KPIMON_SLACK_WEBHOOK_URL": slack.url,
        "KPIMON_ALERTMANAGER_URL": alertmanager_url,
        "KPIMON_GRAFANA_URL": "http://grafana.example:3000",
        **QUICK,
        "KPIMON_ALERTMANAGER_RESEND_SECONDS": "5",
    }
    live = ctr_drop_going_on({**os.environ, **worker_env})
    worker = start_worker("w1", **env)
    try:
        worker.wait_ready()
        firing = wait_for(lambda: slack.messages("firing"), timeout=120,
                          what="the firing message on Slack")  # fmt: skip
        assert slack.refused == 3, "429, 500 and 503 were answered before it got through"
        message = firing[0]
        check_limits(message)
        assert "CTR" in message["text"] and f"campaign {INCIDENT_CAMPAIGN}" in message["text"]
        assert "grafana.example:3000/d/kpimon-campaign" in json.dumps(message)

        # The channel's alert joins c1's incident: sent to Alertmanager (re-sent every
        # 5 s) under the same incident label, inhibited by the root; to Slack in the
        # firing message, or in an update when it joined a tick or more later.
        # The channel may join minutes later, on the live minutes of the drop.
        shown = wait_for(lambda: _grouped(alertmanager_url, tag), timeout=240,
                         what="both alerts of the incident in Alertmanager")  # fmt: skip
        channel = _channel(message)
        # The global CTR may move enough too (c1 is a big campaign): then it is a member.
        assert [tuple(a["labels"].get(k, "") for k in ("alertname", "scope", "channel",
                                                       "campaign", "incident_role"))
                for a in shown] in (
            [("e2e_ctr_campaign", "campaign", channel, INCIDENT_CAMPAIGN, "root"),
             ("e2e_ctr", "channel", channel, "", "member")],
            [("e2e_ctr_campaign", "campaign", channel, INCIDENT_CAMPAIGN, "root"),
             ("e2e_ctr", "channel", channel, "", "member"),
             ("e2e_ctr", "global", "", "", "member")],
        ), shown  # fmt: skip
        assert len({a["labels"]["incident"] for a in shown}) == 1
        assert shown[0]["status"]["state"] == "active"
        wait_for(
            lambda: [a["status"]["state"] for a in _am_alerts(alertmanager_url, tag)][:2]
            == ["active", "suppressed"],
            timeout=30, what="the channel's alert inhibited by the incident's root",
        )  # fmt: skip

        # Kill while firing, once the delivery is recorded (outbox empty), and restart.
        def delivered() -> bool:
            samples = worker.scrape() or {}
            return (
                sample(samples, "kpimon_outbox_pending", channel="slack") == 0
                and sample(samples, "kpimon_alerts_firing", rule="e2e_ctr_campaign",
                           severity="ticket", scope="campaign", channel=channel,
                           campaign=INCIDENT_CAMPAIGN) == 1
            )  # fmt: skip

        wait_for(delivered, timeout=30, what="the delivery recorded, the alert firing")
        worker.stop(sig=9)
        worker = start_worker("w1", **env)
        worker.wait_ready()

        resolved = wait_for(lambda: slack.messages("resolved"), timeout=420,
                            what="the resolve message on Slack")  # fmt: skip
        check_limits(resolved[0])
        assert f"campaign {INCIDENT_CAMPAIGN}" in resolved[0]["text"]
        wait_for(
            lambda: all(a["status"]["state"] != "active"
                        for a in _am_alerts(alertmanager_url, tag)),
            # Its sender may be in a backoff (up to KPIMON_NOTIFY_MAX_BACKOFF_SECONDS, 60 s)
            # from a failure during the kill; Slack's arrived first.
            timeout=90, what="the alert resolved in Alertmanager",
        )  # fmt: skip
        # The resolve went out after the restart: the state came back with it.
        wait_for(
            lambda: sample(worker.scrape() or {}, "kpimon_outbox_pending", channel="slack") == 0,
            timeout=30, what="an empty outbox",
        )  # fmt: skip
    finally:
        live.terminate()
        live.wait(30)
    assert len(slack.messages("firing")) == 1, "one message for one cause, none after the kill"
    assert len(slack.messages("resolved")) == 1
    joins = slack.messages("update")
    everything = [json.loads(r.value) for r in run(consume_all(
        worker_env["KPIMON_KAFKA_BOOTSTRAP"], worker_env["KPIMON_ALERTS_TOPIC"],
        expect=2 + len(joins), within=30))]  # fmt: skip
    # Alerts that joined after the firing message: one update record per short message.
    updates = [r for r in everything if r["notification"] == "update"]
    assert len(updates) == len(joins), (len(updates), len(joins))
    for update, message in zip(updates, joins, strict=True):
        check_limits(message)
        assert update["incident"]["id"] == everything[0]["incident"]["id"]
        assert update["status"] == "firing" and update["incident"]["joined"]
        assert {j["scope"] for j in update["incident"]["joined"]} <= {"channel", "global"}
        assert update["incident"]["id"] in json.dumps(message)
    records = [r for r in everything if r["notification"] != "update"]
    assert [(r["rule"], r["status"], r["campaign"]) for r in records] == [
        ("e2e_ctr_campaign", "firing", INCIDENT_CAMPAIGN),
        ("e2e_ctr_campaign", "resolved", INCIDENT_CAMPAIGN),
    ]
    assert records[0]["change"] <= -0.4 and records[0]["p_value"] < 0.01 / CAMPAIGNS
    assert records[1]["ends_at"] is not None
    # One incident from first to last; by its resolve it holds both alerts, resolved.
    assert records[0]["incident"]["id"] == records[1]["incident"]["id"]
    members = records[1]["incident"]["members"]
    assert [(m["rule"], m["scope"], m["role"], m["status"]) for m in members][:2] == [
        ("e2e_ctr_campaign", "campaign", "root", "resolved"),
        ("e2e_ctr", "channel", "member", "resolved"),
    ]
    assert {(m["scope"], m["status"]) for m in members[2:]} <= {("global", "resolved")}
    for log in (tmp_path / "worker-w1.log",):
        assert slack.url.rsplit("/", 1)[1] not in log.read_text(), "the webhook secret leaked"


def _channel(message: dict[str, Any]) -> str:
    """The campaign's channel, as the message names it ("campaign c1 on social")."""
    text: str = message["text"]
    return text.split(f"campaign {INCIDENT_CAMPAIGN} on ", 1)[1].split()[0]
