"""What one all-quiet tick of the VAD bank costs: N streams of low noise (settled: every frame
under its gate, so nothing reaches webrtcvad or the per-stream Python), 2,000 ticks in a tight
loop, then cProfile's top entries. BENCHMARKS.md, "On an AVX2-only machine" (the real-time
bench costs about twice the tight loop: the caches are cold after each 20 ms sleep).
Run from the repo root: python scripts/experiments/quiet_tick_probe.py [N]"""

import cProfile
import pstats
import sys
import time

import numpy as np

from streamd import config
from streamd.offline.machine import describe, summary
from streamd.signal.vad_bank import VadBank

TICKS = 2000


def main(n: int) -> None:
    cfg = config.load(None)
    bank = VadBank(cfg.vad)
    rows = np.array([bank.add() for _ in range(n)])
    rng = np.random.default_rng(0)
    frames = [(rng.standard_normal((n, cfg.vad.frame_samples)) * 30).astype(np.int16) for _ in range(50)]
    for i in range(600):  # the floor and the gate settle
        tick = bank.tick(rows, frames[i % 50], np.full(n, i * 0.02))
    print(summary(describe()))
    print(f"quiet share after settling: {tick.quiet.mean():.2f}")
    start = time.perf_counter()
    for i in range(TICKS):
        bank.tick(rows, frames[i % 50], np.full(n, (600 + i) * 0.02))
    print(f"one tick of {n} streams: {(time.perf_counter() - start) / TICKS * 1e6:.0f} us")
    profile = cProfile.Profile()
    profile.enable()
    for i in range(TICKS):
        bank.tick(rows, frames[i % 50], np.full(n, (600 + TICKS + i) * 0.02))
    profile.disable()
    pstats.Stats(profile).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100)
