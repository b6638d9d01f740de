"""One stream's processing: VAD -> streaming MFCC ring -> models -> decisions -> events.

Three parts, wired together here: the stream's audio and segmentation (``StreamAudio``,
streamd.service.segmentation), its model work on the Batcher shared by all streams
(``PendingWork``, streamd.service.pending) and its decisions (``Decisions``,
streamd.service.decisions)."""

from __future__ import annotations

import time
from functools import partial

import numpy as np

from streamd.audio.frames import Frame
from streamd.config import Config
from streamd.identity.scoring import Utterance
from streamd.identity.speakers import SpeakerBook
from streamd.identity.vocabulary import WordBook
from streamd.models.batching import Batcher
from streamd.models.inference import Models
from streamd.models.digit_strings import StringDecision
from streamd.service.challenge import Challenge, Verdict, expired, verdict
from streamd.service.decisions import Decisions, StreamEvents
from streamd.service.events import Publisher, VadEnd, VadStart, VerificationEvent
from streamd.service.metrics import Metrics, StageTimes
from streamd.service.pending import FinalRequest, PendingWork
from streamd.service.segmentation import StreamAudio
from streamd.service.strings import DigitStrings, StringTask, digits_event
from streamd.signal.vad import SpeechAudio, SpeechEnd, SpeechStart, VadOutput, audio_level
from streamd.signal.vad_bank import VadBank


class Forwarded:
    """An attribute of the pipeline that lives on one of its parts (read and set there)."""

    def __init__(self, part: str, name: str | None = None):
        self.part, self.name = part, name

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = self.name or name

    def __get__(self, pipeline, owner: type | None = None):
        return getattr(getattr(pipeline, self.part), self.name)

    def __set__(self, pipeline, value) -> None:
        setattr(getattr(pipeline, self.part), self.name, value)


