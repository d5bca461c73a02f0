"""The alert engine's decisions and detector states on a fixed seed, against a golden run.

The engine's evaluation is made cheaper (caches of segment reads, incremental work): none
of that may change a record, a statistic or a byte of the state the worker commits. This
replays a seeded scope store through the worker's own path (``AlertStage.tick``: a clone
of the engine stepped off the loop, then ``messages`` and ``committed``), minute by minute
with a repeat tick within the minute, late cells that restate settled minutes, moving
detectors (noisy traffic), incidents (a CTR drop, orders gone silent, a price rise, a
traffic drop), a day and more of history (the daily shape) and a restart from the committed
state; and digests every tick's records and state entries. The golden digests were written
by the engine as it was before it was made faster (this file's ``__main__``, run against
that checkout; see ``GOLDEN``).

A change that is meant to change decisions (a new detector model, rules) rewrites the
golden file with ``python tests/alerts/test_engine_golden.py --write``, and says why.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

if __name__ == "__main__" and "--code" in sys.argv:  # another checkout's engine
    sys.path.insert(0, sys.argv[sys.argv.index("--code") + 1])

import numpy as np
import orjson

from alerts.rules import DEFAULT_RULES, load_rules
from alerts.stage import AlertStage
from stream.aggregate import SegmentStore
from stream.codec import encode_json
from stream.segments import SegmentView
from stream.settings import Settings
from stream.stages import Topology

GOLDEN = Path(__file__).with_name("golden_engine.json")
START_MIN = 29_916_000
"""A minute index (2026-11-18, 00:00 UTC); the store's clock is event time."""
HISTORY = 26 * 60
"""A day and two hours: the 1-hour baselines are shaped like yesterday."""
MINUTES = 50
CAMPAIGNS, CHANNELS = 16, 4
ONSET, OVER = 15, 35
"""Evaluation minutes at which the incidents start and end."""


