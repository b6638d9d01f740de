"""Typed audio frames passed from sources to the rest of the pipeline."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

SAMPLE_RATE = 16000
# A stream's name in events, configs and network audio.
STREAM_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True, slots=True)
class Frame:
    """A fixed-size block of 16 kHz mono int16 audio from one stream.

    ``t`` is the audio time of the first sample, in seconds since the stream started;
    ``captured_at`` is ``time.monotonic()`` when the block was captured (or read).
    """

    stream: str
    index: int
    samples: np.ndarray
    t: float
    captured_at: float

    @property
    def duration(self) -> float:
        return len(self.samples) / SAMPLE_RATE

    @property
    def t_end(self) -> float:
        return self.t + self.duration
