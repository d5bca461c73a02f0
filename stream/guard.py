"""Cardinality guard: which ids (campaigns, channels) get series of their own.

Pure and deterministic (no clock, no I/O): the scope state replays its input
after a restart and must fold the same ids the same way, so every decision
depends only on the cells applied, in order.

The rule, for at most ``limit`` kept ids:
- *Admission*: an id seen while fewer than ``limit`` are kept is kept at once.
- *Score*: every cell adds its spend (in millionths) plus its event count to its
  id's score, so ids rank by spend and, without spend, by volume. At every hour
  of event time all scores decay by 1/24, so a score follows about a day's spend.
- *Candidates*: the scores of folded ids are tracked in a table of at most
  ``4 * limit`` entries; when it is full the lower half is dropped, so memory is
  bounded by the limit, not by the ids seen (a dropped id starts again from 0).
- *Review*, every hour of event time: while the best candidate's score exceeds
  the lowest kept id's by more than ``HYSTERESIS`` (so two ids of equal spend do
  not swap back and forth), the candidate is promoted and the kept id demoted.

The caller moves a demoted id's history into its ``__other__`` series, so the
sums of kept and folded series always equal the raw sums. A promoted id's series
starts at its promotion; its past stays in ``__other__``.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

K = TypeVar("K", bound=Hashable)

HYSTERESIS = 1.2
CANDIDATES_PER_KEPT = 4
DECAY_DIVISOR = 24
"""Each hour scores lose 1/24: a score weighs about the last day."""


@dataclass(frozen=True)
class Swap(Generic[K]):
    """``demoted`` leaves the kept ids for ``promoted`` (None: the limit was lowered)."""

    promoted: K | None
    demoted: K


class Guard(Generic[K]):
    """Kept and folded ids of one kind, with their scores."""

    def __init__(self, limit: int, source: Callable[[K], str] = lambda key: "") -> None:
        self.limit = limit
        self.kept: dict[K, int] = {}  # kept id -> score
        self.candidates: dict[K, int] = {}  # folded id -> score (bounded)
        # Ids folded on arrival (one dropped from the candidates and seen again counts
        # again), by ``source`` (a campaign's channel): where the pressure comes from.
        self.folded: dict[str, int] = {}
        self._source = source
        self._hour: int | None = None

    def admit(self, key: K, weight: int) -> bool:
        """Count ``weight`` for ``key``; True when it has a series of its own."""
        kept = self.kept
        score = kept.get(key)
        if score is not None:
            kept[key] = score + weight
            return True
        if len(kept) < self.limit:
            # A folded id admitted after the limit was raised takes its score along: left
            # among the candidates too, a review could "promote" it over itself.
            kept[key] = self.candidates.pop(key, 0) + weight
            return True
        candidates = self.candidates
        score = candidates.get(key)
        if score is None:
            where = self._source(key)
            self.folded[where] = self.folded.get(where, 0) + 1
            if len(candidates) >= CANDIDATES_PER_KEPT * self.limit:
                self._prune()
            score = 0
        candidates[key] = score + weight
        return False

    def _prune(self) -> None:
        ranked = sorted(self.candidates.items(), key=lambda item: (-item[1], repr(item[0])))
        self.candidates = dict(ranked[: len(ranked) // 2])

    def tick(self, minute: int) -> list[Swap[K]]:
        """Event time reached ``minute``: at each new hour, decay and review."""
        hour = minute // 60
        if self._hour is None:
            self._hour = hour
        if hour <= self._hour:
            return []
        self._hour = hour
        for scores in (self.kept, self.candidates):
            for key, score in scores.items():
                scores[key] = score - score // DECAY_DIVISOR
        return list(self._review())

    def _review(self) -> Iterator[Swap[K]]:
        while len(self.kept) > self.limit:  # the limit was lowered since the state was kept
            down, score = min(self.kept.items(), key=lambda item: (item[1], repr(item[0])))
            del self.kept[down]
            self.candidates[down] = score
            yield Swap(None, down)
        if not self.candidates or len(self.kept) < self.limit:
            return
        best = sorted(self.candidates.items(), key=lambda item: (-item[1], repr(item[0])))
        worst = sorted(self.kept.items(), key=lambda item: (item[1], repr(item[0])))
        for (up, up_score), (down, down_score) in zip(best, worst, strict=False):
            if up_score <= down_score * HYSTERESIS:
                break
            del self.candidates[up]
            del self.kept[down]
            self.kept[up] = up_score
            self.candidates[down] = down_score
            yield Swap(up, down)

    def view(self) -> Guard[K]:
        """What readers of an evaluation snapshot use (kept ids, fold counts): copied, so
        the live guard can go on; the candidate table, which only admission reads, is not."""
        copy: Guard[K] = Guard(self.limit, self._source)
        copy.kept, copy.folded, copy._hour = dict(self.kept), dict(self.folded), self._hour
        return copy

    # -- changelog ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "kept": [[list(k) if isinstance(k, tuple) else k, s] for k, s in self.kept.items()],
            "candidates": [
                [list(k) if isinstance(k, tuple) else k, s] for k, s in self.candidates.items()
            ],
            "folded": self.folded,
            "hour": self._hour,
        }

    def load(self, data: dict[str, Any]) -> None:
        def key(raw: Any) -> Any:
            return tuple(raw) if isinstance(raw, list) else raw

        self.kept = {key(k): int(s) for k, s in data["kept"]}
        self.candidates = {key(k): int(s) for k, s in data["candidates"]}
        self.folded = {str(k): int(v) for k, v in data["folded"].items()}
        self._hour = data["hour"]
