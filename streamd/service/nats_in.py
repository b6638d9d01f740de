"""``streamd listen --nats``: events of every node from NATS, live (core NATS) or replayed from a
JetStream stream (everything it keeps, or, for a durable consumer, what that name has not yet
acknowledged: what it missed while away). Imports nats-py: only for ``--nats``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import nats
import nats.errors
import nats.js.errors

CONNECT_WAIT_S = 5.0
FETCH_MAX = 100


class ListenError(OSError):
    pass


@dataclass(frozen=True)
class NatsListen:
    servers: tuple[str, ...]
    subject: str = "streamd.>"
    jetstream: str = ""  # the stream to replay from; "" = live only
    replay: bool = False
    durable: str = ""  # a consumer name that remembers what it has seen ("" = everything kept)
    count: int = 0  # stop after this many events (0: never)
    idle_s: float = 0.0  # stop after this long without one (0: never)


def listen(opts: NatsListen, handle: Callable[[dict], None]) -> int:
    """Calls ``handle`` with each event; returns how many there were."""
    return asyncio.run(_listen(opts, handle))


async def _listen(opts: NatsListen, handle: Callable[[dict], None]) -> int:
    nc = await _connect(opts.servers)
    try:
        if opts.replay:
            return await _replay(nc, opts, handle)
        return await _live(nc, opts, handle)
    finally:
        try:  # the acknowledgements out; a server gone by now loses nothing the listener printed
            await nc.flush(timeout=2)
        except (nats.errors.Error, asyncio.TimeoutError):
            pass
        await nc.close()


async def _quiet(_exc: Exception) -> None:
    """nats-py's default logs every failed (re)connection with a traceback; this one line is enough."""


async def _connect(servers: tuple[str, ...]):
    try:
        return await asyncio.wait_for(nats.connect(list(servers), max_reconnect_attempts=-1, reconnect_time_wait=0.5,
                                                   connect_timeout=2, error_cb=_quiet), CONNECT_WAIT_S)
    except (asyncio.TimeoutError, nats.errors.Error, OSError):
        raise ListenError(f"listen --nats {','.join(servers)}: cannot connect within {CONNECT_WAIT_S:g} s") from None


def _wait(opts: NatsListen, idle_since: float) -> float | None:
    """Seconds to wait for the next event (at most 1), or None when the idle time is up."""
    if not opts.idle_s:
        return 1.0
    left = idle_since + opts.idle_s - time.monotonic()
    return None if left <= 0 else min(1.0, left)


async def _live(nc, opts: NatsListen, handle: Callable[[dict], None]) -> int:
    sub = await nc.subscribe(opts.subject)
    seen, idle_since = 0, time.monotonic()
    while not opts.count or seen < opts.count:
        wait = _wait(opts, idle_since)
        if wait is None:
            break
        try:
            msg = await sub.next_msg(timeout=wait)
        except (nats.errors.TimeoutError, asyncio.TimeoutError):
            continue
        handle(json.loads(msg.data))
        seen, idle_since = seen + 1, time.monotonic()
    return seen


async def _replay(nc, opts: NatsListen, handle: Callable[[dict], None]) -> int:
    js = nc.jetstream()
    try:
        sub = await js.pull_subscribe(opts.subject, durable=opts.durable or None, stream=opts.jetstream)
    except nats.js.errors.NotFoundError:
        raise ListenError(f"listen --replay: no JetStream stream {opts.jetstream!r} on the NATS server") from None
    except nats.js.errors.APIError as exc:
        raise ListenError(f"listen --replay: JetStream refused the consumer: {exc.description}") from None
    seen, idle_since = 0, time.monotonic()
    while not opts.count or seen < opts.count:
        wait = _wait(opts, idle_since)
        if wait is None:
            break
        batch = FETCH_MAX if not opts.count else min(FETCH_MAX, opts.count - seen)  # unacked extras come back late
        try:
            msgs = await sub.fetch(batch, timeout=wait)
        except (nats.errors.TimeoutError, asyncio.TimeoutError):  # nats-py raises either when a fetch times out
            continue
        for msg in msgs:
            handle(json.loads(msg.data))
            await msg.ack()
        seen, idle_since = seen + len(msgs), time.monotonic()
    return seen
