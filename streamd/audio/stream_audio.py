"""Continuous audio as users send it, built from clips: words at a speech level with pauses
between them, over a microphone's noise floor, with noise of a kind at an SNR and a channel
effect (digital-silence dips, zero-filled lost frames, clipping, DC offset, telephone band,
reverberation). Pure signal processing, no I/O: ``streamd eval stream`` reads the clips.

Every word's reference span (where its speech is, in stream time) comes from the clip's own
energy, never from the VAD under test.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import signal

from streamd.audio.frames import SAMPLE_RATE

FULL_SCALE = 32768.0
ACTIVE_FRAME_S = 0.01
ACTIVE_RANGE_DB = 25.0  # a clip's frames within this of its loudest are its speech
MARGIN_S = 0.05  # of a clip's own audio kept around its speech


@dataclass(frozen=True)
class Word:
    """One clip of the held-out set: its audio and what was said, by whom."""

    audio: np.ndarray  # int16, 16 kHz
    corpus: str
    speaker: str
    digit: int | None  # None: a word that is not a digit


@dataclass(frozen=True)
class Placed:
    """A word in a stream: where its speech is (reference span, seconds of stream time)."""

    word: Word
    t_start: float
    t_end: float


@dataclass(frozen=True)
class Condition:
    """How one stream is built. ``noise_only_s`` > 0: no words, only that much background."""

    name: str
    group: str
    level_dbfs: float = -26.0  # every word's active speech level
    pause_s: tuple[float, float] = (0.3, 2.0)  # silence between words' reference spans, uniform
    floor_dbfs: float = -90.0  # the microphone's white-noise floor, everywhere
    noise: str | None = None  # white | pink | brown | babble | hum50 | hum60 | fan
    snr_db: float | None = None  # noise power against the speech level
    noise_dbfs: float | None = None  # or an absolute noise level (noise-only streams)
    effect: str | None = None  # dips | gaps | clipping | dc | telephone | reverb
    noise_only_s: float = 0.0

    def describe(self) -> str:
        parts = [f"speech {self.level_dbfs:g} dBFS" if not self.noise_only_s else f"{self.noise_only_s / 60:g} min noise only",
                 f"floor {self.floor_dbfs:g} dBFS"]
        if not self.noise_only_s:
            parts.append(f"pauses {self.pause_s[0]:g}-{self.pause_s[1]:g} s")
        if self.noise:
            parts.append(f"{self.noise} " + (f"at {self.snr_db:g} dB SNR" if self.snr_db is not None
                                             else f"at {self.noise_dbfs:g} dBFS"))
        if self.effect:
            parts.append(self.effect)
        return ", ".join(parts)


def standard_conditions(noise_only_s: float = 600.0) -> list[Condition]:
    """The conditions ``streamd eval stream`` reports, each apart (issue: streams as users have them)."""
    out = [Condition("clean", "clean")]
    out += [Condition(f"level_{lv:g}", "level", level_dbfs=lv) for lv in (-40.0, -30.0, -20.0, -10.0)]
    out += [Condition(f"pause_{p:g}", "pause", pause_s=(p, p)) for p in (0.3, 0.6, 1.0, 2.0)]
    out += [Condition(f"floor_{f:g}", "floor", floor_dbfs=f) for f in (-75.0, -65.0, -55.0, -45.0)]
    out += [Condition(f"{n}_{s:g}db", "noise", noise=n, snr_db=s)
            for n in NOISES for s in (20.0, 10.0, 5.0, 0.0)]
    out += [Condition(e, "channel", effect=e) for e in EFFECTS]
    if noise_only_s > 0:
        out += [Condition(f"noise_only_floor_{f:g}", "noise_only", floor_dbfs=f, noise_only_s=noise_only_s)
                for f in (-75.0, -65.0, -55.0, -45.0)]
        # Each noise type as loud as it is at 10 dB SNR under -26 dBFS speech.
        out += [Condition(f"noise_only_{n}", "noise_only", noise=n, noise_dbfs=-36.0, noise_only_s=noise_only_s)
                for n in NOISES]
        out += [Condition("noise_only_dips", "noise_only", floor_dbfs=-55.0, effect="dips",
                          noise_only_s=noise_only_s)]
    return out


def dbfs_to_rms(dbfs: float) -> float:
    return FULL_SCALE * 10 ** (dbfs / 20)


def active_frames(audio: np.ndarray) -> np.ndarray:
    """Per 10 ms frame of a clip: whether it is speech (within ACTIVE_RANGE_DB of the loudest)."""
    n = int(ACTIVE_FRAME_S * SAMPLE_RATE)
    frames = audio[: len(audio) // n * n].astype(np.float64).reshape(-1, n)
    power = np.mean(frames**2, axis=1) + 1e-9
    level = 10 * np.log10(power)
    return level >= level.max() - ACTIVE_RANGE_DB


def speech_span(audio: np.ndarray) -> tuple[int, int, float]:
    """Sample range of a clip's speech and its mean power there."""
    n = int(ACTIVE_FRAME_S * SAMPLE_RATE)
    active = active_frames(audio)
    idx = np.flatnonzero(active)
    if len(idx) == 0:
        return 0, len(audio), 0.0
    a, b = idx[0] * n, (idx[-1] + 1) * n
    frames = audio[: len(active) * n].astype(np.float64).reshape(-1, n)[active]
    return a, b, float(np.mean(frames**2))


