"""A hard bound on how long a stop may take.

Orchestrators send SIGKILL 10-30 s after SIGTERM (docker compose, Kubernetes),
and a worker that is still stopping then is killed mid-way anyway. The graceful
path (finish or abandon the open transaction, leave the consumer group, close
the clients) is bounded step by step in the worker; this watchdog is the last
resort for whatever that path did not foresee (an event loop stuck in a long
computation, a library call that ignores cancellation). It runs on a thread so
that it fires however busy the event loop is, and ends the process with
``os._exit``: what the worker left open is then in the state it would be after
``kill -9``, which the pipeline is built to survive (the broker aborts the open
transaction; the next owner of the partitions rebuilds their state).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

log = logging.getLogger("kpimon.worker")

EXIT_OVERRUN = 1
"""Exit code when the watchdog had to end the process (a clean stop exits 0)."""


def exit_margin(bound: float) -> float:
    """How long before the bound the watchdog fires: process exit itself takes a moment."""
    return min(0.3, bound / 10)


class Watchdog:
    """Ends the process once ``bound`` seconds have passed since :meth:`arm`."""

    def __init__(self, bound: float, *, terminate: Callable[[int], object] = os._exit) -> None:
        self.bound = bound
        self._terminate = terminate
        self._timer: threading.Timer | None = None
        self._armed_at = 0.0
        self._reason = ""

    @property
    def armed(self) -> bool:
        return self._timer is not None

    def arm(self, reason: str) -> None:
        """Start counting (idempotent: a second signal does not extend the bound)."""
        if self._timer is not None:
            return
        self._armed_at = time.monotonic()
        self._reason = reason
        self._timer = threading.Timer(self.bound - exit_margin(self.bound), self._fire)
        self._timer.name = "kpimon-shutdown-watchdog"
        self._timer.daemon = True
        self._timer.start()

    def deadline(self) -> float:
        """``time.monotonic()`` value by which the graceful stop must be done."""
        start = self._armed_at if self._timer is not None else time.monotonic()
        return start + self.bound

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def _fire(self) -> None:
        log.error(
            "stop after %s did not finish within %g s (KPIMON_SHUTDOWN_TIMEOUT_SECONDS): "
            "exiting now; the broker aborts any open transaction",
            self._reason, self.bound,
        )  # fmt: skip
        for handler in logging.getLogger().handlers:
            handler.flush()
        self._terminate(EXIT_OVERRUN)
