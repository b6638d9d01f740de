"""Control commands (docs/control.md): what each JSON request does to the running daemon.

``gallery_command`` serves the commands that only need the database, so the CLI can run
them with no daemon; ``DaemonCommands`` adds the ones that need live audio and state.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import soundfile as sf

from streamd.audio.frames import SAMPLE_RATE
from streamd.service.challenge import MAX_LENGTH, MAX_TTL_S, new_challenge
from streamd.service.control import ControlError, ControlServer, Pending
from streamd.identity.gallery import Gallery, GalleryError, StorageError, to_blob
from streamd.identity.scoring import Utterance
from streamd.identity.vocabulary import WordBook, check_digit, check_vocabulary

MAX_NEXT_SECONDS = 120.0
MAX_NEXT_TIMEOUT_S = 3600.0
MAX_NEXT_WORDS = 20
GALLERY_COMMANDS = ("list", "remove", "rename", "export", "audit")  # served on the database alone too


def _field(request: dict, name: str, kind: type, default: Any = ...) -> Any:
    value = request.get(name, default)
    if value is ...:
        raise ControlError(f"{request['cmd']}: missing field {name!r}")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ControlError(f"{request['cmd']}: field {name!r} must be {kind.__name__}")
    return value


def _within(request: dict, name: str, value: float, low: float, high: float, low_open: bool = False) -> float:
    """``value`` when it lies in [low, high] ((low, high] with ``low_open``); NaN never does."""
    if not ((low < value if low_open else low <= value) and value <= high):
        raise ControlError(f"{request['cmd']}: {name!r} must be in {'(' if low_open else '['}{low:g}, {high:g}]")
    return value


def wav_bytes(audio: np.ndarray) -> bytes:
    """int16 samples as a 16 kHz mono 16-bit WAV file."""
    out = io.BytesIO()
    sf.write(out, audio, SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return out.getvalue()


def same_dir(a: str, b: str) -> bool:
    """Whether two paths name one folder (links and relative paths resolved)."""
    return os.path.realpath(a) == os.path.realpath(b)


def gallery_command(gallery: Gallery, request: dict, book=None, who: str = "local") -> dict:
    """``book`` (the SpeakerBook over this gallery): a removal drops the voice's clusters too,
    and an export lists them. ``who``: the client, for the audit trail."""
    cmd = request.get("cmd")
    try:
        if cmd == "export":
            name = _field(request, "name", str)
            return {"ok": True, "speaker": book.export(name) if book is not None else gallery.export(name)}
        if cmd == "audit":
            after = _field(request, "after", int, 0)
            if not 0 <= after < 2**62:
                raise ControlError("audit: 'after' must be an audit number (0 or more)")
            return {"ok": True, "audit": gallery.audit(after)}
        if cmd == "list":
            return {"ok": True, "speakers": [
                {"name": s.name, "utterances": s.enrollments, "seconds": round(s.seconds, 2),
                 "created": s.created, "updated": s.updated} for s in gallery.speakers()]}
        if cmd == "remove":
            name = _field(request, "name", str)
            if book is not None:
                return {"ok": True, **book.remove(name, who)}
            if not gallery.remove(name, who):
                raise ControlError(f"no enrolled speaker named {name!r}")
            return {"ok": True, "removed": name, "clusters": [], "erased": gallery.erase()}
        if cmd == "rename":
            old, new = _field(request, "name", str), _field(request, "new_name", str)
            gallery.rename(old, new, who)
            return {"ok": True, "renamed": old, "to": new.strip()}
    except GalleryError as exc:
        raise ControlError(str(exc)) from None
    raise ControlError(f"unknown command {cmd!r}")


def cluster_command(book, request: dict, who: str = "local") -> dict:
    """``clusters`` (list the recurring unknown voices) and ``promote`` (enroll one by name)."""
    if book is None or book.clusters is None:
        raise ControlError(book.unavailable() if book is not None else
                           "the gallery is not available (state directory unusable)")
    if request["cmd"] == "clusters":
        return {"ok": True, "clusters": book.clusters.listing()}
    label, name = _field(request, "cluster", str), _field(request, "name", str)
    try:
        return {"ok": True, **book.promote(label, name, who)}
    except GalleryError as exc:
        raise ControlError(str(exc)) from None


def word_command(words: WordBook | None, request: dict) -> dict:
    """``words`` (the taught vocabularies, templates per digit) and ``remove_words``."""
    if words is None:
        raise ControlError("vocabularies are not available (no word model, or the state directory is unusable)")
    try:
        if request["cmd"] == "words":
            return {"ok": True, "vocabularies": words.listing()}
        vocabulary = _field(request, "vocabulary", str)
        digit = request.get("digit")
        removed = words.remove(vocabulary, None if digit is None else check_digit(digit))
    except GalleryError as exc:
        raise ControlError(str(exc)) from None
    if not removed:
        raise ControlError(f"no templates of vocabulary {vocabulary!r}" + ("" if digit is None else f" digit {digit}"))
    return {"ok": True, "vocabulary": vocabulary, "removed": removed}


@dataclass
class WordCollector:
    """``enroll_word``: the next ``count`` utterances on a stream become templates."""

    vocabulary: str
    digit: int
    count: int
    deadline: float
    pending: Pending
    audios: list[np.ndarray] = field(default_factory=list)


@dataclass
class Collector:
    """``enroll_next``: gathers the next N seconds of speech on a stream, then enrolls."""

    name: str
    seconds: float
    deadline: float
    pending: Pending
    utterances: list[Utterance] = field(default_factory=list)
    vectors: list[np.ndarray] = field(default_factory=list)

    @property
    def collected(self) -> float:
        return sum(u.seconds for u in self.utterances)


class DaemonCommands:
    """The request handler the daemon gives its ControlServer."""

    def __init__(self, daemon):
        self.daemon = daemon
        self.started = time.time()

    def __call__(self, request: dict, pending: Pending) -> dict | None:
        """Every reply names the state directory this daemon serves (``state_dir``); a request
        that names another one (the CLI's config) is refused before it runs."""
        served = str(self.daemon.state_dir)
        wanted = request.get("state_dir")
        if wanted is not None and (not isinstance(wanted, str) or not same_dir(wanted, served)):
            return {"ok": False, "state_dir": served,
                    "error": f"this daemon serves the state directory {served}, not {wanted!r}"}
        reply = self._call(request, pending)
        if reply is not None:
            reply.setdefault("state_dir", served)
        return reply

    def _call(self, request: dict, pending: Pending) -> dict | None:
        cmd = request["cmd"]
        book = self.daemon.book
        if cmd in GALLERY_COMMANDS:
            if book is None or book.gallery is None:
                raise ControlError("the gallery is not available (state directory unusable)")
            enrolled = set()
            if cmd == "remove" and isinstance(request.get("name"), str):
                with contextlib.suppress(StorageError):  # the removal itself reports the error
                    enrolled = set(book.gallery.feature_blobs(request["name"]))
            reply = gallery_command(book.gallery, request, book, pending.client)
            if cmd == "remove":
                self._forget_recent(reply["removed"], set(reply["clusters"]), enrolled)
            return reply
        if cmd in ("clusters", "promote"):
            return cluster_command(book, request, pending.client)
        if cmd in ("words", "remove_words"):
            return word_command(self.daemon.words, request)
        handler = getattr(self, f"cmd_{cmd}", None)
        if handler is None:
            raise ControlError(f"unknown command {cmd!r}")
        return handler(request, pending)

    def _forget_recent(self, name: str, clusters: set[str], enrolled: set[bytes]) -> None:
        """The utterances kept for enroll_recent that were given to a removed speaker or to the
        clusters of their voice, or were enrolled as theirs, are dropped from memory too."""
        for pipeline in self.daemon.pipelines.values():
            kept = [r for r in pipeline.recent if r.speaker != name and r.speaker not in clusters
                    and to_blob(r.utt.features) not in enrolled]
            if len(kept) != len(pipeline.recent):
                pipeline.recent.clear()
                pipeline.recent.extend(kept)

    def _stream(self, request: dict):
        pipelines = self.daemon.pipelines
        if "stream" not in request and len(pipelines) != 1:
            raise ControlError(f"{request['cmd']}: missing field 'stream' (streams: {', '.join(sorted(pipelines))})")
        stream = _field(request, "stream", str, next(iter(pipelines), ""))
        if stream not in pipelines:
            raise ControlError(f"no stream named {stream!r}")
        return pipelines[stream]

    def _enroll(self, name: str, utts: list[Utterance], vectors: list[np.ndarray], source: str,
                who: str) -> dict:
        try:
            result = self.daemon.book.enroll(name, utts, source, np.stack(vectors) if vectors else None, who)
        except GalleryError as exc:
            raise ControlError(str(exc)) from None
        return {"ok": True, **result}

    def cmd_enroll_recent(self, request: dict, pending: Pending) -> dict:
        name = _field(request, "name", str)
        ids = _field(request, "utterances", list)
        if not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ControlError("enroll_recent: 'utterances' must be a non-empty list of utterance numbers")
        recent = {r.utterance: r for r in self._stream(request).recent}
        missing = [i for i in ids if i not in recent]
        if missing:
            raise ControlError(f"enroll_recent: utterances not heard recently: {missing[:10]}")
        picked = [recent[i] for i in dict.fromkeys(ids)]
        return self._enroll(name, [r.utt for r in picked], [r.embedding for r in picked], f"recent:{ids[:50]}",
                            pending.client)

    def cmd_enroll_next(self, request: dict, pending: Pending) -> None:
        name = _field(request, "name", str)
        seconds = _within(request, "seconds", _field(request, "seconds", float, 5.0), 0, MAX_NEXT_SECONDS, True)
        # NaN or inf would never time out
        timeout = _within(request, "timeout_s", _field(request, "timeout_s", float, max(30.0, 4 * seconds)),
                          0, MAX_NEXT_TIMEOUT_S, True)
        pipeline = self._stream(request)
        if pipeline.collector is not None:
            raise ControlError(f"enroll_next: already collecting speech for {pipeline.collector.name!r}")
        from streamd.identity.gallery import validate_name

        try:
            name = validate_name(name)
        except GalleryError as exc:
            raise ControlError(str(exc)) from None
        pipeline.collector = Collector(name, seconds, time.monotonic() + timeout, pending)
        return None  # answered when enough speech has been heard: Daemon._serve_control calls finish()

    def finish(self, server: ControlServer, collector: Collector, timed_out: bool) -> None:
        error = (f"enroll_next: heard only {collector.collected:.1f} s of {collector.seconds:.1f} s before the timeout"
                 if timed_out else None)
        self._answer(server, collector.pending, error,
                     lambda: self._enroll(collector.name, collector.utterances, collector.vectors, "live",
                                          collector.pending.client))

    @staticmethod
    def _answer(server: ControlServer, pending: Pending, error: str | None, enroll) -> None:
        """Reply to a waiting enroll_next or enroll_word: the timeout's error, or what enrolling gave."""
        try:
            reply = {"ok": False, "error": error} if error else enroll()
        except ControlError as exc:
            reply = {"ok": False, "error": str(exc)}
        server.reply(pending, reply)

    def _word_target(self, request: dict) -> tuple[str, int]:
        if self.daemon.words is None:
            raise ControlError(f"{request['cmd']}: vocabularies are not available (no word model, or the state "
                               "directory is unusable)")
        try:
            return check_vocabulary(_field(request, "vocabulary", str)), check_digit(request.get("digit"))
        except GalleryError as exc:
            raise ControlError(f"{request['cmd']}: {exc}") from None

    def _enroll_words(self, vocabulary: str, digit: int, audios: list[np.ndarray], source: str) -> dict:
        try:
            return {"ok": True, **self.daemon.words.enroll(vocabulary, digit, audios, source)}
        except GalleryError as exc:
            raise ControlError(str(exc)) from None

    def cmd_enroll_word_recent(self, request: dict, pending: Pending) -> dict:
        vocabulary, digit = self._word_target(request)
        ids = _field(request, "utterances", list)
        if not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ControlError("enroll_word_recent: 'utterances' must be a non-empty list of utterance numbers")
        recent = {r.utterance: r for r in self._stream(request).recent if r.audio is not None}
        missing = [i for i in ids if i not in recent]
        if missing:
            raise ControlError(f"enroll_word_recent: utterances not heard recently: {missing[:10]}")
        audios = [recent[i].audio for i in dict.fromkeys(ids)]
        return self._enroll_words(vocabulary, digit, audios, f"recent:{ids[:50]}")

    def cmd_enroll_word(self, request: dict, pending: Pending) -> None:
        vocabulary, digit = self._word_target(request)
        count = _within(request, "count", _field(request, "count", int, 1), 1, MAX_NEXT_WORDS)
        timeout = _within(request, "timeout_s", _field(request, "timeout_s", float, 30.0), 0, MAX_NEXT_TIMEOUT_S, True)
        pipeline = self._stream(request)
        if pipeline.word_collector is not None:
            c = pipeline.word_collector
            raise ControlError(f"enroll_word: already waiting for {c.vocabulary} {c.digit} on this stream")
        pipeline.word_collector = WordCollector(vocabulary, digit, count, time.monotonic() + timeout, pending)
        return None  # answered when the words have been heard (Daemon._serve_control)

    def finish_words(self, server: ControlServer, collector: WordCollector, timed_out: bool) -> None:
        error = (f"enroll_word: heard {len(collector.audios)} of {collector.count} utterances before the timeout"
                 if timed_out else None)
        self._answer(server, collector.pending, error, lambda: self._enroll_words(
            collector.vocabulary, collector.digit, collector.audios, "live"))

    def cmd_set_threshold(self, request: dict, pending: Pending) -> dict:
        """``far`` for a calibrated speaker model, ``threshold`` (a cosine) for one without: the
        other would answer ok and change nothing that decides."""
        book = self.daemon.book
        if book is None:
            raise ControlError("set_threshold: no speaker model")
        calibrated = book.calibration is not None
        if "far" in request and "threshold" in request:
            raise ControlError("set_threshold: give 'far' or 'threshold', not both")
        if "far" in request:
            far = _field(request, "far", float)
            if not 1e-6 <= far <= 0.5:
                raise ControlError("set_threshold: 'far' must be in [0.000001, 0.5]")
            if not calibrated:
                raise ControlError("set_threshold: this speaker model has no calibration, 'far' does not apply: "
                                   "set 'threshold' (the cosine a voice needs)")
            book.far = far
        else:
            value = _field(request, "threshold", float)
            if not -1.0 <= value <= 1.0:
                raise ControlError("set_threshold: 'threshold' must be a cosine score in [-1, 1]")
            if calibrated:
                raise ControlError("set_threshold: this speaker model is calibrated: its scores are not cosines and "
                                   "'threshold' does not apply; set 'far' instead (the share of strangers' "
                                   "utterances that may be named, e.g. {\"far\": 0.01})")
            book.cosine_threshold = value
        return {"ok": True, "far": book.far, "threshold": book.threshold, "calibrated": calibrated}

    def cmd_challenge(self, request: dict, pending: Pending) -> dict:
        """A code for ``speaker`` to say on ``stream``; the next utterance there answers it
        (a ``verification`` event). A challenge still open on the stream is replaced."""
        speaker = _field(request, "speaker", str)
        length = _within(request, "length", _field(request, "length", int, 4), 1, MAX_LENGTH)
        ttl = _within(request, "ttl_s", _field(request, "ttl_s", float, 30.0), 0, MAX_TTL_S, True)
        if "stream" not in request:
            raise ControlError(f"challenge: missing field 'stream' (streams: {', '.join(sorted(self.daemon.pipelines))})")
        pipeline = self._stream(request)
        book = self.daemon.book
        if book is None or not book.is_enrolled(speaker):
            raise ControlError(f"challenge: no enrolled speaker named {speaker!r}")
        c = new_challenge(speaker, length, ttl, pipeline.next_utterance)
        pipeline.set_challenge(c)
        return {"ok": True, "id": c.id, "digits": c.digits, "expires": round(c.expires, 3), "stream": pipeline.stream}

    def cmd_recent_audio(self, request: dict, pending: Pending) -> dict:
        """One recent utterance's audio, as the models saw it, as a WAV file (base64); only
        with identity.keep_recent_audio on."""
        utterance = _field(request, "utterance", int)
        if not self.daemon.cfg.identity.keep_recent_audio:
            raise ControlError("recent_audio: identity.keep_recent_audio is off: no audio is kept")
        pipeline = self._stream(request)
        kept = next((r for r in pipeline.recent if r.utterance == utterance), None)
        if kept is None or kept.recording is None:
            raise ControlError(f"recent_audio: utterance {utterance} is not among the recent ones of stream "
                               f"{pipeline.stream!r} (or was heard before identity.keep_recent_audio was on)")
        return {"ok": True, "stream": pipeline.stream, "utterance": utterance, "format": "wav",
                "sample_rate": SAMPLE_RATE, "seconds": round(len(kept.recording) / SAMPLE_RATE, 3),
                "base64": base64.b64encode(wav_bytes(kept.recording)).decode("ascii")}

    def cmd_stats(self, request: dict, pending: Pending) -> dict:
        pipelines = self.daemon.pipelines
        book = self.daemon.book
        streams = {name: {"utterances": p.utterances_seen, "recent": len(p.recent),
                          "recent_audio_s": round(p.recording_seconds(), 3)} for name, p in pipelines.items()}
        return {"ok": True, "uptime_s": round(time.time() - self.started, 1), "streams": streams,
                "keep_recent_audio": self.daemon.cfg.identity.keep_recent_audio,
                "utterances": sum(p.utterances_seen for p in pipelines.values()),
                "speakers": len(book.enrolled().names) if book else 0,
                "threshold": book.threshold if book else None,
                "events_published": self.daemon.publisher.seq, "events_dropped": self.daemon.publisher.dropped,
                "speaker_model": book.sha if book else None}
