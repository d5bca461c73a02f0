"""Slack Web API mode against a local stand-in of Slack's API, driven by the real slack_sdk.

One incident gives one root message, updated in place, with its repeats and its
resolve in the thread; rate limits are honoured; configuration errors are dropped
and counted; the message survives a restart (state through the changelog
encoding) and a crash between a post and its commit (found by its metadata).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from slack_sdk.models.blocks import Block
from slack_sdk.web.async_client import AsyncWebClient

from alerts.engine import AlertEngine
from alerts.notify import (
    MAX_JOINED,
    slack_incident_message,
    slack_payload,
    slack_thread_note,
    slack_update_message,
)
from alerts.outbox import Outbox
from alerts.rules import parse_rules
from alerts.silences import Matcher, Silence, SilenceWatcher
from alerts.sinks import Sender
from alerts.slack import ROOT_EVENT, SlackApiSink, incident_key
from stream import codec
from stream.aggregate import SegmentStore
from stream.kpis import KPI
from tests.alerts.test_engine_incidents import T0, rules_text, run
from tests.alerts.test_notify import check_limits, record
from tests.helpers import until
from tests.slack_api import CHANNEL_ID, TOKEN, SlackApi

NO_PACE = {"chat.postMessage": 0.0, "chat.update": 0.0}


@pytest.fixture
def slack() -> Iterator[SlackApi]:
    api = SlackApi()
    yield api
    api.close()


def alert(kind: str, at: str, campaign: str = "c7", **extra: Any) -> dict[str, Any]:
    resolved = kind == "resolved"
    base = record(
        campaign=campaign, notification=kind, notified_at=at,
        status="resolved" if resolved else "firing",
        ends_at="2026-11-21T10:42:00Z" if resolved else None,
        labels={**record()["labels"], "campaign": campaign},
        summary=f"CTR of campaign {campaign} on social dropped 40% in the last 15 min",
    )  # fmt: skip
    return {**base, **extra}


def valid_blocks(payload: dict[str, Any]) -> None:
    """Slack's own Block Kit models accept every block (to_dict validates the limits)."""
    check_limits(payload)
    for block in payload["blocks"]:
        parsed = Block.parse(block)
        assert parsed is not None, block
        parsed.to_dict()  # raises SlackObjectFormationError past a limit


class Run:
    """A sender with a Web API sink over an outbox: one worker process's view."""

    def __init__(self, api: SlackApi, box: Outbox, **sink_args: Any) -> None:
        self.api, self.box, self.sink_args = api, box, sink_args
        self.counted: list[tuple[str, str]] = []

    async def deliver_all(self, within: float = 20) -> list[tuple[str, str]]:
        """Run until the outbox's slack queue is empty (within a deadline); the outcomes."""
        async with aiohttp.ClientSession() as session:
            client = AsyncWebClient(token=TOKEN, base_url=self.api.base_url, session=session,
                                    retry_handlers=[])  # fmt: skip
            pace = self.sink_args.pop("pace", NO_PACE)
            sink = SlackApiSink(client, CHANNEL_ID, lambda: self.box, pace=pace, **self.sink_args)
            sender = Sender(sink, lambda: self.box, lambda c, o: self.counted.append((c, o)),
                            min_interval=0, max_backoff=0.2)  # fmt: skip
            task = asyncio.create_task(sender.run())
            try:
                await until(lambda: not self.box.counts()["slack"], within=within, interval=0.01)
            finally:
                task.cancel()
        return self.counted


def queue(box: Outbox, *records: dict[str, Any]) -> None:
    box.add(list(records))
    box.commit()


def changelog(box: Outbox, log: dict[Any, Any]) -> None:
    """What a transaction writes: the drained changes, through the worker's JSON encoding."""
    for key, value in box.drain_changes():
        k = codec.decode_json(codec.encode_json(list(key)))
        log[tuple(k)] = None if value is None else codec.decode_json(codec.encode_json(value))


def restore(log: dict[Any, Any]) -> Outbox:
    """A restarted worker's outbox, read back from the compacted changelog."""
    box = Outbox(("slack",))
    for key, value in log.items():
        box.load(key, value)
    box.loaded()
    return box


FIRING = alert("firing", "2026-11-21T10:10:00Z")
REPEAT = alert("repeat", "2026-11-21T10:25:00Z", value=0.008, change=-0.6)
RESOLVED = alert("resolved", "2026-11-21T10:42:00Z", value=0.0195, change=-0.025)


