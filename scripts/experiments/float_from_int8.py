"""Float twins of the models whose LSTM layers ship as int8 (speaker.onnx, digits-ge2e.onnx),
made without training: each DynamicQuantizeLSTM node becomes a float LSTM whose weights are the
int8 weights dequantized (the same values; only the per-batch quantization of the activations
goes). Measures, on this CPU, one session call of each variant (models.threads = 1) and how far
the float outputs lie from the int8 ones on the bundled recordings' windows (issue 31 item 3:
the variant that is faster on the CPU it runs on). Not shipped: see BENCHMARKS.md, "int8 or
float". Run from the repo root: python scripts/experiments/float_from_int8.py"""

import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from streamd import config
from streamd.audio.sources import read_audio
from streamd.models.inference import load_models
from streamd.models.providers import session_options
from streamd.offline.machine import describe, summary
from streamd.signal.features import features_of_audio

ROOT = Path(__file__).resolve().parents[2]
CALLS = 30


def float_twin(src: Path, dst: Path) -> None:
    model = onnx.load(str(src))
    g = model.graph
    init = {t.name: t for t in g.initializer}

    def dequantized(name: str, scale: str, zero: str) -> onnx.TensorProto:
        w = numpy_helper.to_array(init[name]).astype(np.float32)
        s, z = numpy_helper.to_array(init[scale]), numpy_helper.to_array(init[zero]).astype(np.float32)
        # DynamicQuantizeLSTM's weights are [directions, input, 4*hidden]; LSTM's [directions, 4*hidden, input]
        return numpy_helper.from_array(((w - z.reshape(-1, 1, 1)) * s.reshape(-1, 1, 1)).transpose(0, 2, 1).copy(),
                                       name + "_float")

    nodes = []
    for n in g.node:
        if n.op_type != "DynamicQuantizeLSTM":
            nodes.append(n)
            continue
        x, w, r, b, lens, h0, c0, p, ws, wz, rs, rz = list(n.input) + [""] * (12 - len(n.input))
        g.initializer.extend([dequantized(w, ws, wz), dequantized(r, rs, rz)])
        lstm = helper.make_node("LSTM", [x, w + "_float", r + "_float", b, lens, h0, c0, p], list(n.output),
                                name=n.name.replace("_quant", "_float"))
        lstm.attribute.extend(n.attribute)
        nodes.append(lstm)
    del g.node[:]
    g.node.extend(nodes)
    onnx.save(model, str(dst))


def per_call_ms(path: Path, x: np.ndarray) -> float:
    s = ort.InferenceSession(str(path), sess_options=session_options(1), providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    s.run(None, {name: x})
    start = time.perf_counter()
    for _ in range(CALLS):
        s.run(None, {name: x})
    return (time.perf_counter() - start) / CALLS * 1000


def outputs(path: Path, rows: list[np.ndarray]) -> np.ndarray:
    s = ort.InferenceSession(str(path), sess_options=session_options(1), providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: r[None]})[0] for r in rows])


def main() -> None:
    cfg = config.load(None)
    models = load_models(cfg, "cpu")
    print(summary(describe()))
    speaker = models.speaker
    ge2e = models.digits.members.get("ge2e") or next(m for m in models.digits.members.values()
                                                      if m.card.model_path.name == "digits-ge2e.onnx")
    audio = [read_audio(str(p)) for p in sorted((ROOT / "tests" / "data").glob("*.flac"))]
    with tempfile.TemporaryDirectory() as tmp:
        for model, shape in ((speaker, (8, 160, 40)), (ge2e, (1, 100, 40))):
            src = model.card.model_path
            dst = Path(tmp) / (src.stem + ".float.onnx")
            float_twin(src, dst)
            x = np.random.default_rng(0).random(shape, dtype=np.float32)
            t8, tf = per_call_ms(src, x), per_call_ms(dst, x)
            feats = [features_of_audio(a[: 16000 * 3], model.params) for a in audio]
            rows = [r for f in feats for r in model.inputs(f)]
            a, b = outputs(src, rows), outputs(dst, rows)
            if model is speaker:
                cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
                agree = f"cosine int8 vs float min {cos.min():.5f} mean {cos.mean():.5f} over {len(rows)} windows"
            else:
                agree = (f"argmax agrees on {np.mean(a.argmax(1) == b.argmax(1)):.3f} of {len(rows)} utterances, "
                         f"max |logit diff| {np.abs(a - b).max():.3f}")
            print(f"{src.name}: batch {shape}: int8 {t8:.2f} ms, float {tf:.2f} ms per call; {agree}")


if __name__ == "__main__":
    main()
