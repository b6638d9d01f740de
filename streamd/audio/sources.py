"""Audio sources: turn a microphone, a file or stdin into 16 kHz mono int16 ``Frame``s.

Sources are chosen by a spec string: ``mic[:DEVICE]``, ``file:PATH`` or ``stdin``.
Nothing downstream knows where the audio came from.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from math import gcd
from typing import BinaryIO, Protocol

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

from streamd.audio.frames import SAMPLE_RATE, Frame

log = logging.getLogger(__name__)

MAX_FILE_SECONDS = 4 * 3600


class SourceError(RuntimeError):
    """A source cannot be opened or read; the message is one line naming the problem."""


class Source(Protocol):
    stream: str
    overruns: int

    def frames(self) -> Iterator[Frame]: ...

    def close(self) -> None: ...


def to_int16(audio: np.ndarray) -> np.ndarray:
    """Float samples in [-1, 1] to int16, clipping; NaN or inf is an error, never misread."""
    if not np.all(np.isfinite(audio)):
        raise SourceError("audio contains NaN or infinite samples")
    return np.clip(np.round(audio * 32767.0), -32768, 32767).astype(np.int16)


BLOCK_SECONDS = 10  # how much of a file is decoded at a time: memory stays bounded for any length


def open_audio(path: str) -> sf.SoundFile:
    """Open an audio file after checking its header: exists, readable, not empty, not too long."""
    if not os.path.isfile(path):
        what = "not an audio file (a directory)" if os.path.isdir(path) else (
            "not a regular file" if os.path.exists(path) else "no such audio file")
        raise SourceError(f"{path}: {what}")
    try:
        info = sf.info(path)
        if info.frames == 0:
            raise SourceError(f"{path}: audio file is empty")
        if info.duration > MAX_FILE_SECONDS:
            raise SourceError(f"{path}: audio file is too long ({info.duration:.0f} s > {MAX_FILE_SECONDS} s)")
        return sf.SoundFile(path)
    except SourceError:
        raise
    except (sf.LibsndfileError, RuntimeError, OSError) as exc:
        raise SourceError(f"{path}: cannot read audio: {_reason(exc)}") from None


def _reason(exc: Exception) -> str:
    return getattr(exc, "strerror", None) or str(exc).splitlines()[0]


def iter_audio(path: str, block_seconds: float = BLOCK_SECONDS) -> Iterator[np.ndarray]:
    """A WAV/FLAC/... file at any rate and channel count as blocks of 16 kHz mono int16,
    decoded a block at a time, so memory stays bounded whatever the file's length."""
    with open_audio(path) as f:
        rs = _BlockResampler(f.samplerate, block_seconds)
        total = 0
        while True:
            want = rs.wanted()
            try:
                chunk = f.read(want, dtype="float32", always_2d=True)
            except (sf.LibsndfileError, RuntimeError) as exc:
                raise SourceError(f"{path}: cannot read audio: {_reason(exc)}") from None
            if not np.all(np.isfinite(chunk)):
                raise SourceError(f"{path}: audio contains NaN or infinite samples")
            last = len(chunk) < want
            out = rs.push(chunk.mean(axis=1, dtype=np.float64), last)
            total += len(out)
            if len(out):
                yield to_int16(out)
            if last:
                break
        if total == 0:
            raise SourceError(f"{path}: audio file is empty")


