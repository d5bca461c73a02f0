"""``kpimon worker`` as on a machine where the snappy codec is missing at run time.

aiokafka asks ``aiokafka.codec.has_snappy()`` each time it meets a snappy batch
(as without cramjam installed); every other codec stays available. Run as
``python -m tests.integration.no_snappy_worker worker``.
"""

from __future__ import annotations

import sys

import aiokafka.codec

from stream.cli import main

if __name__ == "__main__":
    aiokafka.codec.has_snappy = lambda: False
    sys.exit(main(sys.argv[1:]))
