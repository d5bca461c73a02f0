"""Alert sinks behind one interface, and the sender that drains the outbox into each.

A sink delivers one alert record or raises :class:`DeliveryError` saying
whether to retry and when. A :class:`Sender` per sink takes the oldest
deliverable outbox entry of its channel, delivers it, and only then marks it
done; failures are retried with exponential backoff (or after Slack's
``Retry-After``), so a sink outage delays notifications but never blocks the
stream nor loses one. Webhook URLs are secrets: they are never logged, and
errors are reported by type and status only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import aiohttp

from alerts.notify import alertmanager_alerts, joined_text, slack_payload, slack_update_message
from alerts.outbox import Entry, Outbox
from alerts.silences import SilenceWatcher, silence_url

log = logging.getLogger("kpimon.alerts")
TIMEOUT = aiohttp.ClientTimeout(total=10)


class DeliveryError(Exception):
    """The sink did not take the notification.

    ``outcome`` is the ``kpimon_notifications_total`` outcome label; ``permanent``
    means retrying can never help (the payload itself was refused).
    """

    def __init__(
        self, outcome: str, detail: str, *, retry_after: float | None = None,
        permanent: bool = False,
    ) -> None:  # fmt: skip
        super().__init__(detail)
        self.outcome = outcome
        self.detail = detail
        self.retry_after = retry_after
        self.permanent = permanent


class Sink(Protocol):
    """Delivers one record; may return an outcome other than "sent" (e.g. "silenced")."""

    channel: str

    async def deliver(self, record: Mapping[str, Any]) -> str | None: ...


@runtime_checkable
class EntrySink(Protocol):
    """A sink that needs the outbox entry itself (whether it was restored after a restart)."""

    channel: str

    async def deliver_entry(self, entry: Entry) -> str | None: ...


async def _post(session: aiohttp.ClientSession, url: str, body: Any, what: str) -> None:
    """POST JSON; maps every failure to a DeliveryError without the URL in it."""
    try:
        async with session.post(url, json=body, timeout=TIMEOUT) as response:
            if response.status < 300:
                return
            text = (await response.text())[:200]
            status = response.status
            retry_after = response.headers.get("Retry-After")
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise DeliveryError("error", f"{what}: {type(exc).__name__}") from None
    detail = f"{what}: HTTP {status} {text!r}"
    if status == 429:
        raise DeliveryError("rate_limited", detail, retry_after=_seconds(retry_after))
    # 400 is a payload the receiver will never take; anything else (5xx, a webhook
    # that is disabled for now, ...) may heal, so it is retried.
    raise DeliveryError("error", detail, permanent=status == 400)


def _seconds(value: str | None) -> float:
    try:
        return max(0.0, float(value)) if value else 1.0
    except ValueError:
        return 1.0


class SlackSink:
    """Slack incoming webhook: one Block Kit message per notification.

    A webhook cannot edit what it posted, so an update (alerts that joined an open
    incident) is a short message of its own: what joined, the incident it joined, links.

    With ``silences``, an alert an active Alertmanager silence matches is skipped
    (outcome "silenced"); with ``silence_ui``, every message links a silence form.
    """

    channel = "slack"

    def __init__(
        self, session: aiohttp.ClientSession, webhook_url: str, *,
        silences: SilenceWatcher | None = None, silence_ui: str | None = None,
    ) -> None:  # fmt: skip
        self._session = session
        self._url = webhook_url
        self._silences = silences
        self._silence_ui = silence_ui

    async def deliver(self, record: Mapping[str, Any]) -> str | None:
        if self._silences is not None and self._silences.matching(record["labels"]) is not None:
            return "silenced"
        link = None
        if self._silence_ui is not None:
            link = silence_url(self._silence_ui, record.get("labels") or {})
        if record.get("notification") == "update":
            payload = slack_update_message(record, silence_url=link)
        else:
            payload = slack_payload(record, silence_url=link)
        await _post(self._session, self._url, payload, "slack webhook")
        return None

    def __repr__(self) -> str:
        return "SlackSink(<webhook url hidden>)"


class AlertmanagerSink:
    """Alertmanager API v2: firing alerts (re-sent while firing) and resolves (``endsAt``)."""

    channel = "alertmanager"

    def __init__(self, session: aiohttp.ClientSession, base_url: str) -> None:
        self._session = session
        self._url = base_url.rstrip("/") + "/api/v2/alerts"

    async def deliver(self, record: Mapping[str, Any]) -> str | None:
        await self.deliver_many([record])
        return None

    async def deliver_many(self, records: Sequence[Mapping[str, Any]]) -> None:
        if records:
            await _post(self._session, self._url, alertmanager_alerts(records), "alertmanager")


class ConsoleSink:
    """Readable lines on standard output: the demo's sink when no Slack webhook is set."""

    channel = "console"

    async def deliver(self, record: Mapping[str, Any]) -> str | None:
        print(readable(record), flush=True)
        return None


