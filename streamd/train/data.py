"""Training data: manifests, the fixed speaker-disjoint split, synthetic speech, augmentation
and a feature cache.

Every feature matrix is made by :func:`clip_features`, which runs the daemon's own VAD cut
(:func:`streamd.signal.vad.heard_utterance`) and MFCC (:func:`streamd.signal.features.features_of_audio`)
on the (augmented) waveform, so training sees exactly what the daemon will compute. A clean
clip is cut as a clip (padded with digital silence); every other version is a word inside
continuous audio (:func:`in_stream`: context before and after, a microphone's floor, now and
then a dip of zeros) and is cut by the segmenter as a live stream is, gated from its first
frame: that is what the daemon hands the models from a microphone.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import math
import multiprocessing as mp
import os
import subprocess
import tempfile
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy import signal

from streamd.signal.features import SAMPLE_RATE, FeatureParams, mel_params, word_window_params, features_of_audio
from streamd.audio.stream_audio import fan, hum
from streamd.signal.vad import VadParams, heard_utterance

WORK_DIR = Path(os.environ.get("STREAMD_TRAIN_WORK", "/tmp/train_work"))
AUG_VERSION = 8  # bump when augmentation or synthesis changes: invalidates the cache

NOT_DIGIT = 10
CLASSES = [str(d) for d in range(10)] + ["not_digit"]
FSDD_HELDOUT = ("theo",)
ASC_HELDOUT_SPLIT = "val"
# Validation speakers, out of both digit models' training: the late-fusion layer and the
# rejection threshold are fitted on them (every fifth ASC 'train' speaker from the third, and
# the synthetic voices after the first SYNTH_TRAIN_VOICES). Test speakers stay untouched.
ASC_VALIDATION = ("00000006", "00000016", "00000022", "00000030")
SYNTH_TRAIN_VOICES = 80
SYNTH_VALIDATION_VOICES = 10
LICENCES = {"fsdd": "CC BY-SA 4.0", "asc": "CC BY 4.0"}
CORPUS_DIRS = {"fsdd": "fsdd", "asc": "arabic-speech-commands"}


@dataclass(frozen=True)
class Clip:
    path: str  # a 16 kHz mono file (under --data as given)
    corpus: str  # fsdd | asc | synth
    speaker: str  # corpus-qualified, e.g. "fsdd/jackson"
    label: int  # 0-9 digit value, 10 = not a digit
    heldout: bool
    word: str


# --------------------------------------------------------------------------- manifests


def _rows(manifest: Path) -> list[dict[str, str]]:
    with manifest.open(newline="") as f:
        return list(csv.DictReader(f))


def read_fsdd(data_dir: Path) -> list[Clip]:
    root = data_dir / CORPUS_DIRS["fsdd"]
    return [
        Clip(str(root / r["path"]), "fsdd", f"fsdd/{r['speaker']}", int(r["digit"]),
             r["speaker"] in FSDD_HELDOUT, r["digit"])
        for r in _rows(root / "manifest.csv")
    ]


def read_asc(data_dir: Path) -> list[Clip]:
    root = data_dir / CORPUS_DIRS["asc"]
    return [
        Clip(str(root / r["path"]), "asc", f"asc/{r['speaker']}",
             int(r["digit"]) if r["digit"] != "" else NOT_DIGIT,
             r["split"] == ASC_HELDOUT_SPLIT, r["label"])
        for r in _rows(root / "manifest.csv")
    ]


def real_clips(data_dir: Path) -> list[Clip]:
    return read_fsdd(data_dir) + read_asc(data_dir)


def speakers(clips: list[Clip], heldout: bool) -> list[str]:
    return sorted({c.speaker for c in clips if c.heldout == heldout})


def is_validation(clip: Clip) -> bool:
    """A digit-validation speaker (see ASC_VALIDATION): neither trained on nor tested on."""
    return clip.speaker in _validation_speakers()


@functools.cache
def _validation_speakers() -> frozenset[str]:
    return frozenset([f"asc/{s}" for s in ASC_VALIDATION] + [f"synth/{v.name}" for v in validation_voices()])


def validation_voices() -> list[SynthVoice]:
    """The synthetic validation voices: the same for every training seed, so models trained
    with different seeds can be fused and compared on one validation set."""
    return synth_voices(SYNTH_TRAIN_VOICES + SYNTH_VALIDATION_VOICES, 0)[SYNTH_TRAIN_VOICES:]


def digit_training_voices(seed: int) -> list[SynthVoice]:
    """``SYNTH_TRAIN_VOICES`` voices drawn with ``seed``, skipping any with a validation voice's
    espeak-ng voice and variant (the same voice at another speed or pitch would leak it into
    training). Seed 0 draws none of them, so its voices are synth_voices' first 80."""
    taken = {(v.voice, v.variant) for v in validation_voices()}
    pool = [v for v in synth_voices(4 * SYNTH_TRAIN_VOICES, seed) if (v.voice, v.variant) not in taken]
    return pool[:SYNTH_TRAIN_VOICES]


