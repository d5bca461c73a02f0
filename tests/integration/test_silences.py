"""Silences against a real Alertmanager: they mute matching Slack messages, the CLI and
amtool agree on them.

The Slack side is the Web API sink (real slack_sdk) against the local stand-in
of Slack's API, fed by an outbox as the worker feeds it.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from slack_sdk.web.async_client import AsyncWebClient

from alerts.outbox import Outbox
from alerts.silences import SilenceWatcher, add_silence, parse_matcher
from alerts.sinks import Sender
from alerts.slack import SlackApiSink
from tests.alerts.test_slack import alert
from tests.conftest import require_binary
from tests.helpers import until
from tests.slack_api import CHANNEL_ID, TOKEN, SlackApi

pytestmark = pytest.mark.integration


@pytest.fixture
def slack() -> Iterator[SlackApi]:
    api = SlackApi()
    yield api
    api.close()


def kpimon(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KPIMON_ALERTMANAGER_URL": url, "USER": "on-call-anna"}
    return subprocess.run([sys.executable, "-m", "stream.cli", "silence", *args], env=env,
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip


def amtool(url: str, *args: str) -> Any:
    out = subprocess.run(["amtool", f"--alertmanager.url={url}", *args, "-o", "json"],
                         capture_output=True, text=True, timeout=30, check=True)  # fmt: skip
    return json.loads(out.stdout)


def test_cli_add_list_expire_agrees_with_amtool(alertmanager_url: str) -> None:
    require_binary("amtool")
    campaign = f"c-{uuid.uuid4().hex[:8]}"
    added = kpimon(alertmanager_url, "add", "rule=ctr_drop", f"campaign={campaign}",
                   'channel=~"soc.*"', "--duration", "2h", "--comment", "known issue")  # fmt: skip
    assert added.returncode == 0, added.stderr
    sid = added.stdout.strip()
    (seen,) = [s for s in amtool(alertmanager_url, "silence", "query") if s["id"] == sid]
    assert seen["createdBy"] == "on-call-anna" and seen["comment"] == "known issue"
    assert {(m["name"], m["value"], m["isRegex"], m.get("isEqual", True))
            for m in seen["matchers"]} == {("rule", "ctr_drop", False, True),
                                           ("campaign", campaign, False, True),
                                           ("channel", "soc.*", True, True)}  # fmt: skip
    lasts = _seconds(seen["endsAt"]) - _seconds(seen["startsAt"])
    assert abs(lasts - 7200) < 60
    listed = kpimon(alertmanager_url, "list")
    assert listed.returncode == 0 and sid in listed.stdout and campaign in listed.stdout
    expired = kpimon(alertmanager_url, "expire", sid)
    assert expired.returncode == 0, expired.stderr
    assert sid not in {s["id"] for s in amtool(alertmanager_url, "silence", "query")}
    assert sid not in kpimon(alertmanager_url, "list").stdout
    bad = kpimon(alertmanager_url, "add", "campaign")
    assert bad.returncode == 2 and "not a matcher" in bad.stderr
    down = kpimon("http://127.0.0.1:9", "list")
    assert down.returncode == 1 and "cannot reach Alertmanager" in down.stderr


def _seconds(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def test_a_silence_mutes_the_matching_incident_until_it_expires(
    alertmanager_url: str, slack: SlackApi
) -> None:
    tag = uuid.uuid4().hex[:8]
    silenced, other = f"c1-{tag}", f"c2-{tag}"
    lasts = 8.0
    sid = add_silence(alertmanager_url, [parse_matcher(f"campaign={silenced}")],
                      duration_s=lasts, comment="test", author="tests")  # fmt: skip
    ends = time.time() + lasts
    counted: list[tuple[str, str]] = []
    box = Outbox(("slack",))

    async def until_empty(within: float) -> None:
        await until(lambda: not box.counts()["slack"], within=within)

    async def scenario() -> None:
        async with aiohttp.ClientSession() as session:
            watcher = SilenceWatcher(session, alertmanager_url, refresh=0.2)
            client = AsyncWebClient(token=TOKEN, base_url=slack.base_url, session=session,
                                    retry_handlers=[])  # fmt: skip
            sink = SlackApiSink(client, CHANNEL_ID, lambda: box, silences=watcher,
                                silence_ui=alertmanager_url, pace={})  # fmt: skip
            sender = Sender(sink, lambda: box, lambda c, o: counted.append((c, o)),
                            min_interval=0)  # fmt: skip
            tasks = [asyncio.create_task(watcher.run())]
            try:
                async with asyncio.timeout(10):
                    await watcher.loaded.wait()
                assert any(s.id == sid for s in watcher.silences)
                box.add([alert("firing", "2026-11-21T10:10:00Z", campaign=silenced),
                          alert("firing", "2026-11-21T10:10:00Z", campaign=other)])  # fmt: skip
                box.commit()
                tasks.append(asyncio.create_task(sender.run()))
                await until_empty(10)
                assert time.time() < ends, "the check above ran while the silence was active"
                assert counted == [("slack", "silenced"), ("slack", "sent")]
                # The silence runs out; the incident still fires: its next repeat goes out.
                await until(lambda: watcher.matching({"campaign": silenced}) is None,
                            within=lasts + 20, interval=0.1)  # fmt: skip
                box.add([alert("repeat", "2026-11-21T10:25:00Z", campaign=silenced)])
                box.commit()
                await until_empty(10)
            finally:
                for task in tasks:
                    task.cancel()

    asyncio.run(scenario())
    assert counted == [("slack", "silenced"), ("slack", "sent"), ("slack", "sent")]
    roots = {m.metadata["event_payload"]["incident"].split("|")[3]: m
             for m in slack.roots() if m.metadata}  # fmt: skip
    assert set(roots) == {silenced, other}
    assert "repeat" not in str(slack.replies(roots[silenced].ts)), "posted as its first message"
    # Every message links Alertmanager's silence form pre-filled with its labels.
    buttons = [e for b in roots[other].blocks if b["type"] == "actions" for e in b["elements"]]
    silence_link = next(e["url"] for e in buttons if e["text"]["text"] == "Silence 2h")
    assert silence_link.startswith(f"{alertmanager_url}/#/silences/new?filter=")
    assert other in silence_link and any(e["text"]["text"] == "Dashboard" for e in buttons)
