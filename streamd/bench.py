"""``streamd bench``: the whole pipeline in one process on speech recordings, measured.

Latency percentiles come from the events themselves (``latency_s``); stage percentiles
from the same Prometheus histograms the daemon exports.
"""

from __future__ import annotations

import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from streamd.config import Config
from streamd.enroll import file_utterances
from streamd.events import Publisher
from streamd.frames import SAMPLE_RATE, Frame
from streamd.gallery import Gallery
from streamd.speakers import SpeakerBook, book_settings
from streamd.inference import load_models
from streamd.metrics import STAGES, Metrics
from streamd.pipeline import StreamPipeline
from streamd.sources import read_audio, split_frames

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"


class RecordingPublisher(Publisher):
    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.latencies: list[float] = []

    def publish(self, event):
        body = super().publish(event)
        if "latency_s" in body:
            self.latencies.append(body["latency_s"])
        return body


def histogram_quantile(metrics: Metrics, stage: str, q: float) -> float:
    """Like PromQL's histogram_quantile over one stage's buckets (linear within a bucket)."""
    samples = [s for m in metrics.stage.collect() for s in m.samples
               if s.name.endswith("_bucket") and s.labels["stage"] == stage]
    buckets = sorted((float(s.labels["le"]), s.value) for s in samples)
    total = buckets[-1][1]
    if total == 0:
        return 0.0
    rank, prev_le, prev_n = q * total, 0.0, 0.0
    for le, n in buckets:
        if n >= rank:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * (rank - prev_n) / max(n - prev_n, 1e-12)
        prev_le, prev_n = le, n
    return prev_le


def speech_audio(seconds: float) -> np.ndarray:
    """The bundled demo recording (words with pauses), repeated to ``seconds``."""
    demo = read_audio(str(DATA / "demo.flac"))
    reps = int(np.ceil(seconds * SAMPLE_RATE / len(demo)))
    return np.tile(demo, reps)[: int(seconds * SAMPLE_RATE)]


def run(cfg: Config, seconds: float = 60.0, pace: str = "fast") -> dict:
    models = load_models(cfg)
    metrics = Metrics()
    with tempfile.TemporaryDirectory() as tmp:
        gallery = Gallery(Path(tmp) / "gallery.sqlite3")
        book = SpeakerBook(gallery, models.speaker, **book_settings(cfg.identity))
        for name in ("theo", "asc02", "asc07"):
            book.enroll(name, file_utterances(str(DATA / f"enroll_{name}.flac"), cfg, models.speaker), "bench")
        publisher = RecordingPublisher("tcp://127.0.0.1:*", cfg.events.hwm)
        pipeline = StreamPipeline("bench", cfg, models, book, publisher, metrics)
        audio = speech_audio(seconds)
        frame_s = cfg.vad.frame_ms / 1000
        late = 0
        cpu0, wall0 = time.process_time(), time.monotonic()
        for i, block in enumerate(split_frames(audio, cfg.vad.frame_samples)):
            due = wall0 + (i + 1) * frame_s  # when a microphone would have delivered this frame
            if pace == "realtime":
                time.sleep(max(0.0, due - time.monotonic()))
            pipeline.push(Frame("bench", i, block, i * frame_s, due if pace == "realtime" else time.monotonic()))
            if pace == "realtime" and time.monotonic() - due > frame_s:
                late += 1  # finished more than a frame after its capture: buffered, not lost
        pipeline.flush()
        cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
        publisher.close(0)
        gallery.close()
    lat = np.array(publisher.latencies)
    return {
        "streams": 1,
        "pace": pace,
        "audio_s": round(len(audio) / SAMPLE_RATE, 3),
        "overruns": 0,  # in one process nothing is dropped; see late_frames
        "late_frames": late,
        "dropped_events": publisher.dropped,
        "events": publisher.seq,
        "latency_s_p50": float(np.percentile(lat, 50)) if len(lat) else None,
        "latency_s_p99": float(np.percentile(lat, 99)) if len(lat) else None,
        "stage_s_p99": {s: histogram_quantile(metrics, s, 0.99) for s in STAGES},
        "cpu_per_audio_s": cpu / (len(audio) / SAMPLE_RATE),
        "realtime_factor": (len(audio) / SAMPLE_RATE) / wall,
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "provider": models.speaker.provider,
    }
