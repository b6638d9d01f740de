"""The daemon: wires a source, the stream pipeline, events and metrics; handles signals,
sd_notify readiness and watchdog, and SIGHUP reloads."""

from __future__ import annotations

import collections
import contextlib
import logging
import queue
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from streamd import config as config_mod
from streamd.config import Config, ConfigError
from streamd.service.events import GalleryEvent, Publisher, StatusEvent
from streamd.service import control
from streamd.service.commands import DaemonCommands
from streamd.identity.gallery import Gallery, StorageError
from streamd.identity.gallery_writer import GalleryWriter, Write
from streamd.identity.store import describe, open_gallery as open_store
from streamd.models.inference import load_models
from streamd.identity.vocabulary import open_word_book
from streamd.service.metrics import Metrics
from streamd.service.notify import Watchdog, sd_notify
from streamd.service.engine import Engine
from streamd.audio.frames import Frame
from streamd.audio.netaudio import NetworkReceiver, StreamIdle
from streamd.audio.readers import SourceReader, StreamSpec, StreamStatus
from streamd.audio.sources import SourceError, open_source
from streamd.identity.speakers import SpeakerBook, book_settings

log = logging.getLogger(__name__)

GALLERY_FILE = "gallery.sqlite3"
AUDIT_EVERY_S = 0.5  # how often the audit trail is read for changes made by other processes
RESULTS_READY = "results ready"  # put in the frame queue by the models' thread: wakes the loop


@dataclass
class RunOptions:
    source: str | None = None  # None: the config's [[streams]] or [source]
    pace: str | None = None
    events_jsonl: str | None = None
    wait_subscriber_s: float = 0.0
    config_path: Path | None = None
    overrides: list[str] = field(default_factory=list)
    stream: str = "default"


def open_gallery(cfg: Config) -> Gallery | None:
    """The SQLite file in the state directory, or the shared database state.gallery names (one
    that does not answer yet is waited for: every speaker is 'unknown' until it does)."""
    try:
        return open_store(cfg.state.gallery, cfg.state_dir(), daemon=True)
    except (OSError, StorageError) as exc:
        log.warning("gallery %s unavailable (%s): every speaker will be 'unknown'",
                    describe(cfg.state.gallery, cfg.state_dir()), exc)
        return None


def stream_specs(cfg: Config, opts: RunOptions) -> list[StreamSpec]:
    """The local sources to read: --source (one stream), else [[streams]], else [source].
    "none": no local source (a daemon that only receives network audio)."""
    def spec(stream: str, source: str, pace: str = "") -> StreamSpec:
        return StreamSpec(stream, source, pace or opts.pace or cfg.source.pace, cfg.vad.frame_samples,
                          cfg.source.mic_rate)

    if opts.source:  # the command line's: a file: path is the current folder's
        return [] if opts.source == "none" else [spec(opts.stream, opts.source)]
    if not cfg.streams:
        source = cfg.source.spec
        return [] if source == "none" else [spec(opts.stream, config_source(cfg, source))]
    return [spec(s.id, config_source(cfg, s.source), s.pace) for s in cfg.streams if s.source != "net"]


def config_source(cfg: Config, source: str) -> str:
    """A source of the config file: a relative ``file:`` path is the config file's folder's,
    as every path in it is."""
    if source.startswith("file:"):
        return "file:" + str(cfg.path(source[len("file:"):]))
    return source


