"""Every Prometheus metric streamd exports, declared in one place, on its own registry."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import prometheus_client.metrics
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from streamd import __version__
from streamd.audio.frames import SAMPLE_RATE
from streamd.models.batching import SHED_ORDER

log = logging.getLogger(__name__)

# Audio work spans tens of microseconds (VAD on one frame) to seconds (a slow model).
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
STAGES = ("vad", "features", "inference", "identity", "publish")


@dataclass
class StreamCounts:
    """A stream's running totals of audio, plain integers its pipeline adds to on every frame
    (no lock, no Prometheus call: silence should cost little more than the VAD).
    ``FrameCountsCollector`` reads them when /metrics is scraped."""

    frames: int = 0
    audio_samples: int = 0
    speech_samples: int = 0  # of frames inside utterances
    created: float = field(default_factory=time.time)  # the series' start, as a Counter's _created

    def add_frame(self, samples: int, speech: bool) -> None:
        self.frames += 1
        self.audio_samples += samples
        if speech:
            self.speech_samples += samples


class FrameCountsCollector(Collector):
    """Exports every stream's ``StreamCounts`` as the counters streamd_frames_total,
    streamd_audio_seconds_total and streamd_speech_seconds_total, read at scrape time: what
    /metrics shows is what the pipelines have counted up to that moment."""

    FAMILIES = (
        ("streamd_frames_total", "Audio frames processed."),
        ("streamd_audio_seconds_total", "Audio processed."),
        ("streamd_speech_seconds_total", "Audio inside utterances."),
    )

    def __init__(self) -> None:
        self._streams: dict[str, StreamCounts] = {}
        self._lock = threading.Lock()  # add() runs on the audio thread, collect() on the HTTP server's

    def add(self, stream: str) -> StreamCounts:
        """The stream's counts (the same object for every call with that stream)."""
        with self._lock:
            return self._streams.setdefault(stream, StreamCounts())

    def describe(self) -> list[CounterMetricFamily]:
        return self._families()

    def collect(self) -> Iterator[CounterMetricFamily]:
        with self._lock:
            streams = list(self._streams.items())
        frames, audio, speech = families = self._families()
        with_created = getattr(prometheus_client.metrics, "_use_created", True)  # as Counter does
        for stream, counts in streams:
            created = counts.created if with_created else None
            frames.add_metric([stream], counts.frames, created=created)
            audio.add_metric([stream], counts.audio_samples / SAMPLE_RATE, created=created)
            speech.add_metric([stream], counts.speech_samples / SAMPLE_RATE, created=created)
        yield from families

    def _families(self) -> list[CounterMetricFamily]:
        return [CounterMetricFamily(name, doc, labels=["stream"]) for name, doc in self.FAMILIES]


