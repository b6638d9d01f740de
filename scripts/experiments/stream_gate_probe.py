"""Variants of the VAD's gate and a neural confirmation stage, measured with `streamd eval
stream` on the validation speakers (never the held-out ones). Measured, not shipped beyond
what streamd.signal.vad now does; scripts/experiments/HISTORY.md ("Streams: what was tried") has the figures.

    python scripts/experiments/stream_gate_probe.py VARIANT DATA [eval stream options]

VARIANT, joined with "_":
  floor        the floor's gate alone (streamd.signal.vad before the pause gate)
  spreadkK     the pause gate with K times the spread below the median (shipped: K = 1.5)
  spreadup     the pause gate with the spread above the median (p90 - p50)
  graceN       webrtcvad's voiced frames below the gate kept for N frames after a passing one
  sileroT      silero-vad (MIT; the ONNX file inside the PyPI wheel silero-vad==6.2.3, at
               silero_vad/data/silero_vad.onnx, given by --silero-onnx) confirms each utterance:
               at least a share T of its 32 ms chunks at p > 0.5

Example: stream_gate_probe.py spreadk1.5_silero0.2 ../shared/datasets --silero-onnx silero_vad.onnx
         --speakers validation --words 80 --noise-minutes 1
"""

from __future__ import annotations

import atexit
import collections
import sys
import time

import numpy as np

from streamd.service import pipeline

from streamd.signal import vad
from streamd.cli import main
from streamd.service.events import VadEnd
from streamd.signal.vad import DIGITAL_SILENCE_DBFS, SAMPLE_RATE, frame_levels


def option(variant: str, name: str, default: float | None = None) -> float | None:
    for part in variant.split("_"):
        if part.startswith(name) and part[len(name):].replace(".", "").isdigit():
            return float(part[len(name):])
    return default


def patch_gate(variant: str) -> None:
    k, grace = option(variant, "spreadk"), int(option(variant, "grace", 0))
    orig_reset = vad.Segmenter.reset

    def reset(self):
        orig_reset(self)
        self._grace, self._pause_levels, self._stats, self._n = 0, collections.deque(maxlen=250), None, 0

    def is_speech(self, frame):
        dbfs, level = frame_levels(frame.samples)
        voiced = self._vad.is_speech(self._gain(frame.samples, dbfs).tobytes(), SAMPLE_RATE)
        self._observe(level)  # the floor and the clip-or-stream decision, as streamd.signal.vad
        if not (self._gated and self._floor.noisy):
            return voiced
        gate = self._floor.value + self.params.min_snr_db
        if k is not None or "spreadup" in variant:
            if (self._active is None or len(self._pause_levels) < 25) and level > DIGITAL_SILENCE_DBFS:
                self._pause_levels.append(level)
            self._n += 1
            if self._n % 5 == 0 and len(self._pause_levels) >= 25:
                p10, p50, p90 = np.percentile(np.asarray(self._pause_levels), (10, 50, 90))
                self._stats = p50 + ((p90 - p50) if k is None else k * (p50 - p10)) + 1.0
            if self._stats is not None:
                gate = max(gate, self._stats)
        if not voiced:
            self._grace = 0
            return False
        if level >= gate:
            self._grace = grace
            return True
        if self._active is not None and self._grace > 0:
            self._grace -= 1
            return True
        return False

    vad.Segmenter.reset, vad.Segmenter.is_speech = reset, is_speech


def patch_silero(share: float, onnx_path: str) -> None:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    session = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
    cost = [0.0, 0]

    def probs(audio: np.ndarray) -> np.ndarray:
        start = time.process_time()
        x = audio.astype(np.float32) / 32768.0
        state, ctx = np.zeros((2, 1, 128), np.float32), np.zeros((1, 64), np.float32)
        out = np.zeros(len(x) // 512, np.float32)
        for i in range(len(out)):
            chunk = np.concatenate((ctx, x[None, i * 512 : (i + 1) * 512]), axis=1)
            p, state = session.run(None, {"input": chunk, "state": state, "sr": np.array(16000, np.int64)})
            out[i], ctx = p[0, 0], chunk[:, -64:]
        cost[0] += time.process_time() - start
        cost[1] += len(audio)
        return out

    orig_end = pipeline.StreamPipeline._end

    def end(self, e):
        if e.usable:
            p = probs(np.concatenate(self._audio) if self._audio else np.zeros(0, np.int16))
            if len(p) == 0 or float(np.mean(p > 0.5)) < share:
                self._publish(VadEnd(self.stream, e.utterance, e.t_start, e.t_end, reason="rejected"))
                self._early = None
                return
        orig_end(self, e)

    pipeline.StreamPipeline._end = end
    atexit.register(lambda: print(f"silero: {1000 * cost[0] / max(cost[1] / 16000, 1e-9):.1f} ms CPU per "
                                  "second of utterance audio", file=sys.stderr))


if __name__ == "__main__":
    variant, args = sys.argv[1], sys.argv[2:]
    if "floor" in variant or option(variant, "spreadk") is not None or "spreadup" in variant or "grace" in variant:
        patch_gate(variant)
    onnx_path = None
    if "--silero-onnx" in args:
        i = args.index("--silero-onnx")
        onnx_path = args[i + 1]
        del args[i : i + 2]
    if option(variant, "silero") is not None:
        if onnx_path is None:
            sys.exit("stream_gate_probe: a silero variant needs --silero-onnx PATH")
        patch_silero(option(variant, "silero"), onnx_path)
    sys.exit(main(["eval", "stream", *args]))  # args[0] is DATA
