"""Frame levels in dB below full scale, for one frame or many at once."""

from __future__ import annotations

import numpy as np

SILENT_DBFS = -120.0
# Frames quieter than this are digital silence (a muted microphone, a suspended sound server,
# VoIP silence suppression, zero-filled lost network frames): no microphone's noise floor is
# this low (-96 dBFS is the RMS of one least significant bit).
DIGITAL_SILENCE_DBFS = -100.0
_LEAST = 10 ** (SILENT_DBFS / 10)


def levels(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each row of int16 samples: its level in dBFS, and the same with the DC offset left
    out (what the noise floor and gate compare). The sums are exact (int64), so a frame's
    levels do not depend on the frames beside it."""
    n = frames.shape[1]
    total = frames.sum(axis=1, dtype=np.int64)
    squares = np.einsum("ij,ij->i", frames, frames, dtype=np.int64)
    power = squares / n / 32768.0**2
    ac = np.maximum(squares - total * total / n, 0.0) / n / 32768.0**2
    return 10.0 * np.log10(np.maximum(power, _LEAST)), 10.0 * np.log10(np.maximum(ac, _LEAST))
