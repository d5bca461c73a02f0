"""How the cyclic garbage collector runs in kpimon's long-lived processes.

The worker and the backtest allocate ~10 containers per event (records, parsed fields,
cells) and hold millions of long-lived objects (the dedup state, the windows, the
detectors). With CPython's default thresholds (700, 10, 10) the collector runs a pass
every 700 allocations and full passes over the whole state every few batches: a third of
the backtest's CPU. Nothing per event makes reference cycles (a replay with the collector
off leaves a few hundred unreachable objects in all), so the collector may run rarely:
``THRESHOLDS``. A process whose state only grows may also ``freeze`` what is alive at a
quiet point (the backtest after each evaluation): frozen objects are freed by their
reference counts as ever, the collector just never scans them again. And within a
batch nothing is collected at all (``gc_paused``): a batch's young containers all live
until it ends, so a collection within it would traverse them to free none.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

THRESHOLDS = (200_000, 50, 1000)
"""Young collections every 200k allocations, older ones 50 and 1,000 times rarer."""


def tune() -> None:
    """Set ``THRESHOLDS`` and freeze what start-up made (imports, settings): for a process
    that runs the pipeline until it exits (``kpimon worker``, ``kpimon backtest``)."""
    gc.set_threshold(*THRESHOLDS)
    gc.freeze()


@contextmanager
def gc_paused(*, collect: bool = False) -> Iterator[None]:
    """The cyclic garbage collector held off for one step's (or batch's) work.

    A step keeps tens of thousands of young containers alive until it ends (the records,
    the routed rows, the decoded rows of the routed and partials messages), so every
    collection that falls within it traverses all of them to free none: in
    ``bench/stages`` that was 2 µs of the 12 an event. Paused, the collection runs after
    the step, when those are gone: at the next allocation past the threshold, or, with
    ``collect``, on the way out, by the collector's own rule (the oldest generation whose
    count passed its threshold), for a caller that keeps it paused nearly all the time
    (the worker's loop, which also calls :func:`collect_due` on each attempt of a long
    recovery). The stages make no reference cycles per event, so nothing piles up
    meanwhile. Nested, only the outermost pause counts.
    """
    if not gc.isenabled():  # someone else holds it off: theirs to restore
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        if collect:
            collect_due()


def collect_due() -> None:
    """One collection if the collector would have made one by now (its thresholds)."""
    counts, thresholds = gc.get_count(), gc.get_threshold()
    for generation in (2, 1, 0):
        if thresholds[0] and counts[generation] > thresholds[generation]:
            gc.collect(generation)
            return
