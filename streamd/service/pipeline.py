"""One stream's processing: VAD -> streaming MFCC ring -> models -> decisions -> events."""

from __future__ import annotations

import collections
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Callable

import numpy as np

from streamd.models import digits
from streamd.models.batching import Batcher, Job
from streamd.config import Config
from streamd.service.events import DigitEvent, Publisher, SpeakerEvent, SpeakerPartial, VadEnd, VadStart
from streamd.signal.features import FeatureParams, StreamingMfcc, centred, features_of_audio, normalize, word_input
from streamd.audio.frames import SAMPLE_RATE, Frame
from streamd.identity.scoring import Utterance
from streamd.signal.vad import audio_level
from streamd.identity.scoring import UNKNOWN, Decision
from streamd.models.inference import FeaturesByFrontEnd, Models
from streamd.service.metrics import STAGES, Metrics
from streamd.identity.speakers import SpeakerBook
from streamd.signal.vad import Segmenter, SpeechAudio, SpeechEnd, SpeechStart, model_span
from streamd.identity.vocabulary import WordBook
from streamd.models.words import BUILTIN


@dataclass(frozen=True)
class Recent:
    """An utterance heard recently, kept for ``enroll_recent``."""

    utterance: int
    utt: Utterance
    embedding: np.ndarray
    audio: np.ndarray | None = None  # the word model's 1.5 s of it, kept while vocabularies can be taught
    speaker: str | None = None  # who it was given to (name or cluster label): removed with that speaker


@dataclass
class EarlyFinal:
    """An utterance's final decision computed once speech has been silent for ``vad.tail_ms``:
    the audio the models see is complete then, so the rest of the hangover is spent on the
    models instead of waiting. Used if the utterance then closes with no more speech;
    wasted (and a newer one computed) if speech goes on."""

    utterance: int
    samples: int  # of the audio the models see: what the final decision would compute
    speaker_feats: np.ndarray  # the final decision's too (its Utterance record keeps them)
    result: tuple | None = None  # (embedding, logits[, word embedding])
    waiting: Callable[..., None] | None = None  # the close came before the result

    def done(self, *result) -> None:
        self.result = result
        if self.waiting is not None:
            self.waiting(*result)

    def use(self, decide: Callable[..., None]) -> None:
        if self.result is not None:
            decide(*self.result)
        else:
            self.waiting = decide


FEATURE_CHUNK_S = 0.2  # features computed per 0.2 s of speech (and whenever a decision needs them)


METRICS_EVERY = 25  # frames (0.5 s) counted here, then added to the Prometheus counters in one go


@dataclass
class FrameCounts:
    """Per-frame counts not yet added to the metrics: a counter increment takes a lock, and
    silence should cost little more than the VAD."""

    frames: int = 0
    audio_s: float = 0.0
    speech_s: float = 0.0

    def add(self, seconds: float, speech: bool) -> None:
        self.frames += 1
        self.audio_s += seconds
        if speech:
            self.speech_s += seconds


