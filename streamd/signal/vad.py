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
from streamd.signal.levels import DIGITAL_SILENCE_DBFS, SILENT_DBFS, levels
from streamd.signal.vad_bank import VadBank

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



def frame_dbfs(samples: np.ndarray) -> float:
    """Level of int16 samples in dB below full scale (digital silence: ``SILENT_DBFS``)."""
    return frame_levels(samples)[0]


def frame_levels(samples: np.ndarray) -> tuple[float, float]:
    """``frame_dbfs`` and the same with the DC offset left out (what the noise floor and gate
    compare): ``levels`` of one frame, so that a frame's levels are the same whether it comes
    alone or with other streams' (VadBank)."""
    dbfs, ac = levels(samples.reshape(1, -1))
    return float(dbfs[0]), float(ac[0])


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
    """One stream's gate. Its levels, noise estimates, pre-roll and onset votes live in a row of
    a ``VadBank`` (its own, or one shared by many streams, whose frames then arrive together
    through ``VadBank.tick`` and ``push_ticked``); the utterance state machine lives here."""

    def __init__(self, params: VadParams, bank: VadBank | None = None):
        if params.frame_ms not in VAD_FRAME_MS:
            raise ValueError(f"vad.frame_ms must be one of {VAD_FRAME_MS}, got {params.frame_ms}")
        if params.tail_ms > params.hangover_ms:
            raise ValueError("vad.tail_ms must not exceed vad.hangover_ms")
        if bank is not None and bank.params != params:
            raise ValueError("a Segmenter's bank must have its VadParams")
        self.params = params
        self.bank = bank if bank is not None else VadBank(params, 1)
        self.row = self.bank.add()
        self._rows = np.array([self.row])
        self._vad = webrtcvad.Vad(params.aggressiveness)
        self._onset = params.frames(params.onset_ms)
        self._hangover = params.frames(params.hangover_ms)
        self._quiet_end = params.frames(params.quiet_end_ms) if params.quiet_end_ms > 0 else None
        self._next_utterance = 0
        self.reset()

    def reset(self) -> None:
        self._vad.set_mode(self.params.aggressiveness)
        self.bank.reset_row(self.row)
        self._active: SpeechStart | None = None
        self._silent_run = 0
        self._quiet_run = 0  # frames in a row that are quiet (see _quiet)
        self._peak = SILENT_DBFS  # the open utterance's loudest frame
        self._level = SILENT_DBFS  # the latest frame's level, DC left out
        self._gain_db = 0.0  # the latest frame's InputGain
        self._last_voiced_end = 0.0
        self._last_frame: Frame | None = None
        self._continue = False
        self._set_idle()

    def _set_idle(self) -> None:
        """Tell the bank whether a quiet frame may take the idle step there (VadBank.tick)."""
        self.bank.idle[self.row] = self._active is None and not self._continue

    @property
    def in_speech(self) -> bool:
        return self._active is not None

    @property
    def last_voiced_end(self) -> float:
        """Audio time where the latest voiced frame of the utterance going on ends."""
        return self._last_voiced_end

    def _tick(self, frame: Frame, machine: bool):
        if len(frame.samples) != self.params.frame_samples:
            raise ValueError(f"VAD frames must hold {self.params.frame_samples} samples")
        return self.bank.tick(self._rows, frame.samples.reshape(1, -1), np.array([frame.t]), machine)

    def is_speech(self, frame: Frame) -> bool:
        """webrtcvad's call on the gained frame, confirmed, where the audio has a noise floor
        (``NoiseFloor.noisy``), by the frame standing ``min_snr_db`` above it and above the
        noise of the pauses (``PauseNoise``): webrtcvad fires on steady noise when it starts,
        on noise after digital silence, on loud noise and on other people talking. A frame
        under that gate is silence without asking webrtcvad (``VadBank``).

        Audio that begins in digital silence is taken for clips joined by zeros (as the models'
        training clips are cut by ``heard_utterance``, and as the bundled recordings are) until
        it has carried ``CLIP_MS`` of sound without a break: it is cut by webrtcvad alone, as
        the models were trained. Any other stream is gated from its first frame."""
        tick = self._tick(frame, machine=False)
        self._level, self._gain_db = float(tick.level[0]), float(tick.gain_db[0])
        return False if tick.quiet[0] else self._voiced(frame.samples)

    def _voiced(self, samples: np.ndarray) -> bool:
        """The frame's call, its levels and the noise estimates taken in (VadBank.tick)."""
        b, r, p = self.bank, self.row, self.params
        for skipped, gain in b.take_skipped(r):  # webrtcvad's state, as if it had heard them
            self._vad.is_speech(_gained(skipped, gain, p).tobytes(), SAMPLE_RATE)
        voiced = self._vad.is_speech(_gained(samples, self._gain_db, p).tobytes(), SAMPLE_RATE)
        if p.min_snr_db <= 0 or not voiced or not (b.gated[r] == 1 and b.floor_noisy[r]):
            return voiced
        return self._level >= max(float(b.floor_value[r]) + p.min_snr_db, float(b.pause_gate[r]))

    def push(self, frame: Frame) -> list[VadOutput]:
        tick = self._tick(frame, machine=True)
        if tick.quiet[0]:
            self._last_frame = frame
            return []  # the idle step is taken (VadBank.tick)
        return self.push_ticked(frame, float(tick.level[0]), float(tick.gain_db[0]))

    def push_ticked(self, frame: Frame, level: float, gain_db: float) -> list[VadOutput]:
        """The rest of ``push`` for a frame whose row has taken its tick and was not quiet."""
        self._level, self._gain_db = level, gain_db
        voiced = self._voiced(frame.samples)
        self._last_frame = frame
        if self._active is None:
            return self._idle(frame, voiced)
        return self._speaking(frame, voiced)

    def _idle(self, frame: Frame, voiced: bool) -> list[VadOutput]:
        b, r = self.bank, self.row
        if self._continue:  # an utterance was cut at max length: go straight on
            self._continue = False
            return [self._start(frame.t, frame.t, frame.samples.copy(), frame)]
        if b.history_full(r) and b.pauses_ready(r):
            # A frame leaves the pre-roll without becoming part of an utterance: pause noise.
            # (Frames are taken only here and with the pre-roll, never the onset's, so the next
            # word's onset never raises the gate: with 0.3 s pauses it would be half of what
            # is heard between utterances.)
            b.push_pause(r, b.oldest_level(r))
        b.append_history(r, frame.samples, frame.t, voiced, self._level, self._gain_db)
        held, voiced_in_onset = b.vote(r, voiced)
        if held < self._onset or voiced_in_onset < self.params.onset_ratio * self._onset:
            return []  # the common case in silence: no list is built
        slots = b.history(r)
        b.clear_votes(r)
        onset = slots[-self._onset :]
        first_voiced = float(b.hist_t[r, onset[np.argmax(b.hist_voiced[r, onset])]])
        if b.pauses_ready(r):  # the pre-roll was pause; the onset frames are the utterance's
            for level in b.hist_level[r, slots[: -self._onset]].tolist():
                b.push_pause(r, level)
        audio = b.hist_samples[r, slots].reshape(-1)  # a copy (fancy indexing)
        audio_t = float(b.hist_t[r, slots[0]])
        b.clear_history(r)
        return [self._start(first_voiced, audio_t, audio, frame)]

    def _start(self, t_start: float, audio_t: float, audio: np.ndarray, current: Frame) -> SpeechStart:
        start = SpeechStart(utterance=self._next_utterance, t_start=t_start, audio_t=audio_t, audio=audio)
        self._next_utterance += 1
        self._active = start
        self._set_idle()
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
            self._set_idle()
        return out

    def _quiet(self) -> bool:
        floor = float(self.bank.floor_value[self.row])
        return self._level < min(floor + self.params.quiet_db, self._peak - QUIET_DEPTH_DB)

    def _paused(self) -> bool:
        """Whether a quiet pause (``VadParams.quiet_end_ms``) ends the utterance. Not in clips
        joined by zeros (see is_speech): cut by webrtcvad alone, as the models' training clips."""
        n = self._quiet_end
        gated = self.bank.gated[self.row] == 1
        return n is not None and gated and self._silent_run >= n and self._quiet_run >= n

    def _end(self, reason: str, closing: Frame) -> SpeechEnd:
        assert self._active is not None
        active = self._active
        t_end = self._last_voiced_end
        if reason != "max_length" and (t_end - active.t_start) * 1000 < self.params.min_utterance_ms:
            reason = "too_short"
        self._active = None
        self._set_idle()
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
        self._set_idle()
        if self._active is None or self._last_frame is None:
            return []
        return [self._end("end_of_stream", self._last_frame)]


def _gained(samples: np.ndarray, gain_db: float, params: VadParams) -> np.ndarray:
    """webrtcvad's copy of a frame: ``InputGain``'s gain applied."""
    if params.max_gain_db <= 0 or gain_db <= 0:
        return samples
    return np.clip(np.round(samples * 10 ** (gain_db / 20)), -32768, 32767).astype(np.int16)


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
