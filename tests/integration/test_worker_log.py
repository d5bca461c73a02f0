"""What a person sees: a worker's INFO log over a short run with traffic.

At the default level the log says where the worker reads and serves, what it
restored, and how it stopped; library chatter (aiokafka's group protocol,
faust/mode service lifecycle, timer drift) is not there.
"""

from __future__ import annotations

import json
import re
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.helpers import WorkerProcess, produce, run, sample, wait_for

pytestmark = pytest.mark.integration

NEEDED = ("worker w1 in group", "partitions assigned:", "state ready in",
          "SIGTERM: stopping within", "stopped in")  # fmt: skip
"""Lines a person needs from a start and a stop."""
OURS = re.compile(
    r"(created topics|worker \S+ in group|partitions (assigned|revoked):|restored |state ready"
    r"|SIG(TERM|INT): stopping|stopped in|alert (firing|repeat|update|resolved):|stopping: )"
)
"""Every INFO line is one of kpimon's own (anything else there is noise)."""


def test_info_log_has_what_a_person_needs_and_no_chatter(
    start_worker: Callable[..., WorkerProcess], worker_env: dict[str, str]
) -> None:
    now_ms = int(time.time() * 1000)
    clicks: list[dict[str, Any]] = [
        {"event_id": f"k{i}", "ts": now_ms - (i % 300) * 1000, "campaign_id": f"c{i % 7}",
         "channel": "search", "click_id": f"k{i}", "cost": 0.5}
        for i in range(20_000)
    ]  # fmt: skip
    worker = start_worker("w1")
    worker.wait_ready()
    topic = worker_env["KPIMON_TOPIC_CLICKS"]
    messages = [(topic, e["campaign_id"].encode(), json.dumps(e).encode()) for e in clicks]
    run(produce(worker_env["KPIMON_KAFKA_BOOTSTRAP"], messages))

    def counted() -> bool:
        samples = worker.scrape() or {}
        return sample(samples, "kpimon_events_total", type="click") == len(clicks)

    wait_for(counted, timeout=60, what="every click counted")
    assert worker.stop(signal.SIGTERM) == 0, worker.log_tail()

    log = worker.log_path.read_text()
    assert "woke up too" not in log, "timer drift shown at INFO"
    for needed in NEEDED:
        assert needed in log, f"missing {needed!r}:\n{log}"
    info = [line for line in log.splitlines() if "[INFO]" in line]
    noise = [line for line in info if not OURS.search(line)]
    assert not noise, "library chatter at INFO:\n" + "\n".join(noise)
