"""A stream's audio and segmentation: the VAD, the feature rings, the audio of the utterance
going on, and the frame counts /metrics reads."""

from __future__ import annotations

import time
from functools import partial

import numpy as np

from streamd.audio.frames import SAMPLE_RATE, Frame
from streamd.config import Config
from streamd.models.inference import FeaturesByFrontEnd
from streamd.service.metrics import StageTimes, StreamCounts
from streamd.signal.features import FeatureParams, StreamingFeatures, features_of_audio, normalize
from streamd.signal.vad import Segmenter, SpeechStart, VadOutput, model_span
from streamd.signal.vad_bank import VadBank

FEATURE_CHUNK_S = 0.2  # features computed per 0.2 s of speech (and whenever a decision needs them)
VAD_SAMPLE_EVERY = 25  # frames: the VAD stage is timed on one frame in 25 (timing each cost too much)


class StreamAudio:
    """Frames in, VAD outputs out; keeps what the models will need of the utterance going on:
    its audio and, per front end that streams, its features (each sample's computed once)."""

    def __init__(self, cfg: Config, front_ends: tuple[FeatureParams, ...], counts: StreamCounts,
                 stages: StageTimes, bank: VadBank | None = None):
        self.segmenter = Segmenter(cfg.vad, bank)  # its row of the bank shared by the engine's streams
        self.counts = counts
        self.stages = stages
        # One ring per front end that streams; each sample's features are computed once.
        self.rings = {p: StreamingFeatures(p, int(cfg.features.ring_seconds / p.winstep),
                                       int(FEATURE_CHUNK_S * p.sample_rate))
                      for p in dict.fromkeys(front_ends) if p.streamed}
        self.open: SpeechStart | None = None  # the utterance going on
        self.heard = 0  # its samples so far, pre-roll included
        self._audio: list[np.ndarray] = []

    @property
    def last_voiced_end(self) -> float:
        return self.segmenter.last_voiced_end

    def push(self, frame: Frame) -> list[VadOutput]:
        return self._timed(self.segmenter.push, frame)

    def push_ticked(self, frame: Frame, level: float, gain_db: float) -> list[VadOutput]:
        """``push`` for a frame whose levels the bank has taken in with other streams' frames
        (Engine.push_many) and that was not quiet."""
        return self._timed(self.segmenter.push_ticked, frame, level, gain_db)

    def _timed(self, push, frame: Frame, *args) -> list[VadOutput]:
        timed = self.counts.frames % VAD_SAMPLE_EVERY == 0  # a sample of the VAD's time, not a total
        start = time.perf_counter() if timed else 0.0
        outputs = push(frame, *args)
        if timed:
            self.stages.observe("vad", time.perf_counter() - start)
        self.counts.add_frame(len(frame.samples), self.segmenter.in_speech)
        return outputs

    def quiet(self, frames: int, samples: int) -> None:
        """Quiet frames of ``samples`` each, taken in by the bank alone, are counted."""
        self.counts.frames += frames
        self.counts.audio_samples += frames * samples

    def flush(self) -> list[VadOutput]:
        """End of stream: the utterance still open is closed."""
        return self.segmenter.flush()

    def begin(self, start: SpeechStart) -> None:
        for ring in self.rings.values():
            ring.reset()
        self._audio = []
        self.open, self.heard = start, 0
        self.add(start.audio)

    def add(self, audio: np.ndarray) -> None:
        with self.stages.timed("features"):
            self._audio.append(audio)  # kept until the utterance ends, for its level
            self.heard += len(audio)
            for ring in self.rings.values():
                ring.push(audio)

    def close(self) -> None:
        self.open = None

    def model_samples(self, audio_t: float, t_end: float) -> int:
        """Samples the models see of an utterance whose audio starts at ``audio_t`` and whose
        speech ends at ``t_end`` (SpeechEnd.model_span: the pre-roll, the speech, the tail)."""
        start_t, end_t = model_span(audio_t, t_end, self.segmenter.params)
        return int(round((end_t - start_t) * SAMPLE_RATE))

    def final_due(self, frame: Frame) -> int | None:
        """Once the tail after the utterance's last voiced frame is heard (the audio the models
        see is then complete): how many samples they see of it; None before, or for an
        utterance too short to recognise."""
        vad, start, t_end = self.segmenter.params, self.open, self.last_voiced_end
        if start is None or frame.t_end + 1e-6 < t_end + vad.tail_ms / 1000:
            return None
        if (t_end - start.t_start) * 1000 < vad.min_utterance_ms:
            return None
        return self.model_samples(start.audio_t, t_end)

    def heard_audio(self, samples: int) -> np.ndarray:
        """The utterance's first ``samples``."""
        return np.concatenate(self._audio)[:samples] if self._audio else np.zeros(0, np.int16)

    def features(self, params: FeatureParams, samples: int) -> np.ndarray:
        """The utterance's normalised features of its first ``samples``, from the ring."""
        ring = self.rings[params]
        n = min(params.frames_in(samples), ring.num_frames)
        return normalize(ring.frames(ring.oldest_frame, n), params)

    def features_by_front_end(self, front_ends: tuple[FeatureParams, ...], samples: int,
                              audio: np.ndarray) -> FeaturesByFrontEnd:
        """Each front end's features of the utterance's first ``samples``: from the rings, or (the
        word window) from its ``audio``, on the model thread and only if the member reading it runs."""
        return {p: self.features(p, samples) if p.streamed else partial(features_of_audio, audio, p)
                for p in front_ends}
