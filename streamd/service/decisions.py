"""A stream's decisions: model outputs turned into speaker and digit events, speaker partials,
and the recent utterances that ``enroll_recent`` reads."""

from __future__ import annotations

import collections
import dataclasses
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from streamd.audio.frames import SAMPLE_RATE, Frame
from streamd.identity.scoring import UNKNOWN, Decision, Utterance
from streamd.identity.speakers import SpeakerBook
from streamd.identity.vocabulary import WordBook
from streamd.models import digits
from streamd.models.words import BUILTIN
from streamd.service.events import DigitEvent, Event, Publisher, SpeakerEvent, SpeakerPartial
from streamd.service.metrics import Metrics, StageTimes
from streamd.signal.features import centred, word_input
from streamd.signal.vad import SpeechEnd, SpeechStart

if TYPE_CHECKING:
    from streamd.service.commands import Collector, WordCollector


@dataclass(frozen=True)
class Recent:
    """An utterance heard recently, kept for ``enroll_recent``."""

    utterance: int
    utt: Utterance
    embedding: np.ndarray
    audio: np.ndarray | None = None  # the word model's 1.5 s of it, kept while vocabularies can be taught
    speaker: str | None = None  # who it was given to (name or cluster label): removed with that speaker
    # All of its audio as the models saw it (int16), kept only with identity.keep_recent_audio
    # for playback (control command recent_audio); dropped with this entry.
    recording: np.ndarray | None = None

    def without_recording(self) -> "Recent":
        return self if self.recording is None else dataclasses.replace(self, recording=None)


class StreamEvents:
    """Publishes a stream's events. Each is counted in streamd_events_total first, so a
    subscriber that got it finds it in /metrics too."""

    def __init__(self, stream: str, publisher: Publisher, metrics: Metrics, stages: StageTimes):
        self.publisher = publisher
        self.stages = stages
        self._events = metrics.events
        self._latency = metrics.latency.labels(stream=stream)
        self._stream = stream

    def publish(self, event: Event, closed_at: float | None = None) -> None:
        """``closed_at``: when the utterance decided closed (its latency is observed)."""
        self._events.labels(stream=self._stream, type=event.type).inc()
        if closed_at is not None:
            self._latency.observe(time.monotonic() - closed_at)
        with self.stages.timed("publish"):
            self.publisher.publish(event)


class Decisions:
    """Who spoke and which digit: from the models' outputs to the events, the recent
    utterances, and what ``enroll_next`` / ``enroll_word`` gather."""

    def __init__(self, stream: str, book: SpeakerBook | None, words: WordBook | None,
                 min_digit_confidence: float, recent_utterances: int, events: StreamEvents, stages: StageTimes,
                 keep_audio: bool = False):
        self.stream = stream
        self.book = book
        self.words = words
        self.min_digit_confidence = min_digit_confidence
        self.recent: collections.deque[Recent] = collections.deque(maxlen=recent_utterances)
        self._keep_audio = keep_audio  # identity.keep_recent_audio
        self.collector: Collector | None = None  # while enroll_next gathers speech
        self.word_collector: WordCollector | None = None  # while enroll_word waits for words
        self.events = events
        self.stages = stages

    @property
    def keep_audio(self) -> bool:
        """Whether the recent utterances keep their audio (identity.keep_recent_audio)."""
        return self._keep_audio

    @keep_audio.setter
    def keep_audio(self, on: bool) -> None:
        """Turned off, the audio kept so far is dropped at once; on, kept from the next utterance."""
        self._keep_audio = on
        if not on and any(r.recording is not None for r in self.recent):
            self.recent = collections.deque((r.without_recording() for r in self.recent), maxlen=self.recent.maxlen)

    def recording_seconds(self) -> float:
        """Seconds of audio the recent utterances keep (0 with identity.keep_recent_audio off)."""
        return sum(len(r.recording) for r in self.recent if r.recording is not None) / SAMPLE_RATE

    @property
    def names_speakers(self) -> bool:
        """Whether there is a speaker book to decide with (partial decisions need one)."""
        return self.book is not None

    def word_input(self, audio: np.ndarray) -> np.ndarray | None:
        """The word model's input for the utterance's ``audio``, while some vocabulary has
        templates (the word model costs ~15-30 ms an utterance: it runs only then)."""
        if self.words is None or not self.words.active or not len(audio):
            return None
        return word_input(audio)

    def speaker_partial(self, start: SpeechStart, frame: Frame, feats: np.ndarray,
                        embedding: np.ndarray, _logits: None = None) -> None:
        """The speaker decision on the utterance heard up to ``frame`` (its features ``feats``)."""
        who = self.book.decide(embedding, self.book.seconds_of(feats))
        self.events.publish(SpeakerPartial(
            self.stream, start.utterance, start.t_start, frame.t_end, speaker=who.speaker, score=who.score,
            candidates=who.candidates, latency_s=time.monotonic() - frame.captured_at, cosine=who.raw,
            cluster=who.cluster))

    def final(self, end: SpeechEnd, utt: Utterance, audio: np.ndarray, embedding: np.ndarray,
              logits: np.ndarray, word: np.ndarray | None = None,
              degraded: tuple[str, ...] = ()) -> tuple[Decision, digits.DigitDecision]:
        """The closed utterance's speaker and digit, from the models' outputs on its ``audio``;
        ``degraded``: what was shed computing them (streamd.models.batching.SHED_ORDER).
        Returns both decisions."""
        with self.stages.timed("identity"):
            digit, vocabulary = self._digit(logits, word)
            who = self.book.identify(embedding, utt) if self.book is not None else Decision(UNKNOWN, 0.0, [])
        self._remember(end, utt, audio, embedding, who)
        base = (self.stream, end.utterance, end.t_start, end.t_end)
        self.events.publish(SpeakerEvent(*base, speaker=who.speaker, score=who.score, candidates=who.candidates,
                                         latency_s=time.monotonic() - end.closed_at, cosine=who.raw,
                                         cluster=who.cluster, degraded="speaker_windows" in degraded),
                            end.closed_at)
        self.events.publish(DigitEvent(*base, digit=digit.digit, confidence=digit.confidence,
                                       candidates=digit.candidates, latency_s=time.monotonic() - end.closed_at,
                                       vocabulary=vocabulary,
                                       degraded="cascade" in degraded and vocabulary in (BUILTIN, None)),
                            end.closed_at)
        return who, digit

    def _remember(self, end: SpeechEnd, utt: Utterance, audio: np.ndarray, embedding: np.ndarray,
                  who: Decision) -> None:
        """Kept for ``enroll_recent``, and given to an enrollment that is gathering speech."""
        kept = centred(audio).copy() if self.words is not None else None
        recording = audio.copy() if self._keep_audio else None  # a copy: ``audio`` may be a view of more
        self.recent.append(Recent(end.utterance, utt, embedding, kept, who.cluster or who.speaker, recording))
        if self.collector is not None:
            self.collector.utterances.append(utt)
            self.collector.vectors.append(embedding)
        if self.word_collector is not None:
            self.word_collector.audios.append(audio)

    def _digit(self, logits: np.ndarray, word: np.ndarray | None) -> tuple[digits.DigitDecision, str | None]:
        """The taught vocabularies' answer when their templates name the word, else the digit
        models' (vocabulary ``builtin``); no vocabulary when no digit is named."""
        if word is not None and self.words is not None and (m := self.words.match(word)) is not None:
            return digits.DigitDecision(m.digit, m.score, m.candidates), m.vocabulary
        decision = digits.decide(logits, self.min_digit_confidence)
        return decision, (BUILTIN if decision.digit is not None else None)
