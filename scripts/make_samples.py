"""Rebuild the short clips bundled in tests/data from ../shared/datasets (run once, by hand).

Only speakers held out of model training are used (FSDD `theo`; ASC validation speakers),
so the demo and the end-to-end tests show the models on voices they never saw.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

DATA = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/datasets")
OUT = Path("tests/data")
RATE = 16000
GAP = np.zeros(int(0.8 * RATE), dtype=np.int16)


def clip(corpus: str, rel: str) -> np.ndarray:
    audio, rate = sf.read(DATA / corpus / rel, dtype="int16")
    assert rate == RATE
    return audio


def fsdd(digit: int, rep: int) -> str:
    return f"theo/{digit}_theo_{rep}.flac"


WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def asc(speaker: str, word: str, rep: int) -> str:
    return f"{speaker}/{word}_{speaker}_{rep:02d}.flac"


def trim(audio: np.ndarray, frame: int = 320, floor_dbfs: float = -40.0) -> np.ndarray:
    """The word without the silence around it (20 ms frames above ``floor_dbfs``)."""
    n = len(audio) // frame
    rms = np.sqrt(np.mean((audio[: n * frame].reshape(n, frame) / 32768.0) ** 2, axis=1))
    loud = np.flatnonzero(20 * np.log10(np.maximum(rms, 1e-6)) > floor_dbfs)
    return audio[loud[0] * frame : (loud[-1] + 1) * frame] if len(loud) else audio


def phrase(speaker: str, words: tuple[str, ...]) -> np.ndarray:
    """Keywords 0.1 s apart: one 2-3 s utterance for the daemon's VAD."""
    pause = np.zeros(int(0.1 * RATE), dtype=np.int16)
    cuts = [trim(clip("arabic-speech-commands", asc(speaker, w, 3))) for w in words]
    return np.concatenate([x for c in cuts for x in (c, pause)][:-1])


def write(name: str, parts: list[np.ndarray]) -> None:
    audio = np.concatenate([x for p in parts for x in (p, GAP)])
    sf.write(OUT / name, np.concatenate((GAP, audio)), RATE, subtype="PCM_16")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    # Enrollment material: 10 clips per speaker (one per digit), reps not used in the demo.
    write("enroll_theo.flac", [clip("fsdd", fsdd(d, 40 + d)) for d in range(10)])
    for spk in ("00000002", "00000007"):
        write(f"enroll_asc{spk[-2:]}.flac", [clip("arabic-speech-commands", asc(spk, w, 9)) for w in WORDS])
    # The demo: digits from two enrolled speakers and one who is not enrolled, and a non-digit word.
    demo = [
        ("fsdd", fsdd(3, 1)), ("fsdd", fsdd(7, 2)), ("fsdd", fsdd(1, 3)),
        ("arabic-speech-commands", asc("00000002", "five", 1)),
        ("arabic-speech-commands", asc("00000002", "two", 2)),
        ("arabic-speech-commands", asc("00000007", "nine", 1)),
        ("arabic-speech-commands", asc("00000007", "four", 2)),
        ("arabic-speech-commands", asc("00000008", "six", 1)),
        ("arabic-speech-commands", asc("00000002", "open", 1)),
        ("fsdd", fsdd(8, 4)),
    ]
    write("demo.flac", [clip(c, p) for c, p in demo])
    with open(OUT / "demo.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["order", "corpus", "file", "speaker", "digit"])
        for i, (c, p) in enumerate(demo):
            spk = p.split("/")[0]
            word = Path(p).stem.split("_")[0]
            digit = word if c == "fsdd" else (WORDS.index(word) if word in WORDS else "")
            w.writerow([i, c, p, spk, digit])
    # Voices nobody enrolled, speaking 2-3 s phrases (three keywords each, cut where the
    # daemon's VAD would cut them, 0.1 s apart so they make one utterance): recurring unknown
    # voices for the clustering and promotion tests.
    visitors = {"00000012": [("yes", "open", "left"), ("stop", "record", "next"), ("cancel", "enable", "up"),
                             ("move", "send", "zoom_in"), ("backward", "close", "options")],
                "00000021": [("yes", "open", "left"), ("stop", "record", "next")]}
    for spk, phrases in visitors.items():
        write(f"visitor{spk[-2:]}.flac", [phrase(spk, words) for words in phrases])
    # One clean clip for the feature-parity test, and a clear word for the VAD tests.
    sf.write(OUT / "parity.flac", clip("fsdd", fsdd(5, 10)), RATE, subtype="PCM_16")
    sf.write(OUT / "word.flac", clip("fsdd", "jackson/7_jackson_5.flac"), RATE, subtype="PCM_16")


if __name__ == "__main__":
    main()
