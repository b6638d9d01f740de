"""Audio over ZeroMQ from small devices: ``streamd send`` (PUSH) to a daemon's ``network.listen``
(PULL), one stream per device.

Each message is two frames: a JSON header ``{"v": 1, "stream", "seq", "t", "sent"}`` and the
frame's samples (s16le, 16 kHz mono). ``seq`` counts the frames a sender sent, from 0; ``t``
is the frame's audio time at the sender. A jump in ``seq`` is lost audio (counted, filled with
silence up to ``network.gap_fill_ms``, beyond that the utterance going on is ended); a jump in
``t`` alone is silence the sender's VAD chose not to send; ``seq`` going back to 0 is a
sender that restarted (counted as a reconnect). A malformed message is counted and dropped.
"""

from __future__ import annotations

import collections
import json
import logging
import queue
import re
import socket
import threading
import time
from dataclasses import dataclass

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from streamd.audio.frames import SAMPLE_RATE, STREAM_ID, Frame
from streamd.audio.readers import StreamStatus

log = logging.getLogger(__name__)

VERSION = 1
MAX_FRAME_SAMPLES = SAMPLE_RATE  # one second: anything larger is refused unread


class BadMessage(ValueError):
    pass


@dataclass(frozen=True)
class StreamIdle:
    """Put on the daemon's queue after the silence that closes an idle stream's utterance:
    one still open then (webrtcvad can hear speech a few frames into the zeros) is ended."""

    stream: str


def encode(stream: str, seq: int, t: float, samples: np.ndarray) -> list[bytes]:
    header = {"v": VERSION, "stream": stream, "seq": seq, "t": round(t, 6), "sent": time.time()}
    return [json.dumps(header).encode(), np.ascontiguousarray(samples, "<i2").tobytes()]


def decode(parts: list[bytes], frame_samples: int) -> tuple[dict, np.ndarray]:
    if len(parts) != 2:
        raise BadMessage(f"expected 2 frames, got {len(parts)}")
    try:
        header = json.loads(parts[0])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BadMessage("header is not JSON") from None
    if not isinstance(header, dict) or header.get("v") != VERSION:
        raise BadMessage("header is not a version-1 object")
    stream, seq, t = header.get("stream"), header.get("seq"), header.get("t")
    if not isinstance(stream, str) or not STREAM_ID.match(stream):
        raise BadMessage("bad stream id")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise BadMessage("bad seq")
    if not isinstance(t, (int, float)) or isinstance(t, bool) or not np.isfinite(t) or t < 0:
        raise BadMessage("bad t")
    if len(parts[1]) != 2 * frame_samples:
        raise BadMessage(f"frame of {len(parts[1])} bytes, expected {2 * frame_samples}")
    return header, np.frombuffer(parts[1], "<i2").astype(np.int16)


@dataclass
class _Remote:
    """What the receiver knows of one sender's stream."""

    seq: int
    sender_t: float  # audio time (sender's clock) where the next frame should start
    t: float  # the stream's audio time here
    index: int
    last: float = 0.0  # monotonic time of the last frame received
    closed: bool = True  # no frame since the stream's utterance was last closed for want of audio