def test_one_message_updated_in_place_with_repeat_and_resolve_in_its_thread(
    slack: SlackApi,
) -> None:
    box = Outbox(("slack",))
    queue(box, FIRING, REPEAT, RESOLVED)
    counted = asyncio.run(Run(slack, box).deliver_all())
    assert counted == [("slack", "sent")] * 3
    (root,) = slack.roots()
    assert root.metadata == {"event_type": ROOT_EVENT,
                             "event_payload": {"incident": incident_key(FIRING)}}  # fmt: skip
    assert root.edits == 2, "the repeat and the resolve edit the one message"
    assert root.text.startswith(":white_check_mark:")
    shown = str(root.blocks)
    assert "Resolved after 42 min" in shown and "CTR now 1.95%" in shown
    assert "worst -60%" in shown, "the worst value seen while firing stays on the message"
    replies = slack.replies(root.ts)
    assert [r.text.split(":")[1] for r in replies] == ["repeat", "white_check_mark"]
    assert "Still firing" in replies[0].text and "Resolved after 42 min" in replies[1].text
    for payload in [{"text": root.text, "blocks": root.blocks}, *root.history,
                    *({"text": r.text, "blocks": r.blocks} for r in replies)]:  # fmt: skip
        valid_blocks(payload)
    assert box.states["slack"] == {"@channel": {"id": CHANNEL_ID}}, "resolved: forgotten"


def test_429_waits_retry_after_and_ratelimited_is_retried(slack: SlackApi) -> None:
    slack.script["chat.postMessage"] = [
        (429, {"Retry-After": "1"}, {"ok": False, "error": "ratelimited"})
    ]
    slack.script["chat.update"] = [(200, {}, {"ok": False, "error": "ratelimited"})]
    box = Outbox(("slack",))
    queue(box, FIRING, REPEAT)
    counted = asyncio.run(Run(slack, box).deliver_all())
    assert counted == [("slack", "rate_limited"), ("slack", "sent"), ("slack", "rate_limited"),
                       ("slack", "sent")]  # fmt: skip
    first, second = slack.times("chat.postMessage")[:2]
    assert second - first >= 0.95, "Retry-After: 1 was honoured"
    assert len(slack.roots()) == 1 and slack.count("chat.update") == 2
    assert len(slack.replies(slack.roots()[0].ts)) == 1, "the retried repeat replied once"


def test_calls_are_paced_per_method(slack: SlackApi) -> None:
    box = Outbox(("slack",))
    queue(box, FIRING, alert("firing", "2026-11-21T10:10:00Z", campaign="c8"))
    asyncio.run(Run(slack, box, pace={"chat.postMessage": 0.5}).deliver_all())
    first, second = slack.times("chat.postMessage")
    assert second - first >= 0.45


def test_channel_not_found_is_dropped_counted_and_logged_without_the_token(
    slack: SlackApi, caplog: pytest.LogCaptureFixture
) -> None:
    slack.script["chat.postMessage"] = [(200, {}, {"ok": False, "error": "channel_not_found"})]
    box = Outbox(("slack",))
    queue(box, FIRING, alert("firing", "2026-11-21T10:10:00Z", campaign="c8"))
    with caplog.at_level(logging.DEBUG):
        counted = asyncio.run(Run(slack, box).deliver_all())
    assert counted == [("slack", "error"), ("slack", "sent")], "dropped, not retried forever"
    assert len(slack.roots()) == 1 and "c8" in slack.roots()[0].text
    dropped = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(dropped) == 1 and "channel_not_found" in dropped[0].getMessage()
    assert "KPIMON_SLACK_CHANNEL" in dropped[0].getMessage()
    assert TOKEN not in caplog.text and TOKEN.split("-")[-1] not in caplog.text


def test_a_restart_keeps_updating_the_same_message(slack: SlackApi) -> None:
    log: dict[Any, Any] = {}
    box = Outbox(("slack",))
    queue(box, FIRING)
    changelog(box, log)  # the alert transaction
    asyncio.run(Run(slack, box).deliver_all())
    changelog(box, log)  # the next transaction: the tombstone and the message state
    restarted = restore(log)
    assert restarted.counts() == {"slack": 0}
    assert restarted.state("slack", incident_key(FIRING)) is not None
    queue(restarted, REPEAT, RESOLVED)
    asyncio.run(Run(slack, restarted).deliver_all())
    (root,) = slack.roots()
    assert root.edits == 2 and len(slack.replies(root.ts)) == 2
    assert slack.count("conversations.history") == 0, "the state was known: no lookup"


