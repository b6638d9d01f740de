"""The daemon's events, read on a thread of their own and kept for the browsers.

The thread only drains the SUB socket into a bounded ring and the views built from it (the
recent utterances, who was heard when, each stream's state): it never waits for a browser, so
the daemon's publisher never finds this subscriber's queue full because a page is slow."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any

import zmq

from streamd.console.ring import EventRing

log = logging.getLogger(__name__)

RECEIVE_HWM = 10_000  # the SUB's own queue; the thread drains it far faster than events come
DECISIONS = ("speaker", "digit")


@dataclass
class Utterance:
    """One utterance as the events told it: its cut, then its speaker and digit decisions."""

    stream: str
    utterance: int
    t_start: float
    t_end: float
    time: float  # publication of its latest event, Unix seconds
    reason: str | None = None  # vad.end's
    speaker: str | None = None
    score: float | None = None
    cluster: str | None = None
    digit: int | None = None
    confidence: float | None = None
    degraded: bool = False


@dataclass
class StreamState:
    state: str = "up"  # from status events: up | down | ended
    reason: str = ""
    last_event: float = 0.0


@dataclass
class HubCounts:
    received: int = 0
    lost: int = 0  # gaps in seq: events the daemon could not send us
    restarts: int = 0  # seq went back: the daemon restarted


class EventHub:
    def __init__(self, endpoint: str, recent_per_stream: int, capacity: int = 5000,
                 context: zmq.Context | None = None):
        self.endpoint = endpoint
        self.ring = EventRing(capacity)
        self.counts = HubCounts()
        self._recent_per_stream = recent_per_stream
        self._ctx = context or zmq.Context.instance()
        self._lock = threading.Lock()
        self._utterances: dict[str, OrderedDict[int, Utterance]] = {}  # by stream, oldest first
        self._streams: dict[str, StreamState] = {}
        self._heard: dict[str, float] = {}  # speaker name: when an event last named them
        self._last_seq: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake_pending = False
        self._arrived = asyncio.Event()

    # ------------------------------------------------------------ lifecycle (event loop side)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._pump, name="console-events", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
        self._release()  # readers waiting now see the hub closed

    @property
    def closed(self) -> bool:
        return self._stop.is_set()

    def waiter(self) -> asyncio.Event:
        """Set once events arrive after this call (take it before reading the ring)."""
        return self._arrived

    def _release(self) -> None:
        with self._lock:
            self._wake_pending = False
        arrived, self._arrived = self._arrived, asyncio.Event()
        arrived.set()

    # ------------------------------------------------------------ the thread

    def _pump(self) -> None:
        sock = self._ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.RCVHWM, RECEIVE_HWM)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.connect(self.endpoint)
        try:
            while not self._stop.is_set():
                if sock.poll(200, zmq.POLLIN) and self._drain(sock):
                    self._wake()
        finally:
            sock.close(0)

    def _drain(self, sock: zmq.Socket) -> int:
        taken = 0
        while taken < 10_000:
            try:
                _topic, data = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            except ValueError:  # not two frames: not a streamd event
                continue
            try:
                event = json.loads(data)
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue
            if not isinstance(event, dict):
                continue
            try:
                self.record(event)
            except (TypeError, ValueError) as exc:  # a field of another type than the schema's
                log.warning("event not understood, left out: %s", exc)
                continue
            taken += 1
        return taken

    def _wake(self) -> None:
        with self._lock:
            if self._wake_pending or self._loop is None:
                return
            self._wake_pending = True
        try:
            self._loop.call_soon_threadsafe(self._release)
        except RuntimeError:  # the loop has closed: the console is stopping
            pass

    # ------------------------------------------------------------ what the events tell

    def record(self, event: dict[str, Any]) -> None:
        """Keep one event: in the ring, and in the views it changes."""
        with self._lock:
            self._count(event.get("seq"))
            self._apply(event)
        self.ring.append(event)

    def _count(self, seq: Any) -> None:
        if not isinstance(seq, int):
            return
        c = self.counts
        c.received += 1
        if self._last_seq is not None and seq <= self._last_seq:
            c.restarts += 1  # utterance numbers start again: the old ones cannot be enrolled
            self._utterances.clear()
        elif self._last_seq is not None:
            c.lost += seq - self._last_seq - 1
        self._last_seq = seq

    def _apply(self, event: dict[str, Any]) -> None:
        kind, stream = event.get("type"), event.get("stream")
        if not isinstance(stream, str):
            return
        if kind == "gallery":
            if event.get("action") == "rename" and event.get("from") in self._heard:
                self._heard[str(event.get("name"))] = self._heard.pop(event["from"])
            return
        state = self._streams.setdefault(stream, StreamState())
        state.last_event = float(event.get("time") or time.time())
        if kind == "status":
            state.state, state.reason = str(event.get("state", "")), str(event.get("reason", ""))
        elif kind in ("vad.end", *DECISIONS) and isinstance(event.get("utterance"), int):
            self._utterance(event)

    def _utterance(self, event: dict[str, Any]) -> None:
        mine = self._utterances.setdefault(event["stream"], OrderedDict())
        u = mine.get(event["utterance"])
        if u is None:
            u = mine[event["utterance"]] = Utterance(event["stream"], event["utterance"], float(event.get("t_start", 0)),
                                                     float(event.get("t_end", 0)), float(event.get("time", 0)))
            while len(mine) > self._recent_per_stream:  # as many as the daemon keeps for enroll_recent
                mine.popitem(last=False)
        u.time = float(event.get("time", u.time))
        kind = event["type"]
        if kind == "vad.end":
            u.reason = event.get("reason")
        elif kind == "speaker":
            u.speaker, u.score, u.cluster = event.get("speaker"), event.get("score"), event.get("cluster")
            u.degraded = u.degraded or bool(event.get("degraded"))
            if u.speaker and u.speaker != "unknown":
                self._heard[u.speaker] = u.time
        else:
            u.digit, u.confidence = event.get("digit"), event.get("confidence")
            u.degraded = u.degraded or bool(event.get("degraded"))

    # ------------------------------------------------------------ views (any thread)

    def recent(self) -> list[dict[str, Any]]:
        """The recent utterances, newest first."""
        with self._lock:
            every = [u for mine in self._utterances.values() for u in mine.values()]
        return [asdict(u) for u in sorted(every, key=lambda u: u.time, reverse=True)]

    def heard(self) -> dict[str, float]:
        with self._lock:
            return dict(self._heard)

    def streams(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {name: asdict(s) for name, s in sorted(self._streams.items())}

    def summary(self) -> dict[str, Any]:
        with self._lock:
            return {**asdict(self.counts), "endpoint": self.endpoint}
