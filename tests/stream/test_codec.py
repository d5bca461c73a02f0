"""Internal messages stay below Kafka's default 1 MB limit whatever the batch size."""

from __future__ import annotations

from stream import codec
from stream.events import Event

LIMIT = 1_000_000


def test_routed_chunks_of_worst_case_rows_fit() -> None:
    long = "x" * 128
    event = Event(type="order", event_id=long, dedup_key=long, ts_ms=1_795_000_000_000,
                  campaign_id=long, channel="c" * 64, click_id=long,
                  spend_micros=10**18, revenue_micros=10**18, new_customer=True)  # fmt: skip
    rows = [codec.routed_row(event, 1_795_000_000_000) for _ in range(50_000)]
    parts = list(codec.chunks(rows))
    assert sum(map(len, parts)) == len(rows)
    assert all(len(codec.encode_rows(part)) < LIMIT for part in parts)
    assert codec.decode_rows(codec.encode_rows(parts[0]))[0] == rows[0]


def test_changelog_split_keeps_everything_and_fits() -> None:
    change = {
        "max_ts": 5,
        "seen": [["o" + "k" * 128 + str(i), 29_000_000] for i in range(30_000)],
        "clicks": [["k" * 128 + str(i), 29_000_000, ["c" * 128, "s" * 64]] for i in range(9_000)],
    }
    parts = list(codec.split_changes(change))
    assert [k for p in parts for k in p["seen"]] == change["seen"]
    assert [c for p in parts for c in p["clicks"]] == change["clicks"]
    assert all(p["max_ts"] == 5 for p in parts)
    assert all(len(codec.encode_json(p)) < LIMIT for p in parts)
    assert list(codec.split_changes({"max_ts": 1, "seen": [], "clicks": []})) == [
        {"max_ts": 1, "seen": [], "clicks": []}
    ]


def test_partial_round_trip() -> None:
    partial = codec.Partial(2, 123, True, [["search", "c1", 7, 1, 2, 3, 4, 5, 6, 7]],
                            [[1000, 3]])  # fmt: skip
    assert codec.Partial.decode(partial.encode()) == partial


def test_route_is_routed_row_at_route_partition() -> None:
    """The ingest stage's one call a event makes what the two functions make."""
    events = [
        Event("click", f"k{i}", f"k{i}", 1_795_000_000_000 + i, "c1", "search", f"ck{i}", 5, 0)
        for i in range(20)
    ] + [
        Event("order", f"o{i}", f"o{i}", 1_795_000_000_000, None, "unknown", None, 0, 20, True)
        for i in range(20)
    ]
    routed: dict[int, list[list[object]]] = {}
    expected: dict[int, list[list[object]]] = {}
    for i, event in enumerate(events):
        where = codec.origin("t", 1, i)
        codec.route(routed, event, 6, 7, where)
        expected.setdefault(codec.route_partition(event, 6), []).append(
            codec.routed_row(event, 7, where)
        )
    assert routed == expected and len(routed) > 1
