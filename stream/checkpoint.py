"""The one place that orders a transaction: every message, then the offsets, then commit.

A step's outputs, its state changes (changelogs) and the offsets of the records it
consumed are committed together or not at all, so a crash at any point keeps all of a
step or none of it. Written against a small producer protocol (aiokafka's transactional
producer is one) so the ordering is tested without a broker.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

from stream.stages import Message


class TransactionalProducer(Protocol):
    def transaction(self) -> AbstractAsyncContextManager[Any]: ...

    async def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> Awaitable[Any]: ...

    async def send_offsets_to_transaction(self, offsets: Any, group_id: str) -> None: ...


async def commit(
    producer: TransactionalProducer,
    messages: Iterable[Message],
    offsets: Mapping[Any, int] | None = None,
    group_id: str = "",
) -> None:
    """Send ``messages`` and, with ``offsets``, the consumer group's next offsets, in one
    transaction. Every send must have succeeded before the commit: a failed one raises
    here, the transaction is aborted and the caller redoes the step from committed state."""
    async with producer.transaction():
        sent = [
            await producer.send(m.topic, m.value, key=m.key, partition=m.partition,
                                headers=m.headers)
            for m in messages
        ]  # fmt: skip
        await asyncio.gather(*sent)
        if offsets:
            await producer.send_offsets_to_transaction(dict(offsets), group_id)
