"""Gallery work kept off the audio path: the shared gallery's unknown-voice cluster writes,
re-reads and catch-up run on one thread of their own, from a bounded queue, in order.

The decisions use what is in memory; a write waits here. While the database is away a write
is kept and tried again when it returns (the queue holds at most ``limit``: a write that
finds it full is dropped and counted); a write the database refuses (a cluster deleted by
another node meanwhile) is dropped, logged and counted. Enrollments never come here: they
are acknowledged only after their commit, by the control command that made them.

``Inline`` has the same methods and does the work at once, on the caller's thread: the
SQLite gallery (local, fast) and the commands.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from streamd.identity.gallery import StorageError

log = logging.getLogger(__name__)

RETRY_S = 0.5  # between tries while the database is away
IDLE_S = 0.25  # how often the idle work (other nodes' clusters, reserved ids) looks when nothing is queued


@dataclass(frozen=True)
class Write:
    action: str  # "store an unknown voice": logged as "could not store an unknown voice: ..."
    run: Callable[[], object]


@dataclass
class WriteCounts:
    done: int = 0
    dropped: int = 0  # the queue was full
    failed: int = 0  # refused by the database, or not kept: logged


class Inline:
    """Writes done at once on the caller's thread; a failure is logged, never raised."""

    def __init__(self):
        self.counts = WriteCounts()

    def submit(self, write: Write) -> bool:
        try:
            write.run()
            self.counts.done += 1
        except StorageError as exc:
            self.counts.failed += 1
            log.warning("could not %s: %s", write.action, exc)
        return True

    def flush(self, timeout_s: float = 0.0) -> bool:
        return True

    def on_idle(self, work: Callable[[], None]) -> None:
        pass

    def queued(self) -> int:
        return 0

    def close(self, timeout_s: float = 0.0) -> None:
        pass


class GalleryWriter:
    """One thread, a bounded queue. ``unavailable()``: True while the database is known to be
    away (writes wait instead of failing). ``on_drop``: called for each write dropped."""

    def __init__(self, unavailable: Callable[[], bool], limit: int = 1000,
                 on_drop: Callable[[], None] | None = None):
        self.unavailable = unavailable
        self.limit = limit
        self.on_drop = on_drop
        self.counts = WriteCounts()
        self._queue: collections.deque[Write] = collections.deque()
        self._cond = threading.Condition()
        self._busy = False
        self._stop = False
        self._idle: list[Callable[[], None]] = []
        self._thread = threading.Thread(target=self._run, name="gallery-writer", daemon=True)
        self._thread.start()

    def submit(self, write: Write) -> bool:
        """Queued (never waits); False when the queue is full and the write was dropped."""
        with self._cond:
            if len(self._queue) >= self.limit:
                self._dropped(write, "the queue of gallery writes is full")
                return False
            self._queue.append(write)
            self._cond.notify_all()
        return True

    def on_idle(self, work: Callable[[], None]) -> None:
        """``work()`` every IDLE_S while nothing is queued and the database is there."""
        self._idle.append(work)

    def queued(self) -> int:
        with self._cond:
            return len(self._queue) + self._busy

    def flush(self, timeout_s: float) -> bool:
        """Wait until what was queued before is done (or dropped); False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0 or self._stop:
                    return False
                self._cond.wait(left)
        return True

    def close(self, timeout_s: float = 3.0) -> None:
        """What is queued gets ``timeout_s`` to be written; the rest is dropped, counted."""
        self.flush(timeout_s)
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout_s)
        with self._cond:
            for write in self._queue:
                self._dropped(write, "streamd is stopping")
            self._queue.clear()

    def _dropped(self, write: Write, why: str) -> None:
        self.counts.dropped += 1
        if self.counts.dropped == 1 or self.counts.dropped % 100 == 0:
            log.warning("could not %s: %s (%d gallery writes dropped so far)", write.action, why, self.counts.dropped)
        if self.on_drop is not None:
            self.on_drop()

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._queue and not self._stop:
                    self._cond.wait(IDLE_S)
                if self._stop:
                    return
                write = self._queue[0] if self._queue else None
                self._busy = write is not None
            if self.unavailable():
                time.sleep(RETRY_S)  # kept, in order, until the database returns
            elif write is None:
                self._run_idle()
            else:
                self._attempt(write)
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def _attempt(self, write: Write) -> None:
        try:
            write.run()
            self.counts.done += 1
        except StorageError as exc:
            if self.unavailable():
                return  # the database went away during it: tried again when it returns
            self.counts.failed += 1
            log.warning("could not %s: %s", write.action, exc)
        except Exception:  # a bug in one write must not stop the others
            self.counts.failed += 1
            log.exception("could not %s", write.action)
        with self._cond:
            if self._queue and self._queue[0] is write:
                self._queue.popleft()

    def _run_idle(self) -> None:
        for work in self._idle:
            try:
                work()
            except StorageError as exc:
                if not self.unavailable():
                    log.warning("%s", exc)
            except Exception:
                log.exception("gallery idle work failed")
