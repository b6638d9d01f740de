"""MFCC features, offline and streaming, computed by one function so they cannot drift.

Both paths pre-emphasise the signal, cut it into frames that lie wholly inside the audio
(no zero padding at the end, unlike python_speech_features' default) and hand exactly those
samples to ``python_speech_features.mfcc``. Streaming therefore reproduces offline features.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import python_speech_features as psf

SAMPLE_RATE = 16000
# Log-energy of an all-zero frame would be log(eps) = -36, an outlier that swamps
# per-utterance normalisation; floor it at the energy of a frame of unit samples.
LOG_ENERGY_FLOOR = 0.0


@dataclass(frozen=True)
class FeatureParams:
    """Everything that defines the features; model cards carry a copy and must match."""

    sample_rate: int = SAMPLE_RATE
    winlen: float = 0.025
    winstep: float = 0.01
    numcep: int = 20
    nfilt: int = 40
    nfft: int = 512
    lowfreq: float = 20.0
    highfreq: float = 4000.0
    preemph: float = 0.97
    ceplifter: int = 22
    window: str = "hamming"

    @property
    def frame_len(self) -> int:
        return int(round(self.winlen * self.sample_rate))

    @property
    def frame_step(self) -> int:
        return int(round(self.winstep * self.sample_rate))

    def as_dict(self) -> dict:
        return asdict(self)

    def frames_in(self, num_samples: int) -> int:
        """Number of whole analysis frames in ``num_samples`` samples."""
        if num_samples < self.frame_len:
            return 0
        return 1 + (num_samples - self.frame_len) // self.frame_step


def _window(params: FeatureParams):
    if params.window == "hamming":
        return np.hamming
    if params.window == "rect":
        return lambda n: np.ones((n,))
    raise ValueError(f"unknown window {params.window!r}")


def preemphasis(signal: np.ndarray, coeff: float, previous: float | None = None) -> np.ndarray:
    """y[n] = x[n] - coeff * x[n-1]; the first sample of a stream is kept as is."""
    x = np.asarray(signal, dtype=np.float64)
    y = np.empty_like(x)
    if len(x) == 0:
        return y
    y[0] = x[0] if previous is None else x[0] - coeff * previous
    y[1:] = x[1:] - coeff * x[:-1]
    return y


def mfcc_of_emphasised(emphasised: np.ndarray, params: FeatureParams) -> np.ndarray:
    """MFCC of whole frames of an already pre-emphasised signal: shape (frames, numcep)."""
    n = params.frames_in(len(emphasised))
    if n == 0:
        return np.zeros((0, params.numcep), dtype=np.float64)
    used = params.frame_len + (n - 1) * params.frame_step
    feats = psf.mfcc(
        emphasised[:used],
        samplerate=params.sample_rate,
        winlen=params.winlen,
        winstep=params.winstep,
        numcep=params.numcep,
        nfilt=params.nfilt,
        nfft=params.nfft,
        lowfreq=params.lowfreq,
        highfreq=params.highfreq,
        preemph=0.0,
        ceplifter=params.ceplifter,
        appendEnergy=True,
        winfunc=_window(params),
    )
    feats[:, 0] = np.maximum(feats[:, 0], LOG_ENERGY_FLOOR)
    return feats


def mfcc(signal: np.ndarray, params: FeatureParams) -> np.ndarray:
    """Offline MFCC of a whole clip (int16 or float samples at params.sample_rate)."""
    return mfcc_of_emphasised(preemphasis(signal, params.preemph), params)


def normalize(feats: np.ndarray) -> np.ndarray:
    """Per-utterance mean and variance normalisation, as the models were trained."""
    if len(feats) == 0:
        return feats.astype(np.float32)
    mean = feats.mean(axis=0, keepdims=True)
    std = feats.std(axis=0, keepdims=True)
    return ((feats - mean) / np.maximum(std, 1e-3)).astype(np.float32)


class StreamingMfcc:
    """Computes each frame's MFCC once, as audio arrives, into a ring buffer of frames.

    Frame ``i`` (counted since the last reset) covers samples
    ``[i * frame_step, i * frame_step + frame_len)`` of the audio pushed since that reset,
    exactly as :func:`mfcc` frames the same audio offline.
    """

    def __init__(self, params: FeatureParams, capacity_frames: int):
        if capacity_frames <= 0:
            raise ValueError("capacity_frames must be positive")
        self.params = params
        self.capacity = capacity_frames
        self._ring = np.zeros((capacity_frames, params.numcep), dtype=np.float64)
        self.reset()

    def reset(self) -> None:
        self._pending = np.zeros(0, dtype=np.float64)  # emphasised samples not yet framed away
        self._previous: float | None = None
        self.num_frames = 0  # frames computed since reset

    def push(self, samples: np.ndarray) -> int:
        """Add audio; returns how many new frames were computed."""
        if len(samples) == 0:
            return 0
        emphasised = preemphasis(samples, self.params.preemph, self._previous)
        self._previous = float(samples[-1])
        self._pending = np.concatenate((self._pending, emphasised))
        feats = mfcc_of_emphasised(self._pending, self.params)
        n = len(feats)
        if n:
            self._store(feats)
            self._pending = self._pending[n * self.params.frame_step :]
        return n

    def _store(self, feats: np.ndarray) -> None:
        if len(feats) > self.capacity:
            self.num_frames += len(feats) - self.capacity
            feats = feats[-self.capacity :]
        idx = (self.num_frames + np.arange(len(feats))) % self.capacity
        self._ring[idx] = feats
        self.num_frames += len(feats)

    @property
    def oldest_frame(self) -> int:
        return max(0, self.num_frames - self.capacity)

    def frames(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Copy of frames [start, stop) counted since reset; must still be in the ring."""
        stop = self.num_frames if stop is None else min(stop, self.num_frames)
        if start < self.oldest_frame:
            raise IndexError(f"frame {start} has left the ring (oldest is {self.oldest_frame})")
        if stop <= start:
            return np.zeros((0, self.params.numcep), dtype=np.float64)
        idx = np.arange(start, stop) % self.capacity
        return self._ring[idx].copy()
