"""A local stand-in for the parts of Slack's Web API kpimon calls, for tests.

``chat.postMessage`` (root messages and thread replies), ``chat.update``,
``conversations.history`` and ``conversations.replies`` (with message metadata
when ``include_all_metadata`` is set, and cursor pagination), on a loopback
port, started and stopped by the test. Answers can be scripted per method
(HTTP 429 with ``Retry-After``, ``ok: false`` codes) and every call is logged
with its time, so tests can check pacing and retries.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

TOKEN = "xoxb-0000-test-s3cr3t-token"
CHANNEL_ID = "C0KPIMON1"
PAGE = 2  # small pages, so the lookups' pagination is exercised


@dataclass
class Message:
    ts: str
    text: str
    blocks: list[dict[str, Any]]
    metadata: dict[str, Any] | None
    thread_ts: str | None = None
    edits: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    def view(self, with_metadata: bool, replies: int = 0) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "message", "ts": self.ts, "text": self.text,
                               "blocks": self.blocks}  # fmt: skip
        if self.thread_ts:
            out["thread_ts"] = self.thread_ts
        if replies:
            out["reply_count"] = replies
        if with_metadata and self.metadata:
            out["metadata"] = self.metadata
        return out


class SlackApi:
    """The stand-in; ``script[method]`` holds (status, headers, body) answers to give first."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.messages: dict[str, Message] = {}
        self.calls: list[tuple[str, float, dict[str, Any]]] = []
        self.script: dict[str, list[tuple[int, dict[str, str], dict[str, Any]]]] = {}
        self.down_until = 0.0
        """``time.monotonic()`` until which every call gets HTTP 503 (an outage)."""
        self._clock = time.time()  # ts are wall-clock times, like Slack's
        api = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, status: int, headers: dict[str, str], body: dict[str, Any]) -> None:
                raw = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(raw)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(raw)

            def _handle(self, params: dict[str, Any]) -> None:
                method = urllib.parse.urlsplit(self.path).path.rsplit("/", 1)[-1]
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    self._answer(200, {}, {"ok": False, "error": "invalid_auth"})
                    return
                self._answer(*api.handle(method, params))

            def do_GET(self) -> None:
                query = urllib.parse.urlsplit(self.path).query
                self._handle(dict(urllib.parse.parse_qsl(query)))

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.headers.get("Content-Type", "").startswith("application/json"):
                    self._handle(json.loads(raw) if raw else {})
                else:
                    self._handle(dict(urllib.parse.parse_qsl(raw.decode())))

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.server.server_port}/api/"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- the API ---------------------------------------------------------------------------
    def handle(self, method: str, p: dict[str, Any]) -> tuple[int, dict[str, str], dict[str, Any]]:
        with self.lock:
            self.calls.append((method, time.monotonic(), p))
            if time.monotonic() < self.down_until:
                return 503, {}, {"ok": False, "error": "service_unavailable"}
            scripted = self.script.get(method)
            if scripted:
                return scripted.pop(0)
            handler = getattr(self, "_" + method.replace(".", "_"), None)
            if handler is None:
                return 200, {}, {"ok": False, "error": "unknown_method"}
            return 200, {}, handler(p)

    def _channel_ok(self, p: dict[str, Any]) -> bool:
        return p.get("channel") in (CHANNEL_ID, "#kpi-alerts")

    def _chat_postMessage(self, p: dict[str, Any]) -> dict[str, Any]:
        if not self._channel_ok(p):
            return {"ok": False, "error": "channel_not_found"}
        thread = p.get("thread_ts")
        if thread is not None and thread not in self.messages:
            return {"ok": False, "error": "thread_not_found"}
        self._clock = max(self._clock + 0.001, time.time())
        ts = f"{self._clock:.6f}"
        self.messages[ts] = Message(ts, p.get("text", ""), list(p.get("blocks") or []),
                                    p.get("metadata"), thread)  # fmt: skip
        return {"ok": True, "channel": CHANNEL_ID, "ts": ts, "message": {"ts": ts}}

    def _chat_update(self, p: dict[str, Any]) -> dict[str, Any]:
        if p.get("channel") != CHANNEL_ID:
            return {"ok": False, "error": "channel_not_found"}
        message = self.messages.get(str(p.get("ts")))
        if message is None:
            return {"ok": False, "error": "message_not_found"}
        message.history.append({"text": message.text, "blocks": message.blocks})
        message.text, message.blocks = p.get("text", ""), list(p.get("blocks") or [])
        message.metadata = p.get("metadata", message.metadata)
        message.edits += 1
        return {"ok": True, "channel": CHANNEL_ID, "ts": message.ts}

    def _page(self, items: list[dict[str, Any]], p: dict[str, Any]) -> dict[str, Any]:
        start = int(p.get("cursor") or 0)
        limit = min(int(p.get("limit") or 100), PAGE)
        page = items[start : start + limit]
        more = start + limit < len(items)
        cursor = str(start + limit) if more else ""
        return {"ok": True, "messages": page, "has_more": more,
                "response_metadata": {"next_cursor": cursor}}  # fmt: skip

    def _conversations_history(self, p: dict[str, Any]) -> dict[str, Any]:
        if p.get("channel") != CHANNEL_ID:
            return {"ok": False, "error": "channel_not_found"}
        meta = str(p.get("include_all_metadata", "")).lower() in ("1", "true")
        oldest = float(p.get("oldest") or 0)
        roots = [m for m in self.messages.values() if m.thread_ts is None and float(m.ts) > oldest]
        roots.sort(key=lambda m: float(m.ts), reverse=True)  # newest first, like Slack
        return self._page([m.view(meta, len(self.replies(m.ts))) for m in roots], p)

    def _conversations_replies(self, p: dict[str, Any]) -> dict[str, Any]:
        root = self.messages.get(str(p.get("ts")))
        if p.get("channel") != CHANNEL_ID or root is None:
            return {"ok": False, "error": "thread_not_found"}
        meta = str(p.get("include_all_metadata", "")).lower() in ("1", "true")
        return self._page([root.view(meta)] + [m.view(meta) for m in self.replies(root.ts)], p)

    # -- for assertions --------------------------------------------------------------------
    def roots(self) -> list[Message]:
        with self.lock:
            return [m for m in self.messages.values() if m.thread_ts is None]

    def replies(self, ts: str) -> list[Message]:
        return sorted((m for m in self.messages.values() if m.thread_ts == ts),
                      key=lambda m: float(m.ts))  # fmt: skip

    def count(self, method: str) -> int:
        with self.lock:
            return sum(1 for name, _, _ in self.calls if name == method)

    def times(self, method: str) -> list[float]:
        with self.lock:
            return [at for name, at, _ in self.calls if name == method]
