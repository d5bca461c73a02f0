"""Slack Web API sink: one living message per incident, its repeats and resolve in its thread.

The first notification of an incident is posted with ``chat.postMessage``;
repeats, updates (alerts that joined the open incident) and the resolve edit that
message with ``chat.update`` and add a reply to its thread. Which message belongs
to which incident (channel id + ``ts``) is exactly-once state: noted in the
outbox right after the post, it reaches the scope changelog in the same
transaction as the delivered entry's tombstone, so a restarted worker updates
the same message. A crash can still fall between a
post and that transaction: every message carries its incident key (and thread
replies their notification id) in Slack's message metadata, and an entry read
back from the changelog (:attr:`Entry.restored`) whose message is unknown is
looked up with ``conversations.history`` (replies with ``conversations.replies``)
before anything is posted again.

Errors are mapped to :class:`DeliveryError` so the :class:`Sender` retries
(``ratelimited``, 429 with ``Retry-After``, 5xx, network) or drops and counts
with one log line (a bad token, a missing channel, ...). Calls are paced per
method (``chat.postMessage`` about one a second per channel, ``chat.update``
and the lookups Tier 3). The bot token never appears in a log line or error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import aiohttp
from pydantic import SecretStr
from slack_sdk.errors import SlackApiError, SlackClientError
from slack_sdk.web.async_client import AsyncWebClient
from slack_sdk.web.async_slack_response import AsyncSlackResponse

from alerts.notify import slack_incident_message, slack_thread_note
from alerts.outbox import Entry, Outbox, notification_id
from alerts.silences import SilenceWatcher, silence_url
from alerts.sinks import DeliveryError, Sink, SlackSink

log = logging.getLogger("kpimon.alerts")

ROOT_EVENT = "kpimon_incident"
NOTE_EVENT = "kpimon_notification"
CHANNEL_KEY = "@channel"
"""Outbox state key holding the channel id Slack returned (lookups need the id, not a name)."""

PACE: dict[str, float] = {
    "chat.postMessage": 1.0,  # about one message a second per channel
    "chat.update": 1.2,  # Tier 3: ~50 a minute
    "conversations.history": 1.2,  # Tier 3
    "conversations.replies": 1.2,  # Tier 3
}
LOOKUP_PAGES = 10
"""History pages (200 messages each) searched for a message a crash may have orphaned."""

# ``ok: false`` codes no retry can fix: the notification is dropped, counted, logged once.
DROP = {
    "channel_not_found": "the channel does not exist or the bot cannot see it "
    "(KPIMON_SLACK_CHANNEL)",
    "not_in_channel": "the bot is not a member of the channel: invite it (/invite @bot)",
    "is_archived": "the channel is archived (KPIMON_SLACK_CHANNEL)",
    "invalid_auth": "the bot token is not valid (KPIMON_SLACK_BOT_TOKEN)",
    "not_authed": "no bot token was sent (KPIMON_SLACK_BOT_TOKEN)",
    "token_revoked": "the bot token was revoked (KPIMON_SLACK_BOT_TOKEN)",
    "token_expired": "the bot token expired (KPIMON_SLACK_BOT_TOKEN)",
    "account_inactive": "the bot's account is deactivated",
    "missing_scope": "the bot token lacks a scope (chat:write, channels:history)",
    "msg_too_long": "the message is too long",
    "invalid_blocks": "Slack refused the message's blocks",
    "invalid_metadata_format": "Slack refused the message metadata",
}
THREADED = ("repeat", "update", "resolved")
"""Notifications that edit the incident's message and reply in its thread (an update: the
alerts that joined, edited into the message's member list and named in the reply)."""
RETRY = {"ratelimited", "internal_error", "fatal_error", "service_unavailable", "request_timeout"}


def incident_key(record: Mapping[str, Any]) -> str:
    """The incident a notification belongs to: its one Slack message is keyed by this.

    The incident's id (``alerts.incidents``); a record without one (written before
    incidents, or by a tool) stands for its own alert cycle: rule, segment, start.
    """
    incident = record.get("incident")
    if isinstance(incident, Mapping) and incident.get("id"):
        return str(incident["id"])
    return "|".join(
        str(record.get(name)) for name in ("rule", "scope", "channel", "campaign", "starts_at")
    )