class StreamPipeline:
    """Frames in, events out. Model work goes to the Batcher shared by all streams, which
    the Engine runs."""

    def __init__(self, stream: str, cfg: Config, models: Models, book: SpeakerBook | None,
                 publisher: Publisher, metrics: Metrics, batcher: Batcher, words: WordBook | None = None):
        self.stream = stream
        self.batcher = batcher
        self.models = models
        self.book = book
        self.words = words
        self.publisher = publisher
        self.metrics = metrics
        self.min_digit_confidence = models.digits.min_confidence(cfg.digits.min_confidence)
        self.partial_every_s = cfg.identity.partial_every_s
        self.early_finals = cfg.models.early_finals
        self._early: EarlyFinal | None = None
        self.recent: collections.deque[Recent] = collections.deque(maxlen=cfg.identity.recent_utterances)
        self.collector = None  # streamd.service.commands.Collector while enroll_next gathers speech
        self.word_collector = None  # streamd.service.commands.WordCollector while enroll_word waits for words
        self.utterances_seen = 0
        self._audio: list[np.ndarray] = []
        self._open: SpeechStart | None = None  # the utterance going on
        self._heard = 0  # its samples so far, pre-roll included
        self._next_partial = 0.0  # seconds of it after which the next speaker.partial is due
        self.segmenter = Segmenter(cfg.vad)
        # One ring per front end the models need; each sample's features are computed once.
        self.rings = {p: StreamingMfcc(p, int(cfg.features.ring_seconds / p.winstep), int(FEATURE_CHUNK_S * p.sample_rate))
                      for p in dict.fromkeys((models.speaker.params, *models.digits.front_ends)) if p.streamed}
        metrics.add_stream(stream)
        # Children resolved once: silence costs only these increments and the VAD.
        self._m_frames = metrics.frames.labels(stream=stream)
        self._m_audio = metrics.audio_seconds.labels(stream=stream)
        self._m_speech = metrics.speech_seconds.labels(stream=stream)
        self._m_latency = metrics.latency.labels(stream=stream)
        self._m_stage = {stage: metrics.stage.labels(stream=stream, stage=stage) for stage in STAGES}
        self._counted = FrameCounts()

    @contextmanager
    def _timed(self, stage: str):
        start = time.perf_counter()
        yield
        self._m_stage[stage].observe(time.perf_counter() - start)

    def push(self, frame: Frame) -> None:
        timed = self._counted.frames == 0  # the first frame of each METRICS_EVERY
        start = time.perf_counter() if timed else 0.0
        outputs = self.segmenter.push(frame)
        if timed:  # one frame in METRICS_EVERY: the VAD's time is a sample, not a total
            self._m_stage["vad"].observe(time.perf_counter() - start)
        self._counted.add(frame.duration, self.segmenter.in_speech)
        if self._counted.frames >= METRICS_EVERY:
            self._publish_counts()
        if outputs:
            self._handle(outputs, frame)

    def _publish_counts(self) -> None:
        c, self._counted = self._counted, FrameCounts()
        self._m_frames.inc(c.frames)
        self._m_audio.inc(c.audio_s)
        if c.speech_s:
            self._m_speech.inc(c.speech_s)

    def flush(self) -> None:
        """End of stream: close and recognise an utterance still open."""
        self._publish_counts()
        self._handle(self.segmenter.flush(), None)

    def _handle(self, outputs, frame: Frame | None) -> None:
        ending = any(isinstance(out, SpeechEnd) for out in outputs)
        for out in outputs:
            if isinstance(out, SpeechStart):
                for ring in self.rings.values():
                    ring.reset()
                self._audio = []
                self._open, self._heard = out, 0
                self._next_partial = self.partial_every_s
                self._add_audio(out.audio)
                t_now = frame.t_end if frame is not None else out.t_start
                self._publish(VadStart(self.stream, out.utterance, out.t_start, t_now))
            elif isinstance(out, SpeechAudio):
                self._add_audio(out.audio)
                if frame is not None and not ending:
                    self._maybe_partial(frame)
                    self._maybe_early_final(frame)
            elif isinstance(out, SpeechEnd):
                self._open = None
                self._end(out)

    def _add_audio(self, audio: np.ndarray) -> None:
        with self._timed("features"):
            self._audio.append(audio)  # kept until the utterance ends, for its level
            self._heard += len(audio)
            for ring in self.rings.values():
                ring.push(audio)

    def _maybe_partial(self, frame: Frame) -> None:
        """Every ``partial_every_s`` of speech: the speaker decision on the utterance so far."""
        start = self._open
        # Only while speech goes on: in the hangover the final decision is a moment away.
        if self.segmenter.last_voiced_end != frame.t_end or self.partial_every_s <= 0 or self.book is None:
            return
        if frame.t_end - start.t_start < self._next_partial:
            return
        self._next_partial += self.partial_every_s

        def finish(embedding: np.ndarray, _logits) -> None:
            who = self.book.decide(embedding, self.book.seconds_of(feats))
            self._publish(SpeakerPartial(
                self.stream, start.utterance, start.t_start, frame.t_end, speaker=who.speaker, score=who.score,
                candidates=who.candidates, latency_s=time.monotonic() - frame.captured_at, cosine=who.raw,
                cluster=who.cluster))

        feats = self._utterance_features(self.models.speaker.params, self._heard)
        self.batcher.submit(Job(self.stream, feats, None, finish, utterance=start.utterance))

    def _model_samples(self, audio_t: float, t_end: float) -> int:
        """Samples the models see of an utterance whose audio starts at ``audio_t`` and whose
        speech ends at ``t_end`` (SpeechEnd.model_span: the pre-roll, the speech, the tail)."""
        start_t, end_t = model_span(audio_t, t_end, self.segmenter.params)
        return int(round((end_t - start_t) * SAMPLE_RATE))

    def _maybe_early_final(self, frame: Frame) -> None:
        """Once the tail after the last voiced frame is heard: the final decision, computed now."""
        vad, start = self.segmenter.params, self._open
        t_end = self.segmenter.last_voiced_end
        if not self.early_finals or start is None or frame.t_end + 1e-6 < t_end + vad.tail_ms / 1000:
            return
        if (t_end - start.t_start) * 1000 < vad.min_utterance_ms:
            return
        samples = self._model_samples(start.audio_t, t_end)
        if self._early is not None and (self._early.utterance, self._early.samples) == (start.utterance, samples):
            return
        self._count_early("wasted", self._early)  # speech went on after the last one
        speaker_feats = self._utterance_features(self.models.speaker.params, samples)
        self._early = early = EarlyFinal(start.utterance, samples, speaker_feats)
        audio = np.concatenate(self._audio)[:samples] if self._audio else np.zeros(0, np.int16)
        self.batcher.submit(Job(self.stream, speaker_feats, self._digit_features(samples, audio),
                                early.done, utterance=start.utterance, early=True,
                                word_input=self._word_input(audio)))

    def _count_early(self, outcome: str, early: EarlyFinal | None) -> None:
        if early is not None:
            self.metrics.early_finals.labels(stream=self.stream, outcome=outcome).inc()

    def _end(self, end: SpeechEnd) -> None:
        self.metrics.utterances.labels(stream=self.stream, reason=end.reason).inc()
        self._publish(VadEnd(self.stream, end.utterance, end.t_start, end.t_end, reason=end.reason))
        if end.usable:
            self._recognise(end)

    def _recognise(self, end: SpeechEnd) -> None:
        # The models see the utterance from its pre-roll to the end of speech: the same
        # cut that streamd.signal.vad.utterance_audio makes for training clips.
        samples = self._model_samples(end.audio_t, end.t_end)
        self.utterances_seen += 1
        early, self._early = self._early, None
        same_audio = early is not None and (early.utterance, early.samples) == (end.utterance, samples)
        speaker_feats = early.speaker_feats if same_audio else self._utterance_features(self.models.speaker.params, samples)
        audio = np.concatenate(self._audio)[:samples] if self._audio else np.zeros(0, np.int16)
        utt = Utterance(speaker_feats, end.t_end - end.t_start, *audio_level(audio))

        def decide(embedding: np.ndarray, logits: np.ndarray, word: np.ndarray | None = None) -> None:
            self._decide(end, utt, embedding, logits, word, audio)

        if same_audio:
            self._count_early("used", early)
            early.use(decide)  # the same audio: the same result
            return
        self._count_early("wasted", early)
        self.batcher.submit(Job(self.stream, speaker_feats, self._digit_features(samples, audio),
                                decide, utterance=end.utterance, word_input=self._word_input(audio)))

    def _decide(self, end: SpeechEnd, utt: Utterance, embedding: np.ndarray, logits: np.ndarray,
                word: np.ndarray | None, audio: np.ndarray) -> None:
        with self._timed("identity"):
            digit, vocabulary = self._digit(logits, word)
            who = self.book.identify(embedding, utt) if self.book is not None else Decision(UNKNOWN, 0.0, [])
        kept = centred(audio).copy() if self.words is not None else None
        self.recent.append(Recent(end.utterance, utt, embedding, kept, who.cluster or who.speaker))
        if self.collector is not None:
            self.collector.utterances.append(utt)
            self.collector.vectors.append(embedding)
        if self.word_collector is not None:
            self.word_collector.audios.append(audio)
        base = (self.stream, end.utterance, end.t_start, end.t_end)
        self._publish(SpeakerEvent(*base, speaker=who.speaker, score=who.score, candidates=who.candidates,
                                   latency_s=time.monotonic() - end.closed_at, cosine=who.raw,
                                   cluster=who.cluster), end.closed_at)
        self._publish(DigitEvent(*base, digit=digit.digit, confidence=digit.confidence,
                                 candidates=digit.candidates, latency_s=time.monotonic() - end.closed_at,
                                 vocabulary=vocabulary), end.closed_at)

    def _digit(self, logits: np.ndarray, word: np.ndarray | None) -> tuple[digits.DigitDecision, str | None]:
        """The taught vocabularies' answer when their templates name the word, else the digit
        models' (vocabulary ``builtin``); no vocabulary when no digit is named."""
        if word is not None and self.words is not None and (m := self.words.match(word)) is not None:
            return digits.DigitDecision(m.digit, m.score, m.candidates), m.vocabulary
        decision = digits.decide(logits, self.min_digit_confidence)
        return decision, (BUILTIN if decision.digit is not None else None)

    def _word_input(self, audio: np.ndarray) -> np.ndarray | None:
        """The word model's input for the utterance's ``audio``, while some vocabulary has
        templates (the word model costs ~15-30 ms an utterance: it runs only then)."""
        if self.words is None or not self.words.active or not len(audio):
            return None
        return word_input(audio)

    def _digit_features(self, samples: int, audio: np.ndarray) -> FeaturesByFrontEnd:
        """Each digit front end's features of the utterance's first ``samples``: from the rings,
        or (the word window) from the utterance's ``audio``, on the model thread and only if
        the member reading it runs."""
        return {p: self._utterance_features(p, samples) if p.streamed else partial(features_of_audio, audio, p)
                for p in self.models.digits.front_ends}

    def _utterance_features(self, params: FeatureParams, samples: int) -> np.ndarray:
        ring = self.rings[params]
        n = min(params.frames_in(samples), ring.num_frames)
        return normalize(ring.frames(ring.oldest_frame, n), params)

    def _publish(self, event, closed_at: float | None = None) -> None:
        # Counted first, so a subscriber that got the event finds it in /metrics too.
        self.metrics.events.labels(stream=self.stream, type=event.type).inc()
        if closed_at is not None:
            self._m_latency.observe(time.monotonic() - closed_at)
        with self._timed("publish"):
            self.publisher.publish(event)
