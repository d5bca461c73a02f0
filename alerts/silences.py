"""Alertmanager silences: matched here too, so a silence quiets kpimon's own Slack messages.

A silence set in Alertmanager (its UI, amtool, Grafana, ``kpimon silence add``)
mutes Alertmanager's routes; the worker also sends Slack messages itself, so it
reads the active silences (:class:`SilenceWatcher`) and skips the Slack message
of an alert whose labels one matches, with Alertmanager's own matcher semantics
(equality and anchored regular expressions, each possibly negated; a label the
alert lacks is the empty string). The alert is still recorded and still sent
to Alertmanager, which applies the silence itself.

The synchronous functions at the bottom back ``kpimon silence add|list|expire``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from typing import Any

import aiohttp

log = logging.getLogger("kpimon.alerts")
_MATCHER = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*(.*?)\s*")
TIMEOUT = aiohttp.ClientTimeout(total=10)


@dataclass(frozen=True)
class Matcher:
    """One Alertmanager matcher (``isEqual`` false negates, ``isRegex`` anchors the value)."""

    name: str
    value: str
    is_regex: bool = False
    is_equal: bool = True

    @cached_property
    def _pattern(self) -> re.Pattern[str] | None:
        try:
            return re.compile(f"^(?:{self.value})$")
        except re.error:
            return None  # Alertmanager refuses such a silence; here it simply never matches

    def matches(self, labels: Mapping[str, str]) -> bool:
        value = labels.get(self.name, "")
        if self.is_regex:
            pattern = self._pattern
            hit = pattern is not None and pattern.match(value) is not None
        else:
            hit = value == self.value
        return hit if self.is_equal else not hit

    def to_api(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "isRegex": self.is_regex,
                "isEqual": self.is_equal}  # fmt: skip

    @classmethod
    def from_api(cls, d: Mapping[str, Any]) -> Matcher:
        return cls(str(d["name"]), str(d["value"]), bool(d.get("isRegex", False)),
                   bool(d.get("isEqual", True)))  # fmt: skip

    def __str__(self) -> str:
        op = ("=" if self.is_equal else "!") + ("~" if self.is_regex else "")
        op = {"=": "=", "!": "!=", "=~": "=~", "!~": "!~"}[op]
        return f"{self.name}{op}{json.dumps(self.value)}"


def parse_matcher(text: str) -> Matcher:
    """``rule=ctr_drop``, ``campaign!=c1``, ``channel=~"soc.*"``, ``kpi!~cp.``."""
    found = _MATCHER.fullmatch(text)
    if found is None:
        raise ValueError(f"not a matcher (NAME=VALUE, NAME!=VALUE, NAME=~RE, NAME!~RE): {text!r}")
    name, op, value = found.groups()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = json.loads(value)
    matcher = Matcher(name, value, is_regex="~" in op, is_equal=op[0] == "=")
    if matcher.is_regex and matcher._pattern is None:
        raise ValueError(f"invalid regular expression in {text!r}")
    return matcher


@dataclass(frozen=True)
class Silence:
    id: str
    matchers: tuple[Matcher, ...]
    starts_at: float
    ends_at: float
    state: str = "active"
    created_by: str = ""
    comment: str = ""

    def active(self, now: float) -> bool:
        """In force at ``now``: judged on its times, so an expiry between two refreshes counts."""
        return self.state != "expired" and self.starts_at <= now < self.ends_at

    def matches(self, labels: Mapping[str, str]) -> bool:
        return bool(self.matchers) and all(m.matches(labels) for m in self.matchers)

    @classmethod
    def from_api(cls, d: Mapping[str, Any]) -> Silence:
        return cls(
            id=str(d["id"]),
            matchers=tuple(Matcher.from_api(m) for m in d.get("matchers") or []),
            starts_at=_epoch(d["startsAt"]),
            ends_at=_epoch(d["endsAt"]),
            state=str((d.get("status") or {}).get("state", "active")),
            created_by=str(d.get("createdBy", "")),
            comment=str(d.get("comment", "")),
        )


def _epoch(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")


def string_labels(labels: Mapping[str, Any] | None) -> dict[str, str]:
    """Labels as Alertmanager sees them: empty values are absent (and so match as "")."""
    return {str(k): str(v) for k, v in (labels or {}).items() if v is not None and v != ""}


def silence_url(ui_base: str, labels: Mapping[str, Any]) -> str:
    """Alertmanager's "new silence" form pre-filled with ``labels`` (its default length: 2 h)."""
    shown = string_labels(labels)
    matchers = ",".join(f"{k}={json.dumps(v)}" for k, v in sorted(shown.items()))
    query = urllib.parse.urlencode({"filter": "{" + matchers + "}"}, quote_via=urllib.parse.quote)
    return f"{ui_base.rstrip('/')}/#/silences/new?{query}"


