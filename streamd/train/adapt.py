"""``streamd train digits --adapt CORPUS``: a digit model adapted to a new language or accent
from a few examples, keeping the rest of the network.

The shipped ONNX graph is cut where its classifier head begins (the pooled utterance vector
that feeds ``head.0``). The trunk stays exactly as it is; only the head (two small linear
layers) is trained again, on the pooled vectors of the adaptation clips (each also in six
augmented versions), pulled towards its old weights (L2-SP) so that what it knew is not
forgotten wholesale. The adapted head is written back into a copy of the graph.

The adaptation corpus is a folder with a ``manifest.csv`` like the shipped corpora's: ``path``,
``speaker`` and ``digit`` (empty for other words) columns; when it has a ``split`` column,
speakers whose split is ``val`` are never used for adaptation (they are the test speakers).
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from streamd.models.cards import sha256_of
from streamd.train import data, scoring

HEAD = ("head.0.weight", "head.0.bias", "head.3.weight", "head.3.bias")
# Chosen on the digit validation speakers (English-only model adapted to Arabic: 400 steps at
# 1e-3 with L2-SP 1e-2 underfit; more non-digit examples traded digits for rejection).
STEPS = 1500
LEARNING_RATE = 3e-3
L2_SP = 1e-4
NON_DIGIT_SHARE = 0.3  # other-word clips per speaker, as a share of its digit clips


@dataclass
class Options:
    corpus: Path  # the adaptation corpus (manifest.csv)
    base: Path  # the ONNX model to adapt
    out: Path  # the adapted ONNX model
    data_dir: Path  # the shipped corpora, for held-out figures before and after
    speakers: int = 5
    reps: int = 5
    seed: int = 0


def adaptation_clips(opts: Options) -> list[data.Clip]:
    """``reps`` clips of each digit, and other words (NON_DIGIT_SHARE of that, so "not a digit"
    keeps some weight), from each of the first ``speakers`` non-test speakers."""
    with open(opts.corpus / "manifest.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("split", "") != data.ASC_HELDOUT_SPLIT]
    chosen = sorted({r["speaker"] for r in rows})[: opts.speakers]
    rng = np.random.default_rng(opts.seed)
    clips = []
    for speaker in chosen:
        mine = [r for r in rows if r["speaker"] == speaker]
        for label in range(11):
            pool = [r for r in mine if (int(r["digit"]) if r["digit"] != "" else data.NOT_DIGIT) == label]
            n = round(NON_DIGIT_SHARE * 10 * opts.reps) if label == data.NOT_DIGIT else opts.reps
            for i in rng.permutation(len(pool))[:n]:
                r = pool[i]
                clips.append(data.Clip(str(opts.corpus / r["path"]), "adapt", f"adapt/{speaker}", label, False,
                                       r.get("label", r["digit"])))
    return clips


def head_input(model: onnx.ModelProto) -> str:
    """The tensor feeding the head's first layer (the pooled utterance vector)."""
    for node in model.graph.node:
        if "head.0.weight" in node.input:
            return node.input[0]
    raise ValueError("the model has no head.0 layer: only streamd digit models can be adapted")


def trunk_session(base: Path):
    model = onnx.load(str(base))
    name = head_input(model)
    model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trunk.onnx"
        onnx.save(model, str(path))
        return scoring.ort_session(path)


def pooled(session, fs: data.FeatureSet) -> np.ndarray:
    return np.concatenate([session.run(None, {"feats": fs.item(i)[None]})[1] for i in range(len(fs))])


def forward(p: dict[str, np.ndarray], x: np.ndarray, keep: np.ndarray | None = None):
    """The head: Linear, ReLU, (dropout), Linear. Returns logits and the hidden layer."""
    h = np.maximum(x @ p["head.0.weight"].T + p["head.0.bias"], 0.0)
    if keep is not None:
        h = h * keep
    return h @ p["head.3.weight"].T + p["head.3.bias"], h


def gradients(p: dict[str, np.ndarray], base: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray,
              rng: np.random.Generator) -> tuple[float, dict[str, np.ndarray]]:
    """Cross-entropy (label smoothing 0.05, dropout 0.2) plus L2-SP towards ``base``."""
    keep = (rng.random((len(x), p["head.0.bias"].shape[0])) >= 0.2) / 0.8
    z, h = forward(p, x, keep)
    z = z - z.max(axis=1, keepdims=True)
    prob = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    target = np.full_like(prob, 0.05 / prob.shape[1])
    target[np.arange(len(y)), y] += 0.95
    loss = float(-np.mean(np.sum(target * np.log(prob + 1e-12), axis=1)))
    dz = (prob - target) / len(x)
    dh = (dz @ p["head.3.weight"]) * keep * (h > 0)
    g = {"head.3.weight": dz.T @ h, "head.3.bias": dz.sum(0), "head.0.weight": dh.T @ x, "head.0.bias": dh.sum(0)}
    for k in g:
        loss += L2_SP * float(np.sum((p[k] - base[k]) ** 2))
        g[k] = g[k] + 2 * L2_SP * (p[k] - base[k])
    return loss, g