class NetworkReceiver(threading.Thread):
    """Receives every device's frames on one socket and puts them on the daemon's queue."""

    def __init__(self, endpoint: str, out: queue.Queue, frame_samples: int, metrics, gap_fill_s: float = 1.0,
                 curve=None, idle_s: float = 1.0, close_s: float = 0.32):
        super().__init__(name="network", daemon=True)
        self.out = out
        self.frame_samples = frame_samples
        self.frame_s = frame_samples / SAMPLE_RATE
        self.metrics = metrics
        self.gap_fill_s = gap_fill_s
        # A stream whose frames stop for idle_s (the sender ended, went quiet under --vad, or
        # the network dropped) gets close_s of silence (the VAD's hangover): its utterance
        # ends and is recognised now, not when the next audio comes (maybe another sender's).
        self.idle_s = idle_s
        self.close_s = close_s
        self.remotes: dict[str, _Remote] = {}
        self._stopping = threading.Event()
        self._ctx = zmq.Context()  # its own: a CURVE authenticator is per context
        self._auth = None
        self._sock = self._ctx.socket(zmq.PULL)
        self._sock.setsockopt(zmq.MAXMSGSIZE, 4 * MAX_FRAME_SAMPLES)
        self._sock.setsockopt(zmq.RCVHWM, 10000)
        self._sock.setsockopt(zmq.LINGER, 0)
        try:
            if curve is not None:
                self._auth = curve.secure(self._ctx, self._sock, "streamd-audio", "streamd.network.auth")
            self._sock.bind(endpoint)
        except zmq.ZMQError as exc:
            self.close()
            raise OSError(f"network.listen {endpoint}: cannot bind: {exc}") from None
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def stop(self) -> None:
        self._stopping.set()

    def close(self) -> None:
        self._sock.close(0)
        if self._auth is not None:
            self._auth.stop()
        self._ctx.term()

    def run(self) -> None:
        try:
            while not self._stopping.is_set():
                if not self._sock.poll(100):
                    self._close_idle(time.monotonic())
                    continue
                parts = self._sock.recv_multipart()
                try:
                    header, samples = decode(parts, self.frame_samples)
                except BadMessage as exc:
                    self.metrics.network_bad.inc()
                    log.debug("network: dropped a message: %s", exc)
                    continue
                self._frame(header, samples)
                self._close_idle(time.monotonic())
        finally:
            self.close()

    def _frame(self, header: dict, samples: np.ndarray) -> None:
        stream, seq, sender_t = header["stream"], header["seq"], float(header["t"])
        now = time.monotonic()
        r = self.remotes.get(stream)
        if r is None:
            # Past frame 0: the sender was with another node (failover) or this daemon restarted.
            # Those frames were not lost here; the stream keeps the sender's clock.
            r = self.remotes[stream] = _Remote(seq, sender_t, sender_t if seq else 0.0, 0)
            self.metrics.add_network_stream(stream)
            self.out.put(StreamStatus(stream, "up", "first audio from the network" +
                                      (f", from frame {seq} (the sender was elsewhere before)" if seq else "")))
        elif seq <= r.seq - 1 and seq < 10:
            self.metrics.network_reconnects.labels(stream=stream).inc()
            self._close(stream, r, now)  # the last sender's utterance is not the new one's
            self.out.put(StreamStatus(stream, "up", "sender restarted"))
            r.seq, r.sender_t = seq, sender_t
        elif seq < r.seq:
            self.metrics.network_bad.inc()  # a duplicate or out-of-order frame
            return
        if seq > r.seq:
            self.metrics.network_gaps.labels(stream=stream).inc()
            self.metrics.network_lost.labels(stream=stream).inc(seq - r.seq)
        missing_s = max(0.0, sender_t - r.sender_t, (seq - r.seq) * self.frame_s)
        self._fill(stream, r, missing_s, now)
        self.out.put(Frame(stream, r.index, samples, r.t, now))
        self.metrics.network_frames.labels(stream=stream).inc()
        sent = header.get("sent")
        if isinstance(sent, (int, float)) and np.isfinite(sent):
            self.metrics.network_delay.observe(max(0.0, time.time() - sent))
        r.seq, r.sender_t, r.t, r.index = seq + 1, sender_t + self.frame_s, r.t + self.frame_s, r.index + 1
        r.last, r.closed = now, False

    def _close_idle(self, now: float) -> None:
        for stream, r in self.remotes.items():
            if not r.closed and now - r.last >= self.idle_s:
                self._close(stream, r, now)

    def _close(self, stream: str, r: _Remote, now: float) -> None:
        """The hangover's worth of silence after a stream's last frame: the VAD closes the
        utterance going on (``vad.end`` reason ``silence``) and its decision is published.
        The sender's clock moves on with it, so a sender that comes back keeps its times."""
        if r.closed:
            return
        frames = int(np.ceil(self.close_s / self.frame_s))
        silence = np.zeros(self.frame_samples, np.int16)
        for _ in range(frames):
            self.out.put(Frame(stream, r.index, silence, r.t, now))
            r.t += self.frame_s
            r.index += 1
        r.sender_t += frames * self.frame_s
        r.closed = True
        self.out.put(StreamIdle(stream))

    def _fill(self, stream: str, r: _Remote, missing_s: float, now: float) -> None:
        """Silence for a short gap; a long one ends the utterance going on."""
        frames = int(round(missing_s / self.frame_s))
        if frames <= 0:
            return
        if missing_s > self.gap_fill_s:
            self.out.put(StreamStatus(stream, "down", f"{missing_s:.1f} s of audio missing"))
            self.out.put(StreamStatus(stream, "up", "audio resumed"))
            r.t += frames * self.frame_s
            r.index += frames
            return
        silence = np.zeros(self.frame_samples, np.int16)
        for _ in range(frames):
            self.out.put(Frame(stream, r.index, silence, r.t, now))
            r.t += self.frame_s
            r.index += 1


