"""The notification outbox: alert records waiting for delivery, per sink, in order.

Pure state, no I/O. The worker writes every change (a new entry, a delivered
one's tombstone) to its compacted changelog in the same Kafka transaction as
the alert engine's state, so after a crash the outbox comes back exactly as
committed: a notification is neither lost (it stays until delivered) nor
decided twice (the engine state that produced it is restored with it). An
entry becomes deliverable only once the transaction that added it committed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

OutboxKey = tuple[str, str, str]
"""("outbox", channel, notification id): the changelog key of one entry."""
StateKey = tuple[str, str, str, str]
"""("outbox", channel, "state", key): the changelog key of a sink's note on one incident
(e.g. the Slack message it posted), kept and restored with the entries."""


def notification_id(record: Mapping[str, Any]) -> str:
    """Stable id of one notification: one incident (or rule and segment), kind and time."""
    nid = "|".join(
        str(record[name])
        for name in ("rule", "scope", "channel", "campaign", "notification", "notified_at")
    )
    incident = record.get("incident")
    return f"{incident['id']}|{nid}" if isinstance(incident, Mapping) else nid


@dataclass
class Entry:
    channel: str
    id: str
    seq: int
    record: dict[str, Any]
    restored: bool = False
    """Read back from the changelog: a previous owner may have delivered it already."""

    @property
    def key(self) -> OutboxKey:
        return ("outbox", self.channel, self.id)


@dataclass
class Outbox:
    """Undelivered notifications for each sink channel, oldest first."""

    channels: tuple[str, ...]
    pending: dict[str, dict[str, Entry]] = field(default_factory=dict)
    _staged: list[Entry] = field(default_factory=list)
    _changes: dict[OutboxKey, Entry | None] = field(default_factory=dict)
    _seq: int = 0
    states: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    _state_changes: dict[StateKey, dict[str, Any] | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for channel in self.channels:
            self.pending.setdefault(channel, {})
            self.states.setdefault(channel, {})

    def add(self, records: Iterable[dict[str, Any]]) -> None:
        """Queue records for every channel; deliverable after :meth:`commit`."""
        for record in records:
            nid = notification_id(record)
            for channel in self.channels:
                self._seq += 1
                entry = Entry(channel, nid, self._seq, record)
                self._staged.append(entry)
                self._changes[entry.key] = entry

    def commit(self) -> None:
        """The transaction holding the staged entries committed: they may go out."""
        for entry in self._staged:
            self.pending[entry.channel][entry.id] = entry
        self._staged.clear()

    def head(self, channel: str) -> Entry | None:
        """The oldest deliverable entry of ``channel``."""
        queue = self.pending.get(channel)
        return next(iter(queue.values()), None) if queue else None

    def done(self, entry: Entry) -> None:
        """``entry`` was delivered (or can never be): drop it, tombstone its key."""
        if self.pending.get(entry.channel, {}).pop(entry.id, None) is not None:
            self._changes[entry.key] = None

    def state(self, channel: str, key: str) -> dict[str, Any] | None:
        """What ``channel``'s sink noted about ``key`` (e.g. its Slack message), if anything."""
        return self.states.get(channel, {}).get(key)

    def set_state(self, channel: str, key: str, value: dict[str, Any] | None) -> None:
        """Note (None forgets) sink state, written with the next transaction like a tombstone.

        Noted right after the delivery that produced it, it reaches the changelog in the
        same transaction as that delivery's tombstone: both or neither survive a crash.
        """
        if channel not in self.states:
            return
        if value is None:
            if self.states[channel].pop(key, None) is None:
                return
        else:
            self.states[channel][key] = dict(value)
        self._state_changes[("outbox", channel, "state", key)] = value

    def counts(self) -> dict[str, int]:
        return {channel: len(queue) for channel, queue in self.pending.items()}

    @property
    def changed(self) -> bool:
        return bool(self._changes or self._state_changes)

    def drain_changes(self) -> list[tuple[OutboxKey | StateKey, dict[str, Any] | None]]:
        """Changelog entries since the last drain; None deletes the key (compaction)."""
        changes: list[tuple[OutboxKey | StateKey, dict[str, Any] | None]] = [
            (key, None if e is None else {"seq": e.seq, "record": e.record})
            for key, e in self._changes.items()
        ]
        changes.extend(self._state_changes.items())
        self._changes.clear()
        self._state_changes.clear()
        return changes

    def load(self, key: Any, value: Any) -> None:
        """Restore one changelog entry; channels no longer configured are ignored."""
        if len(key) == 4:
            _, channel, _, name = key
            states = self.states.get(channel)
            if states is not None:
                if value is None:
                    states.pop(name, None)
                else:
                    states[name] = dict(value)
            return
        _, channel, nid = key
        queue = self.pending.get(channel)
        if queue is None:
            return
        if value is None:
            queue.pop(nid, None)
            return
        entry = Entry(channel, nid, int(value["seq"]), dict(value["record"]), restored=True)
        queue[nid] = entry
        self._seq = max(self._seq, entry.seq)

    def loaded(self) -> None:
        """After a restore: order every queue by sequence number again."""
        for channel, queue in self.pending.items():
            self.pending[channel] = dict(sorted(queue.items(), key=lambda kv: kv[1].seq))
