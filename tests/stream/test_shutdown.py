"""The stop watchdog: the last resort that ends the process once the bound has passed."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from stream.shutdown import EXIT_OVERRUN, Watchdog, exit_margin


class FakeExit:
    """Records the exit code instead of ending the test process."""

    def __init__(self) -> None:
        self.code: int | None = None
        self.called = threading.Event()
        self.at = 0.0

    def __call__(self, code: int) -> None:
        self.code, self.at = code, time.monotonic()
        self.called.set()


def test_fires_just_before_the_bound_and_says_why(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeExit()
    dog = Watchdog(1.0, terminate=fake)
    armed = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="kpimon.worker"):
        dog.arm("SIGTERM")
        assert fake.called.wait(5), "watchdog never fired"
    assert fake.code == EXIT_OVERRUN != 0
    assert 1.0 - exit_margin(1.0) - 0.05 <= fake.at - armed < 1.0
    assert "SIGTERM" in caplog.text and "KPIMON_SHUTDOWN_TIMEOUT_SECONDS" in caplog.text


def test_disarmed_never_fires() -> None:
    fake = FakeExit()
    dog = Watchdog(0.3, terminate=fake)
    dog.arm("SIGTERM")
    dog.disarm()
    assert not fake.called.wait(1.0)


def test_second_signal_keeps_the_first_deadline() -> None:
    fake = FakeExit()
    dog = Watchdog(30.0, terminate=fake)
    assert not dog.armed
    dog.arm("SIGTERM")
    first = dog.deadline()
    dog.arm("SIGINT")
    assert dog.armed and dog.deadline() == first
    assert first == pytest.approx(time.monotonic() + 30.0, abs=0.5)
    dog.disarm()


def test_margin_is_small_and_scales_down() -> None:
    assert exit_margin(10.0) == 0.3
    assert exit_margin(1.0) == pytest.approx(0.1)
