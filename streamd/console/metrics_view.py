"""What the console shows from the daemon's Prometheus /metrics: latency percentiles over the
last minute, and each stream's health (up, last frame, capture overruns)."""

from __future__ import annotations

import math
import time
import urllib.request
from collections import deque
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

WINDOW_S = 60.0  # latency percentiles over about this long
Buckets = dict[float, float]  # upper bound (le): cumulative count


@dataclass(frozen=True)
class Snapshot:
    at: float
    latency: dict[str, Buckets]  # by stream
    frames: dict[str, float]
    up: dict[str, float]
    overruns: dict[str, float]
    dropped: float


def parse(text: str, at: float) -> Snapshot:
    latency: dict[str, Buckets] = {}
    frames, up, overruns, dropped = {}, {}, {}, 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            stream = s.labels.get("stream", "")
            if s.name == "streamd_latency_seconds_bucket":
                latency.setdefault(stream, {})[float(s.labels["le"])] = s.value
            elif s.name == "streamd_frames_total":
                frames[stream] = s.value
            elif s.name == "streamd_stream_up":
                up[stream] = s.value
            elif s.name == "streamd_capture_overruns_total":
                overruns[stream] = s.value
            elif s.name == "streamd_events_dropped_total":
                dropped = s.value
    return Snapshot(at, latency, frames, up, overruns, dropped)


def quantile(buckets: Buckets, q: float) -> float | None:
    """Prometheus's histogram_quantile: linear within the bucket that holds the q-th share."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if bounds else 0.0
    if total <= 0:
        return None
    rank, below, lower = q * total, 0.0, 0.0
    for le in bounds:
        count = buckets[le]
        if count >= rank:
            if math.isinf(le):
                return lower  # beyond the last finite bound: say that bound, as Prometheus does
            inside = count - below
            return lower + (le - lower) * ((rank - below) / inside if inside else 1.0)
        below, lower = count, le
    return lower


def minus(new: Buckets, old: Buckets | None) -> Buckets:
    return {le: count - (old or {}).get(le, 0.0) for le, count in new.items()}


def merged(per_stream: dict[str, Buckets]) -> Buckets:
    out: Buckets = {}
    for buckets in per_stream.values():
        for le, count in buckets.items():
            out[le] = out.get(le, 0.0) + count
    return out


@dataclass
class MetricsWatch:
    """Scrapes /metrics when asked (at most every ``min_interval_s``) and keeps a minute of
    snapshots, so percentiles describe the last minute rather than the daemon's whole life."""

    url: str
    min_interval_s: float = 2.0
    _snapshots: deque[Snapshot] = field(default_factory=deque)
    _last_frame: dict[str, float] = field(default_factory=dict)  # stream: when its frame count last grew
    _error: str = ""

    def scrape(self) -> None:
        now = time.time()
        if self._snapshots and now - self._snapshots[-1].at < self.min_interval_s:
            return
        try:
            with urllib.request.urlopen(self.url, timeout=2) as reply:
                snap = parse(reply.read().decode("utf-8", "replace"), now)
        except (OSError, ValueError) as exc:
            self._error = f"{self.url}: {getattr(exc, 'reason', None) or exc}"
            return
        self._error = ""
        previous = self._snapshots[-1] if self._snapshots else None
        for stream, count in snap.frames.items():
            if previous is None or count > previous.frames.get(stream, 0.0):
                self._last_frame[stream] = now
        self._snapshots.append(snap)
        while len(self._snapshots) > 2 and now - self._snapshots[1].at >= WINDOW_S:
            self._snapshots.popleft()

    def view(self) -> dict:
        if not self._snapshots:
            return {"url": self.url, "error": self._error or "not scraped yet"}
        new, old = self._snapshots[-1], self._snapshots[0]
        window = new.at - old.at
        base = old.latency if window > 0 else {}
        per_stream = {s: minus(b, base.get(s)) for s, b in new.latency.items()}
        streams = {s: {"p50": quantile(b, 0.5), "p99": quantile(b, 0.99), "decisions": max(b.values(), default=0),
                       "up": new.up.get(s), "overruns": new.overruns.get(s, 0.0),
                       "last_frame": self._last_frame.get(s)} for s, b in per_stream.items()}
        every = merged(per_stream)
        return {"url": self.url, "error": self._error, "window_s": round(window, 1),
                "p50": quantile(every, 0.5), "p99": quantile(every, 0.99), "decisions": max(every.values(), default=0),
                "events_dropped": new.dropped, "streams": streams}