class StreamPipeline:
    """Frames in, events out. Model work goes to the Batcher shared by all streams, which
    the Engine runs."""

    # What the daemon, its control commands and the tests read and set on a stream.
    recent = Forwarded("decisions")  # deque[Recent]: enroll_recent's utterances
    collector = Forwarded("decisions")  # streamd.service.commands.Collector while enroll_next gathers speech
    word_collector = Forwarded("decisions")  # streamd.service.commands.WordCollector while enroll_word waits
    min_digit_confidence = Forwarded("decisions")
    keep_audio = Forwarded("decisions")  # identity.keep_recent_audio: the recent utterances keep their audio
    recording_seconds = Forwarded("decisions")  # () -> seconds of audio they keep
    utterances_seen = Forwarded("pending", "finals")

    def __init__(self, stream: str, cfg: Config, models: Models, book: SpeakerBook | None,
                 publisher: Publisher, metrics: Metrics, batcher: Batcher, words: WordBook | None = None,
                 realtime: bool = False, bank: VadBank | None = None):
        self.stream = stream
        self.realtime = realtime  # its decisions have a latency budget (Engine.add_stream)
        self.models = models
        self.partial_every_s = cfg.identity.partial_every_s
        self.early_finals = cfg.models.early_finals
        self._next_partial = 0.0  # seconds of the open utterance after which the next speaker.partial is due
        self._utterances = metrics.utterances
        stages = StageTimes(metrics.stage, stream)
        self.audio = StreamAudio(cfg, (models.speaker.params, *models.digits.front_ends),
                                 metrics.add_stream(stream), stages, bank)
        self.pending = PendingWork(stream, batcher, metrics.early_finals)
        self.events = StreamEvents(stream, publisher, metrics, stages)
        self.decisions = Decisions(stream, book, words, models.digits.min_confidence(cfg.digits.min_confidence),
                                   cfg.identity.recent_utterances, self.events, stages,
                                   keep_audio=cfg.identity.keep_recent_audio)
        self.strings = DigitStrings(stream, self.pending, models.digits.front_ends, min_s=cfg.digits.strings_min_s)
        self.challenge: Challenge | None = None  # open on this stream (control command ``challenge``)
        self.last_started = -1  # the latest utterance that started

    def push(self, frame: Frame) -> None:
        outputs = self.audio.push(frame)
        if outputs:
            self._handle(outputs, frame)

    def push_ticked(self, frame: Frame, level: float, gain_db: float) -> None:
        """``push`` for a frame the engine's VadBank has taken in (Engine.push_many)."""
        outputs = self.audio.push_ticked(frame, level, gain_db)
        if outputs:
            self._handle(outputs, frame)

    def flush(self) -> None:
        """End of stream: close and recognise an utterance still open."""
        self._handle(self.audio.flush(), None)

    def _handle(self, outputs: list[VadOutput], frame: Frame | None) -> None:
        ending = any(isinstance(out, SpeechEnd) for out in outputs)
        for out in outputs:
            if isinstance(out, SpeechStart):
                self._start(out, frame)
            elif isinstance(out, SpeechAudio):
                self.audio.add(out.audio)
                if frame is not None and not ending:
                    self._maybe_partial(frame)
                    self._maybe_early_final(frame)
            elif isinstance(out, SpeechEnd):
                self.audio.close()
                self._end(out)

    def _start(self, start: SpeechStart, frame: Frame | None) -> None:
        self.last_started = start.utterance
        c = self.challenge
        if c is not None and c.answering is None and start.utterance >= c.first_utterance:
            c.answering = start.utterance  # it started before the expiry (expire() would have closed it)
        self.audio.begin(start)
        self._next_partial = self.partial_every_s
        t_now = frame.t_end if frame is not None else start.t_start
        self.events.publish(VadStart(self.stream, start.utterance, start.t_start, t_now))

    def _maybe_partial(self, frame: Frame) -> None:
        """Every ``partial_every_s`` of speech: the speaker decision on the utterance so far."""
        start = self.audio.open
        # Only while speech goes on: in the hangover the final decision is a moment away.
        if self.audio.last_voiced_end != frame.t_end or self.partial_every_s <= 0 or not self.decisions.names_speakers:
            return
        if frame.t_end - start.t_start < self._next_partial:
            return
        self._next_partial += self.partial_every_s
        if self.pending.skip_partial():  # the models are behind (models.max_latency_ms)
            return
        feats = self.audio.features(self.models.speaker.params, self.audio.heard)
        self.pending.partial(start.utterance, feats, partial(self.decisions.speaker_partial, start, frame, feats),
                             self._heard_at(frame.captured_at))

    def _maybe_early_final(self, frame: Frame) -> None:
        """Once the tail after the last voiced frame is heard: the final decision, computed now."""
        samples = self.audio.final_due(frame) if self.early_finals else None
        if samples is None or self.pending.has_early(self.audio.open.utterance, samples):
            return
        speaker_feats = self.audio.features(self.models.speaker.params, samples)
        self.pending.early_final(self._final_request(self.audio.open.utterance, samples, speaker_feats,
                                                     heard_at=self._heard_at(frame.captured_at)))

    def _end(self, end: SpeechEnd) -> None:
        self._utterances.labels(stream=self.stream, reason=end.reason).inc()
        self.events.publish(VadEnd(self.stream, end.utterance, end.t_start, end.t_end, reason=end.reason))
        if end.usable:
            self._recognise(end)
        elif self.challenge is not None and self.challenge.answering == end.utterance:
            self.challenge.answering = None  # too short to answer: the next utterance may
            self.challenge.first_utterance = end.utterance + 1

    def _recognise(self, end: SpeechEnd) -> None:
        # The models see the utterance from its pre-roll to the end of speech: the same
        # cut that streamd.signal.vad.utterance_audio makes for training clips.
        samples = self.audio.model_samples(end.audio_t, end.t_end)
        early = self.pending.take_early(end.utterance, samples)
        speaker_feats = early.speaker_feats if early is not None else \
            self.audio.features(self.models.speaker.params, samples)
        audio = self.audio.heard_audio(samples)
        utt = Utterance(speaker_feats, end.t_end - end.t_start, *audio_level(audio))
        task = self.strings.task(audio, self._challenged(end.utterance))  # the same as the early final's
        decide = partial(self._decided, end, utt, audio, task)
        if early is not None:
            self.pending.use_early(early, decide)
        else:
            self.pending.final(self._final_request(end.utterance, samples, speaker_feats, audio,
                                                   self._heard_at(end.closed_at), task),
                               decide)

    def _decided(self, end: SpeechEnd, utt: Utterance, audio: np.ndarray, task: StringTask, embedding: np.ndarray,
                 logits: np.ndarray, word: np.ndarray | None = None, degraded: tuple[str, ...] = (),
                 pieces: list | None = None) -> None:
        """The final decision's events, then the digit string's (once its pieces are named)."""
        who, digit = self.decisions.final(end, utt, audio, embedding, logits, word, degraded)
        self.strings.decide(end, task, audio, digit, pieces, self.decisions.min_digit_confidence,
                            partial(self._string, end, utt, embedding, who.speaker))

    def _string(self, end: SpeechEnd, utt: Utterance, embedding: np.ndarray, speaker: str,
                decision: StringDecision) -> None:
        self.events.publish(digits_event(self.stream, end, decision, speaker), end.closed_at)
        c = self.challenge
        if c is None or c.answering != end.utterance:
            return
        self.challenge = None  # answered once
        book = self.decisions.book
        score, voice_ok = book.verify(c.speaker, embedding, book.seconds_of(utt.features)) if book else (None, False)
        self._verification(c, verdict(c, decision.digits, decision.reason, score, voice_ok), end)

    def _verification(self, c: Challenge, v: Verdict, end: SpeechEnd | None) -> None:
        where = (end.utterance, end.t_start, end.t_end) if end is not None else (-1, 0.0, 0.0)
        latency = time.monotonic() - end.closed_at if end is not None else None
        self.events.publish(VerificationEvent(self.stream, *where, id=c.id, speaker=c.speaker, result=v.result,
                                              digits_heard=v.digits_heard, digits_ok=v.digits_ok,
                                              voice_score=v.voice_score, voice_ok=v.voice_ok, reason=v.reason,
                                              latency_s=latency))

    def expire(self, now: float) -> None:
        """A challenge nobody started to answer before its expiry fails (reason ``expired``)."""
        c = self.challenge
        if c is not None and c.answering is None and now > c.deadline:
            self.challenge = None
            self._verification(c, expired(c), None)

    def set_challenge(self, c: Challenge | None) -> Challenge | None:
        """Open ``c`` on this stream; the challenge it replaces (if any) is returned, unanswered."""
        old, self.challenge = self.challenge, c
        return old

    def _challenged(self, utterance: int) -> bool:
        """Whether the utterance answers the stream's open challenge."""
        return self.challenge is not None and self.challenge.answering == utterance

    @property
    def next_utterance(self) -> int:
        """The number the next utterance to start will have."""
        return self.last_started + 1

    def _heard_at(self, captured_at: float) -> float | None:
        """Where a decision's latency budget starts: the capture of its audio; none when the
        stream is not real-time."""
        return captured_at if self.realtime else None

    def _final_request(self, utterance: int, samples: int, speaker_feats: np.ndarray,
                       audio: np.ndarray | None = None, heard_at: float | None = None,
                       task: StringTask | None = None) -> FinalRequest:
        """What the models need for the final decision on the utterance's first ``samples``
        (``heard_at``: when the audio it decides on was captured), with its candidate pieces."""
        audio = self.audio.heard_audio(samples) if audio is None else audio
        task = self.strings.task(audio, self._challenged(utterance)) if task is None else task
        digit_feats = self.audio.features_by_front_end(self.models.digits.front_ends, samples, audio)
        return FinalRequest(utterance, samples, speaker_feats, digit_feats, self.decisions.word_input(audio),
                            heard_at, task.pieces)
