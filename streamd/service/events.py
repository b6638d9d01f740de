"""Typed events, their JSON form, and the ZeroMQ publisher.

Each message is two frames: the topic ``<type>.<stream>`` and a UTF-8 JSON object.
The schema is documented in docs/events.md; keep it stable (extend, never break).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, TextIO

import zmq

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Event:
    type: ClassVar[str] = ""
    stream: str
    utterance: int
    t_start: float
    t_end: float

    def payload(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class VadStart(Event):
    type: ClassVar[str] = "vad.start"


@dataclass(frozen=True)
class VadEnd(Event):
    type: ClassVar[str] = "vad.end"
    reason: str = "silence"


@dataclass(frozen=True)
class SpeakerEvent(Event):
    type: ClassVar[str] = "speaker"
    speaker: str = "unknown"
    score: float = 0.0
    candidates: list[dict[str, Any]] = field(default_factory=list)
    latency_s: float = 0.0
    cosine: float = 0.0
    cluster: str | None = None  # an unknown voice heard before: its stable label, e.g. "unknown-3"
    degraded: bool = False  # decided with fewer speaker windows: the models were behind (models.max_latency_ms)


@dataclass(frozen=True)
class SpeakerPartial(SpeakerEvent):
    """The decision so far while an utterance goes on; t_end is the audio heard so far and
    latency_s is measured from the capture of that audio."""

    type: ClassVar[str] = "speaker.partial"


@dataclass(frozen=True)
class DigitEvent(Event):
    type: ClassVar[str] = "digit"
    digit: int | None = None
    confidence: float = 0.0
    candidates: list[dict[str, Any]] = field(default_factory=list)
    latency_s: float = 0.0
    vocabulary: str | None = None  # "builtin" (the digit models) or a vocabulary taught at run time
    degraded: bool = False  # decided by the cascade's cheap stage alone: the models were behind (models.max_latency_ms)


@dataclass(frozen=True)
class DigitsEvent(Event):
    """The digits said in one utterance, as a string (docs/events.md, ``digits``)."""

    type: ClassVar[str] = "digits"
    digits: str | None = None
    items: list[dict[str, Any]] = field(default_factory=list)  # {"digit", "t_start", "t_end", "p"}
    confidence: float = 0.0
    speaker: str = "unknown"
    reason: str | None = None  # why ``digits`` is null
    latency_s: float = 0.0


@dataclass(frozen=True)
class VerificationEvent(Event):
    """The answer to a challenge (docs/control.md, ``challenge``)."""

    type: ClassVar[str] = "verification"
    id: str = ""
    speaker: str = ""
    result: str = "fail"  # pass | fail
    digits_heard: str | None = None
    digits_ok: bool = False
    voice_score: float | None = None
    voice_ok: bool = False
    reason: str | None = None
    latency_s: float | None = None


@dataclass(frozen=True)
class StatusEvent:
    """A stream's source came up, went down (being retried) or ended."""

    type: ClassVar[str] = "status"
    stream: str
    state: str  # up | down | ended
    reason: str = ""

    def payload(self) -> dict[str, Any]:
        return {"stream": self.stream, "state": self.state, "reason": self.reason}


@dataclass(frozen=True)
class GalleryEvent:
    """An entry of the gallery's audit trail (docs/events.md, ``gallery``): who enrolled,
    promoted, renamed or removed whom, and when. Never a voice's features or embeddings."""

    type: ClassVar[str] = "gallery"
    entry: dict[str, Any]
    stream: str = "daemon"  # the gallery serves every stream

    def payload(self) -> dict[str, Any]:
        entry = dict(self.entry)
        entry["at"] = entry.pop("time")  # when the change was made; "time" is the publication's
        return {"stream": self.stream, **entry}


def envelope(event: Event, seq: int, now: float) -> dict[str, Any]:
    body = {"v": SCHEMA_VERSION, "type": event.type, "stream": event.stream, "seq": seq}
    body.update(event.payload())
    body["time"] = now
    return body


def _round(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, list):
        return [_round(v) for v in value]
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    return value


def encode(body: dict[str, Any]) -> bytes:
    return json.dumps(_round(body), ensure_ascii=False, separators=(",", ":")).encode("utf-8")


DROP_LOG_EVERY_S = 10.0  # a stalled subscriber is named in the log at most this often


