"""Slack Web API mode with a real worker: one living message per incident through a
``kill -9`` and a Slack outage, its resolve in place and in its thread.

Real broker, real worker process, the simulator's traffic (as in ``test_alerting``), and
a local stand-in for Slack's Web API (``tests.slack_api``) that the worker reaches
through the real ``slack_sdk`` client. The worker logs at DEBUG: the bot token must not
appear in any line.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import WorkerProcess, sample, wait_for
from tests.integration.test_alerting import (
    INCIDENT_CAMPAIGN,
    QUICK,
    ctr_drop_going_on,
    rules_file,
)
from tests.slack_api import CHANNEL_ID, TOKEN, SlackApi

pytestmark = pytest.mark.integration
OUTAGE_S = 60.0


@pytest.fixture
def slack_api() -> Iterator[SlackApi]:
    api = SlackApi()
    yield api
    api.close()


@pytest.mark.timeout(900)
def test_one_message_per_incident_through_a_kill_and_an_outage_resolved_in_place(
    start_worker: Callable[..., WorkerProcess],
    worker_env: dict[str, str],
    slack_api: SlackApi,
    tmp_path: Path,
) -> None:
    tag = uuid.uuid4().hex[:8]
    env = {
        "KPIMON_RULES": str(rules_file(tmp_path / "rules.yml", tag)),
        "KPIMON_SLACK_BOT_TOKEN": TOKEN,
        "KPIMON_SLACK_CHANNEL": CHANNEL_ID,
        "KPIMON_SLACK_API_URL": slack_api.base_url,
        "KPIMON_LOG_LEVEL": "DEBUG",
        **QUICK,
        "KPIMON_NOTIFY_MAX_BACKOFF_SECONDS": "5",
    }
    live = ctr_drop_going_on({**os.environ, **worker_env})
    worker = start_worker("w1", **env)
    try:
        worker.wait_ready()
        (root,) = wait_for(slack_api.roots, timeout=180, what="the incident's message")
        assert root.metadata is not None, "the message carries its incident key"
        assert f"campaign {INCIDENT_CAMPAIGN}" in root.text

        def recorded() -> bool:  # the post and its message ts are in the committed state
            samples = worker.scrape() or {}
            return sample(samples, "kpimon_outbox_pending", channel="slack") == 0

        wait_for(recorded, timeout=60, what="the delivery recorded")
        worker.stop(sig=9)
        # Slack is down while the worker restarts and for a minute after.
        slack_api.down_until = time.monotonic() + OUTAGE_S
        worker = start_worker("w1", **env)
        worker.wait_ready()
        wait_for(lambda: time.monotonic() > slack_api.down_until, timeout=OUTAGE_S + 5,
                 what="the end of the outage")  # fmt: skip
        assert any(name.startswith("chat.") for name, at, _ in slack_api.calls
                   if at < slack_api.down_until), "the worker tried during the outage"  # fmt: skip

        def resolved() -> bool:
            return any("resolved" in reply.text.lower() for reply in slack_api.replies(root.ts))

        wait_for(resolved, timeout=480, what="the resolve in the incident's thread")
    finally:
        live.terminate()
        live.wait(30)
    roots = slack_api.roots()
    assert [m.ts for m in roots] == [root.ts], "one message for the incident, never a second"
    assert root.edits >= 1 and "resolved" in root.text.lower(), "the resolve edits it in place"
    log = (tmp_path / "worker-w1.log").read_text()
    assert "DEBUG" in log, "the worker did log at DEBUG"
    assert TOKEN not in log and TOKEN.split("-")[-1] not in log, "the bot token leaked"