# --------------------------------------------------------------------------- synthetic speech

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
NON_DIGIT_WORDS = (
    "ten", "eleven", "twelve", "twenty", "thirty", "hundred", "thousand", "million", "number",
    "yes", "no", "stop", "go", "left", "right", "up", "down", "on", "off", "open", "close",
    "hello", "goodbye", "computer", "house", "water", "table", "music", "happy", "tree", "bird",
    "cat", "dog", "red", "green", "blue", "yellow", "start", "weather", "morning", "evening",
    "later", "sheep", "wow", "learn", "follow", "forward", "backward", "bed", "window", "phone",
    "light", "cancel", "enter", "next", "previous", "send", "record", "again", "please", "thanks",
    "okay", "maybe", "never", "zebra", "heaven", "fine", "night", "tea", "free", "door", "sticks",
    "sun", "fever", "weight", "dive", "hero", "nice", "heavy", "alpha", "bravo", "delta",
)
# espeak-ng's Arabic voice reads the numerals 0-9 as the Arabic digit words (sifr, wahid, ...);
# other words need their vowels written (tashkeel) to be pronounced. Words that sound like a digit
# (sifr "book", safar "travel") are left out: taught as "not a digit", they would teach the
# models to reject zeros.
ARABIC_DIGITS = tuple(str(d) for d in range(10))
ARABIC_NON_DIGIT_WORDS = (  # (name, text)
    ("ashara", "10"), ("ahada-ashar", "11"), ("ithna-ashar", "12"), ("ishrun", "20"),
    ("thalathun", "30"), ("mia", "100"), ("alf", "1000"), ("naam", "نَعَم"), ("la", "لَا"),
    ("iftah", "اِفْتَحْ"), ("aghliq", "أَغْلِقْ"), ("yamin", "يَمِين"), ("yasar", "يَسَار"),
    ("fawq", "فَوْق"), ("taht", "تَحْت"), ("ibda", "اِبْدَأْ"), ("qif", "قِفْ"), ("ilgha", "إِلْغَاء"),
    ("arsil", "أَرْسِلْ"), ("sajjil", "سَجِّلْ"), ("attali", "التَّالِي"), ("assabiq", "السَّابِق"),
    ("raqm", "رَقْم"), ("marhaban", "مَرْحَبًا"), ("shukran", "شُكْرًا"), ("bab", "بَاب"),
    ("kitab", "كِتَاب"), ("sayyara", "سَيَّارَة"), ("qalam", "قَلَم"), ("shams", "شَمْس"),
    ("qamar", "قَمَر"), ("ahmar", "أَحْمَر"), ("azraq", "أَزْرَق"), ("sabah", "صَبَاح"),
    ("masa", "مَسَاء"),
)
ARABIC_SYNTH_VOICES = 40
ESPEAK_VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp",
                 "en-gb-x-gbcwmd", "en-029", "en-us-nyc")
ESPEAK_VARIANTS = tuple(f"m{i}" for i in range(1, 9)) + tuple(f"f{i}" for i in range(1, 6)) + (
    "croak", "whisper", "whisperf", "klatt", "klatt2", "klatt3", "klatt4", "Andy", "Annie",
    "Denis", "Gene", "Lee", "Mike", "adam", "anika", "aunty", "belinda", "benjamin", "boris",
    "caleb", "david", "edward", "grandma", "grandpa", "iven", "john", "linda", "max", "michel",
    "norbert", "paul", "quincy", "rob", "robert", "steph", "travis", "victor",
)


@dataclass(frozen=True)
class SynthVoice:
    voice: str
    variant: str
    speed: int  # words per minute
    pitch: int  # 0-99

    @property
    def name(self) -> str:
        return f"{self.voice}+{self.variant}-s{self.speed}-p{self.pitch}"

    def command(self, word: str, wav: str) -> list[str]:
        return ["espeak-ng", "-v", f"{self.voice}+{self.variant}", "-s", str(self.speed),
                "-p", str(self.pitch), "-w", wav, word]


def synth_voices(n: int, seed: int) -> list[SynthVoice]:
    rng = np.random.default_rng([seed, 7])
    return [
        SynthVoice(str(rng.choice(ESPEAK_VOICES)), str(rng.choice(ESPEAK_VARIANTS)),
                   int(rng.integers(110, 200)), int(rng.integers(15, 85)))
        for _ in range(n)
    ]


# flite's voices (Debian package flite), each built from one real speaker's recordings: unlike
# espeak-ng's formant voices they carry a human voice's spectrum. Variants stretch the duration
# and move the mean pitch around the voice's own (Hz).
FLITE_VOICES = {"awb": 105, "kal": 100, "kal16": 100, "rms": 100, "slt": 170}
FLITE_VARIANTS = 8