def test_a_crash_between_post_and_commit_does_not_post_twice(slack: SlackApi) -> None:
    log: dict[Any, Any] = {}
    box = Outbox(("slack",))
    queue(box, FIRING)
    changelog(box, log)
    asyncio.run(Run(slack, box).deliver_all())
    # kill -9 here: neither the tombstone nor the message state reached the changelog.
    # Newer messages (another worker's, people's), so the lookup pages through history.
    others = Outbox(("slack",))
    queue(others, *(alert("firing", "2026-11-21T10:10:00Z", campaign=f"o{i}") for i in range(5)))
    asyncio.run(Run(slack, others).deliver_all())
    restarted = restore(log)
    assert restarted.counts() == {"slack": 1}
    queue(restarted, REPEAT)
    changelog(restarted, log)
    asyncio.run(Run(slack, restarted).deliver_all())
    key = incident_key(FIRING)
    roots = [m for m in slack.roots() if (m.metadata or {})["event_payload"]["incident"] == key]
    assert len(roots) == 1, "found by its metadata, not posted again"
    assert slack.count("conversations.history") >= 2, "paged through the history"
    # And once more between the repeat's thread reply and its commit.
    again = restore(log)
    assert again.counts() == {"slack": 2}, "the firing and the repeat, both delivered before"
    asyncio.run(Run(slack, again).deliver_all())
    assert len(slack.replies(roots[0].ts)) == 1, "the reply was found, not posted twice"
    assert len([m for m in slack.roots() if "c7" in m.text]) == 1


def test_a_deleted_message_is_posted_anew(slack: SlackApi) -> None:
    box = Outbox(("slack",))
    queue(box, FIRING)
    asyncio.run(Run(slack, box).deliver_all())
    with slack.lock:
        slack.messages.clear()
    queue(box, REPEAT)
    asyncio.run(Run(slack, box).deliver_all())
    assert len(slack.roots()) == 1


class Silenced(SilenceWatcher):
    def __init__(self, silences: tuple[Silence, ...]) -> None:
        self.silences = silences


def test_a_silenced_incident_is_not_posted_and_its_message_stays_true(slack: SlackApi) -> None:
    silence = Silence("s1", (Matcher("campaign", "c7"),), 0, 4e9)
    box = Outbox(("slack",))
    queue(box, FIRING)
    asyncio.run(Run(slack, box).deliver_all())
    queue(box, REPEAT, alert("firing", "2026-11-21T10:10:00Z", campaign="c8"), RESOLVED)
    counted = asyncio.run(Run(slack, box, silences=Silenced((silence,))).deliver_all())
    assert counted == [("slack", "silenced"), ("slack", "sent"), ("slack", "silenced")]
    root = next(m for m in slack.roots() if "c7" in m.text)
    assert root.edits == 1 and root.text.startswith(":white_check_mark:"), "resolve edited"
    assert slack.replies(root.ts) == [], "no thread reply while silenced"


@settings(max_examples=40, deadline=None)
@given(
    campaign=st.text(min_size=1, max_size=3000),
    summary=st.text(min_size=1, max_size=6000),
    contributors=st.integers(0, 60),
    status=st.sampled_from(["firing", "resolved"]),
)
def test_every_message_passes_slacks_block_kit_models(
    campaign: str, summary: str, contributors: int, status: str
) -> None:
    many = [{"scope": "campaign", "channel": "x" * 300, "campaign": campaign, "value": 0.1,
             "baseline": 0.2, "change": -0.5}] * contributors  # fmt: skip
    rec = record(campaign=campaign, summary=summary, contributors=many, status=status,
                 notification="repeat", labels={"campaign": campaign, "rule": "r"})  # fmt: skip
    link = "http://am:9093/#/silences/new?filter=" + "x" * len(campaign)
    valid_blocks(slack_payload(rec, silence_url=link))
    valid_blocks(slack_incident_message(rec, silence_url=link, worst=-0.7, updates=3,
                                        duration_s=7200.0))  # fmt: skip
    valid_blocks(slack_thread_note(rec, duration_s=60.0))


def test_the_worker_settings_choose_the_slack_mode_and_hide_the_token() -> None:
    from alerts.sinks import SlackSink
    from alerts.slack import slack_setup
    from stream.settings import load_settings

    async def build(**env: Any) -> Any:
        async with aiohttp.ClientSession() as session:
            return slack_setup(session, lambda: None, load_settings(**env))

    api = asyncio.run(build(slack_bot_token=TOKEN, slack_channel=CHANNEL_ID,
                            alertmanager_url="http://am:9093"))  # fmt: skip
    assert isinstance(api.sink, SlackApiSink) and api.watcher is not None
    assert TOKEN not in repr(api.sink) and TOKEN not in repr(
        load_settings(slack_bot_token=TOKEN, slack_channel="#x")
    )
    hook = asyncio.run(build(slack_webhook_url="https://hooks.example/T/B/x"))
    assert isinstance(hook.sink, SlackSink) and hook.watcher is None
    assert asyncio.run(build()) is None


# ----------------------------------------------------------------------------- late joiners


@functools.cache
def outage() -> tuple[dict[str, Any], ...]:
    """The engine's records of an order outage: a firing, updates as KPIs and the channel
    join, repeats and the resolve (tests.alerts.test_engine_incidents' scenario)."""
    engine = AlertEngine(parse_rules(rules_text()), grafana_url="http://grafana:3000")
    return tuple(run(engine, range(T0, T0 + 240), SegmentStore()))