# --- noises, each of unit power -------------------------------------------------------------

def _unit(x: np.ndarray) -> np.ndarray:
    return x / max(float(np.sqrt(np.mean(x**2))), 1e-12)


def white(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal(n)


def pink(n: int, rng: np.random.Generator) -> np.ndarray:
    spectrum = np.fft.rfft(rng.standard_normal(n))
    spectrum /= np.sqrt(np.maximum(np.arange(len(spectrum)), 1))
    return _unit(np.fft.irfft(spectrum, n))


def brown(n: int, rng: np.random.Generator) -> np.ndarray:
    """1/f^2 noise, high-passed at 20 Hz so it does not wander off."""
    b, a = signal.butter(1, 20, "highpass", fs=SAMPLE_RATE)
    return _unit(signal.lfilter(b, a, np.cumsum(rng.standard_normal(n))))


def hum(n: int, rng: np.random.Generator, mains: float = 50.0) -> np.ndarray:
    """Mains hum: the fundamental and odd and even harmonics up to 1 kHz, falling off."""
    t = np.arange(n) / SAMPLE_RATE
    out = np.zeros(n)
    for k in range(1, int(1000 // mains) + 1):
        out += np.sin(2 * np.pi * mains * k * t + rng.uniform(0, 2 * np.pi)) / k
    return _unit(out)


def fan(n: int, rng: np.random.Generator) -> np.ndarray:
    """A fan: broadband noise in a 100-2000 Hz band with a blade tone and slow wobble."""
    b, a = signal.butter(2, (100, 2000), "bandpass", fs=SAMPLE_RATE)
    band = _unit(signal.lfilter(b, a, rng.standard_normal(n)))
    t = np.arange(n) / SAMPLE_RATE
    tone = 0.3 * np.sin(2 * np.pi * 120 * t)
    wobble = 1 + 0.2 * np.sin(2 * np.pi * 0.5 * t)
    return _unit((band + tone) * wobble)


def babble(n: int, rng: np.random.Generator, talkers: list[np.ndarray], voices: int = 6) -> np.ndarray:
    """Several other speakers talking at once, each looped from a random place."""
    if not talkers:
        raise ValueError("babble needs recordings of other speakers")
    out = np.zeros(n)
    for _ in range(voices):
        src = talkers[rng.integers(len(talkers))].astype(np.float64)
        start = int(rng.integers(len(src)))
        reps = int(np.ceil((start + n) / len(src)))
        out += _unit(np.tile(src, reps)[start : start + n])
    return _unit(out)


NOISES = ("white", "pink", "brown", "babble", "hum50", "hum60", "fan")
EFFECTS = ("dips", "gaps", "clipping", "dc", "telephone", "reverb")


def noise(kind: str, n: int, rng: np.random.Generator, talkers: list[np.ndarray]) -> np.ndarray:
    if kind == "babble":
        return babble(n, rng, talkers)
    if kind.startswith("hum"):
        return hum(n, rng, float(kind[3:]))
    return {"white": white, "pink": pink, "brown": brown, "fan": fan}[kind](n, rng)


# --- channel effects on the whole stream (float, full scale 32768) -------------------------

def reverb(x: np.ndarray, rng: np.random.Generator, rt60_s: float = 0.5) -> np.ndarray:
    """A room: the direct sound plus exponentially decaying diffuse reflections."""
    t = np.arange(int(rt60_s * SAMPLE_RATE)) / SAMPLE_RATE
    tail = rng.standard_normal(len(t)) * np.exp(-6.9 * t / rt60_s)
    tail[: int(0.005 * SAMPLE_RATE)] = 0  # first reflections after 5 ms
    rir = np.concatenate(([1.0], 0.3 * tail / np.sqrt(np.sum(tail**2))))
    return signal.fftconvolve(x, rir)[: len(x)]


def telephone(x: np.ndarray) -> np.ndarray:
    """A narrowband phone call: 300-3400 Hz at 8 kHz, G.711 mu-law, back to 16 kHz."""
    import soxr

    b, a = signal.butter(4, (300, 3400), "bandpass", fs=SAMPLE_RATE)
    narrow = soxr.resample(signal.lfilter(b, a, x) / FULL_SCALE, SAMPLE_RATE, 8000)
    mu = 255.0
    coded = np.sign(narrow) * np.log1p(mu * np.minimum(np.abs(narrow), 1)) / np.log1p(mu)
    coded = np.round(coded * 127) / 127  # 8 bits
    decoded = np.sign(coded) * np.expm1(np.abs(coded) * np.log1p(mu)) / mu
    return soxr.resample(decoded, 8000, SAMPLE_RATE)[: len(x)] * FULL_SCALE


def zero_gaps(x: np.ndarray, rng: np.random.Generator, loss: float = 0.02, frame_s: float = 0.02) -> np.ndarray:
    """Lost network frames filled with zeros, anywhere (inside words too), in bursts of 1-3."""
    n = int(frame_s * SAMPLE_RATE)
    out = x.copy()
    frames = len(x) // n
    for start in np.flatnonzero(rng.random(frames) < loss / 2):
        out[start * n : (start + int(rng.integers(1, 4))) * n] = 0
    return out


@dataclass
class Built:
    audio: np.ndarray  # int16
    words: list[Placed] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return len(self.audio) / SAMPLE_RATE

    def speech_seconds(self) -> float:
        return sum(p.t_end - p.t_start for p in self.words)


def build(cond: Condition, words: list[Word], rng: np.random.Generator, talkers: list[np.ndarray]) -> Built:
    """The stream for one condition: ``words`` in order (none for a noise-only condition)."""
    speech, placed, dips = _lay_out(cond, words, rng)
    x = speech
    if cond.effect == "reverb":
        x = reverb(x, rng)
    if cond.floor_dbfs > -120:
        x = x + white(len(x), rng) * dbfs_to_rms(cond.floor_dbfs)
    if cond.noise is not None:
        level = cond.noise_dbfs if cond.noise_dbfs is not None else cond.level_dbfs - (cond.snr_db or 0.0)
        x = x + noise(cond.noise, len(x), rng, talkers) * dbfs_to_rms(level)
    x = _channel(cond.effect, x, rng, dips)
    return Built(np.clip(np.round(x), -32768, 32767).astype(np.int16), placed)


def _lay_out(cond: Condition, words: list[Word], rng: np.random.Generator):
    """Words scaled to the speech level with pauses between their speech; digital-silence
    dips (0.3 s of zeros) placed inside pauses long enough to hold one with room around."""
    if cond.noise_only_s > 0:
        n = int(cond.noise_only_s * SAMPLE_RATE)
        dips = [(s, s + int(0.3 * SAMPLE_RATE)) for s in range(SAMPLE_RATE, n - SAMPLE_RATE, 3 * SAMPLE_RATE)]
        return np.zeros(n), [], dips
    pieces, placed, dips = [np.zeros(int(0.5 * SAMPLE_RATE))], [], []
    pos = len(pieces[0])
    margin = int(MARGIN_S * SAMPLE_RATE)
    for w in words:
        a, b, power = speech_span(w.audio)
        a0, b0 = max(0, a - margin), min(len(w.audio), b + margin)  # the clip's own background, trimmed
        gain = dbfs_to_rms(cond.level_dbfs) / max(np.sqrt(power), 1e-9)
        clip = w.audio[a0:b0].astype(np.float64) * gain
        pause = int(rng.uniform(*cond.pause_s) * SAMPLE_RATE)
        # The silence between two words' speech: the pause less the clips' own margins.
        lead = max(0, pause - (a - a0) - (placed[-1][1] if placed else 0))
        if lead >= int(0.5 * SAMPLE_RATE):
            mid = pos + lead // 2
            dips.append((mid - int(0.15 * SAMPLE_RATE), mid + int(0.15 * SAMPLE_RATE)))
        pieces.append(np.zeros(lead))
        pos += lead
        placed.append((Placed(w, (pos + a - a0) / SAMPLE_RATE, (pos + b - a0) / SAMPLE_RATE), b0 - b))
        pieces.append(clip)
        pos += len(clip)
    pieces.append(np.zeros(SAMPLE_RATE))
    return np.concatenate(pieces), [p for p, _ in placed], dips


def _channel(effect: str | None, x: np.ndarray, rng: np.random.Generator, dips) -> np.ndarray:
    if effect == "dips":
        x = x.copy()
        for a, b in dips:
            x[a:b] = 0
        return x
    if effect == "gaps":
        return zero_gaps(x, rng)
    if effect == "clipping":
        return np.clip(x * 10 ** (14 / 20), -0.5 * FULL_SCALE, 0.5 * FULL_SCALE)  # +14 dB into a hard limit
    if effect == "dc":
        return x + 0.05 * FULL_SCALE
    if effect == "telephone":
        return telephone(x)
    return x