class Daemon:
    def __init__(self, cfg: Config, opts: RunOptions):
        self.cfg = cfg
        self.opts = opts
        self.metrics = Metrics()
        self._stop = threading.Event()
        self._reload = threading.Event()
        self.frames: queue.Queue = queue.Queue(maxsize=1024)
        self.readers: list[SourceReader] = []
        self._refused: set[str] = set()  # network streams over network.max_streams

    def _signals(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        signal.signal(signal.SIGINT, lambda *_: self._stop.set())
        signal.signal(signal.SIGHUP, lambda *_: self._reload.set())

    def run(self) -> int:
        self._signals()  # first: a SIGHUP or SIGTERM during start-up must not kill the process
        # A control socket another daemon serves is refused before anything is loaded.
        control.check_free(self.cfg.control.endpoint or control.default_endpoint())
        specs = stream_specs(self.cfg, self.opts)
        # Sources first: a wrong device or file is reported before anything else is loaded.
        # With one stream that is fatal; with several, the others go on without it.
        failed: list[StreamStatus] = []
        for spec in specs:
            try:
                source = open_source(spec.source, spec.stream, spec.frame_samples, spec.pace, spec.mic_rate)
            except SourceError as exc:
                if len(specs) == 1 and not self.cfg.network.listen:
                    raise
                log.error("stream %s: %s", spec.stream, exc)
                failed.append(StreamStatus(spec.stream, "down" if spec.live else "ended", str(exc)))
                source = None
                if not spec.live:
                    continue
            self.readers.append(SourceReader(spec, self.frames, source, self._stop))
        if not self.readers and not self.cfg.network.listen:
            raise SourceError(failed[0].reason if failed else
                              "no audio to listen to: no local source (--source none, source.spec = \"none\" or "
                              "only \"net\" [[streams]]) and no [network] listen; give a source (--source "
                              "mic[:DEVICE] | file:PATH | stdin) or set network.listen to receive `streamd send`")
        try:
            return self._run(specs, failed)
        finally:
            for reader in self.readers:
                reader.stop()

    @staticmethod
    def _open_jsonl(path: str):
        try:
            return open(path, "w", encoding="utf-8")
        except OSError as exc:
            raise OSError(f"events jsonl {path}: cannot write: {exc.strerror}") from None

    def _run(self, specs: list[StreamSpec], failed: list[StreamStatus]) -> int:
        cfg = self.cfg
        jsonl = self._open_jsonl(self.opts.events_jsonl) if self.opts.events_jsonl else None  # before the slow part
        models = load_models(cfg, on_fallback=self.metrics.provider_fallback)
        for m in models.all():
            self.metrics.model.labels(model=m.card.name, sha256=m.card.sha256, provider=m.provider).set(1)
        publisher = self.publisher = Publisher(cfg.events.endpoint, cfg.events.hwm, jsonl)
        publisher.on_drop = self.metrics.dropped.inc
        nats_out = self._open_nats(publisher)
        server = self.metrics.serve(cfg.metrics.listen) if cfg.metrics.listen else None
        gallery = open_gallery(cfg)
        self.state_dir = cfg.state_dir()  # named in control replies: a client can tell whose gallery answers
        self.writer = self._gallery_writer(gallery)
        away = gallery is not None and gallery.down is not None  # what follows reads it again when it returns
        self.book = SpeakerBook(gallery, models.speaker, writes=self.writer, **book_settings(cfg.identity))
        self._audit_seen = self._last_audit(gallery)  # published up to here
        self._gallery_down: str | None = None  # as last reported
        self.metrics.gallery_up.set(0 if gallery is None else 1)
        if gallery is not None and gallery.shared:
            gallery.on_change = self._gallery_changed
        self._audit_checked = 0.0
        self.words = open_word_book(gallery, cfg)
        if self.writer is not None:
            catch_up = Write("catch up with the gallery", self._catch_up)
            gallery.on_up.append(lambda: self.writer.submit(catch_up))
            if away and gallery.down is None:  # it came back before that
                self.writer.submit(catch_up)
        self.control = control.ControlServer(cfg.control.endpoint or control.default_endpoint(),
                                             curve=control.server_curve(cfg))
        self.commands = DaemonCommands(self)
        self.engine = Engine(cfg, models, self.book, publisher, self.metrics, cfg.network.max_streams, self.words)
        self.engine.on_results(self._wake)
        self.receiver = None
        if cfg.network.listen:
            self.receiver = NetworkReceiver(cfg.network.listen, self.frames, cfg.vad.frame_samples, self.metrics,
                                            cfg.network.gap_fill_ms / 1000, control.server_curve(cfg),
                                            idle_s=cfg.network.idle_ms / 1000,
                                            close_s=(cfg.vad.hangover_ms + cfg.vad.frame_ms) / 1000)
        try:
            for spec in specs:  # a file read at pace fast waits for the models: it has no latency budget
                self.engine.add_stream(spec.stream, realtime=spec.pace != "fast" or spec.source.startswith("mic"))
            for st in cfg.streams:
                self.engine.add_stream(st.id, realtime=True)  # the network's
            if self.opts.wait_subscriber_s > 0 and not publisher.wait_for_subscriber(self.opts.wait_subscriber_s):
                log.warning("no subscriber joined within %.1f s; publishing anyway", self.opts.wait_subscriber_s)
            for status in failed:
                self.engine.status(status)
            sd_notify("READY=1\nSTATUS=listening")
            log.info("ready: %d streams (%s), events on %s, metrics on %s, control on %s", len(self.engine.pipelines),
                     ", ".join(f"{s.stream}={s.source}" for s in specs), publisher.endpoint,
                     cfg.metrics.listen or "off", self.control.endpoint)
            return self._loop(gallery, single=len(specs) == 1 and not cfg.network.listen)
        finally:
            sd_notify("STOPPING=1")
            self.engine.close()
            self.control.close()
            if nats_out is not None:
                nats_out.close()
            publisher.close()
            if server is not None:
                server.shutdown()
            if self.writer is not None:
                self.writer.close()
            self.book.close()
            if gallery is not None:
                gallery.close()

    def _open_nats(self, publisher: Publisher):
        """events.nats: every event also to NATS, from a thread of its own (nats-py imported only then)."""
        events = self.cfg.events
        if not events.nats:
            return None
        from streamd.service.nats_out import NatsOut, NatsSettings

        node = self.cfg.node.id or socket.gethostname()
        out = NatsOut(NatsSettings.of(events.nats, events.nats_jetstream, events.nats_buffer, node),
                      on_drop=self.metrics.nats_dropped.inc, on_state=self._nats_state)
        self.metrics.nats_buffered.set_function(out.buffered)
        publisher.forward = out.put
        out.start()
        return out

    def _nats_state(self, up: bool, why: str) -> None:
        """NATS came or went (called on its thread; the publisher takes a lock)."""
        self.metrics.nats_connected.set(1 if up else 0)
        self.publisher.publish(StatusEvent("daemon", "up" if up else "down", f"events.nats: {why}"))

    def _gallery_writer(self, gallery: Gallery | None) -> GalleryWriter | None:
        """A shared gallery's cluster writes, re-reads and catching up: on a thread of their own."""
        if gallery is None or not gallery.shared:
            return None
        writer = GalleryWriter(lambda: gallery.down is not None, on_drop=self.metrics.gallery_writes_dropped.inc)
        self.metrics.gallery_writes_queued.set_function(writer.queued)
        return writer

    def _catch_up(self) -> None:
        """The shared gallery answers again (or for the first time): on the writer's thread."""
        self.book.catch_up()
        if self.words is not None:
            self.words.catch_up()

    @property
    def pipelines(self):
        return self.engine.pipelines

    def _loop(self, gallery: Gallery | None, single: bool) -> int:
        up = {r.spec.stream for r in self.readers if r.source is not None}
        for stream in up:
            self.metrics.stream_up.labels(stream=stream).set(1)
        running = {r.spec.stream for r in self.readers}
        ended_with: str | None = None
        watchdog = Watchdog()
        for reader in self.readers:
            reader.start()
        if self.receiver is not None:
            self.receiver.start()
        while not self._stop.is_set() and (running or self.cfg.network.listen):
            if self._reload.is_set():
                self._reload.clear()
                self._apply_reload(gallery)
            self._serve_control()
            if self.engine.backlogged():
                if self.engine.pump(force=True, wait_s=0.05):
                    watchdog.processed()
                continue
            try:
                item = self.frames.get(timeout=min(0.05, self.engine.wait_left()))
            except queue.Empty:
                self.engine.pump()
                if not up:
                    watchdog.processed()  # every source is down and being retried: alive, not stuck
                continue
            frames: list[Frame] = []  # handed to the engine together (Engine.push_many)
            for _ in range(1024):  # everything that is waiting, then the models once
                if isinstance(item, Frame):
                    if item.stream in self.engine.pipelines or self._admit(item.stream):
                        frames.append(item)
                else:
                    self.engine.push_many(frames)  # the frames before it came first
                    frames = []
                if isinstance(item, StreamStatus):
                    ended_with = self._status(item, up, running) or ended_with
                elif isinstance(item, StreamIdle) and item.stream in self.engine.pipelines:
                    self.engine.pipelines[item.stream].flush()  # its sender stopped: no more audio
                try:
                    item = self.frames.get_nowait()
                except queue.Empty:
                    break
            self.engine.push_many(frames)
            self.engine.pump()
            watchdog.processed()
            self._count_overruns()
        interrupted = self._stop.is_set()
        for reader in self.readers:
            reader.stop()
        for reader in self.readers:
            reader.join(0.5)  # a reader blocked on a pipe is a daemon thread: left behind
        if self.receiver is not None:
            self.receiver.stop()
            self.receiver.join(2)
        self.engine.flush()
        if single and ended_with and not interrupted:
            raise SourceError(ended_with)
        return 0

    def _admit(self, stream: str) -> bool:
        """A network stream not in [[streams]]: taken when network.accept_any allows."""
        if stream in self._refused:
            return False
        if not self.cfg.network.accept_any:
            # Once per stream: a sender cannot be told (its socket only sends), the log says it.
            log.warning("stream %s: audio from the network refused: it is not in [[streams]] and "
                        "network.accept_any is false", stream)
            self._refused.add(stream)
            return False
        try:
            self.engine.add_stream(stream, realtime=True)
        except ValueError as exc:
            log.warning("%s; its audio is dropped", exc)
            self._refused.add(stream)
            return False
        log.info("stream %s: new network stream", stream)
        return True

    def _wake(self) -> None:
        """The models finished a batch (called on their thread): wake the loop to publish it."""
        with contextlib.suppress(queue.Full):
            self.frames.put_nowait(RESULTS_READY)

    def _status(self, status: StreamStatus, up: set[str], running: set[str]) -> str | None:
        """Returns the reason when a stream ended because its source failed."""
        if status.stream not in self.engine.pipelines and not self._admit(status.stream):
            return None
        (up.add if status.state == "up" else up.discard)(status.stream)
        if status.state == "ended":
            running.discard(status.stream)
        self.engine.status(status)
        failed = status.state == "ended" and status.reason != "end of audio"
        return status.reason if failed else None

    def _count_overruns(self) -> None:
        for reader in self.readers:
            new = reader.overruns - reader.overruns_counted
            if new > 0:
                self.metrics.overruns.labels(stream=reader.spec.stream).inc(new)
                reader.overruns_counted = reader.overruns

    def _serve_control(self) -> None:
        """Control requests are served between frames, on the audio thread: no locks needed."""
        served = self.control.poll(self.commands)
        now = time.monotonic()
        if served or now - self._audit_checked >= AUDIT_EVERY_S:
            self._audit_checked = now
            self._gallery_health()
            self._publish_audit()
        for pipeline in self.engine.pipelines.values():
            pipeline.expire(now)
            collector = pipeline.collector
            if collector is not None:
                done = collector.collected >= collector.seconds
                if done or time.monotonic() > collector.deadline:
                    pipeline.collector = None
                    self.commands.finish(self.control, collector, timed_out=not done)
            words = pipeline.word_collector
            if words is not None:
                done = len(words.audios) >= words.count
                if done or time.monotonic() > words.deadline:
                    pipeline.word_collector = None
                    self.commands.finish_words(self.control, words, timed_out=not done)

    def _publish_audit(self) -> None:
        """A ``gallery`` event for each new entry of the audit trail: the changes made through
        this daemon, and those made on the database by ``streamd enroll`` or ``speakers``."""
        gallery = self.book.gallery
        if gallery is None:
            return
        if self._audit_seen is None:  # a shared gallery away at start-up: from when it answers
            self._audit_seen = self._last_audit(gallery)
            return
        try:
            entries = gallery.audit(self._audit_seen, limit=100)
        except StorageError as exc:
            if not gallery.down:  # an outage is reported once, by _gallery_health
                log.warning("could not read the gallery's audit trail: %s", exc)
            return
        for entry in entries:
            self.publisher.publish(GalleryEvent(entry))
            self._audit_seen = entry["audit"]

    def _gallery_changed(self) -> None:
        """Another node changed the shared gallery (called on its watcher's thread): the loop
        wakes and publishes the change's gallery event now, not at its next half-second look."""
        self._audit_checked = 0.0
        self._wake()

    @staticmethod
    def _last_audit(gallery: Gallery | None) -> int | None:
        try:
            return gallery.last_audit() if gallery is not None else 0
        except StorageError:
            return None

    def _gallery_health(self) -> None:
        """A shared gallery that went away or came back: a status event and the metric (the
        gallery's watcher logs it)."""
        gallery = self.book.gallery
        down = gallery.down if gallery is not None else None
        if down == self._gallery_down or (down and self._gallery_down):
            return
        self._gallery_down = down
        self.metrics.gallery_up.set(0 if down else 1)
        reason = f"gallery unavailable: {down}" if down else "gallery: back, re-read"
        self.publisher.publish(StatusEvent("daemon", "down" if down else "up", reason))

    def _apply_reload(self, gallery: Gallery | None) -> None:
        """SIGHUP: re-read the config and the gallery; a bad config keeps the old one. Each key
        is applied or named as needing a restart, as ``config.ON_RELOAD`` says."""
        try:
            path = self.opts.config_path
            new = config_mod.load(path, self.opts.overrides)
        except ConfigError as exc:
            log.error("reload refused, keeping the running config: %s", exc)
            return
        running, restart = config_mod.reload_plan(self.cfg, new)
        if restart:
            log.warning("reload: %s changed; restart streamd to apply %s", ", ".join(restart),
                        "it" if len(restart) == 1 else "them")
        set_log_level(running.log.level)
        for pipeline in self.engine.pipelines.values():
            pipeline.min_digit_confidence = self.engine.models.digits.min_confidence(running.digits.min_confidence)
            pipeline.partial_every_s = running.identity.partial_every_s
            if pipeline.recent.maxlen != running.identity.recent_utterances:  # keeps the newest
                pipeline.recent = collections.deque(pipeline.recent, maxlen=running.identity.recent_utterances)
            pipeline.keep_audio = running.identity.keep_recent_audio  # off: the kept audio is dropped now
        for key, value in book_settings(running.identity).items():
            setattr(self.book, key, value)
        self.cfg = self.engine.cfg = running  # and the streams that join later
        if gallery is not None:
            gallery.invalidate()
        self.book.reload_clusters()
        log.info("reloaded config and gallery%s", f" ({len(restart)} changed keys wait for a restart)" if restart else "")


def set_log_level(level: str) -> None:
    logging.getLogger().setLevel(getattr(logging, level.upper()))


def setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), format="streamd: %(levelname)s: %(message)s")
