"""Source readers: one thread per local source, feeding frames of every stream into one queue.

A live source (a microphone) that fails or disappears is reported and re-opened with backoff,
found again by its name; files and stdin end. Frames keep one audio clock per stream across
re-opens, so event times never go back.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, replace

from streamd.audio.sources import Source, SourceError, open_source

log = logging.getLogger(__name__)

BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


@dataclass(frozen=True)
class StreamStatus:
    """A stream's state changed: ``up`` (audio flows), ``down`` (retrying) or ``ended``."""

    stream: str
    state: str
    reason: str = ""


@dataclass(frozen=True)
class StreamSpec:
    stream: str
    source: str
    pace: str
    frame_samples: int
    mic_rate: int = 0

    @property
    def live(self) -> bool:
        """A source worth re-opening when it fails (a device), not one that ends (a file)."""
        return self.source.split(":", 1)[0] == "mic"


class SourceReader(threading.Thread):
    """Reads one source into ``out``: frames and StreamStatus items."""

    def __init__(self, spec: StreamSpec, out: queue.Queue, source: Source | None = None,
                 stop: threading.Event | None = None):
        super().__init__(name=f"source-{spec.stream}", daemon=True)
        self.spec = spec
        self.out = out
        self.source = source  # already opened (start-up checks it), else opened here
        self.stop_event = stop or threading.Event()
        self.restarts = 0
        self.overruns = 0  # capture blocks the source lost, all openings together
        self.overruns_counted = 0  # of which already in /metrics (the main loop's bookkeeping)
        self._overruns_before = 0
        self._t0 = 0.0  # where the current source's audio clock starts on the stream's clock
        self._index0 = 0
        self._next_t = 0.0
        self._next_index = 0

    def stop(self) -> None:
        """Ask the thread to stop; it closes its source itself. Closing a PortAudio stream
        from a second thread, after or while its reader closes it, hangs in stop_stream."""
        self.stop_event.set()
        if not self.is_alive() and self.source is not None:  # never started: nobody else owns it
            self.source.close()
            self.source = None

    def run(self) -> None:
        failures = 0
        while not self.stop_event.is_set():
            reason = self._read_once()
            if self.stop_event.is_set():
                return
            if reason is None or not self.spec.live:
                self.out.put(StreamStatus(self.spec.stream, "ended", reason or "end of audio"))
                return
            delay = BACKOFF_S[min(failures, len(BACKOFF_S) - 1)]
            failures = 0 if self._next_index > self._index0 + 50 else failures + 1  # it ran a while: start over
            self.out.put(StreamStatus(self.spec.stream, "down", f"{reason}; retrying in {delay:g} s"))
            log.warning("stream %s: %s; retrying in %g s", self.spec.stream, reason, delay)
            down_at = time.monotonic()
            if self.stop_event.wait(delay):
                return
            self._t0 = self._next_t + (time.monotonic() - down_at)
            self._index0 = self._next_index
            self.restarts += 1

    def _read_once(self) -> str | None:
        """Open (if needed) and read until the source ends (None) or fails (the reason)."""
        try:
            if self.source is None:
                s = self.spec
                self.source = open_source(s.source, s.stream, s.frame_samples, s.pace, s.mic_rate)
            if self.restarts:
                self.out.put(StreamStatus(self.spec.stream, "up", "source re-opened"))
                log.info("stream %s: source %s is back", self.spec.stream, self.spec.source)
            for frame in self.source.frames():
                frame = replace(frame, index=self._index0 + frame.index, t=self._t0 + frame.t)
                self._next_t, self._next_index = frame.t_end, frame.index + 1
                self.out.put(frame)
                self.overruns = self._overruns_before + getattr(self.source, "overruns", 0)
                if self.stop_event.is_set():
                    return None
            return None
        except SourceError as exc:
            return str(exc)
        except Exception as exc:  # a broken device driver must not kill the daemon
            return f"{self.spec.source}: {exc}"
        finally:
            if self.source is not None:
                self._overruns_before += getattr(self.source, "overruns", 0)
                self.source.close()
                self.source = None
