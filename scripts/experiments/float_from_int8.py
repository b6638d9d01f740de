"""Float twins of the shipped int8 models, made without training, timed against int8 on this
CPU (issue 31 item 3: the variant that is faster on the CPU it runs on). Not shipped: see
BENCHMARKS.md, "int8 or float".

Two kinds of int8 graph ship. speaker.onnx and digits-ge2e.onnx have DynamicQuantizeLSTM
layers: each becomes a float LSTM whose weights are the int8 weights dequantized (the same
values; only the per-batch quantization of the activations goes, so the twin's rows may batch
together where the int8 model's must run alone). words.onnx and digits-words.onnx are static
QDQ graphs: weights' DequantizeLinear folded into float initializers, each activation's
QuantizeLinear -> DequantizeLinear pair bypassed.

Per row, one thread (models.threads = 1): int8 as the daemon runs it (rows alone where the card
says so) against the float twin in one call of 1, 4, 8 and 16 rows; then how far the twin's
outputs lie from int8's on the bundled recordings. Run from the repo root:
python scripts/experiments/float_from_int8.py"""

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
BATCHES = (1, 4, 8, 16)


def _array(init: dict, name: str) -> np.ndarray:
    return numpy_helper.to_array(init[name])


def float_lstms(graph) -> None:
    """Each DynamicQuantizeLSTM becomes an LSTM whose weights are the int8 weights dequantized."""
    init = {t.name: t for t in graph.initializer}

    def dequantized(name: str, scale: str, zero: str):
        w = _array(init, name).astype(np.float32)
        s, z = _array(init, scale), _array(init, zero).astype(np.float32)
        # DynamicQuantizeLSTM's weights are [directions, input, 4*hidden]; LSTM's [directions, 4*hidden, input]
        w = ((w - z.reshape(-1, 1, 1)) * s.reshape(-1, 1, 1)).transpose(0, 2, 1)
        return numpy_helper.from_array(np.ascontiguousarray(w, np.float32), name + "_float")

    nodes = []
    for n in graph.node:
        if n.op_type != "DynamicQuantizeLSTM":
            nodes.append(n)
            continue
        x, w, r, b, lens, h0, c0, p, ws, wz, rs, rz = list(n.input) + [""] * (12 - len(n.input))
        graph.initializer.extend([dequantized(w, ws, wz), dequantized(r, rs, rz)])
        lstm = helper.make_node("LSTM", [x, w + "_float", r + "_float", b, lens, h0, c0, p], list(n.output),
                                name=n.name + "_float")
        lstm.attribute.extend(n.attribute)
        nodes.append(lstm)
    del graph.node[:]
    graph.node.extend(nodes)


def _dequantize(q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, axis: int) -> np.ndarray:
    shape = [1] * q.ndim
    if scale.ndim == 1 and q.ndim:
        shape[axis] = -1
    zero = np.zeros_like(scale) if zero is None else zero.astype(np.float32)
    return ((q.astype(np.float32) - zero.reshape(shape)) * scale.reshape(shape)).astype(np.float32)


def strip_qdq(graph) -> None:
    """A static QDQ graph as float."""
    init = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    renamed, kept, folded = {}, [], []
    for n in graph.node:
        src = n.input[0] if n.op_type == "DequantizeLinear" else None
        if src is not None and src in init:
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            zero = _array(init, n.input[2]) if len(n.input) > 2 and n.input[2] else None
            folded.append(numpy_helper.from_array(_dequantize(_array(init, src), _array(init, n.input[1]), zero, axis),
                                                  n.output[0]))
        elif src is not None and src in producer and producer[src].op_type == "QuantizeLinear":
            renamed[n.output[0]] = producer[src].input[0]
        else:
            kept.append(n)
    for n in kept:
        for i, name in enumerate(n.input):
            n.input[i] = renamed.get(name, name)
    used = {i for n in kept for i in n.input} | {o.name for o in graph.output}
    kept = [n for n in kept if n.op_type != "QuantizeLinear" or n.output[0] in used]
    used = {i for n in kept for i in n.input} | {o.name for o in graph.output}
    live = [t for t in list(graph.initializer) + folded if t.name in used]
    del graph.node[:]
    graph.node.extend(kept)
    del graph.initializer[:]
    graph.initializer.extend(live)


def float_twin(path: Path) -> bytes:
    model = onnx.load(str(path))
    float_lstms(model.graph)
    strip_qdq(model.graph)
    return model.SerializeToString()


def session(model):
    return ort.InferenceSession(model, sess_options=session_options(1), providers=["CPUExecutionProvider"])


def per_row_ms(s, x: np.ndarray, alone: bool) -> float:
    name = s.get_inputs()[0].name

    def run():
        if alone:
            for i in range(len(x)):
                s.run(None, {name: x[i : i + 1]})
        else:
            s.run(None, {name: x})

    run()
    start = time.perf_counter()
    for _ in range(CALLS):
        run()
    return (time.perf_counter() - start) / CALLS / len(x) * 1000


def agreement(model, a, b, audio: list[np.ndarray]) -> str:
    """How far the twin's outputs lie from int8's on real speech, each row alone."""
    if model.params.kind == "wordwin":
        rows = [features_of_audio(x[: 16000 * 2], model.params)[None] for x in audio]
    else:
        rows = [r for x in audio for r in model.inputs(features_of_audio(x[: 16000 * 3], model.params))]
    name = a.get_inputs()[0].name
    oa = np.concatenate([a.run(None, {name: r[None] if r.ndim < len(a.get_inputs()[0].shape) else r})[0] for r in rows])
    ob = np.concatenate([b.run(None, {name: r[None] if r.ndim < len(a.get_inputs()[0].shape) else r})[0] for r in rows])
    if model.card.kind == "speaker" or oa.shape[1] > 40:  # embeddings
        cos = (oa * ob).sum(1) / np.linalg.norm(oa, axis=1) / np.linalg.norm(ob, axis=1)
        return f"cosine min {cos.min():.5f} mean {cos.mean():.5f} ({len(rows)} rows)"
    return f"argmax same on {np.mean(oa.argmax(1) == ob.argmax(1)):.3f} of {len(rows)}, max |logit diff| {np.abs(oa - ob).max():.3f}"


def main() -> None:
    from dataclasses import replace

    cfg = config.load(None)
    models = load_models(replace(cfg, digits=replace(cfg.digits, model="fused")), "cpu")
    print(summary(describe()))
    by_file = {m.card.model_path.name: m for m in models.all()}
    audio = [read_audio(str(p)) for p in sorted((ROOT / "tests" / "data").glob("*.flac"))]
    for file in ("speaker.onnx", "digits-ge2e.onnx", "digits-words.onnx"):
        model = by_file[file]
        a, b = session(str(model.card.model_path)), session(float_twin(model.card.model_path))
        shape = [d if isinstance(d, int) else 1 for d in a.get_inputs()[0].shape]
        if model.card.window is not None:
            shape[1] = model.card.window[0]
        elif not isinstance(a.get_inputs()[0].shape[1], int):
            shape[1] = 100  # a 1 s utterance
        cells = []
        for n in BATCHES:
            x = np.random.default_rng(0).random((n, *shape[1:]), dtype=np.float32)
            cells.append(f"{n}: int8 {per_row_ms(a, x, model.card.rows_alone):.2f} / float {per_row_ms(b, x, False):.2f}")
        print(f"{file} ms per row ({'int8 rows alone' if model.card.rows_alone else 'int8 batched'}), "
              f"by rows per call: {'; '.join(cells)}; {agreement(model, a, b, audio)}")


if __name__ == "__main__":
    main()
