"""Many streams, shared models: routes each frame to its stream's pipeline and runs the
utterances that are ready, across streams, through the models in batches."""

from __future__ import annotations

import logging
import operator
import time

import numpy as np

from streamd.models.batching import Batcher, Job
from streamd.config import Config
from streamd.service.events import Publisher, StatusEvent
from streamd.audio.frames import Frame
from streamd.models.inference import Models
from streamd.service.metrics import Metrics
from streamd.service.pipeline import StreamPipeline
from streamd.audio.readers import StreamStatus
from streamd.identity.speakers import SpeakerBook
from streamd.identity.vocabulary import WordBook
from streamd.signal.vad_bank import VadBank

log = logging.getLogger(__name__)
_STREAM, _SAMPLES, _T = (operator.attrgetter(a) for a in ("stream", "samples", "t"))

# Jobs a stream may have waiting for the models (a partial, an early final, a final, the next
# utterance's) before the sources are held back: a file or stdin read faster than the models
# run would otherwise pile utterances up in memory without bound.
BACKLOG_PER_STREAM = 4
MIN_BACKLOG = 16
# Quiet frames (taken in by the VadBank alone) are added to their streams' frame counts every
# this many ticks, and whenever a stream's status changes: a count per stream per frame would
# cost more than the rest of a quiet frame.
QUIET_COUNT_EVERY = 50


