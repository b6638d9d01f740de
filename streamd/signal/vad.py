"""Speech gating with webrtcvad: pre-roll, hangover, minimum and maximum utterance length.

``Segmenter`` is a stateful per-stream object with no I/O: push frames in, get typed
speech events out, ``reset()`` to start over. ``InputGain`` lifts quiet audio for webrtcvad's
decision only (``vad.max_gain_db``); the models always get the audio as captured.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass

import numpy as np
import webrtcvad

from streamd.audio.frames import SAMPLE_RATE, Frame

VAD_FRAME_MS = (10, 20, 30)


@dataclass(frozen=True)
class VadParams:
    aggressiveness: int = 2
    frame_ms: int = 20
    onset_ms: int = 100
    onset_ratio: float = 0.6
    preroll_ms: int = 200
    hangover_ms: int = 300
    # Audio after the last voiced frame that still goes to the models: webrtcvad often calls
    # a word's soft ending (the "s" of "six") unvoiced. It lies inside the hangover, so it
    # costs no latency.
    tail_ms: int = 150
    min_utterance_ms: int = 60
    max_utterance_ms: int = 10000
    # Gain for webrtcvad's copy of the audio (InputGain); 0 turns it off.
    max_gain_db: float = 24.0
    target_dbfs: float = -25.0
    noise_ceiling_dbfs: float = -50.0
    # A frame is voiced only this far above the noise floor (NoiseFloor), whatever webrtcvad
    # says (Segmenter.is_speech); 0 turns the gate off.
    min_snr_db: float = 3.0
    # A pause this long ends an utterance before the hangover when webrtcvad calls all of it
    # silence and every frame of it is quiet: within quiet_db of the noise floor and
    # QUIET_DEPTH_DB under the utterance's loudest frame. Words said 0.3 s apart are then two
    # utterances; noise that webrtcvad alone calls silence still waits for hangover_ms. Streams
    # only (audio gated from its first frame), not clips joined by zeros. 0: off.
    quiet_end_ms: int = 160
    quiet_db: float = 6.0

    def frames(self, ms: int) -> int:
        return max(1, math.ceil(ms / self.frame_ms))

    @property
    def frame_samples(self) -> int:
        return SAMPLE_RATE * self.frame_ms // 1000


@dataclass(frozen=True, slots=True)
class SpeechStart:
    utterance: int
    t_start: float  # first voiced frame
    audio_t: float  # where ``audio`` (pre-roll included) begins
    audio: np.ndarray


@dataclass(frozen=True, slots=True)
class SpeechAudio:
    utterance: int
    audio: np.ndarray


@dataclass(frozen=True, slots=True)
class SpeechEnd:
    utterance: int
    t_start: float
    audio_t: float
    t_end: float  # end of the last voiced frame, without the hangover
    reason: str  # silence | max_length | end_of_stream | too_short
    closed_at: float  # capture time of the frame that closed the utterance

    @property
    def usable(self) -> bool:
        return self.reason != "too_short"

    def model_span(self, params: VadParams) -> tuple[float, float]:
        return model_span(self.audio_t, self.t_end, params)


def model_span(audio_t: float, t_end: float, params: VadParams) -> tuple[float, float]:
    """Audio times the models see of an utterance whose audio (pre-roll included) starts at
    ``audio_t`` and whose speech ends at ``t_end``: up to the end of speech plus the tail."""
    return audio_t, t_end + params.tail_ms / 1000


VadOutput = SpeechStart | SpeechAudio | SpeechEnd

CLIP_MS = 3000
QUIET_DEPTH_DB = 30.0  # a quiet frame lies at least this far under the utterance's loudest  # of unbroken sound after which audio that began in digital silence is gated too

SILENT_DBFS = -120.0
# Frames quieter than this are digital silence (a muted microphone, a suspended sound server,
# VoIP silence suppression, zero-filled lost network frames): no microphone's noise floor is
# this low (-96 dBFS is the RMS of one least significant bit).
DIGITAL_SILENCE_DBFS = -100.0


def frame_dbfs(samples: np.ndarray) -> float:
    """Level of int16 samples in dB below full scale (digital silence: ``SILENT_DBFS``)."""
    return frame_levels(samples)[0]


def frame_levels(samples: np.ndarray) -> tuple[float, float]:
    """``frame_dbfs`` and the same with the DC offset left out (what the noise floor and gate
    compare), from one pass over the samples (integer sums: exact)."""
    x = samples.astype(np.int64)
    n = len(x)
    total, squares = int(x.sum()), int(x @ x)
    least = 10 ** (SILENT_DBFS / 10)
    power = squares / n / 32768.0**2
    ac = max(squares - total * total / n, 0.0) / n / 32768.0**2
    return 10.0 * math.log10(max(power, least)), 10.0 * math.log10(max(ac, least))


def audio_level(audio: np.ndarray) -> tuple[float, float, float]:
    """(peak, clipped share, RMS in dBFS) of int16 audio (digital silence: ``SILENT_DBFS``)."""
    if len(audio) == 0:
        return 0.0, 0.0, SILENT_DBFS
    a = np.abs(audio.astype(np.int32))
    return float(a.max()) / 32768.0, float(np.mean(a >= 32767)), frame_dbfs(audio)


class NoiseFloor:
    """The microphone's noise floor: a low percentile of the levels of the last ``WINDOW_S``,
    digital silence left out (a dip of zeros is no microphone's floor); and whether the audio
    is ``noisy``: more of its frames lie within ``margin_db`` of that floor than are digital
    silence (audio whose pauses are zeros has no noise to keep out). Recomputed every
    ``EVERY`` frames (and on each of the first): a percentile per frame would cost more than
    webrtcvad."""

    WINDOW_S = 3.0
    PERCENTILE = 10
    EVERY = 5

    def __init__(self, frame_ms: int, margin_db: float = 3.0):
        self.margin_db = margin_db
        self._levels = np.zeros(max(1, round(self.WINDOW_S * 1000 / frame_ms)))
        self.reset()

    def reset(self) -> None:
        self._count = 0
        self.value = SILENT_DBFS
        self.noisy = False

    def push(self, level: float) -> None:
        n = len(self._levels)
        self._levels[self._count % n] = level
        self._count += 1
        if self._count <= self.EVERY or self._count % self.EVERY == 0:
            known = self._levels[: min(self._count, n)]
            heard = known[known > DIGITAL_SILENCE_DBFS]
            if len(heard) == 0:
                self.value, self.noisy = SILENT_DBFS, False
                return
            k = int(len(heard) * self.PERCENTILE / 100)
            self.value = float(np.partition(heard, k)[k])
            self.noisy = int(np.count_nonzero(heard < self.value + self.margin_db)) > len(known) - len(heard)


class PauseNoise:
    """The level of the noise in the pauses: frames heard while no utterance is open, the
    onset that opens the next one left out (digital silence too), the last ``WINDOW_S`` of them. Its median plus ``SPREAD`` times its
    spread below the median (the half that speech onsets do not reach) is a level that noise
    which rises and falls, such as other people talking, seldom passes: steady noise has
    almost no spread and leaves the gate at the floor's. Until ``MIN_S`` of pauses has been
    heard, every frame counts: noise that starts with the stream would otherwise open an
    utterance that never pauses."""

    WINDOW_S = 5.0
    MIN_S = 0.5
    SPREAD = 1.5
    EVERY = 5

    def __init__(self, frame_ms: int):
        self._levels = np.zeros(max(1, round(self.WINDOW_S * 1000 / frame_ms)))
        self._min = max(1, round(self.MIN_S * 1000 / frame_ms))
        self.reset()

    def reset(self) -> None:
        self._count = 0
        self.gate = SILENT_DBFS  # below any frame's level until MIN_S of pauses is heard

    @property
    def ready(self) -> bool:
        return self._count >= self._min

    def push(self, level: float) -> None:
        if level <= DIGITAL_SILENCE_DBFS:
            return
        n = len(self._levels)
        self._levels[self._count % n] = level
        self._count += 1
        if self.ready and self._count % self.EVERY == 0:
            known = self._levels[: min(self._count, n)]
            ranks = [len(known) // 10, len(known) // 2]
            p10, p50 = np.partition(known, ranks)[ranks]
            self.gate = float(p50 + self.SPREAD * (p50 - p10) + 1.0)


class InputGain:
    """The gain webrtcvad's input gets, frame by frame: webrtcvad calls quiet speech silence
    (20 dB below a normal microphone level it loses whole words), whatever its shape.

    A peak follower (instant attack, ``RELEASE_DB_PER_S`` release) lifts the loudest recent
    audio toward ``target_dbfs``, by at most ``max_gain_db``, and never so far that the
    quietest frame of the last ``FLOOR_WINDOW_S`` (the noise floor) passes
    ``noise_ceiling_dbfs``: steady noise is not made loud enough to pass for speech. It never
    attenuates. Stateful per stream, like ``Segmenter``; ``reset()`` starts over.
    """

    RELEASE_DB_PER_S = 6.0
    FLOOR_WINDOW_S = 2.0

    def __init__(self, params: VadParams):
        self.params = params
        self._floor_frames = max(1, round(self.FLOOR_WINDOW_S * 1000 / params.frame_ms))
        self.reset()

    def reset(self) -> None:
        self._peak = SILENT_DBFS
        self._levels: collections.deque[float] = collections.deque(maxlen=self._floor_frames)

    def gain_db(self, samples: np.ndarray, level: float | None = None) -> float:
        """Take in one frame (``level``: its ``frame_dbfs``, if known); the gain for it."""
        level = frame_dbfs(samples) if level is None else level
        self._peak = max(self._peak - self.RELEASE_DB_PER_S * self.params.frame_ms / 1000, level)
        self._levels.append(level)
        p = self.params
        return max(0.0, min(p.target_dbfs - self._peak, p.noise_ceiling_dbfs - min(self._levels), p.max_gain_db))

    def __call__(self, samples: np.ndarray, level: float | None = None) -> np.ndarray:
        if self.params.max_gain_db <= 0:
            return samples
        gain = self.gain_db(samples, level)
        if gain <= 0:
            return samples
        return np.clip(np.round(samples * 10 ** (gain / 20)), -32768, 32767).astype(np.int16)


class Segmenter:
    def __init__(self, params: VadParams):
        if params.frame_ms not in VAD_FRAME_MS:
            raise ValueError(f"vad.frame_ms must be one of {VAD_FRAME_MS}, got {params.frame_ms}")
        if params.tail_ms > params.hangover_ms:
            raise ValueError("vad.tail_ms must not exceed vad.hangover_ms")
        self.params = params
        self._vad = webrtcvad.Vad(params.aggressiveness)
        self._gain = InputGain(params)
        self._floor = NoiseFloor(params.frame_ms, params.min_snr_db)
        self._pauses = PauseNoise(params.frame_ms)
        self._clip_frames = params.frames(CLIP_MS)
        self._onset = params.frames(params.onset_ms)
        self._hangover = params.frames(params.hangover_ms)
        self._quiet_end = params.frames(params.quiet_end_ms) if params.quiet_end_ms > 0 else None
        self._next_utterance = 0
        self.reset()

    def reset(self) -> None:
        self._vad.set_mode(self.params.aggressiveness)
        self._gain.reset()
        self._floor.reset()
        self._pauses.reset()
        self._gated: bool | None = None  # decided by the first frame (see is_speech)
        self._sound_run = 0  # frames of sound (not digital silence) in a row
        self._history: collections.deque[tuple[Frame, bool, float]] = collections.deque(
            maxlen=self.params.frames(self.params.preroll_ms) + self._onset
        )
        self._onset_votes: collections.deque[bool] = collections.deque(maxlen=self._onset)
        self._voiced_in_onset = 0  # voiced frames among the last onset frames (kept as they come)
        self._active: SpeechStart | None = None
        self._silent_run = 0
        self._quiet_run = 0  # frames in a row that are quiet (see _quiet)
        self._peak = SILENT_DBFS  # the open utterance's loudest frame
        self._level = SILENT_DBFS  # the latest frame's level, DC left out
        self._last_voiced_end = 0.0
        self._last_frame: Frame | None = None
        self._continue = False

    @property
    def in_speech(self) -> bool:
        return self._active is not None

    @property
    def last_voiced_end(self) -> float:
        """Audio time where the latest voiced frame of the utterance going on ends."""
        return self._last_voiced_end

    def is_speech(self, frame: Frame) -> bool:
        """webrtcvad's call on the gained frame, confirmed, where the audio has a noise floor
        (``NoiseFloor.noisy``), by the frame standing ``min_snr_db`` above it and above the
        noise of the pauses (``PauseNoise``): webrtcvad fires on steady noise when it starts,
        on noise after digital silence, on loud noise and on other people talking.

        Audio that begins in digital silence is taken for clips joined by zeros (as the models'
        training clips are cut by ``heard_utterance``, and as the bundled recordings are) until
        it has carried ``CLIP_MS`` of sound without a break: it is cut by webrtcvad alone, as
        the models were trained. Any other stream is gated from its first frame."""
        dbfs, level = frame_levels(frame.samples)
        self._level = level
        voiced = self._vad.is_speech(self._gain(frame.samples, dbfs).tobytes(), SAMPLE_RATE)
        if self.params.min_snr_db <= 0:
            return voiced
        self._observe(level)
        if not voiced or not (self._gated and self._floor.noisy):
            return voiced
        return level >= max(self._floor.value + self.params.min_snr_db, self._pauses.gate)

    def _observe(self, level: float) -> None:
        """Take a frame's level into the noise estimates and the clip-or-stream decision."""
        self._floor.push(level)
        if not self._pauses.ready:  # at start-up, whatever is heard; later, see _idle
            self._pauses.push(level)
        self._sound_run = self._sound_run + 1 if level > DIGITAL_SILENCE_DBFS else 0
        if self._gated is None:
            self._gated = self._sound_run > 0
        elif not self._gated and self._sound_run >= self._clip_frames:
            self._gated = True

    def push(self, frame: Frame) -> list[VadOutput]:
        if len(frame.samples) != self.params.frame_samples:
            raise ValueError(f"VAD frames must hold {self.params.frame_samples} samples")
        voiced = self.is_speech(frame)
        self._last_frame = frame
        if self._active is None:
            return self._idle(frame, voiced)
        return self._speaking(frame, voiced)

    def _idle(self, frame: Frame, voiced: bool) -> list[VadOutput]:
        if self._continue:  # an utterance was cut at max length: go straight on
            self._continue = False
            return [self._start(frame.t, [frame], frame)]
        if len(self._history) == self._history.maxlen and self._pauses.ready:
            # A frame leaves the pre-roll without becoming part of an utterance: pause noise.
            # (Frames are taken only here and with the pre-roll, never the onset's, so the next
            # word's onset never raises the gate: with 0.3 s pauses it would be half of what
            # is heard between utterances.)
            self._pauses.push(self._history[0][2])
        self._history.append((frame, voiced, self._level))
        if len(self._onset_votes) == self._onset:
            self._voiced_in_onset -= self._onset_votes[0]
        self._onset_votes.append(voiced)
        self._voiced_in_onset += voiced
        if len(self._onset_votes) < self._onset or self._voiced_in_onset < self.params.onset_ratio * self._onset:
            return []  # the common case in silence: no list is built
        recent = [(f, v) for f, v, _ in list(self._history)[-self._onset :]]
        self._onset_votes.clear()
        self._voiced_in_onset = 0
        first_voiced = next(f for f, v in recent if v)
        if self._pauses.ready:  # the pre-roll was pause; the onset frames are the utterance's
            for _, _, level in list(self._history)[: -self._onset]:
                self._pauses.push(level)
        frames = [f for f, _, _ in self._history]
        self._history.clear()
        return [self._start(first_voiced.t, frames, frame)]

    def _start(self, t_start: float, frames: list[Frame], current: Frame) -> SpeechStart:
        start = SpeechStart(
            utterance=self._next_utterance,
            t_start=t_start,
            audio_t=frames[0].t,
            audio=np.concatenate([f.samples for f in frames]),
        )
        self._next_utterance += 1
        self._active = start
        self._silent_run = self._quiet_run = 0
        self._peak = self._level
        self._last_voiced_end = current.t_end
        return start

    def _speaking(self, frame: Frame, voiced: bool) -> list[VadOutput]:
        assert self._active is not None
        out: list[VadOutput] = [SpeechAudio(self._active.utterance, frame.samples)]
        if voiced:
            self._silent_run = 0
            self._last_voiced_end = frame.t_end
        else:
            self._silent_run += 1
        self._peak = max(self._peak, self._level)
        self._quiet_run = self._quiet_run + 1 if self._quiet() else 0
        if self._silent_run >= self._hangover or self._paused():
            out.append(self._end("silence", frame))
        elif frame.t_end - self._active.t_start >= self.params.max_utterance_ms / 1000:
            self._last_voiced_end = frame.t_end
            out.append(self._end("max_length", frame))
            self._continue = True
        return out

    def _quiet(self) -> bool:
        return self._level < min(self._floor.value + self.params.quiet_db, self._peak - QUIET_DEPTH_DB)

    def _paused(self) -> bool:
        """Whether a quiet pause (``VadParams.quiet_end_ms``) ends the utterance. Not in clips
        joined by zeros (see is_speech): cut by webrtcvad alone, as the models' training clips."""
        n = self._quiet_end
        return n is not None and bool(self._gated) and self._silent_run >= n and self._quiet_run >= n

    def _end(self, reason: str, closing: Frame) -> SpeechEnd:
        assert self._active is not None
        active = self._active
        t_end = self._last_voiced_end
        if reason != "max_length" and (t_end - active.t_start) * 1000 < self.params.min_utterance_ms:
            reason = "too_short"
        self._active = None
        self._silent_run = 0
        return SpeechEnd(
            utterance=active.utterance,
            t_start=active.t_start,
            audio_t=active.audio_t,
            t_end=t_end,
            reason=reason,
            closed_at=closing.captured_at,
        )

    def flush(self) -> list[VadOutput]:
        """End of stream: close an utterance still open."""
        self._continue = False
        if self._active is None or self._last_frame is None:
            return []
        return [self._end("end_of_stream", self._last_frame)]


def segment_clip(audio: np.ndarray, params: VadParams) -> list[SpeechEnd]:
    """Run the streaming segmenter over a whole clip; returns its utterances in order."""
    seg = Segmenter(params)
    step = params.frame_samples
    out: list[SpeechEnd] = []
    n = len(audio) // step
    for i in range(n):
        frame = Frame("clip", i, np.ascontiguousarray(audio[i * step : (i + 1) * step]), i * step / SAMPLE_RATE, 0.0)
        out += [e for e in seg.push(frame) if isinstance(e, SpeechEnd)]
    out += [e for e in seg.flush() if isinstance(e, SpeechEnd)]
    return out


def heard_utterance(clip: np.ndarray, params: VadParams, pad_s: float = 0.3) -> tuple[np.ndarray, bool]:
    """The audio the daemon would hand to the models for a clip holding one word, and whether
    the VAD heard it: a clip it finds no usable speech in comes back whole, with False (live,
    the daemon would say nothing; training keeps every clip).

    The clip is padded with silence, gated by the same segmenter as live audio, and the
    longest usable utterance is cut out from its pre-roll start to the end of speech plus
    the tail (``SpeechEnd.model_span``).
    """
    pad = np.zeros(int(pad_s * SAMPLE_RATE), dtype=np.int16)
    padded = np.concatenate((pad, clip.astype(np.int16), pad))
    ends = [e for e in segment_clip(padded, params) if e.usable]
    if not ends:
        return clip.astype(np.int16), False
    best = max(ends, key=lambda e: e.t_end - e.t_start)
    a, b = (int(round(t * SAMPLE_RATE)) for t in best.model_span(params))
    return padded[a:b], True


def utterance_audio(clip: np.ndarray, params: VadParams, pad_s: float = 0.3) -> np.ndarray:
    """``heard_utterance``'s audio alone."""
    return heard_utterance(clip, params, pad_s)[0]