def test_alerts_joining_an_incident_are_edited_in_and_named_in_its_thread(
    slack: SlackApi,
) -> None:
    records = outage()
    kinds = [r["notification"] for r in records]
    assert kinds[0] == "firing" and kinds[-1] == "resolved" and kinds.count("update") >= 2
    box = Outbox(("slack",))
    queue(box, *records)
    assert asyncio.run(Run(slack, box).deliver_all()) == [("slack", "sent")] * len(records)
    (root,) = slack.roots()
    assert root.edits == len(records) - 1, "every later notification edits the one message"
    replies = slack.replies(root.ts)
    assert len(replies) == len(records) - 1
    for told, reply in zip(records[1:], replies, strict=True):
        if told["notification"] == "update":
            assert reply.text.startswith(":heavy_plus_sign: Also affected: "), reply.text
            for joined in told["incident"]["joined"]:
                assert f"{KPI[joined['kpi']].title} of " in reply.text
    # The message as each update left it: the new members in its list, marked new.
    versions = [*root.history[1:], {"text": root.text, "blocks": root.blocks}]
    for told, version in zip(records[1:], versions, strict=True):
        valid_blocks(version)
        header = version["blocks"][0]["text"]["text"]
        assert f"(+{len(told['incident']['members']) - 1} related)" in header
        if told["notification"] == "update":
            assert "(new)" in json.dumps(version["blocks"])
    for reply in replies:
        valid_blocks({"text": reply.text, "blocks": reply.blocks})
    assert f"{len(records) - 1} updates in the thread" in json.dumps(root.blocks)


def test_a_silenced_incident_gets_no_update(slack: SlackApi) -> None:
    records = outage()
    firing, updates = records[0], [r for r in records if r["notification"] == "update"]
    box = Outbox(("slack",))
    queue(box, firing)
    asyncio.run(Run(slack, box).deliver_all())
    silence = Silence("s1", (Matcher("incident", firing["incident"]["id"]),), 0, 4e9)
    queue(box, *updates)
    counted = asyncio.run(Run(slack, box, silences=Silenced((silence,))).deliver_all())
    assert counted == [("slack", "silenced")] * len(updates)
    (root,) = slack.roots()
    assert root.edits == 0 and slack.replies(root.ts) == []


def test_a_crash_between_an_update_reply_and_its_commit_does_not_reply_twice(
    slack: SlackApi,
) -> None:
    records = outage()
    firing = records[0]
    update = next(r for r in records if r["notification"] == "update")
    log: dict[Any, Any] = {}
    box = Outbox(("slack",))
    queue(box, firing)
    changelog(box, log)
    asyncio.run(Run(slack, box).deliver_all())
    changelog(box, log)  # the message state committed
    queue(box, update)
    changelog(box, log)
    asyncio.run(Run(slack, box).deliver_all())
    # kill -9 here: the update's tombstone never reached the changelog.
    restarted = restore(log)
    assert restarted.counts() == {"slack": 1}
    asyncio.run(Run(slack, restarted).deliver_all())
    (root,) = slack.roots()
    assert len(slack.replies(root.ts)) == 1, "the update's reply was found, not posted again"


@settings(max_examples=40, deadline=None)
@given(campaign=st.text(min_size=1, max_size=3000) | st.just("x" * 2500),
       joiners=st.integers(1, 80) | st.just(50),
       kpi=st.sampled_from(sorted(KPI)))  # fmt: skip
def test_update_messages_pass_slacks_block_kit_models(
    campaign: str, joiners: int, kpi: str
) -> None:
    members = [record(rule=f"r{i}", kpi=kpi, campaign=f"{campaign}{i}", change=-0.3 - i / 100)
               for i in range(joiners + 1)]  # fmt: skip
    rec = record(
        campaign=campaign, notification="update", labels={"campaign": campaign, "rule": "r"},
        incident={"id": "inc-1", "members": members,
                  "joined": [{k: m[k] for k in ("rule", "kpi", "scope", "channel", "campaign")}
                             for m in members[1:]]},
    )  # fmt: skip
    link = "http://am:9093/#/silences/new?filter=" + "x" * len(campaign)
    for payload in (slack_update_message(rec, silence_url=link),
                    slack_thread_note(rec, duration_s=None),
                    slack_incident_message(rec, silence_url=link, worst=-0.5, updates=2,
                                           duration_s=None)):  # fmt: skip
        valid_blocks(payload)
    note = slack_thread_note(rec, duration_s=None)["text"]
    assert note.startswith(":heavy_plus_sign: Also affected: ")
    assert joiners <= MAX_JOINED or f"and {joiners - MAX_JOINED} more" in note
