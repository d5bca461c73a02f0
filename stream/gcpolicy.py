"""How the cyclic garbage collector runs in kpimon's long-lived processes.

The worker and the backtest allocate ~10 containers per event (records, parsed fields,
cells) and hold millions of long-lived objects (the dedup state, the windows, the
detectors). With CPython's default thresholds (700, 10, 10) the collector runs a pass
every 700 allocations and full passes over the whole state every few batches: a third of
the backtest's CPU. Nothing per event makes reference cycles (a replay with the collector
off leaves a few hundred unreachable objects in all), so the collector may run rarely:
``THRESHOLDS``. A process whose state only grows may also ``freeze`` what is alive at a
quiet point (the backtest after each evaluation): frozen objects are freed by their
reference counts as ever, the collector just never scans them again.
"""

from __future__ import annotations

import gc

THRESHOLDS = (200_000, 50, 1000)
"""Young collections every 200k allocations, older ones 50 and 1,000 times rarer."""


def tune() -> None:
    """Set ``THRESHOLDS`` and freeze what start-up made (imports, settings): for a process
    that runs the pipeline until it exits (``kpimon worker``, ``kpimon backtest``)."""
    gc.set_threshold(*THRESHOLDS)
    gc.freeze()
