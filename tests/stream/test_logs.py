"""The log policy: libraries quiet at INFO, timer drift at DEBUG, repeats limited."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from stream.logs import LIBRARY_LOGGERS, DriftToDebug, RepeatLimiter, configure


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def timers() -> Iterator[tuple[logging.Logger, Collect]]:
    logger = logging.getLogger("test.kpimon.timers")
    handler = Collect()
    logger.addHandler(handler)
    logger.addFilter(DriftToDebug())
    logger.propagate = False
    yield logger, handler
    logger.handlers.clear()
    logger.filters.clear()


def _drift(logger: logging.Logger, kind: str = "late") -> None:
    # mode.timers' own format string and arguments.
    logger.info("Timer %s woke up too " + kind + ", with a drift of +%r runtime=%r sleeptime=%r",
                "Monitor.sampler", 0.47, 3e-5, 1.47)  # fmt: skip


def test_drift_is_not_shown_at_info(timers: tuple[logging.Logger, Collect]) -> None:
    logger, handler = timers
    logger.setLevel(logging.INFO)
    _drift(logger)
    _drift(logger, "early")
    logger.info("Timer %s is fine", "x")
    assert [r.getMessage() for r in handler.records] == ["Timer x is fine"]


def test_drift_is_debug_at_debug(timers: tuple[logging.Logger, Collect]) -> None:
    logger, handler = timers
    logger.setLevel(logging.DEBUG)
    _drift(logger)
    assert [(r.levelname, "woke up too late" in r.getMessage()) for r in handler.records] == [
        ("DEBUG", True)
    ]


def _record(name: str, msg: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord(name, logging.ERROR, __file__, 1, msg, args, None)


def test_repeats_limited_per_interval_with_a_count() -> None:
    now = [0.0]
    limiter = RepeatLimiter(interval=30, clock=lambda: now[0])
    fmt = "Unable connect to node with id %s: %s"
    assert limiter.filter(_record("aiokafka.conn", fmt, 1, "refused"))
    kept = []
    for i in range(1, 301):  # every 100 ms for 30 s
        now[0] = i / 10
        record = _record("aiokafka.conn", fmt, 1, "refused")
        if limiter.filter(record):
            kept.append(record.getMessage())
    assert kept == ["Unable connect to node with id 1: refused (299 more like this in 30 s)"]
    # Another message, and other loggers, are not affected.
    assert limiter.filter(_record("aiokafka.conn", "Unable to update metadata from %s", [1]))
    for _ in range(3):
        assert limiter.filter(_record("kpimon.worker", "transaction failed (%r)", "x"))


def test_one_decision_per_record_across_handlers() -> None:
    limiter = RepeatLimiter(interval=30, clock=lambda: 0.0)
    first = _record("aiokafka.client", "boom")
    assert limiter.filter(first) and limiter.filter(first)  # a second handler sees it too
    again = _record("aiokafka.client", "boom")
    assert not limiter.filter(again) and not limiter.filter(again)


@pytest.fixture
def restore_levels() -> Iterator[None]:
    names = [*LIBRARY_LOGGERS, "mode.timers"]
    before = {n: (logging.getLogger(n).level, list(logging.getLogger(n).filters)) for n in names}
    handlers = {h: list(h.filters) for h in logging.getLogger().handlers}
    yield
    for n, (level, filters) in before.items():
        logging.getLogger(n).setLevel(level)
        logging.getLogger(n).filters[:] = filters
    for h, filters in handlers.items():
        h.filters[:] = filters


@pytest.mark.usefixtures("restore_levels")
def test_configure_info_quiets_libraries_but_not_their_warnings() -> None:
    configure("INFO")
    for name in ("aiokafka.consumer.group_coordinator", "faust.worker", "mode.services"):
        logger = logging.getLogger(name)
        assert not logger.isEnabledFor(logging.INFO), name
        assert logger.isEnabledFor(logging.WARNING), name
    assert logging.getLogger("kpimon.worker").level == logging.NOTSET  # the root's level


@pytest.mark.usefixtures("restore_levels")
def test_configure_debug_shows_everything() -> None:
    configure("DEBUG")
    for name in LIBRARY_LOGGERS:
        assert logging.getLogger(name).level == logging.NOTSET