def _epoch(text: Any) -> float | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class Pacer:
    """Spaces calls of each Slack method by its minimum interval."""

    def __init__(self, intervals: Mapping[str, float]) -> None:
        self.intervals = dict(intervals)
        self._next: dict[str, float] = {}

    async def wait(self, method: str) -> None:
        now = time.monotonic()
        at = self._next.get(method, now)
        if at > now:
            await asyncio.sleep(at - now)
        self._next[method] = max(at, now) + self.intervals.get(method, 0.0)


def delivery_error(method: str, exc: SlackApiError) -> DeliveryError:
    """What a failed call means for the sender: retry (when) or drop; never the token."""
    response = exc.response
    status = int(getattr(response, "status_code", 0) or getattr(response, "status", 0) or 0)
    data = getattr(response, "data", None)
    error = str(data.get("error", "")) if isinstance(data, dict) else ""
    headers = getattr(response, "headers", None) or {}
    detail = f"slack {method}: {error or 'HTTP ' + str(status)}"
    if status == 429 or error == "ratelimited":
        retry_after = headers.get("Retry-After")
        try:
            wait = max(0.0, float(retry_after)) if retry_after is not None else None
        except ValueError:
            wait = None
        return DeliveryError("rate_limited", detail, retry_after=wait)
    if error in DROP:
        return DeliveryError("error", f"{detail}: {DROP[error]}", permanent=True)
    if status >= 500 or error in RETRY or not error:
        return DeliveryError("error", detail)
    return DeliveryError("error", detail, permanent=True)  # e.g. invalid_arguments


