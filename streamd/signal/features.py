"""Features, offline and streaming, computed by one function so they cannot drift.

Three front ends: MFCC (python_speech_features; the digit model), a mel power spectrogram
(the GE2E speaker encoder's own front end) and Kaldi's log mel filterbank (``kaldifbank``,
the front end CAM++ was trained on). A fourth, ``wordwin`` (the word model's 1.5 s window of
log filterbanks, ``word_input``), is computed from an utterance's audio, not
streamed into a ring. Both paths pre-emphasise the signal (MFCC only; Kaldi
pre-emphasises each frame on its own, after removing its DC), cut it into frames that lie
wholly inside the audio (no zero padding at the end, unlike python_speech_features' default;
Kaldi's snip_edges) and compute each frame from exactly those samples, so streaming
reproduces offline features.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import functools

import numpy as np
import python_speech_features as psf
from scipy.fftpack import dct

from streamd.audio.frames import SAMPLE_RATE

# Log-energy of an all-zero frame would be log(eps) = -36, an outlier that swamps
# per-utterance normalisation; floor it at 0, an energy of 1 on the int16 scale: a frame of
# samples about 0.1 in size. (A frame of unit samples, +-1, has 4.4 to 4.8: 4.83 constant or
# alternating, 4.38 of random signs, with the default [features].)
LOG_ENERGY_FLOOR = 0.0
# The speaker encoder was trained on utterances brought up to -30 dBFS (never down).
MEL_TARGET_DBFS = -30.0


@dataclass(frozen=True)
class FeatureParams:
    """Everything that defines the features; model cards carry a copy and must match."""

    kind: str = "mfcc"
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

    @property
    def stored_dims(self) -> int:
        """Columns per frame in the ring: mel power keeps the frame's energy beside the bands."""
        if self.kind == "kaldifbank":
            return self.nfilt
        return self.numcep if self.kind == "mfcc" else self.nfilt + 1

    @property
    def signal_preemph(self) -> float:
        """Pre-emphasis of the continuous signal, before framing. Kaldi pre-emphasises inside
        each frame (after removing the frame's DC), so its kind sees the signal unchanged."""
        return 0.0 if self.kind == "kaldifbank" else self.preemph

    @property
    def streamed(self) -> bool:
        """Whether the daemon keeps these features in a ring as audio arrives (all but the word
        window, which depends on where the utterance's middle is)."""
        return self.kind != "wordwin"

    def frames_in(self, num_samples: int) -> int:
        """Number of whole analysis frames in ``num_samples`` samples."""
        if num_samples < self.frame_len:
            return 0
        return 1 + (num_samples - self.frame_len) // self.frame_step


@functools.lru_cache(maxsize=8)
def _window_array(params: FeatureParams) -> np.ndarray:
    """The analysis window, built once per setting (not per 0.2 s of audio)."""
    window = _window(params)(params.frame_len)
    window.flags.writeable = False
    return window


def _window(params: FeatureParams):
    if params.window == "hamming":
        return np.hamming
    if params.window == "hann":  # periodic, as librosa and scipy's fftbins=True
        return lambda n: 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)
    if params.window == "rect":
        return lambda n: np.ones((n,))
    if params.window == "povey":  # Kaldi's default: a Hann window (symmetric) to the power 0.85
        return lambda n: (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / (n - 1))) ** 0.85
    raise ValueError(f"unknown window {params.window!r}")


def mel_params() -> FeatureParams:
    """The speaker encoder's front end: 40 Slaney mel bands of the power spectrum."""
    return FeatureParams(kind="melpower", winlen=0.025, winstep=0.01, numcep=40, nfilt=40, nfft=400,
                         lowfreq=0.0, highfreq=8000.0, preemph=0.0, ceplifter=0, window="hann")


def word_window_params() -> FeatureParams:
    """The word model's front end (EfficientWord-Net): 64 log mel filterbanks, 25 ms / 10 ms,
    NFFT 512, no pre-emphasis, of a 1.5 s window with the utterance centred in it."""
    return FeatureParams(kind="wordwin", winlen=0.025, winstep=0.01, numcep=64, nfilt=64, nfft=512,
                         lowfreq=0.0, highfreq=8000.0, preemph=0.0, ceplifter=0, window="rect")


def kaldi_fbank_params() -> FeatureParams:
    """CAM++'s front end (3D-Speaker; Kaldi's compute-fbank-feats defaults but 80 bins and no
    dither): 25 ms frames every 10 ms, DC removed and pre-emphasis 0.97 per frame, povey
    window, 512-point power spectrum, 80 mel bins from 20 Hz to Nyquist, log of samples in
    [-1, 1]."""
    return FeatureParams(kind="kaldifbank", winlen=0.025, winstep=0.01, numcep=80, nfilt=80, nfft=512,
                         lowfreq=20.0, highfreq=8000.0, preemph=0.97, ceplifter=0, window="povey")