class SendError(OSError):
    """The daemon will not take this sender's audio: refused, mismatched keys, or not there."""


HANDSHAKE_RETRIES = 3  # failed handshakes in a row: keys that do not match, not a passing hiccup


ZMTP_SIGNATURE = b"\xff" + bytes(8) + b"\x01\x7f"


def peer_mechanism(endpoint: str, timeout_s: float = 1.0) -> str | None:
    """The security mechanism (``NULL``, ``CURVE``…) in the greeting of the ZeroMQ peer at a
    ``tcp://`` endpoint, or None when nothing there sends a ZMTP 3 greeting."""
    match = re.fullmatch(r"tcp://\[?([^\]]+?)\]?:(\d+)", endpoint)
    if match is None:
        return None
    try:
        with socket.create_connection((match[1], int(match[2])), timeout=timeout_s) as conn:
            conn.sendall(ZMTP_SIGNATURE + b"\x03")  # ZMTP 3: the peer then sends the rest of its greeting
            greeting = b""
            while len(greeting) < 32:
                chunk = conn.recv(64 - len(greeting))
                if not chunk:
                    break
                greeting += chunk
    except OSError:
        return None
    if len(greeting) < 32 or greeting[0] != 0xFF or greeting[9] != 0x7F or greeting[10] < 3:
        return None
    return greeting[12:32].rstrip(b"\x00").decode("ascii", "replace")


