"""What skipping webrtcvad on quiet frames (streamd.signal.vad_bank) changes, by how many of the
skipped frames are replayed into it before it runs again: the bundled recordings, each over
Gaussian noise at 4 levels, segmented with every frame through webrtcvad and with the skip;
counts the utterance boundaries that differ. Run from the repo root:
python scripts/experiments/vad_skip_probe.py"""

from pathlib import Path

import numpy as np

from streamd.audio.sources import read_audio
from streamd.signal.vad import VadParams, segment_clip
from streamd.signal.vad_bank import VadBank

DATA = Path(__file__).resolve().parents[2] / "tests" / "data"


def cuts(audio: np.ndarray) -> set[tuple[float, float]]:
    return {(round(e.t_start, 2), round(e.t_end, 2)) for e in segment_clip(audio, VadParams())}


def main() -> None:
    rng = np.random.default_rng(0)
    tests = []
    for clip in (read_audio(str(p)) for p in sorted(DATA.glob("*.flac"))):
        for sigma in (3, 10, 30, 60):
            noise = rng.standard_normal(len(clip) + 32000) * sigma
            noise[16000 : 16000 + len(clip)] += clip
            tests.append(np.clip(noise, -32768, 32767).astype(np.int16))
    VadBank.SKIP_QUIET = False
    every = [cuts(a) for a in tests]
    VadBank.SKIP_QUIET = True
    take = VadBank.take_skipped
    for replay in (0, 15, 50, 100):
        VadBank.REPLAY_FRAMES = max(replay, 1)
        VadBank.take_skipped = take if replay else lambda self, r: take(self, r) and []
        moved = sum(len(cuts(a) ^ e) for a, e in zip(tests, every))
        print(f"replay {replay:3} frames: {moved} of {sum(map(len, every))} utterances' boundaries differ")


if __name__ == "__main__":
    main()