def readable(record: Mapping[str, Any]) -> str:
    """One alert record as a line a person reads at a glance."""
    icon = "FIRING  " if record["status"] == "firing" else "RESOLVED"
    extra = []
    also = joined_text(record) if record["status"] == "firing" else None
    if record.get("notification") == "update":
        icon = "UPDATE  "
    if also:
        extra.append(f"also affected: {also}")
    if record.get("p_value") is not None:
        extra.append(f"p={record['p_value']:.1e}")
    top = record.get("contributors") or []
    if top and record["status"] == "firing":
        names = [c["campaign"] or c["channel"] for c in top]
        extra.append("most from " + ", ".join(names))
    url = (record.get("annotations") or {}).get("dashboard_url")
    if url:
        extra.append(str(url))
    tail = f" [{'; '.join(extra)}]" if extra else ""
    return f"[kpimon] {icon} {record['severity']}: {record['summary']}{tail}"


class Sender:
    """Drains one channel of the outbox into its sink, in order, retrying until delivered."""

    def __init__(
        self,
        sink: Sink,
        outbox: Callable[[], Outbox | None],
        count: Callable[[str, str], None],
        *,
        min_interval: float = 1.0,
        max_backoff: float = 60.0,
        resend: Callable[[], Awaitable[int]] | None = None,
        resend_every: float = 60.0,
    ) -> None:
        self.sink = sink
        self.resend = resend
        self.resend_every = resend_every
        self._resent_at = time.monotonic()
        self._outbox = outbox
        self._count = count
        self.min_interval = min_interval
        self.max_backoff = max_backoff
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """New entries were committed."""
        self._wake.set()

    async def _resend_if_due(self) -> None:
        """Re-send what is active, in this sender's order: only with nothing queued, so a
        snapshot of firing alerts can never overtake the resolve that followed it."""
        if self.resend is None or time.monotonic() - self._resent_at < self.resend_every:
            return
        self._resent_at = time.monotonic()
        try:
            sent = await self.resend()
        except DeliveryError as exc:
            self._count(self.sink.channel, exc.outcome)
            log.warning("re-sending firing alerts to %s failed (%s)", self.sink.channel,
                        exc.detail)  # fmt: skip
        else:
            if sent:
                self._count(self.sink.channel, "sent")

    async def run(self) -> None:
        channel, backoff = self.sink.channel, 1.0
        while True:
            box = self._outbox()
            entry = box.head(channel) if box is not None else None
            if box is None or entry is None:
                await self._resend_if_due()
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=1.0)
                continue
            try:
                if isinstance(self.sink, EntrySink):
                    outcome = await self.sink.deliver_entry(entry) or "sent"
                else:
                    outcome = await self.sink.deliver(entry.record) or "sent"
            except DeliveryError as exc:
                self._count(channel, exc.outcome)
                if exc.permanent:
                    log.error("%s refused a notification for good (%s); dropped: %s",
                              channel, exc.detail, entry.record.get("summary"))  # fmt: skip
                    current = self._outbox()
                    if current is not None:
                        current.done(entry)
                    continue
                delay = exc.retry_after if exc.retry_after is not None else backoff
                backoff = min(backoff * 2, self.max_backoff)
                log.warning("%s delivery failed (%s); %d waiting, retrying in %.1f s",
                            channel, exc.detail, len(box.pending[channel]), delay)  # fmt: skip
                await asyncio.sleep(delay)
                continue
            backoff = 1.0
            self._count(channel, outcome)
            current = self._outbox()  # the outbox may have been rebuilt meanwhile
            if current is not None:
                current.done(entry)
            if outcome == "sent":
                await asyncio.sleep(self.min_interval)