@functools.lru_cache(maxsize=8)
def kaldi_mel_banks(sample_rate: int, nfft: int, nfilt: int, lowfreq: float, highfreq: float) -> np.ndarray:
    """(nfilt, nfft//2+1) triangular filters as Kaldi's MelBanks builds them: evenly spaced on
    the mel scale 1127 ln(1 + f/700), unnormalised peaks of 1, and zero on the Nyquist bin."""
    def mel(f):
        return 1127.0 * np.log(1.0 + np.asarray(f, np.float64) / 700.0)

    edges = mel(lowfreq) + (mel(highfreq) - mel(lowfreq)) / (nfilt + 1) * np.arange(nfilt + 2)
    left, centre, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    m = mel(np.arange(nfft // 2) * sample_rate / nfft)[None, :]
    weights = np.where(m <= centre, (m - left) / (centre - left), (right - m) / (right - centre))
    weights = np.where((m > left) & (m < right), weights, 0.0)
    return np.concatenate((weights, np.zeros((nfilt, 1))), axis=1)


# Kaldi floors the mel energies at float32's epsilon before the log.
KALDI_ENERGY_FLOOR = float(np.finfo(np.float32).eps)


def _kaldi_fbank(signal: np.ndarray, params: FeatureParams, n: int) -> np.ndarray:
    """Log mel filterbank of each frame as Kaldi computes it: the frame's DC removed, then
    pre-emphasis within the frame (its first sample against itself), window, power spectrum,
    mel banks, log. Samples are scaled to [-1, 1], as 3D-Speaker feeds torchaudio's Kaldi
    fbank: the energy floor then silences bands ~65 dB quieter than Kaldi's int16 scale does,
    and CAM++ was trained with those floors (mean subtraction cancels the scale, not them)."""
    frames = _frames(np.asarray(signal, np.float64) / 32768.0, params, n)
    frames = frames - frames.mean(axis=1, keepdims=True)
    frames = np.concatenate((frames[:, :1] * (1 - params.preemph), frames[:, 1:] - params.preemph * frames[:, :-1]),
                            axis=1)
    power = np.abs(np.fft.rfft(frames * _window_array(params), params.nfft)) ** 2
    fb = kaldi_mel_banks(params.sample_rate, params.nfft, params.nfilt, params.lowfreq, params.highfreq)
    return np.log(np.maximum(power @ fb.T, KALDI_ENERGY_FLOOR))


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney's mel scale (librosa's default): linear below 1 kHz, logarithmic above."""
    f = np.asarray(f, dtype=np.float64)
    return np.where(f >= 1000.0, 15.0 + np.log(np.maximum(f, 1e-9) / 1000.0) / (np.log(6.4) / 27.0), f / (200.0 / 3))


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    return np.where(m >= 15.0, 1000.0 * np.exp((np.log(6.4) / 27.0) * (m - 15.0)), m * 200.0 / 3)


@functools.lru_cache(maxsize=8)
def slaney_filterbank(sample_rate: int, nfft: int, nfilt: int, lowfreq: float, highfreq: float) -> np.ndarray:
    """(nfilt, nfft//2+1) area-normalised triangular mel filters, as librosa.filters.mel."""
    fft_hz = np.linspace(0, sample_rate / 2, 1 + nfft // 2)
    mel_hz = _mel_to_hz(np.linspace(_hz_to_mel(lowfreq), _hz_to_mel(highfreq), nfilt + 2))
    fdiff = np.diff(mel_hz)
    ramps = mel_hz[:, None] - fft_hz[None, :]
    weights = np.maximum(0, np.minimum(-ramps[:-2] / fdiff[:-1, None], ramps[2:] / fdiff[1:, None]))
    return weights * (2.0 / (mel_hz[2:] - mel_hz[:-2]))[:, None]


def _frames(signal: np.ndarray, params: FeatureParams, n: int) -> np.ndarray:
    idx = np.arange(params.frame_len)[None, :] + params.frame_step * np.arange(n)[:, None]
    return signal[idx]


def _melpower(signal: np.ndarray, params: FeatureParams, n: int) -> np.ndarray:
    """Mel power of each frame (samples scaled to [-1, 1]) plus the frame's mean square."""
    frames = _frames(np.asarray(signal, np.float64) / 32768.0, params, n)
    power = np.abs(np.fft.rfft(frames * _window_array(params), params.nfft)) ** 2
    fb = slaney_filterbank(params.sample_rate, params.nfft, params.nfilt, params.lowfreq, params.highfreq)
    return np.concatenate((power @ fb.T, np.mean(frames**2, axis=1, keepdims=True)), axis=1)


@functools.lru_cache(maxsize=8)
def _psf_filterbank(nfilt: int, nfft: int, sample_rate: int, lowfreq: float, highfreq: float) -> np.ndarray:
    return psf.get_filterbanks(nfilt, nfft, sample_rate, lowfreq, highfreq)


def _psf_mfcc(emphasised: np.ndarray, params: FeatureParams, n: int) -> np.ndarray:
    """``python_speech_features.mfcc`` (appendEnergy, no pre-emphasis) of the first ``n``
    frames, step for step, except that its filterbank is built once per setting, not on
    every call: on 20 ms of audio at a time, rebuilding it was most of the features' cost.
    tests/test_features.py checks the result equals python_speech_features' bit for bit."""
    p = params
    frames = _frames(np.asarray(emphasised, np.float64), p, n) * _window_array(p)
    pspec = 1.0 / p.nfft * np.square(np.absolute(np.fft.rfft(frames, p.nfft)))
    energy = np.sum(pspec, 1)
    energy = np.where(energy == 0, np.finfo(float).eps, energy)
    feat = np.dot(pspec, _psf_filterbank(p.nfilt, p.nfft, p.sample_rate, p.lowfreq, p.highfreq or p.sample_rate / 2).T)
    feat = np.where(feat == 0, np.finfo(float).eps, feat)
    feat = dct(np.log(feat), type=2, axis=1, norm="ortho")[:, : p.numcep]
    feat = psf.lifter(feat, p.ceplifter)
    feat[:, 0] = np.log(energy)
    return feat


def preemphasis(signal: np.ndarray, coeff: float, previous: float | None = None) -> np.ndarray:
    """y[n] = x[n] - coeff * x[n-1]; the first sample of a stream is kept as is."""
    x = np.asarray(signal, dtype=np.float64)
    y = np.empty_like(x)
    if len(x) == 0:
        return y
    y[0] = x[0] if previous is None else x[0] - coeff * previous
    y[1:] = x[1:] - coeff * x[:-1]
    return y


def features_of_emphasised(emphasised: np.ndarray, params: FeatureParams) -> np.ndarray:
    """Features of the whole frames of an already pre-emphasised signal: (frames, stored_dims)."""
    n = params.frames_in(len(emphasised))
    if n == 0:
        return np.zeros((0, params.stored_dims), dtype=np.float64)
    if params.kind == "melpower":
        return _melpower(emphasised, params, n)
    if params.kind == "kaldifbank":
        return _kaldi_fbank(emphasised, params, n)
    feats = _psf_mfcc(emphasised, params, n)
    feats[:, 0] = np.maximum(feats[:, 0], LOG_ENERGY_FLOOR)
    return feats


def feature_frames(signal: np.ndarray, params: FeatureParams) -> np.ndarray:
    """The front end's frames of a whole clip (int16 samples at params.sample_rate), before
    normalisation: MFCC, mel power, Kaldi fbank or the word window, as ``params.kind`` says."""
    if params.kind == "wordwin":
        return word_input(signal)[0]
    return features_of_emphasised(preemphasis(signal, params.signal_preemph), params)


def features_of_audio(signal: np.ndarray, params: FeatureParams) -> np.ndarray:
    """A whole utterance's normalised features, offline: what the models read."""
    return normalize(feature_frames(signal, params), params)


def normalize(feats: np.ndarray, params: FeatureParams | None = None) -> np.ndarray:
    """Per-utterance normalisation, as the models were trained: mean and variance for MFCC;
    for mel power, gain up to MEL_TARGET_DBFS (the energy column is used, then dropped); for
    Kaldi fbank, the mean only (3D-Speaker's per-utterance CMN); the word window as it is."""
    if params is not None and params.kind == "wordwin":
        return np.asarray(feats, np.float32)
    if params is not None and params.kind == "melpower":
        power, energy = feats[:, :-1], feats[:, -1]
        level = 10 * np.log10(max(float(np.mean(energy)) if len(energy) else 0.0, 1e-20))
        gain = 10 ** ((MEL_TARGET_DBFS - level) / 10) if level < MEL_TARGET_DBFS else 1.0
        return (power * gain).astype(np.float32)
    if len(feats) == 0:
        return feats.astype(np.float32)
    mean = feats.mean(axis=0, keepdims=True)
    if params is not None and params.kind == "kaldifbank":
        return (feats - mean).astype(np.float32)
    std = feats.std(axis=0, keepdims=True)
    return ((feats - mean) / np.maximum(std, 1e-3)).astype(np.float32)


class StreamingFeatures:
    """Computes each frame's MFCC once, as audio arrives, into a ring buffer of frames.

    Frame ``i`` (counted since the last reset) covers samples
    ``[i * frame_step, i * frame_step + frame_len)`` of the audio pushed since that reset,
    exactly as :func:`feature_frames` frames the same audio offline.
    """

    def __init__(self, params: FeatureParams, capacity_frames: int, chunk_samples: int = 0):
        if capacity_frames <= 0:
            raise ValueError("capacity_frames must be positive")
        self.params = params
        self.capacity = capacity_frames
        # Audio waits until this much is pending (or features are asked for): one numpy pass
        # per chunk instead of per 20 ms frame; the features are the same either way.
        self.chunk_samples = min(chunk_samples, capacity_frames * params.frame_step)
        self._ring = np.zeros((capacity_frames, params.stored_dims), dtype=np.float64)
        self.reset()

    def reset(self) -> None:
        self._pending: list[np.ndarray] = []  # emphasised samples not yet framed away
        self._pending_len = 0
        self._previous: float | None = None
        self._count = 0  # frames computed since reset

    def push(self, samples: np.ndarray) -> int:
        """Add audio; returns how many new frames were computed now."""
        if len(samples) == 0:
            return 0
        self._pending.append(preemphasis(samples, self.params.signal_preemph, self._previous))
        self._pending_len += len(samples)
        self._previous = float(samples[-1])
        return self._compute() if self._pending_len >= self.chunk_samples else 0

    def _compute(self) -> int:
        if self._pending_len < self.params.frame_len:
            return 0
        pending = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        feats = features_of_emphasised(pending, self.params)
        n = len(feats)
        rest = pending[n * self.params.frame_step :]
        self._pending, self._pending_len = [rest], len(rest)
        if n:
            self._store(feats)
        return n

    @property
    def num_frames(self) -> int:
        """Frames of the audio pushed since reset (computing what is pending)."""
        self._compute()
        return self._count

    def _store(self, feats: np.ndarray) -> None:
        if len(feats) > self.capacity:
            self._count += len(feats) - self.capacity
            feats = feats[-self.capacity :]
        idx = (self._count + np.arange(len(feats))) % self.capacity
        self._ring[idx] = feats
        self._count += len(feats)

    @property
    def oldest_frame(self) -> int:
        return max(0, self.num_frames - self.capacity)

    def frames(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Copy of frames [start, stop) counted since reset; must still be in the ring."""
        stop = self.num_frames if stop is None else min(stop, self.num_frames)
        if start < self.oldest_frame:
            raise IndexError(f"frame {start} has left the ring (oldest is {self.oldest_frame})")
        if stop <= start:
            return np.zeros((0, self.params.stored_dims), dtype=np.float64)
        idx = np.arange(start, stop) % self.capacity
        return self._ring[idx].copy()


# --------------------------------------------------------------------------- the word model's input

WINDOW = int(1.5 * SAMPLE_RATE)  # the word model reads 1.5 s, the utterance centred in it
FILTERS = 64
FRAMES = 149  # 25 ms windows every 10 ms in 1.5 s


def centred(audio: np.ndarray) -> np.ndarray:
    """The middle WINDOW samples of ``audio`` (all of it if shorter): what the word model reads."""
    start = max(0, (len(audio) - WINDOW) // 2)
    return audio[start : start + WINDOW]


def centred_window(audio: np.ndarray) -> np.ndarray:
    """``audio`` (int16) as float in [-1, 1], centred in WINDOW samples: cut or zero-padded."""
    x = audio.astype(np.float32) / 32768
    if len(x) >= WINDOW:
        start = (len(x) - WINDOW) // 2
        return x[start : start + WINDOW]
    pad = WINDOW - len(x)
    return np.pad(x, (pad // 2, pad - pad // 2))


def word_input(utterance: np.ndarray) -> np.ndarray:
    """The word model's input for one utterance's audio (the VAD's cut, int16): 64 log mel
    filterbanks (25 ms / 10 ms, NFFT 512, no pre-emphasis) of the centred 1.5 s window, as
    EfficientWord-Net computes them. Shape (1, FRAMES, FILTERS), float32."""
    f = psf.logfbank(centred_window(utterance), samplerate=SAMPLE_RATE, winlen=0.025, winstep=0.01,
                     nfilt=FILTERS, nfft=512, preemph=0.0)
    return f[None].astype(np.float32)
