"""How often the VAD loses a word as the microphone gets quieter, with and without its input
gain (vad.max_gain_db), on the training speakers only (no model involved, so this may choose
the gain's settings without touching the held-out speakers). Each clip is scaled by 0, -10,
-20 and -30 dB, padded with 0.3 s of silence as `streamd eval` pads it, and segmented: "lost"
is no speech found (the daemon would say nothing), "split" is more than one utterance. Pure
noise (pink and white, one minute at each level) shows what the gain costs: utterances
started by noise alone. With --digits, the shipped digit decision (config.toml's) on the
digit-validation speakers' real clips (ASC; neither trained nor tested on) at each level, as
`streamd eval digits` scores it: the model's choice, and named right by the daemon's rule.

Run from the repo root: python scripts/vad_levels.py --data ../shared/datasets [--digits]
(~3 min, ~8 more with --digits)"""

import argparse
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import soundfile as sf

from streamd.config import build, read_toml
from streamd.audio.stream_audio import pink as pink_noise
from streamd.offline.evaluate import Clip, digit_report
from streamd.audio.frames import SAMPLE_RATE
from streamd.models.inference import load_digits
from streamd.train import data
from streamd.signal.vad import VadParams, heard_utterance, segment_clip

LEVELS_DB = (0, -10, -20, -30)
NOISE_DBFS = (-70, -55, -40)


def utterances(audio: np.ndarray, params: VadParams, pad_s: float = 0.3) -> int:
    pad = np.zeros(int(pad_s * SAMPLE_RATE), np.int16)
    return sum(e.usable for e in segment_clip(np.concatenate((pad, audio, pad)), params))


def scaled(audio: np.ndarray, db: float) -> np.ndarray:
    return np.round(audio * 10 ** (db / 20)).astype(np.int16)


def word_table(clips: list[data.Clip], settings: dict[str, VadParams]) -> None:
    print("| gain | level | " + " | ".join(f"{g}: lost / split" for g in sorted({c.corpus for c in clips})) + " |")
    audio = [sf.read(c.path, dtype="int16")[0] for c in clips]
    for name, params in settings.items():
        for db in LEVELS_DB:
            counts: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
            for clip, a in zip(clips, audio):
                n = utterances(scaled(a, db), params)
                c = counts[clip.corpus]
                c[0], c[1], c[2] = c[0] + 1, c[1] + (n == 0), c[2] + (n > 1)
            cells = [f"{c[1] / c[0]:.1%} / {c[2] / c[0]:.1%}" for _, c in sorted(counts.items())]
            print(f"| {name} | {db} dB | " + " | ".join(cells) + " |")


def digit_table(clips: list[data.Clip], settings: dict[str, VadParams]) -> None:
    """Scored by ``streamd.offline.evaluate.digit_report``, as ``streamd eval digits`` scores the
    held-out speakers (a clip the VAD does not hear is said nothing)."""
    cfg = build(read_toml(Path("config.toml")))
    digits = load_digits(cfg)
    threshold = digits.min_confidence(cfg.digits.min_confidence)
    scored = [Clip(Path(c.path), c.corpus, c.speaker, None if c.label == data.NOT_DIGIT else c.label) for c in clips]
    audio = [sf.read(c.path, dtype="int16")[0] for c in clips]
    print(f"| gain | level | digits: model's choice | named right | other words called a digit |  "
          f"({digits.choice}, >= {threshold:.2f})")
    for name, params in settings.items():
        for db in LEVELS_DB:
            cuts = [heard_utterance(scaled(a, db), params) for a in audio]
            logits = np.stack([digits.run(digits.features_of(speech)) for speech, _ in cuts])
            r = digit_report(scored, logits, threshold, np.array([heard for _, heard in cuts]))
            asc = r["asc"]
            print(f"| {name} | {db} dB | {asc['accuracy']:.1%} | {asc['accuracy_with_rejection']:.1%} "
                  f"| {r['non_digit_called_digit']['rate']:.1%} |")


def noise_table(settings: dict[str, VadParams]) -> None:
    rng = np.random.default_rng(0)
    minute = 60 * SAMPLE_RATE
    kinds = {"pink": pink_noise(minute, rng), "white": rng.standard_normal(minute)}
    print("| gain | " + " | ".join(f"{k} {d} dBFS" for k in kinds for d in NOISE_DBFS) + " |  (utterances per minute)")
    for name, params in settings.items():
        cells = [str(utterances(np.round(x * 32768 * 10 ** (d / 20)).astype(np.int16), params, 0.0))
                 for x in kinds.values() for d in NOISE_DBFS]
        print(f"| {name} | " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--gain-db", type=float, nargs="+", default=[24.0])
    ap.add_argument("--every", type=int, default=3, help="take every n-th training clip (speed)")
    ap.add_argument("--digits", action="store_true", help="also the digit decision on the validation speakers")
    args = ap.parse_args()
    clips = [c for c in data.real_clips(args.data) if not data.is_validation(c) and not c.heldout
             and c.label != data.NOT_DIGIT][:: args.every]
    settings = {"off": replace(VadParams(), max_gain_db=0.0)}
    settings |= {f"{g:g} dB": replace(VadParams(), max_gain_db=g) for g in args.gain_db}
    print(f"{len(clips)} training-speaker digit clips")
    word_table(clips, settings)
    noise_table(settings)
    if args.digits:
        validation = [c for c in data.real_clips(args.data) if data.is_validation(c)]
        print(f"{len(validation)} validation-speaker clips")
        digit_table(validation, settings)


if __name__ == "__main__":
    main()