class SilenceWatcher:
    """The active silences of one Alertmanager, refreshed in the background.

    An Alertmanager outage keeps the last known set (a silence someone set stays
    honoured) and is logged once, and once more when it is over.
    """

    def __init__(
        self, session: aiohttp.ClientSession, base_url: str, *, refresh: float = 30.0
    ) -> None:
        self._session = session
        self._url = base_url.rstrip("/") + "/api/v2/silences"
        self.refresh = refresh
        self.silences: tuple[Silence, ...] = ()
        self.loaded = asyncio.Event()
        self._failing = False

    def matching(self, labels: Mapping[str, Any], now: float | None = None) -> Silence | None:
        """The first silence in force that matches ``labels``, if any."""
        at = time.time() if now is None else now
        shown = string_labels(labels)
        return next((s for s in self.silences if s.active(at) and s.matches(shown)), None)

    async def poll(self) -> None:
        """Fetch the silences once; on failure keep the previous set."""
        try:
            async with self._session.get(self._url, timeout=TIMEOUT) as response:
                response.raise_for_status()
                body = await response.json()
            silences = tuple(
                Silence.from_api(d)
                for d in body
                if (d.get("status") or {}).get("state") != "expired"
            )
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError) as exc:
            if not self._failing:
                log.warning("cannot read Alertmanager silences (%s); keeping the %d known",
                            type(exc).__name__, len(self.silences))  # fmt: skip
            self._failing = True
            return
        if self._failing:
            log.info("reading Alertmanager silences again: %d in force or pending", len(silences))
        self._failing = False
        self.silences = silences
        self.loaded.set()

    async def run(self) -> None:
        while True:
            await self.poll()
            await asyncio.sleep(self.refresh)


# -- the API for ``kpimon silence`` (synchronous: a CLI makes one call) ---------------------
class SilenceError(Exception):
    """Alertmanager could not be reached or refused the request; the message says which."""


def _request(url: str, method: str = "GET", body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace").strip()[:300]
        raise SilenceError(f"Alertmanager answered {exc.code}: {detail}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise SilenceError(f"cannot reach Alertmanager: {reason}") from None
    return json.loads(raw) if raw.strip() else None


def add_silence(
    base_url: str, matchers: Sequence[Matcher], *, duration_s: float, comment: str, author: str,
    now: float | None = None,
) -> str:  # fmt: skip
    """Create a silence from now for ``duration_s``; returns its id."""
    if not matchers:
        raise SilenceError("a silence needs at least one matcher")
    start = time.time() if now is None else now
    body = {
        "matchers": [m.to_api() for m in matchers],
        "startsAt": _iso(start),
        "endsAt": _iso(start + duration_s),
        "createdBy": author,
        "comment": comment,
    }
    answer = _request(base_url.rstrip("/") + "/api/v2/silences", "POST", body)
    return str(answer["silenceID"])


def list_silences(base_url: str) -> list[Silence]:
    """Active and pending silences, soonest to end first."""
    body = _request(base_url.rstrip("/") + "/api/v2/silences")
    found = [Silence.from_api(d) for d in body if d["status"]["state"] != "expired"]
    return sorted(found, key=lambda s: s.ends_at)


def expire_silence(base_url: str, silence_id: str) -> None:
    quoted = urllib.parse.quote(silence_id, safe="")
    _request(f"{base_url.rstrip('/')}/api/v2/silence/{quoted}", "DELETE")


def format_silences(silences: Iterable[Silence]) -> str:
    rows = [
        f"{s.id}  ends {_iso(s.ends_at)}  {s.state:<7}  {' '.join(map(str, s.matchers))}"
        f"  by {s.created_by or '?'}: {s.comment}"
        for s in silences
    ]
    return "\n".join(rows) if rows else "no active silences"


def parse_duration(text: str) -> float:
    """``90s``, ``30m``, ``2h``, ``1d``, ``1h30m`` -> seconds (amtool's style)."""
    parts = re.fullmatch(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", text.strip())
    if parts is None or not text.strip():
        raise ValueError(f"not a duration (e.g. 30m, 2h, 1d): {text!r}")
    d, h, m, s = (int(x or 0) for x in parts.groups())
    seconds = float(((d * 24 + h) * 60 + m) * 60 + s)
    if seconds <= 0:
        raise ValueError(f"a duration must be positive: {text!r}")
    return seconds