class StageTimes:
    """One stream's ``streamd_stage_seconds`` children, resolved once."""

    def __init__(self, stage: Histogram, stream: str):
        self._children = {name: stage.labels(stream=stream, stage=name) for name in STAGES}

    def observe(self, stage: str, seconds: float) -> None:
        self._children[stage].observe(seconds)

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self._children[stage].observe(time.perf_counter() - start)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.latency = Histogram(
            "streamd_latency_seconds",
            "Capture of the frame that closed an utterance to publication of its event.",
            ["stream"], buckets=LATENCY_BUCKETS, registry=r)
        self.stage = Histogram(
            "streamd_stage_seconds", "Time spent in each pipeline stage per call.",
            ["stream", "stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.frame_counts = FrameCountsCollector()  # frames, audio and speech seconds, per stream
        r.register(self.frame_counts)
        self.utterances = Counter("streamd_utterances_total", "Utterances ended.", ["stream", "reason"], registry=r)
        self.events = Counter("streamd_events_total", "Events published.", ["stream", "type"], registry=r)
        self.dropped = Counter("streamd_events_dropped_total", "Events that could not be published.", registry=r)
        self.overruns = Counter("streamd_capture_overruns_total", "Audio blocks lost because capture outran the pipeline.", ["stream"], registry=r)
        self.stream_up = Gauge("streamd_stream_up", "1 while a stream's source delivers audio, 0 while it is down.",
                               ["stream"], registry=r)
        self.source_failures = Counter("streamd_source_failures_total",
                                       "Times a stream's source failed or disappeared (then retried).",
                                       ["stream"], registry=r)
        self.early_finals = Counter(
            "streamd_early_finals_total", "Final decisions computed once speech had been silent for vad.tail_ms: "
            "used when the utterance then closed, wasted when speech went on.", ["stream", "outcome"], registry=r)
        self.shed = Counter(
            "streamd_shed_total", "Work shed because the models were behind (models.max_latency_ms): partial "
            "decisions and early finals not computed, digit decisions left to the cascade's cheap stage, speaker "
            "decisions on fewer windows.", ["what"], registry=r)
        for what in SHED_ORDER:
            self.shed.labels(what=what)
        self.backlog = Gauge(
            "streamd_backlog_seconds", "How far the models are behind: the age of the audio of the oldest final "
            "decision waiting for them or being computed (0 when none is).", registry=r)
        self.batch_size = Histogram("streamd_batch_size", "Utterances per batched model run (all streams).",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.network_frames = Counter("streamd_network_frames_total", "Audio frames received from the network.",
                                      ["stream"], registry=r)
        self.network_gaps = Counter("streamd_network_gaps_total", "Breaks in a remote stream's frame numbers.",
                                    ["stream"], registry=r)
        self.network_lost = Counter("streamd_network_lost_frames_total", "Remote frames that never arrived.",
                                    ["stream"], registry=r)
        self.network_reconnects = Counter("streamd_network_reconnects_total", "Remote senders that restarted.",
                                          ["stream"], registry=r)
        self.network_bad = Counter("streamd_network_bad_messages_total",
                                   "Network audio messages refused (malformed, duplicate, out of order).", registry=r)
        self.network_delay = Histogram("streamd_network_delay_seconds", "Sender's clock at sending to receipt.",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.nats_connected = Gauge("streamd_nats_connected", "1 while the events' NATS connection is up "
                                    "(events.nats); 0 while it is down, or off.", registry=r)
        self.nats_dropped = Counter("streamd_nats_dropped_total", "Events not published to NATS: its buffer "
                                    "(events.nats_buffer) overflowed while NATS was away, or the daemon stopped.",
                                    registry=r)
        self.nats_buffered = Gauge("streamd_nats_buffered", "Events waiting for NATS.", registry=r)
        self.gallery_up = Gauge("streamd_gallery_up", "1 while the gallery answers; 0 while a shared "
                                "(PostgreSQL) gallery is away: recognition goes on with the speakers in memory, "
                                "changes are refused.", registry=r)
        self.gallery_writes_queued = Gauge("streamd_gallery_writes_queued", "Unknown-voice cluster writes "
                                           "waiting for a shared gallery (written off the audio path, in order).",
                                           registry=r)
        self.gallery_writes_dropped = Counter("streamd_gallery_writes_dropped_total", "Cluster writes to a "
                                              "shared gallery dropped: the queue was full while the database "
                                              "was away, or the daemon stopped.", registry=r)
        self.build = Gauge("streamd_build_info", "streamd version.", ["version"], registry=r)
        self.model = Gauge("streamd_model_info", "Loaded models and the onnxruntime provider running them.",
                           ["model", "sha256", "provider"], registry=r)
        self.provider_fallbacks = Counter(
            "streamd_provider_fallbacks_total",
            "Models put on the CPU although models.provider asked for CUDA (auto or cuda): at load "
            "(CUDA could not start) or at run (a CUDA session failed and was replaced).",
            ["model", "requested", "stage"], registry=r)
        self.build.labels(version=__version__).set(1)

    def provider_fallback(self, model: str, sha256: str, requested: str, stage: str, old: str, new: str) -> None:
        self.provider_fallbacks.labels(model=model, requested=requested, stage=stage).inc()
        try:  # streamd_model_info names the provider that runs the model now
            self.model.remove(model, sha256, old)
        except KeyError:
            pass
        self.model.labels(model=model, sha256=sha256, provider=new).set(1)

    def add_stream(self, stream: str) -> StreamCounts:
        """Create a stream's series up front so dashboards show zeros, not gaps; returns the
        counts its pipeline adds each frame to."""
        for stage in STAGES:
            self.stage.labels(stream=stream, stage=stage)
        self.latency.labels(stream=stream)
        self.overruns.labels(stream=stream)
        self.source_failures.labels(stream=stream)
        return self.frame_counts.add(stream)

    def add_network_stream(self, stream: str) -> None:
        """A remote stream's network series, at zero until something is lost."""
        for counter in (self.network_frames, self.network_gaps, self.network_lost, self.network_reconnects):
            counter.labels(stream=stream)

    def serve(self, listen: str):
        """Serve /metrics on ``host:port``; returns the HTTP server (``shutdown()`` stops it)."""
        host, _, port = listen.rpartition(":")
        try:
            server, _thread = start_http_server(int(port), addr=host or "127.0.0.1", registry=self.registry)
        except (OSError, ValueError) as exc:
            raise OSError(f"metrics.listen {listen}: cannot listen: {exc}") from None
        return server