class SlackApiSink:
    """Delivers outbox entries as one living Slack message per incident (see module doc)."""

    channel = "slack"

    def __init__(
        self,
        client: AsyncWebClient,
        slack_channel: str,
        outbox: Callable[[], Outbox | None],
        *,
        silences: SilenceWatcher | None = None,
        silence_ui: str | None = None,
        pace: Mapping[str, float] = PACE,
    ) -> None:
        self._client = client
        self._target = slack_channel
        self._outbox = outbox
        self._silences = silences
        self._silence_ui = silence_ui
        self._pacer = Pacer(pace)
        self._known: dict[str, dict[str, Any]] = {}
        """Messages noted in this process: a rebuilt outbox may not hold them yet."""

    def __repr__(self) -> str:
        return f"SlackApiSink(channel={self._target!r}, <token hidden>)"

    # -- state ---------------------------------------------------------------------------
    def _state(self, key: str) -> dict[str, Any] | None:
        box = self._outbox()
        state = box.state(self.channel, key) if box is not None else None
        state = state if state is not None else self._known.get(key)
        return None if state is None else dict(state)  # edited by the caller, noted after

    def _note(self, key: str, state: dict[str, Any] | None) -> None:
        if state is None:
            self._known.pop(key, None)
        else:
            self._known[key] = state
        box = self._outbox()
        if box is not None and box.state(self.channel, key) != state:
            box.set_state(self.channel, key, state)

    def _channel_id(self) -> str:
        noted = self._state(CHANNEL_KEY)
        return str(noted["id"]) if noted else self._target

    # -- calls ---------------------------------------------------------------------------
    async def _call(self, method: str, **kwargs: Any) -> AsyncSlackResponse:
        await self._pacer.wait(method)
        try:
            if method in ("conversations.history", "conversations.replies"):
                return await self._client.api_call(method, http_verb="GET", params=kwargs)
            return await self._client.api_call(method, json=kwargs)
        except SlackApiError as exc:
            raise delivery_error(method, exc) from None
        except (SlackClientError, aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise DeliveryError("error", f"slack {method}: {type(exc).__name__}") from None

    def _silenced(self, record: Mapping[str, Any]) -> bool:
        return self._silences is not None and self._silences.matching(record["labels"]) is not None

    def _silence_link(self, record: Mapping[str, Any]) -> str | None:
        if self._silence_ui is None:
            return None
        return silence_url(self._silence_ui, record.get("labels") or {})

    # -- delivery ------------------------------------------------------------------------
    async def deliver(self, record: Mapping[str, Any]) -> str | None:
        """A record with no outbox entry behind it (tests, tools): treated as fresh."""
        return await self.deliver_entry(Entry(self.channel, notification_id(record), 0,
                                              dict(record)))  # fmt: skip

    async def deliver_entry(self, entry: Entry) -> str | None:
        """Post, or update and reply; returns the outcome when it is not "sent"."""
        record = entry.record
        key = incident_key(record)
        resolved = record["status"] == "resolved"
        state = self._state(key)
        if state is None and entry.restored:
            state = await self._find_root(key, record)
            if state is not None:
                self._note(key, state)
        if self._silenced(record):
            if state is not None and resolved:
                # Keep the message true (an edit pings nobody); no thread reply.
                await self._update(key, state, record)
                self._note(key, None)
            return "silenced"
        if state is None:
            state = await self._post_root(key, record)
            self._note(key, None if resolved else state)
            return None
        await self._update(key, state, record)
        if record.get("notification") in THREADED:
            nid = notification_id(record)
            if not (entry.restored and await self._replied(state, nid)):
                await self._reply(key, state, record, nid)
        self._note(key, None if resolved else state)
        return None

    def _message(self, record: Mapping[str, Any], state: Mapping[str, Any] | None) -> Any:
        change = record.get("change")
        worst = state.get("worst") if state else None
        if record["status"] == "firing" and change is not None:
            worst = change if worst is None or abs(change) > abs(worst) else worst
        start, end = _epoch(record.get("starts_at")), _epoch(record.get("ends_at"))
        return slack_incident_message(
            record, silence_url=self._silence_link(record), worst=worst,
            updates=int(state.get("updates", 0)) if state else 0,
            duration_s=end - start if start is not None and end is not None else None,
        ), worst  # fmt: skip

    async def _post_root(self, key: str, record: Mapping[str, Any]) -> dict[str, Any]:
        payload, worst = self._message(record, None)
        response = await self._call(
            "chat.postMessage", channel=self._channel_id(), **payload,
            metadata={"event_type": ROOT_EVENT, "event_payload": {"incident": key}},
        )  # fmt: skip
        channel_id = str(response["channel"])
        if self._state(CHANNEL_KEY) is None:
            self._note(CHANNEL_KEY, {"id": channel_id})
        return {"channel": channel_id, "ts": str(response["ts"]), "worst": worst, "updates": 0}

    async def _update(self, key: str, state: dict[str, Any], record: Mapping[str, Any]) -> None:
        if record.get("notification") in THREADED and not self._silenced(record):
            state["updates"] = int(state.get("updates", 0)) + 1
        payload, state["worst"] = self._message(record, state)
        try:
            await self._call("chat.update", channel=state["channel"], ts=state["ts"], **payload,
                             metadata={"event_type": ROOT_EVENT,
                                       "event_payload": {"incident": key}})  # fmt: skip
        except DeliveryError as exc:
            if "message_not_found" not in exc.detail:
                raise
            # Someone deleted the message: the incident starts a new one.
            log.warning("slack: the message of an incident was deleted; posting a new one")
            state.update(await self._post_root(key, record))

    async def _reply(
        self, key: str, state: Mapping[str, Any], record: Mapping[str, Any], nid: str
    ) -> None:
        start, end = _epoch(record.get("starts_at")), _epoch(record.get("ends_at"))
        note = slack_thread_note(
            record, duration_s=end - start if start is not None and end is not None else None
        )
        await self._call(
            "chat.postMessage", channel=state["channel"], thread_ts=state["ts"], **note,
            metadata={"event_type": NOTE_EVENT,
                      "event_payload": {"incident": key, "notification": nid}},
        )  # fmt: skip

    # -- lookups after a restart -----------------------------------------------------------
    async def _find_root(self, key: str, record: Mapping[str, Any]) -> dict[str, Any] | None:
        """The message a previous owner may have posted for ``key`` before it could note it.

        Searched from the moment the alert fired (no message of it can be older).
        A channel given by name cannot be searched until a post has taught us its id.
        """
        channel = self._channel_id()
        if channel[:1] not in ("C", "G", "D") or not channel[1:].isalnum():
            log.warning("slack: cannot look for an earlier message by channel name; "
                        "use a channel id in KPIMON_SLACK_CHANNEL")  # fmt: skip
            return None
        since = _epoch(record.get("fired_at")) or _epoch(record.get("starts_at")) or 0.0
        cursor: str | None = None
        for _ in range(LOOKUP_PAGES):
            params: dict[str, Any] = {"channel": channel, "oldest": f"{since - 60:.6f}",
                                      "limit": 200, "include_all_metadata": True}  # fmt: skip
            if cursor:
                params["cursor"] = cursor
            response = await self._call("conversations.history", **params)
            for message in response.get("messages") or []:
                meta = message.get("metadata") or {}
                payload = meta.get("event_payload") or {}
                if meta.get("event_type") == ROOT_EVENT and payload.get("incident") == key:
                    replies = int(message.get("reply_count", 0) or 0)
                    log.info("slack: found the message an earlier run posted for an incident")
                    return {"channel": channel, "ts": str(message["ts"]), "worst": None,
                            "updates": replies}  # fmt: skip
            cursor = (response.get("response_metadata") or {}).get("next_cursor") or None
            if not cursor:
                break
        return None

    async def _replied(self, state: Mapping[str, Any], nid: str) -> bool:
        """Whether the thread already holds the reply for notification ``nid``."""
        cursor: str | None = None
        for _ in range(LOOKUP_PAGES):
            params: dict[str, Any] = {"channel": state["channel"], "ts": state["ts"],
                                      "limit": 200, "include_all_metadata": True}  # fmt: skip
            if cursor:
                params["cursor"] = cursor
            response = await self._call("conversations.replies", **params)
            for message in response.get("messages") or []:
                meta = message.get("metadata") or {}
                if (meta.get("event_payload") or {}).get("notification") == nid:
                    return True
            cursor = (response.get("response_metadata") or {}).get("next_cursor") or None
            if not cursor:
                break
        return False


class SlackSettings(Protocol):
    """The settings :func:`slack_setup` reads (``stream.settings.Settings`` has them)."""

    @property
    def slack_webhook_url(self) -> SecretStr | None: ...
    @property
    def slack_bot_token(self) -> SecretStr | None: ...
    @property
    def slack_channel(self) -> str | None: ...
    @property
    def slack_api_url(self) -> str | None: ...
    @property
    def alertmanager_url(self) -> str | None: ...
    @property
    def alertmanager_ui_url(self) -> str | None: ...
    @property
    def silences_refresh_seconds(self) -> float: ...


@dataclass
class SlackSetup:
    """The Slack sink of a worker and the silence watcher it consults (if any)."""

    sink: Sink
    watcher: SilenceWatcher | None

    def start(self) -> list[asyncio.Task[None]]:
        """Background tasks to cancel on stop: the silence refresh."""
        return [asyncio.create_task(self.watcher.run())] if self.watcher is not None else []


def slack_setup(
    session: aiohttp.ClientSession, outbox: Callable[[], Outbox | None], s: SlackSettings
) -> SlackSetup | None:
    """The configured Slack sink: Web API (bot token) or incoming webhook, or None."""
    watcher = None
    if s.alertmanager_url:
        watcher = SilenceWatcher(session, s.alertmanager_url, refresh=s.silences_refresh_seconds)
    ui = s.alertmanager_ui_url or s.alertmanager_url
    sink: Sink
    if s.slack_bot_token is not None and s.slack_channel is not None:
        client = AsyncWebClient(
            token=s.slack_bot_token.get_secret_value(),
            base_url=s.slack_api_url or AsyncWebClient.BASE_URL,
            session=session,
            retry_handlers=[],  # the Sender retries, counts and backs off
        )
        sink = SlackApiSink(client, s.slack_channel, outbox, silences=watcher, silence_ui=ui)
    elif s.slack_webhook_url is not None:
        sink = SlackSink(session, s.slack_webhook_url.get_secret_value(), silences=watcher,
                         silence_ui=ui)  # fmt: skip
    else:
        return None
    return SlackSetup(sink, watcher)
