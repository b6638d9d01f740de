"""Every event also to NATS (``events.nats``): subject ``streamd.<type>.<stream>``, the ZeroMQ
event's JSON plus ``"node"``, stored in JetStream when ``events.nats_jetstream`` names a stream.

The audio thread only appends to a bounded buffer (``put``); a thread of its own runs an
asyncio loop with nats-py that empties it in order, one event at a time (per-stream order is
kept), reconnecting forever. While NATS is away the buffer holds the events; when it is full
the oldest one is dropped and counted. This module imports nats-py: import it only when
``events.nats`` is set.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import nats
import nats.errors
import nats.js.errors

log = logging.getLogger(__name__)

SUBJECT_PREFIX = "streamd."
JS_SUBJECTS = "streamd.>"
PUBLISH_TIMEOUT_S = 2.0  # a JetStream acknowledgement not back by then: the event is sent again
RETRY_S = 0.2  # pause after a failed publication


@dataclass(frozen=True)
class NatsSettings:
    servers: tuple[str, ...]
    jetstream: str  # "" = core NATS
    buffer: int
    node: str

    @classmethod
    def of(cls, urls: str, jetstream: str, buffer: int, node: str) -> NatsSettings:
        return cls(tuple(u.strip() for u in urls.split(",") if u.strip()), jetstream, buffer, node)


@dataclass(frozen=True)
class _Item:
    subject: str
    data: bytes
    msg_id: str  # JetStream drops a second copy with the same id (a publication retried after a lost ack)


def with_node(data: bytes, node: str) -> bytes:
    """The event's JSON object with ``"node"`` added as its last field (no decode, no re-encode)."""
    return data[:-1] + b',"node":' + json.dumps(node, ensure_ascii=False).encode() + b"}"


