"""What a person sees at the default log level (``KPIMON_LOG_LEVEL=INFO``).

kpimon's own loggers (``kpimon.*``) say what a person needs: where the worker
reads and serves, what it restored, alerts, errors. The libraries under it
narrate their internals at INFO (aiokafka's group protocol steps, faust/mode's
"Starting..."/"Stopping..." for every service, mode's timer drift); at INFO and
above they are shown from WARNING up, so their warnings and errors stay
visible. ``KPIMON_LOG_LEVEL=DEBUG`` shows everything, drift included.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

LIBRARY_LOGGERS = ("aiokafka", "faust", "mode", "aiohttp")
REPEAT_INTERVAL_S = 30.0


class DriftToDebug(logging.Filter):
    """mode's ``Timer ... woke up too late/early`` lines are DEBUG, not INFO.

    They report how late a periodic timer woke (0.3-1.3 s while a batch or an
    evaluation holds the event loop): a tuning diagnostic, not news for a person.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.INFO and str(record.msg).startswith("Timer %s woke up too"):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


class RepeatLimiter(logging.Filter):
    """The same library message at most once per ``interval`` seconds.

    While the broker is down aiokafka logs "Unable connect to node" and "Group
    Coordinator Request failed" every 100 ms: one line per interval says the
    same, with the count of those left out. Messages are the same when their
    logger, level and format string are.
    """

    def __init__(
        self,
        interval: float = REPEAT_INTERVAL_S,
        prefixes: tuple[str, ...] = ("aiokafka",),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.interval = interval
        self.prefixes = prefixes
        self.clock = clock
        self._seen: dict[tuple[str, int, str], tuple[float, int]] = {}
        # One decision per record, however many handlers it passes (the record is kept,
        # so its identity cannot be reused by the next one).
        self._last: tuple[logging.LogRecord | None, bool] = (None, True)

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self.prefixes):
            return True
        if self._last[0] is record:
            return self._last[1]
        key = (record.name, record.levelno, str(record.msg))
        now = self.clock()
        shown_at, left_out = self._seen.get(key, (float("-inf"), 0))
        keep = now - shown_at >= self.interval
        if keep:
            self._seen[key] = (now, 0)
            if left_out:
                record.msg = f"{record.msg} ({left_out} more like this in {now - shown_at:.0f} s)"
        else:
            self._seen[key] = (shown_at, left_out + 1)
        self._last = (record, keep)
        return keep


def configure(level: str) -> None:
    """Apply the policy above once logging has handlers (mode's worker sets them up)."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if numeric <= logging.DEBUG
                                         else max(logging.WARNING, numeric))  # fmt: skip
    timers = logging.getLogger("mode.timers")
    if not any(isinstance(f, DriftToDebug) for f in timers.filters):
        timers.addFilter(DriftToDebug())
    if numeric <= logging.DEBUG:
        return
    limiter = RepeatLimiter()
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RepeatLimiter) for f in handler.filters):
            handler.addFilter(limiter)