class _BlockResampler:
    """Resamples to 16 kHz block by block, equal to resampling the whole signal at once.

    Each block spans a whole number of resampling periods and is resampled with ``margin``
    input samples of real context on each side (more than the polyphase filter's reach),
    which are then cut from the output."""

    def __init__(self, rate: int, block_seconds: float):
        g = gcd(rate, SAMPLE_RATE)
        self.up, self.down = SAMPLE_RATE // g, rate // g
        self.step = max(1, int(block_seconds * rate) // self.down) * self.down
        reach = 10 * max(self.up, self.down) // self.up + 1  # scipy's default filter half-length
        self.margin = 0 if rate == SAMPLE_RATE else -(-reach // self.down) * self.down
        self.left = 0  # context samples before the block in buf (none before the first block)
        self.buf = np.zeros(0)

    def wanted(self) -> int:
        return self.left + self.step + self.margin - len(self.buf)

    def push(self, samples: np.ndarray, last: bool) -> np.ndarray:
        self.buf = np.concatenate((self.buf, samples))
        out = self._resample(self.buf)
        skip = self.left * self.up // self.down
        if last:
            return out[skip:]
        out = out[skip : skip + self.step * self.up // self.down]
        self.buf = self.buf[self.left + self.step - self.margin :]
        self.left = self.margin
        return out

    def _resample(self, x: np.ndarray) -> np.ndarray:
        return x if self.up == self.down else resample_poly(x, self.up, self.down)


def read_audio(path: str) -> np.ndarray:
    """A whole audio file as 16 kHz mono int16 (for short files: enrollment, tests, eval)."""
    return np.concatenate(list(iter_audio(path)))


def split_frames(blocks: Iterable[np.ndarray], frame_samples: int) -> Iterator[np.ndarray]:
    """Fixed-size frames from blocks of any size; the last one is padded with silence."""
    rest = np.zeros(0, np.int16)
    for block in blocks:
        rest = np.concatenate((rest, block))
        usable = len(rest) - len(rest) % frame_samples
        yield from rest[:usable].reshape(-1, frame_samples)
        rest = rest[usable:]
    if len(rest):
        yield np.concatenate((rest, np.zeros(frame_samples - len(rest), np.int16)))


class _Clock:
    """Numbers frames and stamps their audio time and capture time."""

    def __init__(self, stream: str, frame_samples: int):
        self.stream = stream
        self.frame_samples = frame_samples
        self.index = 0

    def frame(self, samples: np.ndarray, captured_at: float | None = None) -> Frame:
        f = Frame(
            stream=self.stream,
            index=self.index,
            samples=samples,
            t=self.index * self.frame_samples / SAMPLE_RATE,
            captured_at=time.monotonic() if captured_at is None else captured_at,
        )
        self.index += 1
        return f


class FileSource:
    def __init__(self, path: str, stream: str, frame_samples: int, pace: str = "realtime"):
        self.path = path
        self.stream = stream
        self.frame_samples = frame_samples
        self.pace = pace
        self.overruns = 0
        open_audio(path).close()  # refuse a missing, empty or unreadable file now, not later
        self._closed = threading.Event()

    def frames(self) -> Iterator[Frame]:
        clock = _Clock(self.stream, self.frame_samples)
        started = time.monotonic()
        for block in split_frames(iter_audio(self.path), self.frame_samples):
            if self._closed.is_set():
                return
            if self.pace == "realtime":
                due = started + (clock.index + 1) * self.frame_samples / SAMPLE_RATE
                if self._closed.wait(max(0.0, due - time.monotonic())):
                    return
            yield clock.frame(block)

    def close(self) -> None:
        self._closed.set()


class StdinSource:
    """Raw s16le 16 kHz mono from a pipe (``arecord -f S16_LE -r 16000 -c 1 -t raw | ...``)."""

    def __init__(self, stream: str, frame_samples: int, fh: BinaryIO | None = None):
        self.stream = stream
        self.frame_samples = frame_samples
        self.overruns = 0
        self._fh = fh or sys.stdin.buffer
        self._closed = False

    def frames(self) -> Iterator[Frame]:
        clock = _Clock(self.stream, self.frame_samples)
        need = self.frame_samples * 2
        while not self._closed:
            data = self._fh.read(need)
            if not data:
                return
            while len(data) < need:  # a pipe may deliver a frame in pieces
                more = self._fh.read(need - len(data))
                if not more:
                    break
                data += more
            data = data[: len(data) // 2 * 2]
            block = np.frombuffer(data, dtype="<i2").astype(np.int16)
            if len(block) < self.frame_samples:
                block = np.concatenate((block, np.zeros(self.frame_samples - len(block), np.int16)))
            yield clock.frame(block)

    def close(self) -> None:
        self._closed = True


@contextlib.contextmanager
def _quiet_stderr():
    """PortAudio's ALSA/JACK probing prints dozens of lines to fd 2; hide them."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def find_input_device(pa, device: str | None) -> dict:
    """An input device by index or name substring; the default input device when None."""
    inputs = [pa.get_device_info_by_index(i) for i in range(pa.get_device_count())]
    inputs = [d for d in inputs if d.get("maxInputChannels", 0) > 0]
    if not inputs:
        raise SourceError("mic: no audio input devices found (is a sound server running?)")
    if device is None or device == "":
        try:
            return pa.get_default_input_device_info()
        except OSError:
            return inputs[0]
    if device.isdigit():
        match = [d for d in inputs if d["index"] == int(device)]
    else:
        match = [d for d in inputs if device.lower() in d["name"].lower()]
    if not match:
        names = ", ".join(f"{d['index']}:{d['name']}" for d in inputs)
        raise SourceError(f"mic: no input device matches {device!r} (inputs: {names})")
    return match[0]


class PulseSourceWatch:
    """Whether the PulseAudio source named by ``PULSE_SOURCE`` is there.

    Through PortAudio's PulseAudio device, a source that goes away (unplugged, module
    unloaded) does not fail the capture: PulseAudio moves the stream to its fallback source
    and streamd would go on hearing another microphone. So when ``PULSE_SOURCE`` names the
    source, it is checked (``pactl``) before capture starts and every ``every_s`` during it."""

    def __init__(self, name: str, every_s: float = 2.0):
        self.name = name
        self.every_s = every_s
        self._next = 0.0

    @classmethod
    def for_device(cls, device_name: str) -> PulseSourceWatch | None:
        name = os.environ.get("PULSE_SOURCE", "")
        if not name or device_name not in ("pulse", "default") or not shutil.which("pactl"):
            return None
        return cls(name)

    def present(self) -> bool:
        try:
            out = subprocess.run(["pactl", "list", "short", "sources"], capture_output=True, text=True,
                                 timeout=5).stdout
        except (OSError, subprocess.SubprocessError):
            return False
        return any(line.split("\t")[1:2] == [self.name] for line in out.splitlines())

    def check(self) -> None:
        """Raise SourceError when the source is gone (at most one look every ``every_s``)."""
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self.every_s
        if not self.present():
            raise SourceError(f"mic: PulseAudio source {self.name!r} (PULSE_SOURCE) is not there")


class MicSource:
    """pyaudio capture in callback mode: the audio thread never waits for the pipeline.

    Blocks go through a bounded queue; when the pipeline falls behind, blocks are dropped
    and counted in ``overruns`` rather than stalling capture.
    """

    def __init__(self, stream: str, frame_samples: int, device: str | None = None, rate: int = 0,
                 queue_seconds: float = 5.0):
        import pyaudio  # imported here so file and stdin sources work without PortAudio

        self.stream = stream
        self.frame_samples = frame_samples
        self.overruns = 0
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, int(queue_seconds * SAMPLE_RATE / frame_samples)))
        self._closed = threading.Event()
        self._pending = np.zeros(0, dtype=np.int16)
        with _quiet_stderr():
            self._pa = pyaudio.PyAudio()
        try:
            info = find_input_device(self._pa, device)
            self.device_name = info["name"]
            self._watch = PulseSourceWatch.for_device(self.device_name)
            if self._watch is not None:
                self._watch.check()  # PulseAudio would quietly capture from another source
            self.rate = self._open(pyaudio, info, rate)
        except Exception:
            self._pa.terminate()
            raise
        self._resampler = None
        if self.rate != SAMPLE_RATE:
            import soxr

            self._resampler = soxr.ResampleStream(self.rate, SAMPLE_RATE, 1, dtype="float32")
        log.info("mic: capturing from %r at %d Hz", self.device_name, self.rate)

    def _open(self, pyaudio, info: dict, rate: int) -> int:
        rates = [rate] if rate else [SAMPLE_RATE, int(info["defaultSampleRate"])]
        last: Exception | None = None
        for r in dict.fromkeys(rates):
            try:
                with _quiet_stderr():
                    self._pa_stream = self._pa.open(
                        format=pyaudio.paInt16, channels=1, rate=r, input=True,
                        input_device_index=info["index"],
                        frames_per_buffer=self.frame_samples * r // SAMPLE_RATE,
                        stream_callback=self._callback,
                    )
                return r
            except (OSError, ValueError) as exc:
                last = exc
        raise SourceError(f"mic: cannot open {info['name']!r}: {last}")

    def _callback(self, data, frame_count, time_info, status):
        import pyaudio

        if status & pyaudio.paInputOverflow:
            self.overruns += 1
        try:
            self._queue.put_nowait((data, time.monotonic()))
        except queue.Full:
            self.overruns += 1
        return (None, pyaudio.paContinue)

    def _convert(self, data: bytes) -> np.ndarray:
        block = np.frombuffer(data, dtype="<i2")
        if self._resampler is None:
            return block.astype(np.int16)
        out = self._resampler.resample_chunk(block.astype(np.float32) / 32768.0)
        return to_int16(out)

    def frames(self) -> Iterator[Frame]:
        clock = _Clock(self.stream, self.frame_samples)
        while not self._closed.is_set():
            try:
                data, captured_at = self._queue.get(timeout=0.5)
            except queue.Empty:
                if not self._pa_stream.is_active():
                    raise SourceError(f"mic: capture from {self.device_name!r} stopped")
                continue
            if self._watch is not None:
                self._watch.check()
            self._pending = np.concatenate((self._pending, self._convert(data)))
            while len(self._pending) >= self.frame_samples:
                block, self._pending = self._pending[: self.frame_samples], self._pending[self.frame_samples :]
                yield clock.frame(block, captured_at)

    def close(self) -> None:
        if self._closed.is_set():
            return  # PortAudio hangs when a stopped stream is stopped again
        self._closed.set()
        with contextlib.suppress(Exception):
            self._pa_stream.stop_stream()
            self._pa_stream.close()
        with contextlib.suppress(Exception):
            self._pa.terminate()


def open_source(spec: str, stream: str, frame_samples: int, pace: str = "realtime", mic_rate: int = 0) -> Source:
    """Open the source named by ``spec``: ``mic[:DEVICE]``, ``file:PATH`` or ``stdin``."""
    kind, _, arg = spec.partition(":")
    if kind == "file":
        if not arg:
            raise SourceError("file source needs a path: file:PATH")
        return FileSource(arg, stream, frame_samples, pace)
    if kind == "stdin":
        return StdinSource(stream, frame_samples)
    if kind == "mic":
        return MicSource(stream, frame_samples, arg or None, mic_rate)
    raise SourceError(f"unknown source {spec!r} (expected mic[:DEVICE], file:PATH or stdin)")
