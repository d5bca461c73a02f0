"""Delivery: the sinks the settings configure, each drained by its own sender.

The alert stage's outbox holds what to deliver (committed with the decision that made
it); here each configured sink (Slack, Alertmanager, console) gets a :class:`Sender`
that drains its channel of the outbox, with pacing, backoff and, for Alertmanager, the
re-send of firing alerts. The runtime starts it, wakes it after a commit and stops it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from alerts.outbox import Outbox
from alerts.sinks import AlertmanagerSink, ConsoleSink, Sender, Sink
from alerts.slack import slack_setup
from stream.settings import Settings

Firing = Callable[[float], list[dict[str, Any]]]
"""The records of what fires now (for Alertmanager's re-send)."""


class Delivery:
    """One sender per configured sink, and the HTTP session they share."""

    def __init__(
        self,
        settings: Settings,
        outbox: Callable[[], Outbox | None],
        count: Callable[[str, str], None],
        firing: Firing,
    ) -> None:
        self.settings = settings
        self._outbox = outbox
        self._count = count
        self._firing = firing
        self.session: aiohttp.ClientSession | None = None
        self.senders: list[Sender] = []
        self.tasks: list[asyncio.Task[None]] = []
        self._alertmanager: AlertmanagerSink | None = None

    @property
    def channels(self) -> tuple[str, ...]:
        return tuple(sender.sink.channel for sender in self.senders)

    def start(self) -> None:
        s = self.settings
        self.session = aiohttp.ClientSession()
        sinks: list[Sink] = []
        slack = slack_setup(self.session, self._outbox, s)
        if slack is not None:
            sinks.append(slack.sink)
        if s.alertmanager_url:
            self._alertmanager = AlertmanagerSink(self.session, s.alertmanager_url)
            sinks.append(self._alertmanager)
        if s.console_alerts:
            sinks.append(ConsoleSink())
        self.senders = [
            Sender(sink, self._outbox, self._count,
                   min_interval=s.notify_min_interval_seconds,
                   max_backoff=s.notify_max_backoff_seconds,
                   resend=self._resend_firing if sink is self._alertmanager else None,
                   resend_every=s.alertmanager_resend_seconds)
            for sink in sinks
        ]  # fmt: skip
        self.tasks = [asyncio.create_task(sender.run()) for sender in self.senders]
        self.tasks += slack.start() if slack is not None else []

    def wake(self) -> None:
        """Something new is in the outbox (a commit, a restore)."""
        for sender in self.senders:
            sender.wake()

    async def _resend_firing(self) -> int:
        """Alertmanager forgets an alert not re-sent within its resolve timeout."""
        if self._alertmanager is None:
            return 0
        records = self._firing(time.time())
        await self._alertmanager.deliver_many(records)
        return len(records)