def cells(rng: np.random.Generator, minute: int, incidents: bool) -> list[
    tuple[str, str, int, list[int]]
]:  # fmt: skip
    """A minute of every campaign: noisy funnels at campaign-specific volumes, and spend
    reported in lumps every 10 minutes; with ``incidents``: c15's CTR halves, c14's orders
    go silent, c13's price per click rises 80%, c12's impressions fall by 60%."""
    volume = 20 + 15 * np.arange(CAMPAIGNS)
    imps = rng.poisson(volume)
    ctr = np.full(CAMPAIGNS, 0.04)
    if incidents:
        ctr[15] *= 0.5
        imps[12] = rng.poisson(volume[12] * 0.4)
    clicks = rng.binomial(imps, ctr)
    orders = rng.binomial(clicks, 0.15)
    leads = rng.binomial(clicks, 0.1)
    if incidents:
        orders[14] = 0
    price = np.full(CAMPAIGNS, 500_000)
    if incidents:
        price[13] = 900_000
    spend = np.zeros(CAMPAIGNS, dtype=np.int64)
    if minute % 10 == 3:  # a report of about the last 10 minutes' clicks
        spend = rng.poisson(volume * ctr * 10) * price
    return [
        (f"ch{c % CHANNELS}", f"c{c}", minute,
         [int(imps[c]), int(clicks[c]), int(leads[c]), int(orders[c]), int(orders[c] // 2),
          int(orders[c]) * 40_000_000, int(spend[c])])
        for c in range(CAMPAIGNS)
    ]  # fmt: skip


def run() -> list[str]:
    """Digests of every tick's records and committed state, in order."""
    rng = np.random.default_rng(20261202)
    store = SegmentStore(max_campaigns=500, max_channels=50)
    for minute in range(START_MIN - HISTORY, START_MIN):
        store.apply_cells(cells(rng, minute, False))
    settings = Settings()
    rules, topology = load_rules(DEFAULT_RULES), Topology.of(settings)
    stage = AlertStage(rules, settings, topology, ["log"])
    digests: list[str] = []
    for i in range(MINUTES):
        minute = START_MIN + i
        store.apply_cells(cells(rng, minute, ONSET <= i < OVER))
        if i % 7 == 3:  # late cells restate settled minutes (within the baselines' spans)
            late = cells(rng, minute - 20 - i % 5, ONSET + 20 <= i < OVER + 20)
            store.apply_cells(late[i % CAMPAIGNS : i % CAMPAIGNS + 3])
        now_ms = (minute + 2) * 60_000 + 5_000  # past the settle delay of ``minute``
        for repeat in (0, 20_000):  # a tick that adds the minute, then one that adds none
            tick = stage.tick(store, now_ms + repeat, False)
            stage.messages(tick)
            stage.committed(tick)
            digest = hashlib.sha256()
            for record in tick.records:
                digest.update(orjson.dumps(record, option=orjson.OPT_SORT_KEYS))
            for entry, value in sorted(tick.state.items()):
                digest.update(entry.encode() + b"\0" + value + b"\0")
            digests.append(f"{len(tick.records)}:{digest.hexdigest()[:16]}")
        if i == MINUTES // 2:  # a restart: a new stage restored from the committed state
            restored = AlertStage(rules, settings, topology, ["log"])
            restored.engine.load(stage.engine.to_dict())
            restored.state = dict(stage.state)
            stage = restored
    return digests


def test_the_engine_decides_and_stores_as_the_golden_run() -> None:
    golden = json.loads(GOLDEN.read_text())
    digests = run()
    assert sum(int(d.split(":")[0]) for d in golden["ticks"]) > 0, "the golden run must alert"
    assert len(digests) == len(golden["ticks"])
    first = next((i for i, (a, b) in enumerate(zip(digests, golden["ticks"], strict=True))
                  if a != b), None)  # fmt: skip
    assert first is None, f"tick {first} differs from the golden run: {digests[first]}"


def main() -> int:
    if "--write" not in sys.argv:
        print("usage: test_engine_golden.py --write [--code DIR] [--by COMMIT]", file=sys.stderr)
        return 2
    written_by = sys.argv[sys.argv.index("--by") + 1] if "--by" in sys.argv else "?"
    digests = run()
    GOLDEN.write_bytes(encode_json({"written_by": written_by, "ticks": digests}) + b"\n")
    print(f"{GOLDEN}: {len(digests)} ticks, {sum(int(d.split(':')[0]) for d in digests)} records")
    return 0


if __name__ == "__main__":
    sys.exit(main())


def test_a_clone_shares_detectors_until_one_engine_changes_them() -> None:
    """Clones share the detectors copy-on-write: stepping one (a tick, later discarded or
    put in place) leaves the other's state as it was, and the other, stepped alike, ends
    in the same state."""
    rng = np.random.default_rng(7)
    store = SegmentStore(max_campaigns=500, max_channels=50)
    for minute in range(START_MIN - 240, START_MIN + 3):
        store.apply_cells(cells(rng, minute, minute >= START_MIN))
    engine = AlertStage(load_rules(DEFAULT_RULES), Settings(), Topology.of(Settings()),
                        ["log"]).engine  # fmt: skip
    view = SegmentView(store.series)
    engine.evaluate(view, START_MIN + 1, (START_MIN + 1) * 60.0)
    before = orjson.dumps(engine.to_dict())
    twin = engine.clone()
    stepped = twin.evaluate(view, START_MIN + 2, (START_MIN + 2) * 60.0)
    assert orjson.dumps(engine.to_dict()) == before, "the clone's tick changed the original"
    assert orjson.dumps(twin.to_dict()) != before
    assert engine.evaluate(view, START_MIN + 2, (START_MIN + 2) * 60.0) == stepped
    assert orjson.dumps(engine.to_dict()) == orjson.dumps(twin.to_dict())
    again = twin.clone()  # a tick within the minute changes no detector
    assert again.evaluate(view, START_MIN + 2, (START_MIN + 2) * 60.0 + 20) == []
    assert orjson.dumps(again.to_dict()["detectors"]) == orjson.dumps(twin.to_dict()["detectors"])