class Publisher:
    """Publishes events on an XPUB socket, never blocking, and counts every event a
    subscriber lost.

    The socket is ``XPUB_NODROP``: an event is queued for every subscriber whose topic matches
    or, when one of them already holds ``hwm`` messages (it reads too slowly, or not at all),
    for none of them. The send is non-blocking, so that refusal is ZeroMQ's ``EAGAIN``: the
    event is counted in ``dropped`` (and ``on_drop``) and publishing goes on. The count is
    exact: each subscriber of the topic gets every event that was not counted and misses every
    one that was (a gap in ``seq``). The price: while one subscriber is stalled, the others of
    its topics lose the same events. Sparing them cannot be counted with ZeroMQ: a lossy XPUB
    (or PUB) drops a full subscriber's messages silently, and stops matching that subscriber
    until it reads again, so its later losses are not even refused (docs/operations.md,
    "Slow subscribers", says why this choice). XPUB rather than PUB also lets the daemon see
    subscribers join and leave."""

    def __init__(self, endpoint: str, hwm: int = 1000, jsonl: TextIO | None = None,
                 context: zmq.Context | None = None):
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.XPUB)
        self._sock.setsockopt(zmq.SNDHWM, hwm)
        self._sock.setsockopt(zmq.LINGER, 1000)
        self._sock.setsockopt(zmq.XPUB_NODROP, 1)  # a full subscriber refuses the send (EAGAIN): counted
        self._sock.setsockopt(zmq.XPUB_VERBOSER, 1)  # every (un)subscription, duplicates too: each subscriber counts
        try:
            self._sock.bind(endpoint)
        except zmq.ZMQError as exc:
            self._sock.close(0)
            raise OSError(f"events.endpoint {endpoint}: cannot bind: {exc}") from None
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.hwm = hwm
        self._jsonl = jsonl
        self._lock = threading.Lock()
        self.seq = 0
        self.dropped = 0
        self.on_drop = None  # called once per dropped event (the daemon counts them in /metrics)
        self.forward = None  # also given every event, in order: (topic, JSON bytes, seq) (events.nats)
        # Subscriptions held by connected subscribers, each one counted: two subscribers of the
        # same topic are 2 (a subscriber of two topics is 2 as well; one of none receives nothing).
        self.subscribers = 0
        self._drop_logged_at = float("-inf")
        self._drops_unlogged = 0

    def _drain_subscriptions(self) -> None:
        while True:
            try:
                msg = self._sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if msg[:1] == b"\x01":
                self.subscribers += 1
            elif msg[:1] == b"\x00":
                self.subscribers = max(0, self.subscribers - 1)

    def wait_for_subscriber(self, timeout_s: float, count: int = 1) -> bool:
        """Wait until ``count`` subscriptions have arrived (for demos and tests: ZeroMQ drops
        what is sent before a subscriber has joined)."""
        deadline = time.monotonic() + timeout_s
        while self.subscribers < count and time.monotonic() < deadline:
            if self._sock.poll(50, zmq.POLLIN):
                with self._lock:
                    self._drain_subscriptions()
        return self.subscribers >= count

    def _count_drop(self, topic: bytes) -> None:
        self.dropped += 1
        self._drops_unlogged += 1
        if self.on_drop is not None:
            self.on_drop()
        now = time.monotonic()
        if now - self._drop_logged_at >= DROP_LOG_EVERY_S:  # not one line per event: a stall lasts
            log.warning("events dropped: a subscriber of %s holds events.hwm (%d) unread events; %d dropped "
                        "since the last report, %d in all (streamd_events_dropped_total)",
                        topic.decode(), self.hwm, self._drops_unlogged, self.dropped)
            self._drop_logged_at = now
            self._drops_unlogged = 0

    def publish(self, event: Event) -> dict[str, Any]:
        with self._lock:
            body = envelope(event, self.seq, time.time())
            self.seq += 1
            data = encode(body)
            topic = f"{event.type}.{event.stream}".encode()
            try:
                self._sock.send_multipart((topic, data), zmq.NOBLOCK)  # never waits
            except zmq.Again:
                self._count_drop(topic)
            except zmq.ZMQError as exc:
                self._count_drop(topic)
                log.warning("event %s dropped: %s", topic.decode(), exc)
            self._drain_subscriptions()
            if self.forward is not None:
                self.forward(topic.decode(), data, body["seq"])
            if self._jsonl is not None:
                self._jsonl.write(data.decode("utf-8") + "\n")
                self._jsonl.flush()
        return body

    def close(self, linger_s: float = 1.0) -> None:
        self._sock.setsockopt(zmq.LINGER, int(linger_s * 1000))
        self._sock.close()
        if self._jsonl is not None:
            self._jsonl.close()


def subscribe(endpoint: str, topic: str = "", context: zmq.Context | None = None) -> zmq.Socket:
    ctx = context or zmq.Context.instance()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt_string(zmq.SUBSCRIBE, topic)
    sock.connect(endpoint)
    return sock


def receive(sock: zmq.Socket, timeout_ms: int | None = None) -> dict[str, Any] | None:
    """One event from a SUB socket, or None on timeout."""
    if timeout_ms is not None and not sock.poll(timeout_ms, zmq.POLLIN):
        return None
    _topic, data = sock.recv_multipart()
    return json.loads(data)
