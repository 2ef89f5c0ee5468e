"""The subscription fan-out: live run events to every client following the run.

A subscriber `listen`s to a run and gets an asyncio.Queue; `publish` puts an
event in every listener's queue and `end` the run's final status.  `follow`
drains one queue onto a client's connection, in batches, dropping any event
whose seq the client already has, until the end arrives.  Replaying the log
first is the subscribe operation's job (engine.server.operations): it listens before
it reads the file, so nothing falls between the two.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import Iterator

from engine.wire import protocol


class Subscriptions:
    def __init__(self):
        self._listeners: dict[str, set[asyncio.Queue]] = collections.defaultdict(set)

    @contextlib.contextmanager
    def listen(self, run_id: str) -> Iterator[asyncio.Queue]:
        """A queue that receives ("event", record) and finally ("end", StreamEnd) for `run_id`."""
        queue: asyncio.Queue = asyncio.Queue()
        self._listeners[run_id].add(queue)
        try:
            yield queue
        finally:
            self._listeners[run_id].discard(queue)
            if not self._listeners[run_id]:
                del self._listeners[run_id]

    def publish(self, run_id: str, event: dict) -> None:
        for queue in self._listeners.get(run_id, ()):
            queue.put_nowait(("event", event))

    def end(self, run_id: str, status: str, reason: str | None = None, unsaved: str | None = None) -> None:
        """The run is settled: every listener's stream ends with this status (and `unsaved`,
        why its log may lack it)."""
        for queue in self._listeners.get(run_id, ()):
            queue.put_nowait(("end", protocol.StreamEnd(status, reason, unsaved)))

    def __len__(self) -> int:
        """How many runs have listeners."""
        return len(self._listeners)


async def follow(queue: asyncio.Queue, writer: asyncio.StreamWriter, last_seq: int) -> None:
    """Send what arrives on `queue` to `writer` (events past `last_seq`, in batches) until the end."""
    while True:
        items = [await queue.get()]
        while not queue.empty():
            items.append(queue.get_nowait())
        batch, end = [], None
        for what, payload in items:
            if what == "end":
                end = payload
                break
            if payload.get("seq", 0) > last_seq:
                batch.append(payload)
                last_seq = payload["seq"]
        if batch:
            await send_events(writer, batch)
        if end is not None:
            await send(writer, end)
            return


async def send(writer: asyncio.StreamWriter, message: protocol.Message) -> None:
    writer.write(protocol.encode(message))
    await writer.drain()


async def send_events(writer: asyncio.StreamWriter, events: list[dict]) -> None:
    for i in range(0, len(events), protocol.EVENTS_PER_BATCH):
        await send(writer, protocol.EventBatch(events[i:i + protocol.EVENTS_PER_BATCH]))