def train_head(base: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, seed: int,
               steps: int = STEPS, lr: float = LEARNING_RATE) -> tuple[dict[str, np.ndarray], list[float]]:
    """Adam on mini-batches of 64; returns the new head and the loss per step."""
    rng = np.random.default_rng(seed)
    p = {k: v.astype(np.float64).copy() for k, v in base.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(val) for k, val in p.items()}
    losses = []
    for t in range(1, steps + 1):
        idx = rng.choice(len(x), size=min(64, len(x)), replace=False)
        loss, g = gradients(p, base, x[idx].astype(np.float64), y[idx], rng)
        losses.append(loss)
        for k in p:
            m[k] = 0.9 * m[k] + 0.1 * g[k]
            v[k] = 0.999 * v[k] + 0.001 * g[k] ** 2
            p[k] -= lr * (m[k] / (1 - 0.9**t)) / (np.sqrt(v[k] / (1 - 0.999**t)) + 1e-8)
    return {k: val.astype(np.float32) for k, val in p.items()}, losses


def write_adapted(base: Path, out: Path, weights: dict[str, np.ndarray]) -> None:
    model = onnx.load(str(base))
    for init in model.graph.initializer:
        if init.name in weights:
            init.CopyFrom(numpy_helper.from_array(weights[init.name], init.name))
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out))


def held_out(path: Path, test: data.FeatureSet) -> dict:
    return scoring.corpus_metrics(scoring.onnx_logits(path, test), test) if len(test) else {}


def run(opts: Options) -> int:
    clips = adaptation_clips(opts)
    if not clips:
        print(f"streamd train digits --adapt: no usable clips in {opts.corpus}/manifest.csv")
        return 2
    fs = data.build_features(clips, "adapt", opts.seed)
    x = pooled(trunk_session(opts.base), fs)
    base_weights = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(opts.base)).graph.initializer
                    if i.name in HEAD}
    head, losses = train_head(base_weights, x, fs.labels(), opts.seed)
    write_adapted(opts.base, opts.out, head)
    test = data.load_test_set(opts.data_dir, opts.seed)
    report = {"before": held_out(opts.base, test), "after": held_out(opts.out, test)}
    report["adaptation_loss"] = {"first_step": losses[0], "last_10_steps": float(np.mean(losses[-10:]))}
    write_card(opts, clips, len(fs), report)
    print(json.dumps(report, indent=2))
    return 0


def write_card(opts: Options, clips: list[data.Clip], items: int, report: dict) -> None:
    base_card = json.loads(opts.base.with_suffix(".card.json").read_text()) \
        if opts.base.with_suffix(".card.json").exists() else {}
    card = {k: v for k, v in base_card.items() if k not in ("metrics", "suggested_threshold", "sha256", "size_bytes")}
    card.update({
        "name": base_card.get("name", "streamd-digits") + "-adapted",
        "file": opts.out.name,
        "sha256": sha256_of(opts.out),
        "size_bytes": opts.out.stat().st_size,
        "adapted": {
            "from": {"file": opts.base.name, "sha256": sha256_of(opts.base)},
            "method": f"trunk frozen (the base graph unchanged up to the head's input); head re-trained "
                      f"{STEPS} steps of 64, Adam {LEARNING_RATE:g}, dropout 0.2, label smoothing 0.05, "
                      f"L2-SP {L2_SP:g} towards the base head; other words {NON_DIGIT_SHARE:.0%} of the digit clips",
            "corpus": str(opts.corpus),
            "speakers": sorted({c.speaker.split("/", 1)[1] for c in clips}),
            "clips": len(clips), "items_with_augmentation": items,
            "command": f"streamd train digits --adapt {opts.corpus} --from {opts.base} --out {opts.out.parent} "
                       f"--adapt-speakers {opts.speakers} --adapt-reps {opts.reps}",
        },
        "metrics": report,
        "created": dt.date.today().isoformat(),
    })
    opts.out.with_suffix(".card.json").write_text(json.dumps(card, indent=2) + "\n")
