"""Time one session call of each shipped model on one CPU thread (models.threads = 1):
the speaker encoder per 1.6 s window alone, in a batch of 8 and per second of speech, each
digit model family per second of audio. Run from the repo root: python scripts/time_models.py"""

import time
from dataclasses import replace

import numpy as np

from streamd import config
from streamd.models.inference import load_models
from streamd.signal.features import FRAMES

CALLS = 50


def per_row_ms(model, shape: tuple[int, ...]) -> float:
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    model.infer(x)  # warm-up: the first call plans the shape
    start = time.perf_counter()
    for _ in range(CALLS):
        model.infer(x)
    return (time.perf_counter() - start) / CALLS / shape[0] * 1000


def main() -> None:
    cfg = config.load(None)
    models = load_models(replace(cfg, digits=replace(cfg.digits, model="fused")), "cpu")
    window, hop, _ = models.speaker.card.window
    alone = per_row_ms(models.speaker, (1, window, 40))
    print(f"speaker, one {window}-frame window alone: {alone:.1f} ms")
    print(f"speaker, per window in a batch of 8:    {per_row_ms(models.speaker, (8, window, 40)):.1f} ms")
    # A long utterance gets a window every hop frames: cost per second of speech.
    print(f"speaker, per second of speech (a window per {hop * 10} ms): {alone * 100 / hop:.1f} ms")
    for name, digits in models.digits.members.items():
        # the word window is 1.5 s whatever the utterance's length: its cost is per utterance
        frames = 100 if digits.params.streamed else FRAMES
        print(f"digits {name + ',':<7} one 1 s utterance:          {per_row_ms(digits, (1, frames, digits.params.numcep)):.2f} ms")


if __name__ == "__main__":
    main()