class Engine:
    def __init__(self, cfg: Config, models: Models, book: SpeakerBook | None, publisher: Publisher,
                 metrics: Metrics, max_streams: int = 100000, words: WordBook | None = None):
        self.cfg = cfg
        self.models = models
        self.book = book
        self.words = words  # vocabularies taught at run time
        self.publisher = publisher
        self.metrics = metrics
        self.max_streams = max_streams
        self.batcher = Batcher(models, cfg.models.max_batch, cfg.models.batch_wait_ms / 1000, self._observe,
                               cfg.models.workers, words.model if words is not None else None,
                               cfg.models.max_latency_ms / 1000, self._shed)
        self.batcher.start()  # the models run on threads of their own: other cores
        self.pipelines: dict[str, StreamPipeline] = {}
        self.vad_bank = VadBank(cfg.vad)  # every stream's VAD levels and gate, a row each
        self._by_row: list[StreamPipeline] = []  # the pipelines by their bank row
        self._rows: dict[str, int] = {}  # each stream's bank row
        self._quiet = np.zeros(0, np.int64)  # quiet frames not yet counted, by row
        self._ticks = 0
        # Status events waiting for their stream's last results: a consumer that stops at
        # "ended" must have seen every speaker and digit event of the stream before it.
        self._held: dict[str, list[StatusEvent]] = {}

    def _observe(self, jobs: list[Job], seconds: float) -> None:
        self.metrics.batch_size.observe(len(jobs))
        for stream in {j.stream for j in jobs}:
            self.metrics.stage.labels(stream=stream, stage="inference").observe(seconds)

    def _shed(self, what: str, n: int) -> None:
        self.metrics.shed.labels(what=what).inc(n)

    def add_stream(self, stream: str, realtime: bool = False) -> StreamPipeline:
        """The stream's pipeline, created if new. ``realtime``: its audio comes as it is captured
        (a microphone, the network, a file read at its pace), so its decisions can be late: work
        is shed to keep them within ``models.max_latency_ms``. A stream read as fast as the
        models take it (a file at pace fast, an evaluation) waits for them instead."""
        if stream not in self.pipelines:
            if len(self.pipelines) >= self.max_streams:
                raise ValueError(f"stream {stream!r}: already {self.max_streams} streams (network.max_streams)")
            self.pipelines[stream] = StreamPipeline(stream, self.cfg, self.models, self.book, self.publisher,
                                                    self.metrics, self.batcher, self.words, realtime,
                                                    self.vad_bank)
            self.metrics.stream_up.labels(stream=stream).set(0)
            self._by_row.append(self.pipelines[stream])
            self._rows[stream] = self.pipelines[stream].audio.segmenter.row
            assert self._rows[stream] == len(self._by_row) - 1
            self._quiet = np.resize(self._quiet, self.vad_bank.rows)
            self._quiet[-1] = 0
        return self.pipelines[stream]

    def push(self, frame: Frame) -> None:
        self.pipelines[frame.stream].push(frame)

    def push_many(self, frames: list[Frame]) -> None:
        """Frames that arrived together (one tick of many streams), in order: their levels and
        gates are computed at once (VadBank.tick); only the frames of streams in or near speech
        go on, one by one, to their pipelines. A stream's second frame starts another tick."""
        names = list(map(_STREAM, frames))
        if len(set(names)) == len(names):
            self._tick(frames, names)
            return
        start, seen = 0, set()
        for i, name in enumerate(names):
            if name in seen:
                self._tick(frames[start:i], names[start:i])
                start, seen = i, set()
            seen.add(name)
        self._tick(frames[start:], names[start:])

    def _tick(self, frames: list[Frame], names: list[str]) -> None:
        n, size = len(frames), self.cfg.vad.frame_samples
        if n < 2:
            for frame in frames:
                self.push(frame)
            return
        samples = list(map(_SAMPLES, frames))
        if (np.fromiter(map(len, samples), np.int64, n) != size).any():
            raise ValueError(f"VAD frames must hold {size} samples")
        rows = np.fromiter(map(self._rows.__getitem__, names), np.int64, n)
        tick = self.vad_bank.tick(rows, np.concatenate(samples).reshape(n, size),
                                  np.fromiter(map(_T, frames), np.float64, n))
        self._quiet[rows[tick.quiet]] += 1
        loud = np.flatnonzero(~tick.quiet).tolist()
        if loud:
            level, gain = tick.level.tolist(), tick.gain_db.tolist()
            for i in loud:
                self.pipelines[names[i]].push_ticked(frames[i], level[i], gain[i])
        self._ticks += 1
        if self._ticks % QUIET_COUNT_EVERY == 0:
            self._count_quiet()

    def _count_quiet(self) -> None:
        """Add the quiet frames to their streams' counts (streamd_frames_total and the rest)."""
        size = self.cfg.vad.frame_samples
        for r in np.flatnonzero(self._quiet).tolist():
            self._by_row[r].audio.quiet(int(self._quiet[r]), size)
        self._quiet[:] = 0

    def status(self, status: StreamStatus) -> None:
        """A source came up, went down or ended: end its utterance if audio stopped, tell
        subscribers and /metrics."""
        self._count_quiet()
        pipeline = self.pipelines.get(status.stream)
        if pipeline is not None and status.state != "up":
            pipeline.flush()
        self.metrics.stream_up.labels(stream=status.stream).set(1 if status.state == "up" else 0)
        if status.state == "down":
            self.metrics.source_failures.labels(stream=status.stream).inc()
        self._held.setdefault(status.stream, []).append(StatusEvent(status.stream, status.state, status.reason))
        self._publish_held()

    def _publish_held(self) -> None:
        """The status events of streams whose results are all published, in their order."""
        for stream in [s for s in self._held if not self.batcher.pending(s)]:
            for event in self._held.pop(stream):
                self.publisher.publish(event)
                self.metrics.events.labels(stream=stream, type=StatusEvent.type).inc()

    def pump(self, force: bool = False, wait_s: float = 0.0) -> int:
        """Publish what the models have finished (waiting up to ``wait_s`` for it); hand the
        waiting utterances to the models when the oldest has waited long enough (or ``force``)."""
        finished = self.batcher.pump(force, wait_s)
        self.metrics.backlog.set(self.batcher.lag() or 0.0)
        if self._held:
            self._publish_held()
        return finished

    def backlogged(self) -> bool:
        """Too much waits for the models: take no more audio until they catch up (a fast file
        source then waits; a microphone that outruns them counts overruns)."""
        return self.batcher.backlog >= max(MIN_BACKLOG, BACKLOG_PER_STREAM * len(self.pipelines))

    def on_results(self, wake) -> None:
        """``wake()`` is called (from the models' thread) when results are ready for pump()."""
        self.batcher.wake = wake

    def wait_left(self) -> float:
        return self.batcher.wait_left(time.monotonic())

    def flush(self) -> None:
        """End of everything: close every open utterance and run what is left."""
        self._count_quiet()
        for pipeline in self.pipelines.values():
            pipeline.flush()
        self.batcher.drain()
        for stream in list(self._held):  # after drain nothing is pending (or it timed out)
            for event in self._held.pop(stream):
                self.publisher.publish(event)
                self.metrics.events.labels(stream=stream, type=StatusEvent.type).inc()

    def close(self) -> None:
        self.batcher.close()
