"""The daemon: wires a source, the stream pipeline, events and metrics; handles signals,
sd_notify readiness and watchdog, and SIGHUP reloads."""

from __future__ import annotations

import logging
import queue
import signal
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from streamd import config as config_mod
from streamd.config import Config, ConfigError
from streamd.events import Publisher
from streamd import control
from streamd.commands import DaemonCommands
from streamd.gallery import Gallery
from streamd.inference import load_models
from streamd.metrics import Metrics
from streamd.notify import Watchdog, sd_notify
from streamd.pipeline import StreamPipeline
from streamd.sources import Source, SourceError, open_source
from streamd.speakers import SpeakerBook, book_settings

log = logging.getLogger(__name__)

GALLERY_FILE = "gallery.sqlite3"
_END = object()


@dataclass
class RunOptions:
    source: str
    pace: str
    events_jsonl: str | None = None
    wait_subscriber_s: float = 0.0
    config_path: Path | None = None
    overrides: list[str] = field(default_factory=list)
    stream: str = "default"


def open_gallery(cfg: Config) -> Gallery | None:
    path = cfg.state_dir() / GALLERY_FILE
    try:
        return Gallery(path)
    except (OSError, sqlite3.Error) as exc:
        log.warning("gallery %s unavailable (%s): every speaker will be 'unknown'", path, exc)
        return None


class FrameReader(threading.Thread):
    """Reads a source in its own thread so the main loop can always react to signals."""

    def __init__(self, source: Source):
        super().__init__(name="source", daemon=True)
        self.source = source
        self.frames: queue.Queue = queue.Queue(maxsize=256)
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            for frame in self.source.frames():
                self.frames.put(frame)
        except Exception as exc:  # reported by the main loop
            self.error = exc
        finally:
            self.frames.put(_END)


class Daemon:
    def __init__(self, cfg: Config, opts: RunOptions):
        self.cfg = cfg
        self.opts = opts
        self.metrics = Metrics()
        self._stop = threading.Event()
        self._reload = threading.Event()

    def _signals(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        signal.signal(signal.SIGINT, lambda *_: self._stop.set())
        signal.signal(signal.SIGHUP, lambda *_: self._reload.set())

    def run(self) -> int:
        cfg = self.cfg
        # The source first: a wrong device or file is reported before anything else is loaded.
        source = open_source(self.opts.source, self.opts.stream, cfg.vad.frame_samples,
                             self.opts.pace, cfg.source.mic_rate)
        try:
            return self._run(source)
        finally:
            source.close()

    def _run(self, source: Source) -> int:
        cfg = self.cfg
        models = load_models(cfg)
        for m in (models.speaker, models.digits):
            self.metrics.model.labels(model=m.card.name, sha256=m.card.sha256, provider=m.provider).set(1)
        jsonl = open(self.opts.events_jsonl, "w", encoding="utf-8") if self.opts.events_jsonl else None
        publisher = self.publisher = Publisher(cfg.events.endpoint, cfg.events.hwm, jsonl)
        publisher.on_drop = self.metrics.dropped.inc
        server = self.metrics.serve(cfg.metrics.listen) if cfg.metrics.listen else None
        gallery = open_gallery(cfg)
        self.book = SpeakerBook(gallery, models.speaker, **book_settings(cfg.identity))
        self.control = control.ControlServer(cfg.control.endpoint or control.default_endpoint(),
                                             curve=control.server_curve(cfg))
        self.commands = DaemonCommands(self)
        try:
            self.pipeline = StreamPipeline(self.opts.stream, cfg, models, self.book, publisher, self.metrics)
            if self.opts.wait_subscriber_s > 0 and not publisher.wait_for_subscriber(self.opts.wait_subscriber_s):
                log.warning("no subscriber joined within %.1f s; publishing anyway", self.opts.wait_subscriber_s)
            self._signals()
            sd_notify("READY=1\nSTATUS=listening")
            log.info("ready: source %s, events on %s, metrics on %s, control on %s", self.opts.source,
                     publisher.endpoint, cfg.metrics.listen or "off", self.control.endpoint)
            return self._loop(source, gallery)
        finally:
            sd_notify("STOPPING=1")
            self.control.close()
            publisher.close()
            if server is not None:
                server.shutdown()
            self.book.close()
            if gallery is not None:
                gallery.close()

    def _loop(self, source: Source, gallery: Gallery | None) -> int:
        reader = FrameReader(source)
        reader.start()
        watchdog = Watchdog()
        overruns = 0
        try:
            while not self._stop.is_set():
                if self._reload.is_set():
                    self._reload.clear()
                    self._apply_reload(gallery)
                self._serve_control()
                try:
                    frame = reader.frames.get(timeout=0.05)
                except queue.Empty:
                    continue
                if frame is _END:
                    break
                self.pipeline.push(frame)
                watchdog.processed()
                if source.overruns != overruns:
                    self.metrics.overruns.labels(stream=source.stream).inc(source.overruns - overruns)
                    overruns = source.overruns
        finally:
            source.close()
        self.pipeline.flush()
        if reader.error is not None and not self._stop.is_set():
            raise reader.error if isinstance(reader.error, SourceError) else SourceError(
                f"source {self.opts.source}: {reader.error}")
        return 0

    def _serve_control(self) -> None:
        """Control requests are served between frames, on the audio thread: no locks needed."""
        self.control.poll(self.commands)
        collector = self.pipeline.collector
        if collector is not None:
            done = collector.collected >= collector.seconds
            if done or time.monotonic() > collector.deadline:
                self.pipeline.collector = None
                self.commands.finish(self.control, collector, timed_out=not done)

    def _apply_reload(self, gallery: Gallery | None) -> None:
        """SIGHUP: re-read the config and the gallery; a bad config keeps the old one."""
        try:
            path = self.opts.config_path
            new = config_mod.load(path, self.opts.overrides)
        except ConfigError as exc:
            log.error("reload refused, keeping the running config: %s", exc)
            return
        for section in ("vad", "features", "mel", "models", "events", "metrics", "state", "source", "control"):
            if getattr(new, section) != getattr(self.cfg, section):
                log.warning("reload: [%s] changed; restart streamd to apply it", section)
        self.pipeline.min_digit_confidence = new.digits.min_confidence
        self.pipeline.partial_every_s = new.identity.partial_every_s
        for key, value in book_settings(new.identity).items():
            setattr(self.book, key, value)
        self.cfg = new
        if gallery is not None:
            gallery.invalidate()
        if self.book.clusters is not None:
            self.book.clusters.reload()
        log.info("reloaded config and gallery")


def setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), format="streamd: %(levelname)s: %(message)s")