@dataclass(frozen=True)
class FliteVoice:
    voice: str
    stretch: float  # duration_stretch: > 1 speaks slower
    f0: int  # int_f0_target_mean, Hz

    @property
    def name(self) -> str:
        return f"flite-{self.voice}-d{self.stretch:.2f}-f{self.f0}"

    def command(self, word: str, wav: str) -> list[str]:
        return ["flite", "-voice", self.voice, "--setf", f"duration_stretch={self.stretch}",
                "--setf", f"int_f0_target_mean={self.f0}", "-t", word, "-o", wav]


def flite_voices(per_voice: int = FLITE_VARIANTS, seed: int = 0) -> list[FliteVoice]:
    rng = np.random.default_rng([seed, 13])
    return [FliteVoice(voice, round(float(rng.uniform(0.8, 1.3)), 2), int(f0 * rng.uniform(0.8, 1.3)))
            for voice, f0 in FLITE_VOICES.items() for _ in range(per_voice)]


def synthesize(voice: SynthVoice | FliteVoice, word: str, out: Path) -> None:
    """Speak ``word`` with espeak-ng or flite and store it as 16 kHz int16 FLAC."""
    with tempfile.NamedTemporaryFile(suffix=".wav") as tmp:
        subprocess.run(voice.command(word, tmp.name), check=True, capture_output=True)
        x, sr = sf.read(tmp.name, dtype="float64")
    g = math.gcd(SAMPLE_RATE, sr)
    y = x if sr == SAMPLE_RATE else signal.resample_poly(x, SAMPLE_RATE // g, sr // g)
    out.parent.mkdir(parents=True, exist_ok=True)
    sf.write(out, np.clip(y * 32767, -32768, 32767).astype(np.int16), SAMPLE_RATE, subtype="PCM_16")


def synth_clips(n_voices: int = SYNTH_TRAIN_VOICES, words_per_voice: int = 24, seed: int = 0,
                voices: list[SynthVoice] | None = None) -> list[Clip]:
    """English digits and non-digit words in ``n_voices`` espeak-ng voices drawn with ``seed``
    (or in ``voices``)."""
    return _spoken(voices or synth_voices(n_voices, seed), np.random.default_rng([seed, 11]), words_per_voice)


def arabic_synth_voices(n: int = ARABIC_SYNTH_VOICES, seed: int = 0) -> list[SynthVoice]:
    """espeak-ng's Arabic voice in ``n`` variants, speeds and pitches drawn with ``seed``."""
    rng = np.random.default_rng([seed, 19])
    return [SynthVoice("ar", str(rng.choice(ESPEAK_VARIANTS)), int(rng.integers(110, 200)), int(rng.integers(15, 85)))
            for _ in range(n)]


def arabic_synth_clips(seed: int = 0, words_per_voice: int = 24) -> list[Clip]:
    """Arabic digits and non-digit words in espeak-ng's Arabic voice (training only)."""
    return _spoken(arabic_synth_voices(seed=seed), np.random.default_rng([seed, 23]), words_per_voice,
                   ARABIC_DIGITS, ARABIC_NON_DIGIT_WORDS)


def flite_clips(seed: int = 0, words_per_voice: int = 24) -> list[Clip]:
    """English digits and non-digit words in flite's voices (training only)."""
    return _spoken(flite_voices(seed=seed), np.random.default_rng([seed, 17]), words_per_voice)


def _spoken(voices: list, rng: np.random.Generator, words_per_voice: int, digit_texts: tuple[str, ...] = DIGIT_WORDS,
            others: tuple[tuple[str, str], ...] = tuple((w, w) for w in NON_DIGIT_WORDS)) -> list[Clip]:
    """Each voice says the ten digits (``digit_texts``: what is typed for 0-9) and
    ``words_per_voice`` of ``others`` ((name, text) pairs), as clips named by the words' names."""
    root = WORK_DIR / "synth"
    clips = []
    for voice in voices:
        chosen = rng.choice(len(others), size=words_per_voice, replace=False)
        words = [(DIGIT_WORDS[d], text, d) for d, text in enumerate(digit_texts)]
        words += [(*others[i], NOT_DIGIT) for i in chosen]
        for word, text, label in words:
            path = root / voice.name / f"{word}.flac"
            if not path.exists():
                synthesize(voice, text, path)
            clips.append(Clip(str(path), "synth", f"synth/{voice.name}", label, False, word))
    return clips


# --------------------------------------------------------------------------- augmentation


@dataclass(frozen=True)
class Variant:
    index: int
    speed: float  # speed perturbation factor (0.9 = slower and lower)
    augment: bool  # noise, gain, reverb, band limit
    stream: bool = False  # inside continuous audio (in_stream), cut as the live VAD cuts it


CLEAN = Variant(0, 1.0, False)
TRAIN_VARIANTS = (CLEAN, Variant(1, 1.0, True, True), Variant(2, 1.0, True, True), Variant(3, 0.9, True, True),
                  Variant(4, 0.9, True, True), Variant(5, 1.1, True, True), Variant(6, 1.1, True, True))
SYNTH_VARIANTS = (CLEAN, Variant(1, 1.0, True, True), Variant(3, 0.9, True, True), Variant(5, 1.1, True, True))
# The validation speakers' words as clips and as the live VAD cuts them out of a clean stream:
# the fusion and its rejection are fitted on both.
STREAMED = Variant(7, 1.0, False, True)
VALIDATION_VARIANTS = (CLEAN, STREAMED)
# In continuous audio: context before and after the word (the floor trackers and webrtcvad
# settle on it, the hangover runs out in it), a microphone floor this far under the speech.
CONTEXT_BEFORE_S = (0.6, 1.5)
CONTEXT_AFTER_S = (0.4, 1.0)
FLOOR_BELOW_SPEECH_DB = (20.0, 70.0)
AUGMENTATION_TEXT = (
    "speed perturbation 0.9/1.1 (resampling; a new speaker class for the speaker model); "
    "vocal-tract length perturbation (p=0.3, spectral warp 0.9-1.1 at constant duration); "
    "simulated reverb (p=0.3, RT60 0.15-0.6 s); channel (p=0.5): telephone (300-3400 Hz, 8 kHz, "
    "8-bit mu-law) one time in three, else low-pass at 3.9 kHz for ASC and synthetic clips (FSDD "
    "is 8 kHz material); inside continuous audio: 0.6-1.5 s of context before the word and "
    "0.4-1.0 s after; noise (p=0.8) over all of it at 5-30 dB SNR: babble of 3-7 training-speaker "
    "clips (p=0.3), 50/60 Hz hum (p=0.1), a fan (p=0.1) or white/pink/brown; gain -18..+6 dB; a "
    "white or pink microphone floor 20-70 dB under the speech; a 0.1-0.4 s dip of digital silence "
    "in the context before (p=0.15); cut by the live segmenter, gated from the first frame, as a "
    "stream is; every clip also kept clean (cut as a clip, in digital silence); 7 versions per "
    "real training clip, 4 per synthetic clip"
)
_LOWPASS = signal.butter(10, 3900, fs=SAMPLE_RATE, output="sos")
_TELEPHONE = signal.butter(6, (300, 3400), btype="bandpass", fs=SAMPLE_RATE, output="sos")
BABBLE_SECONDS = 120


def speed_perturb(x: np.ndarray, speed: float) -> np.ndarray:
    if speed == 1.0:
        return x
    up, down = 10, int(round(10 * speed))
    return signal.resample_poly(x, up, down)


def vtlp(x: np.ndarray, alpha: float) -> np.ndarray:
    """Vocal-tract length perturbation: the spectrum of each 32 ms frame stretched by ``alpha``
    along frequency (formants and pitch move, duration stays). A phase vocoder: each output
    bin turns at ``alpha`` times its source bin's instantaneous frequency, so partials stay
    coherent from frame to frame."""
    if alpha == 1.0:
        return np.asarray(x, np.float64).copy()
    n, hop = 512, 256
    _, _, spec = signal.stft(x, fs=SAMPLE_RATE, nperseg=n, noverlap=n - hop)
    bins = np.arange(spec.shape[0], dtype=np.float64)
    source = np.clip(bins / alpha, 0, bins[-1])
    mag = np.stack([np.interp(source, bins, col) for col in np.abs(spec).T], axis=1)
    phase = np.angle(spec)
    expected = 2 * np.pi * bins * hop / n
    drift = np.diff(phase, axis=1) - expected[:, None]
    advance = expected[:, None] + (drift + np.pi) % (2 * np.pi) - np.pi  # per hop, unwrapped
    nearest = np.round(source).astype(int)
    out = np.empty_like(phase)
    out[:, 0] = phase[nearest, 0]
    for t in range(1, phase.shape[1]):
        out[:, t] = out[:, t - 1] + alpha * advance[nearest, t - 1]
    _, y = signal.istft(mag * np.exp(1j * out), fs=SAMPLE_RATE, nperseg=n, noverlap=n - hop)
    return y[: len(x)]


def telephone(x: np.ndarray) -> np.ndarray:
    """A narrow-band phone line: 300-3400 Hz, 8 kHz sampling, 8-bit mu-law."""
    y = signal.resample_poly(signal.sosfilt(_TELEPHONE, x), 1, 2)
    peak = max(float(np.abs(y).max()), 1e-9)
    mu = np.sign(y / peak) * np.log1p(255 * np.abs(y / peak)) / np.log1p(255)
    mu = np.round(mu * 127) / 127
    y = np.sign(mu) * np.expm1(np.abs(mu) * np.log1p(255)) / 255 * peak
    return signal.resample_poly(y, 2, 1)[: len(x)]


def speech_power(x: np.ndarray) -> float:
    """Mean power of the louder half of 20 ms frames (the speech, not the pauses)."""
    n = len(x) // 320
    if n == 0:
        return float(np.mean(x**2) + 1e-9)
    e = np.sort(np.mean(x[: n * 320].reshape(n, 320) ** 2, axis=1))
    return float(np.mean(e[n // 2 :]) + 1e-9)


def colored_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    return colored_noise_of(n, rng, float(rng.choice([0.0, 0.5, 1.0])))  # white, pink, brown


def colored_noise_of(n: int, rng: np.random.Generator, slope: float) -> np.ndarray:
    """Unit-variance noise whose amplitude falls as 1 / f ** slope."""
    white = rng.standard_normal(n)
    if slope == 0.0:
        return white
    spec = np.fft.rfft(white) / np.arange(1, n // 2 + 2) ** slope
    noise = np.fft.irfft(spec, n)
    return noise / (noise.std() + 1e-12)


def reverb(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    rt60 = rng.uniform(0.15, 0.6)
    t = np.arange(int(rt60 * SAMPLE_RATE)) / SAMPLE_RATE
    rir = rng.standard_normal(len(t)) * np.exp(-6.9 * t / rt60) * rng.uniform(0.05, 0.3)
    rir[0] = 1.0
    y = signal.fftconvolve(x, rir)[: len(x)]
    return y * np.sqrt(speech_power(x) / speech_power(y))


def peaking_eq(f0: float, gain_db: float, q: float) -> tuple[np.ndarray, np.ndarray]:
    """A peaking equaliser biquad (b, a) at ``f0`` Hz (RBJ audio EQ cookbook)."""
    amp, w = 10 ** (gain_db / 40), 2 * np.pi * f0 / SAMPLE_RATE
    alpha = np.sin(w) / (2 * q)
    b = np.array([1 + alpha * amp, -2 * np.cos(w), 1 - alpha * amp])
    a = np.array([1 + alpha / amp, -2 * np.cos(w), 1 - alpha / amp])
    return b / a[0], a / a[0]


def random_channel(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The same speech through another microphone and room: three random peaking EQs
    (150-6000 Hz, +-9 dB), reverb one time in 2.5, a phone line one time in 4; the speech
    power kept. int16 in, int16 out."""
    y = x.astype(np.float64)
    for _ in range(3):
        y = signal.lfilter(*peaking_eq(rng.uniform(150, 6000), rng.uniform(-9, 9), rng.uniform(0.5, 2)), y)
    if rng.random() < 0.4:
        y = reverb(y, rng)
    if rng.random() < 0.25:
        y = telephone(y)
    return to_int16(y * np.sqrt(speech_power(x.astype(np.float64)) / speech_power(y)))


def babble_path(seed: int) -> Path:
    return WORK_DIR / f"babble-v{AUG_VERSION}-{seed}.npy"


def build_babble(data_dir: Path, seed: int = 0) -> None:
    """BABBLE_SECONDS of babble: each second a sum of 3-7 random training-speaker clips, each
    scaled to unit speech power, from the real training corpora only (never validation or
    test speakers); stored beside the features for the augmentation workers."""
    path = babble_path(seed)
    if path.exists():
        return
    clips = [c for c in real_clips(data_dir) if not c.heldout and not is_validation(c)]
    rng = np.random.default_rng([seed, 13])
    bank = np.zeros(BABBLE_SECONDS * SAMPLE_RATE)
    for start in range(0, len(bank), SAMPLE_RATE):
        voices = int(rng.integers(3, 8))
        for k in rng.choice(len(clips), size=voices, replace=voices > len(clips)):
            x, _ = sf.read(clips[k].path, dtype="float64")
            x = x[:SAMPLE_RATE] / np.sqrt(speech_power(x))
            seg = bank[start + int(rng.integers(0, SAMPLE_RATE // 2)) :][: len(x)]
            seg += x[: len(seg)]
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, (bank / (bank.std() + 1e-12)).astype(np.float32))


@functools.lru_cache(maxsize=2)
def babble_bank(seed: int) -> np.ndarray | None:
    path = babble_path(seed)
    return np.load(path, allow_pickle=False).astype(np.float64) if path.exists() else None


def noise(n: int, rng: np.random.Generator, babble: np.ndarray | None) -> np.ndarray:
    kind = rng.random()
    if babble is not None and len(babble) > n and kind < 0.3:
        at = int(rng.integers(0, len(babble) - n))
        return babble[at : at + n]
    if kind < 0.4:
        return hum(n, rng, float(rng.choice([50.0, 60.0])))
    if kind < 0.5:
        return fan(n, rng)
    return colored_noise(n, rng)


def context(rng: np.random.Generator) -> tuple[int, int]:
    """Samples of continuous audio before and after a word."""
    return (int(rng.uniform(*CONTEXT_BEFORE_S) * SAMPLE_RATE), int(rng.uniform(*CONTEXT_AFTER_S) * SAMPLE_RATE))


def in_stream(x: np.ndarray, lead: int, power: float, rng: np.random.Generator) -> np.ndarray:
    """``x`` (a word after ``lead`` samples of context) as a microphone gives it: a white or
    pink floor ``FLOOR_BELOW_SPEECH_DB`` under the speech's ``power``, and one time in seven
    a dip of digital silence in the context before the word."""
    floor = rng.standard_normal(len(x)) if rng.random() < 0.5 else colored_noise_of(len(x), rng, 0.5)
    x = x + floor * np.sqrt(power / 10 ** (rng.uniform(*FLOOR_BELOW_SPEECH_DB) / 10))
    if rng.random() < 0.15 and lead > int(0.5 * SAMPLE_RATE):
        width = int(rng.uniform(0.1, 0.4) * SAMPLE_RATE)
        at = int(rng.integers(0, lead - width - int(0.1 * SAMPLE_RATE)))
        x[at : at + width] = 0.0
    return x


def augment(x: np.ndarray, rng: np.random.Generator, band_limit: bool,
            babble: np.ndarray | None = None) -> np.ndarray:
    """Waveform augmentation of float samples (int16 scale), the word inside continuous
    audio (:func:`in_stream`); returns float samples."""
    lead, tail = context(rng)
    if rng.random() < 0.3:
        x = vtlp(x, rng.uniform(0.9, 1.1))
    if rng.random() < 0.3:
        x = reverb(x, rng)
    if rng.random() < 0.5:
        if rng.random() < 1 / 3:
            x = telephone(x)
        elif band_limit:
            x = signal.sosfilt(_LOWPASS, x)
    power = speech_power(x)
    x = np.concatenate((np.zeros(lead), x, np.zeros(tail)))
    if rng.random() < 0.8:
        snr_db = rng.uniform(5, 30)
        x = x + noise(len(x), rng, babble) * np.sqrt(power / 10 ** (snr_db / 10))
    gain = 10 ** (rng.uniform(-18, 6) / 20)
    return in_stream(x * gain, lead, power * gain**2, rng)


def streamed(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A clean word inside continuous audio: context, a floor, maybe a dip (no other change)."""
    lead, tail = context(rng)
    power = speech_power(x)
    return in_stream(np.concatenate((np.zeros(lead), x, np.zeros(tail))), lead, power, rng)


def to_int16(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x), -32768, 32767).astype(np.int16)


# The models' front ends by FeatureParams.kind (a model card's features.kind): MFCC (the design
# card's; cnn and rnn), the pretrained speech encoder's mel power (speaker model, digit family ge2e)
# and the word model's window (digit family words).
FRONT_ENDS = {"mfcc": FeatureParams, "melpower": mel_params, "wordwin": word_window_params}


def clip_features(audio: np.ndarray, front_end: str = "mfcc", stream: bool = False) -> np.ndarray:
    """What the daemon feeds the models for one word: VAD cut, features, normalisation. A clip
    is cut padded with digital silence (as a file of clips); ``stream``: the audio is a stretch
    of continuous audio holding the word, cut as the live segmenter cuts a microphone."""
    params = FRONT_ENDS[front_end]()
    speech, _ = heard_utterance(audio, VadParams(), pad_s=0.0 if stream else 0.3)
    return features_of_audio(speech, params)


def clip_id(clip: Clip) -> str:
    """The clip's name wherever the corpora lie (``--data`` spelt or placed otherwise): it seeds
    the clip's augmentation, so a model is reproducible from another checkout."""
    return f"{clip.speaker}/{Path(clip.path).name}"


def variant_audio(clip: Clip, variant: Variant, seed: int) -> np.ndarray:
    x, sr = sf.read(clip.path, dtype="int16")
    if sr != SAMPLE_RATE or x.ndim != 1:
        raise ValueError(f"{clip.path}: expected 16 kHz mono, got {sr} Hz shape {x.shape}")
    if variant == CLEAN:
        return x
    rng = np.random.default_rng([seed, zlib.crc32(clip_id(clip).encode()), variant.index])
    y = speed_perturb(x.astype(np.float64), variant.speed)
    if variant.augment:
        y = augment(y, rng, band_limit=clip.corpus != "fsdd", babble=babble_bank(seed))
    elif variant.stream:
        y = streamed(y, rng)
    return to_int16(y)


# --------------------------------------------------------------------------- feature cache


@dataclass
class FeatureSet:
    """Variable-length feature matrices stored back to back; item i is one clip variant."""

    clips: list[Clip]
    feats: np.ndarray  # (total_frames, numcep) float32
    offsets: np.ndarray  # (items + 1,) int64
    clip_index: np.ndarray  # (items,) which clip
    speed: np.ndarray  # (items,) speed factor of the variant
    variant: np.ndarray  # (items,) variant index, 0 = clean
    cached: bool = False  # loaded from the cache rather than computed
    front_end: str = "mfcc"  # a key of FRONT_ENDS

    def __len__(self) -> int:
        return len(self.clip_index)

    def item(self, i: int) -> np.ndarray:
        return self.feats[self.offsets[i] : self.offsets[i + 1]]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def labels(self) -> np.ndarray:
        return np.array([self.clips[c].label for c in self.clip_index], dtype=np.int64)

    def speakers(self) -> list[str]:
        return [self.clips[c].speaker for c in self.clip_index]


def _job(task: tuple[Clip, Variant, int, str]) -> np.ndarray:
    clip, variant, seed, front_end = task
    return clip_features(variant_audio(clip, variant, seed), front_end, variant.stream)


def _cache_key(clips: list[Clip], variants: list[tuple[Variant, ...]], seed: int, front_end: str = "mfcc") -> str:
    blob = json.dumps({
        "features": FRONT_ENDS[front_end]().as_dict(), "vad": asdict(VadParams()), "aug": AUG_VERSION,
        "seed": seed, "clips": [asdict(c) for c in clips],
        "variants": [[asdict(v) for v in vs] for vs in variants],
    }, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


# Which versions of a training clip are made: (real clips', synthetic clips').
VariantPlan = tuple[tuple[Variant, ...], tuple[Variant, ...]]
ALL_VARIANTS: VariantPlan = (TRAIN_VARIANTS, SYNTH_VARIANTS)
# The heads on frozen pretrained encoders (digit families ge2e and words) see four versions of
# each real training clip and two of each synthetic one, every epoch (measured: as good as the
# MFCC families' seven with a third of the work).
HEAD_PLAN: VariantPlan = (tuple(TRAIN_VARIANTS[i] for i in (0, 1, 3, 5)), SYNTH_VARIANTS[:2])
HEAD_PLAN_TEXT = ("every clip also kept clean; 4 versions per real training clip (clean, augmented, speed 0.9 "
                  "and 1.1 augmented), 2 per synthetic clip")


def variants_for(clip: Clip, augment_train: bool, plan: VariantPlan = ALL_VARIANTS) -> tuple[Variant, ...]:
    if clip.heldout:
        return (CLEAN,)
    if not augment_train:
        return VALIDATION_VARIANTS
    return plan[1] if clip.corpus == "synth" else plan[0]


def _compute(tasks: list[tuple[Clip, Variant, int, str]], workers: int) -> list[np.ndarray]:
    if workers <= 1:
        return [_job(t) for t in tasks]
    with mp.get_context("fork").Pool(workers) as pool:
        return pool.map(_job, tasks, chunksize=64)


_VARIANTS = {v.index: v for v in TRAIN_VARIANTS + VALIDATION_VARIANTS}


def variant_of(fs: FeatureSet, i: int) -> Variant:
    return _VARIANTS[int(fs.variant[i])]


def item_audio(fs: FeatureSet, i: int, seed: int) -> np.ndarray:
    """The (augmented) audio feature item ``i`` was computed from."""
    return variant_audio(fs.clips[fs.clip_index[i]], variant_of(fs, i), seed)


def cache_is_current(fs: FeatureSet, seed: int, n: int = 48) -> bool:
    """Recompute a random sample of cached items with today's streamd code: the cache is only
    trusted if they match, whatever changed (features.py, vad.py, python_speech_features)."""
    if len(fs) == 0:
        return True
    rng = np.random.default_rng()
    for i in rng.choice(len(fs), size=min(n, len(fs)), replace=False):
        fresh = clip_features(item_audio(fs, int(i), seed), fs.front_end, _VARIANTS[int(fs.variant[i])].stream)
        cached = fs.item(i)
        if fresh.shape != cached.shape or not np.allclose(fresh, cached, rtol=0, atol=1e-4):
            return False
    return True


def build_features(clips: list[Clip], name: str, seed: int = 0, augment_train: bool = True,
                   workers: int = 2, front_end: str = "mfcc", plan: VariantPlan = ALL_VARIANTS) -> FeatureSet:
    """Features of every clip variant, cached as ``WORK_DIR/features/{name}-{key}.npz``."""
    variants = [variants_for(c, augment_train, plan) for c in clips]
    path = WORK_DIR / "features" / f"{name}-{_cache_key(clips, variants, seed, front_end)}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as z:
            fs = FeatureSet(clips, z["feats"], z["offsets"], z["clip_index"], z["speed"],
                            z["variant"], cached=True, front_end=front_end)
        if cache_is_current(fs, seed):
            return fs
        print(f"{path.name}: cached features differ from today's streamd code; recomputing", flush=True)
    tasks = [(c, v, seed, front_end) for c, vs in zip(clips, variants) for v in vs]
    mats = _compute(tasks, workers)
    index = np.array([i for i, vs in enumerate(variants) for _ in vs], dtype=np.int32)
    fs = FeatureSet(
        clips,
        np.concatenate(mats).astype(np.float32),
        np.concatenate(([0], np.cumsum([len(m) for m in mats]))).astype(np.int64),
        index,
        np.array([v.speed for vs in variants for v in vs], dtype=np.float32),
        np.array([v.index for vs in variants for v in vs], dtype=np.int16),
        front_end=front_end,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, feats=fs.feats, offsets=fs.offsets, clip_index=fs.clip_index,
             speed=fs.speed, variant=fs.variant)
    return fs


def merge(sets: list[FeatureSet]) -> FeatureSet:
    """One FeatureSet holding the clips and items of several, in order."""
    clips: list[Clip] = []
    offsets, index = [np.zeros(1, np.int64)], []
    frames = 0
    for fs in sets:
        index.append(fs.clip_index + len(clips))
        offsets.append(fs.offsets[1:] + frames)
        clips += fs.clips
        frames += int(fs.offsets[-1])
    return FeatureSet(
        clips, np.concatenate([fs.feats for fs in sets]), np.concatenate(offsets),
        np.concatenate(index).astype(np.int32), np.concatenate([fs.speed for fs in sets]),
        np.concatenate([fs.variant for fs in sets]), cached=all(fs.cached for fs in sets),
        front_end=sets[0].front_end,
    )


def load_all(data_dir: Path, seed: int, synth: bool) -> tuple[FeatureSet, FeatureSet]:
    """(training features incl. synthetic clips, clean features of the held-out speakers)."""
    real = real_clips(data_dir)
    train = build_features([c for c in real if not c.heldout], "train-real", seed)
    if synth:
        train = merge([train, build_features(synth_clips(seed=seed), "train-synth", seed)])
    return train, build_features([c for c in real if c.heldout], "heldout", seed)


@dataclass
class DigitSplit:
    train: FeatureSet  # augmented; real training speakers (+ synthetic voices)
    validation: FeatureSet  # clean; validation speakers: fits fusion and rejection threshold
    test: FeatureSet  # clean; held-out speakers: every reported figure


def validation_clips(data_dir: Path, synth: bool) -> list[Clip]:
    """The validation speakers' clips: the same words whatever the training seed."""
    clips = [c for c in real_clips(data_dir) if is_validation(c)]
    if synth:
        voices = synth_clips(SYNTH_TRAIN_VOICES + SYNTH_VALIDATION_VOICES, seed=0)
        clips += [c for c in voices if is_validation(c)]
    return clips


def load_test_set(data_dir: Path, seed: int, front_end: str = "mfcc") -> FeatureSet:
    """Clean features of the held-out (test) speakers."""
    return build_features([c for c in real_clips(data_dir) if c.heldout], "heldout", seed, front_end=front_end)


def load_digit_split(data_dir: Path, seed: int, synth: bool, flite: bool = False,
                     arabic_synth: bool = False, front_end: str = "mfcc",
                     plan: VariantPlan = ALL_VARIANTS) -> DigitSplit:
    """The digit models' three speaker-disjoint sets (see ASC_VALIDATION); ``flite`` adds the
    flite voices to training, ``arabic_synth`` espeak-ng's Arabic voice."""
    build_babble(data_dir, seed)
    real = real_clips(data_dir)
    train = build_features([c for c in real if not c.heldout and not is_validation(c)], "digits-train", seed,
                           front_end=front_end, plan=plan)
    if synth:
        voices = synth_clips(seed=seed, voices=digit_training_voices(seed))
        train = merge([train, build_features(voices, "digits-synth", seed, front_end=front_end, plan=plan)])
    if flite:
        train = merge([train, build_features(flite_clips(seed), "digits-flite", seed)])
    if arabic_synth:
        train = merge([train, build_features(arabic_synth_clips(seed), "digits-synth-ar", seed)])
    return DigitSplit(train, *load_digit_eval_sets(data_dir, seed, synth, front_end))


def load_digit_eval_sets(data_dir: Path, seed: int, synth: bool,
                         front_end: str = "mfcc") -> tuple[FeatureSet, FeatureSet]:
    """(validation, test) of :func:`load_digit_split`, without the training features."""
    return (build_features(validation_clips(data_dir, synth), "digits-val", 0, augment_train=False,
                           front_end=front_end),
            load_test_set(data_dir, seed, front_end))


def select(fs: FeatureSet, keep) -> FeatureSet:
    """The items of ``fs`` whose clip ``keep(clip)`` accepts (clips list unchanged)."""
    items = np.array([i for i, c in enumerate(fs.clip_index) if keep(fs.clips[c])], dtype=np.int64)
    lengths = np.diff(fs.offsets)[items]
    feats = np.concatenate([fs.item(i) for i in items]) if len(items) else fs.feats[:0]
    return FeatureSet(fs.clips, feats, np.concatenate(([0], np.cumsum(lengths))).astype(np.int64),
                      fs.clip_index[items], fs.speed[items], fs.variant[items], fs.cached, fs.front_end)
