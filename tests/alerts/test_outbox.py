"""The outbox: ordered per channel, deliverable only once committed, restored exactly."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from alerts.outbox import Outbox, notification_id
from tests.alerts.test_notify import record


def note(campaign: str, kind: str = "firing", at: str = "2026-11-21T10:00:00Z") -> dict[str, Any]:
    return record(campaign=campaign, notification=kind, notified_at=at,
                  status="resolved" if kind == "resolved" else "firing")  # fmt: skip


def test_entries_are_deliverable_only_after_commit_in_order_per_channel() -> None:
    box = Outbox(("slack", "alertmanager"))
    box.add([note("c1"), note("c2")])
    assert box.head("slack") is None, "not committed yet: a crash would redo the decision"
    box.commit()
    first = box.head("slack")
    assert first is not None and first.record["campaign"] == "c1"
    box.done(first)
    second = box.head("slack")
    assert second is not None and second.record["campaign"] == "c2"
    assert box.counts() == {"slack": 1, "alertmanager": 2}, "channels drain independently"


def test_the_same_decision_has_the_same_id_and_others_differ() -> None:
    assert notification_id(note("c1")) == notification_id(note("c1"))
    assert notification_id(note("c1")) != notification_id(note("c2"))
    assert notification_id(note("c1")) != notification_id(note("c1", "repeat"))
    assert notification_id(note("c1")) != notification_id(note("c1", at="2026-11-21T11:00:00Z"))


@given(
    st.lists(st.tuples(st.sampled_from(["add", "deliver", "drain"]), st.integers(0, 5)),
             max_size=40)
)  # fmt: skip
def test_restoring_the_drained_changes_gives_the_same_outbox(ops: list[tuple[str, int]]) -> None:
    box = Outbox(("slack", "alertmanager"))
    log: dict[Any, Any] = {}  # a compacted topic: the last value per key
    n = 0
    for op, arg in ops:
        if op == "add":
            n += 1
            box.add([note(f"c{n}")])
            box.commit()
        elif op == "deliver":
            entry = box.head("slack" if arg % 2 else "alertmanager")
            if entry is not None:
                box.done(entry)
        else:
            log.update(box.drain_changes())
    log.update(box.drain_changes())
    restored = Outbox(("slack", "alertmanager"))
    for key, value in log.items():
        restored.load(key, value)
    restored.loaded()
    for channel in ("slack", "alertmanager"):
        assert [e.id for e in restored.pending[channel].values()] == [
            e.id for e in box.pending[channel].values()
        ]


def test_a_channel_no_longer_configured_is_ignored_on_restore() -> None:
    box = Outbox(("slack",))
    box.add([note("c1")])
    box.commit()
    restored = Outbox(("alertmanager",))
    for key, value in box.drain_changes():
        restored.load(key, value)
    assert restored.counts() == {"alertmanager": 0}