class NatsOut:
    """The NATS side of the publisher: ``put`` never blocks; ``close`` gives the buffer a
    last chance to leave."""

    def __init__(self, settings: NatsSettings, on_drop: Callable[[], None] = lambda: None,
                 on_state: Callable[[bool, str], None] = lambda up, why: None):
        self.settings = settings
        self.on_drop = on_drop
        self.on_state = on_state  # called on the NATS thread: (connected, why)
        self.dropped = 0
        self.published = 0
        self.connected: bool | None = None  # None until the first connection or failure
        self._boot = os.urandom(6).hex()  # a restarted daemon's seq starts again at 0: its ids must not
        self._buffer: collections.deque[_Item] = collections.deque()
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._wake = asyncio.Event()
        self._stopping = False
        self._nc = None
        self._thread = threading.Thread(target=self._run, name="nats", daemon=True)

    # ---------------------------------------------------------------- the audio thread's side

    def start(self) -> None:
        self._thread.start()

    def put(self, topic: str, data: bytes, seq: int) -> None:
        item = _Item(SUBJECT_PREFIX + topic, with_node(data, self.settings.node), f"{self._boot}-{seq}")
        with self._lock:
            idle = not self._buffer  # else the NATS thread is at work and will find this one: no wake-up needed
            if len(self._buffer) >= self.settings.buffer:
                self._buffer.popleft()
                self._count_drop()
            self._buffer.append(item)
        if idle:
            self._poke()

    def buffered(self) -> int:
        return len(self._buffer)

    def close(self, timeout_s: float = 2.0) -> None:
        """Sends what is buffered for up to ``timeout_s``, then stops; what is left is counted as dropped."""
        if not self._thread.is_alive():
            return
        self._stopping = True
        self._poke()
        self._thread.join(timeout_s + 1.0)
        with self._lock:
            left = len(self._buffer)
            self._buffer.clear()
        for _ in range(left):
            self._count_drop()
        if left:
            log.warning("NATS: %d events not sent before the daemon stopped (counted in streamd_nats_dropped_total)",
                        left)

    def _count_drop(self) -> None:
        self.dropped += 1
        self.on_drop()

    def _poke(self) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the daemon is stopping
            self._loop.call_soon_threadsafe(self._wake.set)

    # ---------------------------------------------------------------- the NATS thread

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main())
        except Exception:  # noqa: BLE001 - never take the daemon down; say what happened
            log.exception("NATS: the publishing thread failed; events go to ZeroMQ only from now on")
        finally:
            self._loop.close()

    async def _main(self) -> None:
        connecting = asyncio.ensure_future(self._connect())
        while not self._stopping and not connecting.done():
            await self._wait(0.5)
        if not connecting.done():  # stopping before NATS was ever reached
            connecting.cancel()
            return
        nc = self._nc = connecting.result()
        self._state(True, self._url())
        js = nc.jetstream() if self.settings.jetstream else None
        stream_ready = False
        deadline = None
        while True:
            if self._stopping:
                deadline = deadline or time.monotonic() + 2.0
                if not self._buffer or time.monotonic() > deadline:
                    break
            if not self._buffer or not nc.is_connected:
                await self._wait(0.1 if self._buffer else 0.5)
                continue
            if js is not None and not stream_ready:
                stream_ready = await self._ensure_stream(js)
                if not stream_ready:
                    await asyncio.sleep(RETRY_S)
                    continue
            if not await self._send_one(nc, js):
                await asyncio.sleep(RETRY_S)
        with contextlib.suppress(Exception):
            await nc.close()

    async def _wait(self, timeout_s: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout_s)
        self._wake.clear()

    async def _connect(self):
        return await nats.connect(
            list(self.settings.servers), name=f"streamd {self.settings.node}", max_reconnect_attempts=-1,
            reconnect_time_wait=0.5, connect_timeout=2, ping_interval=5, max_outstanding_pings=2,
            error_cb=self._on_error, disconnected_cb=self._on_disconnected, reconnected_cb=self._on_reconnected)

    async def _ensure_stream(self, js) -> bool:
        """The JetStream stream exists (created with subjects ``streamd.>`` when missing)."""
        name = self.settings.jetstream
        try:
            await js.stream_info(name)
            return True
        except nats.js.errors.NotFoundError:
            pass
        except (nats.errors.Error, asyncio.TimeoutError) as exc:
            log.debug("NATS: stream_info %s: %s", name, exc)
            return False
        try:
            await js.add_stream(name=name, subjects=[JS_SUBJECTS])
            log.info("NATS: created JetStream stream %s (subjects %s)", name, JS_SUBJECTS)
            return True
        except (nats.errors.Error, asyncio.TimeoutError) as exc:
            log.warning("NATS: cannot create JetStream stream %s: %s", name, exc)
            return False

    async def _send_one(self, nc, js) -> bool:
        with self._lock:
            item = self._buffer.popleft()
        try:
            if js is None:
                await nc.publish(item.subject, item.data)
            else:
                await js.publish(item.subject, item.data, timeout=PUBLISH_TIMEOUT_S, stream=self.settings.jetstream,
                                 headers={"Nats-Msg-Id": item.msg_id})
        except (nats.errors.Error, asyncio.TimeoutError, OSError) as exc:
            log.debug("NATS: %s not published (%s); retried", item.subject, exc)
            with self._lock:  # back at the head, unless newer events have filled the buffer meanwhile
                if len(self._buffer) < self.settings.buffer:
                    self._buffer.appendleft(item)
                else:
                    self._count_drop()
            return False
        self.published += 1
        return True

    def _state(self, up: bool, why: str) -> None:
        if self.connected == up or self._stopping:  # closing the connection is not an outage
            return
        self.connected = up
        if up:
            log.info("NATS: connected to %s (%d events buffered)", why, len(self._buffer))
        else:
            log.warning("NATS: %s; events wait in a buffer of %d (what overflows it is dropped and counted in "
                        "streamd_nats_dropped_total); ZeroMQ events go on", why, self.settings.buffer)
        self.on_state(up, why)

    async def _on_error(self, exc: Exception) -> None:
        log.debug("NATS: %s", exc)
        if self.connected is None:
            self._state(False, f"cannot reach {', '.join(self.settings.servers)} ({exc or type(exc).__name__})")

    async def _on_disconnected(self) -> None:
        self._state(False, "connection lost")

    async def _on_reconnected(self) -> None:
        self._state(True, self._url())

    def _url(self) -> str:
        url = self._nc.connected_url if self._nc is not None else None
        return url.geturl() if url is not None else "NATS"
