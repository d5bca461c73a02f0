"""Senders deliver in order, retry with backoff or Retry-After, drop only refused payloads."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from alerts.outbox import Outbox
from alerts.silences import Matcher, Silence, SilenceWatcher
from alerts.sinks import DeliveryError, Sender, SlackSink, readable
from stream.kpis import KPI
from tests.alerts.test_outbox import note
from tests.alerts.test_slack import Silenced, outage, valid_blocks


class ScriptedSink:
    channel = "slack"

    def __init__(self, failures: list[DeliveryError]) -> None:
        self.failures = failures
        self.delivered: list[str] = []

    async def deliver(self, record: Mapping[str, Any]) -> None:
        if self.failures:
            raise self.failures.pop(0)
        self.delivered.append(str(record["campaign"]))


async def drain(sink: ScriptedSink, box: Outbox, want: int) -> list[tuple[str, str]]:
    """Run a sender until ``want`` notifications were sent; the outcomes it counted."""
    counted: list[tuple[str, str]] = []
    done = asyncio.Event()

    def count(channel: str, outcome: str) -> None:
        counted.append((channel, outcome))
        if sum(o == "sent" for _, o in counted) == want:
            done.set()

    sender = Sender(sink, lambda: box, count, min_interval=0, max_backoff=0.05)
    task = asyncio.create_task(sender.run())
    try:
        await asyncio.wait_for(done.wait(), timeout=10)
    finally:
        task.cancel()
    return counted


def test_failures_are_retried_until_delivered_once_in_order() -> None:
    box = Outbox(("slack",))
    box.add([note("c1"), note("c2")])
    box.commit()
    sink = ScriptedSink([
        DeliveryError("rate_limited", "429", retry_after=0.01),
        DeliveryError("error", "500"),
        DeliveryError("error", "connection refused"),
    ])  # fmt: skip
    counted = asyncio.run(drain(sink, box, 2))
    assert sink.delivered == ["c1", "c2"]
    assert counted == [("slack", "rate_limited"), ("slack", "error"), ("slack", "error"),
                       ("slack", "sent"), ("slack", "sent")]  # fmt: skip


def test_a_refused_payload_is_dropped_and_counted_not_retried_forever() -> None:
    box = Outbox(("slack",))
    box.add([note("c1"), note("c2")])
    box.commit()
    sink = ScriptedSink([DeliveryError("error", "400 invalid_payload", permanent=True)])
    counted = asyncio.run(drain(sink, box, 1))
    assert sink.delivered == ["c2"]
    assert counted == [("slack", "error"), ("slack", "sent")]


@contextlib.asynccontextmanager
async def webhook(
    path: str, handler: Callable[[web.Request], Awaitable[web.Response]]
) -> AsyncIterator[str]:
    """A local webhook receiver answering POSTs to ``path`` with ``handler``: its URL."""
    app = web.Application()
    app.router.add_post(path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}{path}"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    ("status", "outcome", "retry_after", "permanent"),
    [(429, "rate_limited", 7.0, False), (500, "error", None, False),
     (400, "error", None, True), (404, "error", None, False)],
)  # fmt: skip
def test_slack_answers_map_to_delivery_errors_without_the_secret(
    status: int, outcome: str, retry_after: float | None, permanent: bool
) -> None:
    async def scenario() -> DeliveryError:
        async def hook(request: web.Request) -> web.Response:
            return web.Response(status=status, text="no", headers={"Retry-After": "7"})

        async with webhook("/services/secret-token", hook) as url, aiohttp.ClientSession() as s:
            sink = SlackSink(s, url)
            assert "secret" not in repr(sink)
            with pytest.raises(DeliveryError) as caught:
                await sink.deliver(note("c1"))
            return caught.value

    error = asyncio.run(scenario())
    assert (error.outcome, error.permanent) == (outcome, permanent)
    assert error.retry_after == retry_after
    assert "secret" not in str(error)


def test_an_unreachable_webhook_is_a_retryable_error_without_the_url() -> None:
    async def scenario() -> DeliveryError:
        async with aiohttp.ClientSession() as session:
            sink = SlackSink(session, "http://127.0.0.1:9/services/secret-token")
            with pytest.raises(DeliveryError) as caught:
                await sink.deliver(note("c1"))
            return caught.value

    error = asyncio.run(scenario())
    assert error.outcome == "error" and not error.permanent
    assert "secret" not in str(error) and "127.0.0.1" not in str(error)


def test_readable_line_names_what_where_and_links() -> None:
    line = readable(note("c7"))
    assert line.startswith("[kpimon] FIRING") and "c7" in line and "kpimon-campaign" in line
    assert readable(note("c7", "resolved")).startswith("[kpimon] RESOLVED")


def test_active_alerts_are_resent_only_when_nothing_is_queued() -> None:
    """A re-send is a snapshot of what fires: it must never overtake a queued resolve."""
    box = Outbox(("slack",))
    box.add([note("c1", "resolved")])
    box.commit()
    sink = ScriptedSink([])
    resent_with_queue: list[int] = []
    resent = asyncio.Event()

    async def resend() -> int:
        resent_with_queue.append(box.counts()["slack"])
        resent.set()
        return 1

    async def scenario() -> None:
        sender = Sender(sink, lambda: box, lambda c, o: None, min_interval=0,
                        resend=resend, resend_every=0)  # fmt: skip
        task = asyncio.create_task(sender.run())
        try:
            await asyncio.wait_for(resent.wait(), timeout=10)
        finally:
            task.cancel()

    asyncio.run(scenario())
    assert sink.delivered == ["c1"]
    assert resent_with_queue and all(n == 0 for n in resent_with_queue)


def test_webhook_mode_posts_an_update_as_a_short_message_unless_silenced() -> None:
    """A webhook cannot edit its firing message: an update is a short message of its own,
    naming what joined and the incident it joined; a silence mutes it like the rest."""
    update = next(r for r in outage() if r["notification"] == "update")
    ident = update["incident"]["id"]

    async def scenario(silences: SilenceWatcher | None) -> tuple[str | None, list[Any]]:
        bodies: list[Any] = []

        async def hook(request: web.Request) -> web.Response:
            bodies.append(await request.json())
            return web.Response(text="ok")

        async with webhook("/services/hook", hook) as url, aiohttp.ClientSession() as session:
            sink = SlackSink(session, url, silences=silences, silence_ui="http://am:9093")
            return await sink.deliver(update), bodies

    outcome, (body,) = asyncio.run(scenario(None))
    assert outcome is None
    valid_blocks(body)
    assert body["text"].startswith(":heavy_plus_sign: Also affected: ")
    assert ident in json.dumps(body) and len(body["blocks"]) <= 3, "short: no fields"
    assert all(KPI[j["kpi"]].title in body["text"] for j in update["incident"]["joined"])
    assert "silences/new" in json.dumps(body), "the silence button is there too"
    muted = Silenced((Silence("s1", (Matcher("incident", ident),), 0, 4e9),))
    assert asyncio.run(scenario(muted)) == ("silenced", [])
    line = readable(update)
    assert line.startswith("[kpimon] UPDATE") and "also affected: " in line
