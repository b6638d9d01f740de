"""A stream's model work: the jobs it hands the Batcher shared by all streams, and how their
results come back (a final decision may have been computed early, in the hangover)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from prometheus_client import Counter

from streamd.models.batching import Batcher, Finish, Job
from streamd.models.inference import FeaturesByFrontEnd

# Called with the embedding, the digit logits and the word embedding (or not), ``degraded=``
# what was shed computing them (streamd.models.batching.SHED_ORDER's names; () for none) and
# ``pieces=`` the cheap logits of the utterance's candidate pieces (streamd.models.digit_strings).
Decide = Callable[..., None]


@dataclass(frozen=True)
class FinalRequest:
    """What the models compute a final decision from: an utterance's first ``samples``."""

    utterance: int
    samples: int
    speaker_feats: np.ndarray
    digit_feats: FeaturesByFrontEnd
    word_input: np.ndarray | None  # while some vocabulary has templates
    heard_at: float | None = None  # capture time of the audio it decides on (the latency budget's start)
    pieces: tuple[FeaturesByFrontEnd, ...] = ()  # candidate pieces of a digit string, scored cheaply


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
    degraded: tuple[str, ...] = ()  # what was shed computing it
    pieces: list | None = None  # its candidate pieces' logits
    waiting: Decide | None = None  # the close came before the result
    job: Job | None = field(default=None, repr=False)  # its job for the models

    def done(self, *result, degraded: tuple[str, ...] = (), pieces: list | None = None) -> None:
        self.result, self.degraded, self.pieces = result, degraded, pieces
        if self.waiting is not None:
            self.waiting(*result, degraded=degraded, pieces=pieces)

    def use(self, decide: Decide) -> None:
        if self.result is not None:
            decide(*self.result, degraded=self.degraded, pieces=self.pieces)
        else:
            self.waiting = decide
            if self.job is not None:
                self.job.early = False  # the final decision now: never shed as an early final

    @property
    def shed(self) -> bool:
        """Whether the models were never given it (early finals shed under overload)."""
        return self.job is not None and self.job.dropped

    def covers(self, utterance: int, samples: int) -> bool:
        """Whether it was computed on exactly this audio."""
        return (self.utterance, self.samples) == (utterance, samples)


class PendingWork:
    """Submits a stream's partial, early final and final decisions to the Batcher; keeps the
    early final until its utterance closes, and counts it used or wasted."""

    def __init__(self, stream: str, batcher: Batcher, early_finals: Counter):
        self.stream = stream
        self.batcher = batcher
        self._early_finals = early_finals  # labelled when counted: no series before the first
        self.early: EarlyFinal | None = None
        self.finals = 0  # final decisions asked for (early ones used included)

    def skip_partial(self) -> bool:
        """Whether partial decisions are shed now (this one is counted as shed): not worth preparing."""
        return self.batcher.skip("partial")

    def partial(self, utterance: int, speaker_feats: np.ndarray, finish: Finish, heard_at: float | None = None) -> None:
        """The speaker decision on the utterance heard so far (a newer one supersedes it)."""
        self.batcher.submit(Job(self.stream, speaker_feats, None, finish, utterance=utterance, heard_at=heard_at))

    def has_early(self, utterance: int, samples: int) -> bool:
        """Whether an early final on exactly this audio was asked for (even if it was shed)."""
        return self.early is not None and self.early.covers(utterance, samples)

    def early_final(self, request: FinalRequest) -> None:
        """The final decision, computed before the utterance closes; the previous one is wasted
        (speech went on after it)."""
        self._count("wasted", self.early)
        self.early = early = EarlyFinal(request.utterance, request.samples, request.speaker_feats)
        early.job = self._submit(request, early.done, early=True)

    def take_early(self, utterance: int, samples: int) -> EarlyFinal | None:
        """The early final computed on exactly this audio, if any; any other is wasted. One
        that was shed is neither: the final decision is computed now."""
        early, self.early = self.early, None
        if early is not None and early.covers(utterance, samples):
            return None if early.shed else early
        self._count("wasted", early)
        return None

    def use_early(self, early: EarlyFinal, decide: Decide) -> None:
        """The final decision is ``early``'s (the same audio: the same result), now or when it comes."""
        self.finals += 1
        self._count("used", early)
        early.use(decide)

    def final(self, request: FinalRequest, decide: Decide) -> None:
        """The final decision, from the models."""
        self.finals += 1
        self._submit(request, decide)

    def _submit(self, request: FinalRequest, finish: Decide, early: bool = False) -> Job:
        job = Job(self.stream, request.speaker_feats, request.digit_feats, finish, utterance=request.utterance,
                  early=early, word_input=request.word_input, heard_at=request.heard_at, pieces=request.pieces,
                  pieces_cheap=True)
        job.finish = lambda *result: finish(*result, degraded=job.degraded, pieces=job.piece_logits)
        self.batcher.submit(job)
        return job

    def name_pieces(self, utterance: int, pieces: tuple[FeaturesByFrontEnd, ...], finish: Callable[[list], None],
                    heard_at: float | None = None) -> None:
        """The chosen pieces of a digit string, named by the full digit models; ``finish`` gets their logits."""
        job = Job(self.stream, None, None, finish, utterance=utterance, heard_at=heard_at, pieces=pieces)
        job.finish = lambda *_: finish(job.piece_logits)
        self.batcher.submit(job)

    def _count(self, outcome: str, early: EarlyFinal | None) -> None:
        if early is not None and not early.shed:
            self._early_finals.labels(stream=self.stream, outcome=outcome).inc()
