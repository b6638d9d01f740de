"""A bounded ring of events that many readers follow at their own pace, each with a cursor."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Batch:
    """What a reader gets: the events after its cursor, how many it missed (it fell more than
    the ring's capacity behind), and the cursor to ask with next time."""

    events: list[dict[str, Any]]
    skipped: int
    cursor: int


class EventRing:
    """The newest ``capacity`` events, numbered from 0. A reader that falls behind loses the
    oldest events (counted in ``skipped``), never slows the writer, and costs no memory of
    its own: one slow browser can neither hold events for the others nor grow the console."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._slots: list[dict[str, Any] | None] = [None] * capacity
        self._next = 0  # the number the next event gets
        self._lock = threading.Lock()

    @property
    def capacity(self) -> int:
        return len(self._slots)

    @property
    def next(self) -> int:
        return self._next

    def append(self, event: dict[str, Any]) -> int:
        with self._lock:
            n = self._next
            self._slots[n % len(self._slots)] = event
            self._next = n + 1
            return n

    def since(self, cursor: int, limit: int = 500) -> Batch:
        """At most ``limit`` events from number ``cursor`` on."""
        with self._lock:
            oldest = max(0, self._next - len(self._slots))
            start = min(max(cursor, oldest), self._next)
            end = min(self._next, start + limit)
            events = [self._slots[n % len(self._slots)] for n in range(start, end)]
        return Batch(events, max(0, start - max(cursor, 0)), end)  # type: ignore[arg-type]
