"""Do the training clips get other VAD cuts with ``vad.quiet_end_ms`` on than off?

Every FSDD and ASC clip, as the models were trained on it (``streamd.train.data``): the
clip padded with digital silence, the clip inside a clean stream (variant 7, as the fusion
was fitted), and one augmented stream copy (variant 1); cut by ``heard_utterance`` with the
quiet end off (the cards' VadParams) and on. Prints how many cuts differ, and by how much.

    python scripts/experiments/quiet_end_cuts.py --data ../shared/datasets [--jobs 2] [--depth DB] [--quiet-ms MS] [--every N]
"""

from __future__ import annotations

import argparse
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np

from streamd.offline.evaluate import corpus_clips
from streamd.signal import vad
from streamd.signal.vad import VadParams, heard_utterance
from streamd.train import data

VARIANTS = (data.CLEAN, data.STREAMED, data.TRAIN_VARIANTS[1])


QUIET_MS = VadParams().quiet_end_ms


def cut_lengths(clip) -> list[tuple[int, int]]:
    on, off = replace(VadParams(), quiet_end_ms=QUIET_MS), replace(VadParams(), quiet_end_ms=0)
    out = []
    for v in VARIANTS:
        audio = data.variant_audio(clip, v, 0)
        pad = 0.0 if v.stream else 0.3
        out.append((len(heard_utterance(audio, off, pad)[0]), len(heard_utterance(audio, on, pad)[0])))
    return out


def configure(depth: float, quiet_ms: int) -> None:
    global QUIET_MS
    vad.QUIET_DEPTH_DB, QUIET_MS = depth, quiet_ms


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=Path("../shared/datasets"))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--depth", type=float, default=vad.QUIET_DEPTH_DB, help="QUIET_DEPTH_DB to try")
    ap.add_argument("--quiet-ms", type=int, default=QUIET_MS, help="vad.quiet_end_ms to try")
    ap.add_argument("--every", type=int, default=1, help="every Nth clip (a quicker look)")
    opts = ap.parse_args()
    clips = corpus_clips(opts.data, {"jackson", "nicolas", "theo", "yweweler"}, lambda r: True)[:: opts.every]
    with ProcessPoolExecutor(opts.jobs, initializer=configure, initargs=(opts.depth, opts.quiet_ms)) as pool:
        lengths = np.array(list(pool.map(cut_lengths, clips, chunksize=64)))  # (clips, variants, 2)
    print(f"{len(clips)} clips, QUIET_DEPTH_DB {opts.depth:g}, quiet_end_ms {opts.quiet_ms}")
    for k, v in enumerate(VARIANTS):
        off, on = lengths[:, k, 0], lengths[:, k, 1]
        diff = off != on
        shorter = (on < off)[diff]
        print(f"variant {v.index} ({'stream' if v.stream else 'clip'}{', augmented' if v.augment else ''}): "
              f"{diff.sum()} of {len(clips)} cuts differ ({100 * diff.mean():.2f}%), {shorter.sum()} shorter; "
              f"median change {np.median(np.abs(off - on)[diff]) / 16 if diff.any() else 0:.0f} ms")


if __name__ == "__main__":
    main()