class _Link:
    """What the sender's socket monitor says about the connection to the daemon."""

    EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
              | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_DISCONNECTED)

    def __init__(self, sock: zmq.Socket, endpoint: str, curve: bool = False):
        self.endpoint = endpoint
        self.curve = curve  # whether this sender uses CurveZMQ
        self.up = False
        self.failed_handshakes = 0
        self._sock = sock
        self.monitor = sock.get_monitor_socket(self.EVENTS)

    def update(self, wait_ms: int = 0) -> None:
        """Reads the events so far (waiting up to ``wait_ms`` for one); raises SendError when
        the daemon will never take this sender's audio (libzmq does not retry those)."""
        while self.monitor.poll(wait_ms):
            wait_ms = 0
            message = recv_monitor_message(self.monitor)
            event = message["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                log.info("send: connected to %s", self.endpoint)
                self.up, self.failed_handshakes = True, 0
            elif event == zmq.EVENT_DISCONNECTED and self.up:
                log.warning("send: lost %s; waiting for it to come back", self.endpoint)
                self.up = False
            elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                raise SendError(f"{self.endpoint} refused this sender's key (its public key is not in the "
                                "daemon's control.curve_clients)")
            elif event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
                self.failed_handshakes += 1
            if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
                if message["value"] == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
                    raise SendError(self._curve_mismatch())
                raise SendError(self._not_streamd("something answers there but does not speak ZeroMQ's protocol"))
            if self.failed_handshakes >= HANDSHAKE_RETRIES:
                # A CurveZMQ server that cannot read this sender's hello closes the connection
                # without a word; so does a server that is not ZeroMQ at all, and a CurveZMQ
                # server that saw a plain sender's greeting before sending all of its own.
                raise SendError(self._curve_mismatch() if self.curve or peer_mechanism(self.endpoint) == "CURVE"
                                else self._not_streamd("something answers there but closes every connection "
                                                       "before ZeroMQ's handshake"))

    def _curve_mismatch(self) -> str:
        return (f"{self.endpoint}: the CurveZMQ handshake fails: control.curve_server_key is not that daemon's "
                "key, or only one side uses CurveZMQ")

    def _not_streamd(self, what: str) -> str:
        return f"{self.endpoint}: no streamd daemon listens there ({what}; is it the daemon's network.listen?)"

    def close(self) -> None:
        self._sock.disable_monitor()
        self.monitor.close(0)


HEARTBEAT_IVL_MS = 250  # a node whose host died (no FIN, no RST) is given up after HEARTBEAT_TIMEOUT_MS
HEARTBEAT_TIMEOUT_MS = 1000
RESEND_S = 1.0  # audio sent to a node just before it was found gone, sent again to the next one
# Several nodes: how long the first one has to take the sender before the next may (a loaded
# machine took over 0.5 s for the handshake in CI; a live source's audio is queued meanwhile).
FIRST_GRACE_S = 2.0


class _Node:
    """One daemon a sender may send to: its PUSH socket and what the socket's monitor says.

    ``immediate`` (one of several nodes): frames are queued only on a connection that is up,
    so none wait in the socket for a node that is gone (they would reach it, stale, when it
    came back); the sender queues them itself until some node takes them. A sole node's
    socket queues them itself while the daemon is away."""

    def __init__(self, ctx: zmq.Context, endpoint: str, curve, hwm: int, immediate: bool):
        self.endpoint = endpoint
        self.sock = ctx.socket(zmq.PUSH)
        for option, value in ((zmq.SNDHWM, hwm), (zmq.LINGER, 2000), (zmq.IMMEDIATE, int(immediate)),
                              (zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS), (zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)):
            self.sock.setsockopt(option, value)
        if curve is not None:
            curve.secure(self.sock)
        self.link = _Link(self.sock, endpoint, curve is not None)
        try:
            self.sock.connect(endpoint)
        except zmq.ZMQError as exc:
            self.close()
            raise SendError(f"{endpoint}: cannot connect: {zmq.strerror(exc.errno)}") from None

    def offer(self, parts: list[bytes]) -> bool:
        try:
            self.sock.send_multipart(parts, zmq.NOBLOCK)
            return True
        except zmq.Again:  # 10 s queued (the node reads too slowly), or just gone and not yet told
            return False

    def close(self) -> None:
        self.link.close()
        self.sock.close()  # lingers up to 2 s while a connected daemon takes the rest


class Sender:
    """``streamd send``: frames of a local source to a daemon's network.listen endpoint, or to
    the first of several that takes them (``--to A,B``).

    With several nodes the sender goes to the first one up and stays with it while it is up;
    when it is gone (its connection closed, or 1 s of missed heartbeats) the stream moves to
    the next node that is up, and the last ``RESEND_S`` of audio is sent again there (the gone
    node may never have heard it). It never moves back on its own: ``prefer_first`` (SIGUSR1
    to ``streamd send``) moves it to the first node in the list that is up.

    A daemon that refuses the key, or whose key does not match, ends the sender with a
    SendError. While no node takes the audio, a live source's frames are queued (10 s) and
    then dropped; a file waits for one up to ``wait_s``."""

    def __init__(self, endpoints: str | list[str], stream: str, curve=None, hwm: int = 500, wait_s: float = 30.0,
                 resend_s: float = RESEND_S):
        self.endpoints = [endpoints] if isinstance(endpoints, str) else list(endpoints)
        self.endpoint = ", ".join(self.endpoints)
        self._ctx = zmq.Context()
        self._nodes: list[_Node] = []
        try:
            for endpoint in self.endpoints:
                self._nodes.append(_Node(self._ctx, endpoint, curve, hwm, immediate=len(self.endpoints) > 1))
        except SendError:
            self.close()
            raise
        self._single = len(self._nodes) == 1
        self.active: _Node | None = self._nodes[0] if self._single else None
        self.stream = stream
        self.hwm = hwm
        self.wait_s = wait_s
        self.seq = 0
        self.dropped = 0
        self.moves = 0  # times the stream went to another node
        self._backlog: collections.deque[list[bytes]] = collections.deque()  # taken by no node yet
        self._resend_s = resend_s
        self._recent: collections.deque[list[bytes]] = collections.deque(maxlen=0)  # sized at the first frame
        self._last: _Node | None = None  # the node that had the stream last
        self._want_first = False
        self._poller = zmq.Poller()
        for node in self._nodes:
            self._poller.register(node.link.monitor, zmq.POLLIN)
        self._first_until = time.monotonic() + FIRST_GRACE_S  # until then only the first node may take it
        if len(self._nodes) > 1:  # "the first node that takes it": give the first a moment to
            while not self._nodes[0].link.up and time.monotonic() < self._first_until:
                self._update(50)

    def wait_connected(self, wait_s: float) -> bool:
        """Whether a node has taken this sender's handshake, waiting up to ``wait_s`` for one
        (``streamd bench --network`` starts its clocks once every sender is connected)."""
        deadline = time.monotonic() + wait_s
        self._update()
        while not self._connected() and time.monotonic() < deadline:
            self._update(max(1, int((deadline - time.monotonic()) * 1000)))
        return self._connected()

    def _connected(self) -> bool:
        return self.active is not None and self.active.link.up

    def check(self) -> None:
        """Follows the connections (and logs them); SendError if a daemon refused this sender.
        Called for every captured frame, also those --vad does not send."""
        self._update()

    def prefer_first(self) -> None:
        """Move to the first node in the list that is up, at the next frame (safe in a signal handler)."""
        self._want_first = True

    def _update(self, wait_ms: int = 0) -> None:
        try:
            if wait_ms > 0:
                self._poller.poll(wait_ms)
            for node in self._nodes:
                node.link.update()
        except SendError:
            self._give_up()
            raise
        self._choose()
        self._flush()

    def _choose(self) -> None:
        if self._single:
            return
        if self.active is not None and not self.active.link.up:
            self._lost(self.active)
        if self._want_first:
            self._want_first = False
            first = next((n for n in self._nodes if n.link.up), None)
            if first is not None and first is not self.active:
                self._move(first, "told to prefer the first node")
        if self.active is None:
            start = self._nodes.index(self._last) + 1 if self._last is not None else 0
            order = self._nodes[start:] + self._nodes[:start]
            if self._last is None and time.monotonic() < self._first_until:
                order = order[:1]  # another node may have answered first; the first is preferred
            node = next((n for n in order if n.link.up), None)
            if node is not None:
                if self._last is None and node is not self._nodes[0]:
                    log.warning("send: %s did not take stream %s within %.1f s; it goes to %s",
                                self._nodes[0].endpoint, self.stream, FIRST_GRACE_S, node.endpoint)
                self._move(node, f"{self._last.endpoint} is gone" if self._last is not None else "")

    def _lost(self, node: _Node) -> None:
        """The active node is gone: what it may not have heard is sent again to the next."""
        self._backlog.extendleft(reversed(self._recent))
        self._recent.clear()
        while len(self._backlog) > self.hwm:
            self._backlog.popleft()
            self.dropped += 1
        self.active, self._last = None, node
        if len(self._nodes) > 1:
            log.warning("send: %s is gone; stream %s goes to the next node that is up", node.endpoint, self.stream)

    def _move(self, node: _Node, why: str) -> None:
        previous = self.active or self._last
        if previous is not None and node is not previous:
            self.moves += 1
            log.warning("send: stream %s moves to %s (%s; from frame %d)", self.stream, node.endpoint, why,
                        self._first_unsent())
        self.active = self._last = node

    def _first_unsent(self) -> int:
        return json.loads(self._backlog[0][0])["seq"] if self._backlog else self.seq

    def _flush(self) -> None:
        while self.active is not None and self._backlog and self.active.offer(self._backlog[0]):
            self._recent.append(self._backlog.popleft())

    def _offer(self, parts: list[bytes]) -> bool:
        """Hands a frame to the active node, or queues it; False when neither can take it."""
        if self._single:
            return self._nodes[0].offer(parts)
        if self.active is not None and not self._backlog and self.active.offer(parts):
            self._recent.append(parts)
            return True
        if len(self._backlog) < self.hwm:
            self._backlog.append(parts)
            return True
        return False

    def _give_up(self) -> None:
        """Nothing queued will be taken: the sockets' close must not linger for it (``--wait``
        is the whole wait)."""
        for node in self._nodes:
            node.sock.setsockopt(zmq.LINGER, 0)

    def send(self, frame: Frame, block: bool = False) -> None:
        """``block``: wait while the queue is full (a file, which has time); a live capture
        never waits, its frames are dropped and counted instead."""
        self._update()
        if self.seq == 0:
            self._recent = collections.deque(maxlen=round(self._resend_s * SAMPLE_RATE / len(frame.samples)))
        parts = encode(self.stream, self.seq, frame.t, frame.samples)
        self.seq += 1  # a dropped frame still takes its number: the receiver counts it as lost
        if block:
            self._send_waiting(parts)
        elif not self._offer(parts):
            self.dropped += 1  # no node takes audio and 10 s are queued: capture must not stall

    def _send_waiting(self, parts: list[bytes]) -> None:
        deadline = time.monotonic() + self.wait_s
        while not self._offer(parts):
            if time.monotonic() > deadline:
                self._give_up()
                raise SendError(f"no daemon at {self.endpoint} took audio for {self.wait_s:g} s")
            self._update(100)

    def finish(self) -> None:
        """Waits, up to ``wait_s``, for a daemon to take what is queued; SendError if none does."""
        deadline = time.monotonic() + self.wait_s
        self._update()
        while self._backlog or (self._single and not self._connected() and self.seq > self.dropped):
            left = deadline - time.monotonic()
            if left <= 0:
                self._give_up()
                raise SendError(f"no daemon at {self.endpoint} took the audio within {self.wait_s:g} s")
            self._update(max(1, min(100, int(left * 1000))))

    def close(self) -> None:
        for node in self._nodes:
            node.close()
        self._ctx.term()
