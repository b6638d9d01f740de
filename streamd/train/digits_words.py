"""Digit family ``words``: a head on the shipped word model's embedding (models/words.onnx).

The word model (EfficientWord-Net's ResNet-50, ArcFace on the Multilingual Spoken Words
Corpus; Apache-2.0) heard thousands of speakers in 50 languages; the MFCC families heard 17
real ones. It stays frozen: every training clip version is embedded once (cached), and a small
head learns our eleven classes from the vectors, in seconds. The shipped ONNX model is the word
model with the head after it, one input (the 1.5 s word window, ``wordwin`` front end) and the
logits out; in the fusion it runs as the cascade's second stage, only for the utterances the
MFCC members are unsure of (it costs ~30 ms an utterance).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from streamd.signal.features import word_window_params
from streamd.models.cards import load_card, sha256_of
from streamd.train import card, common, data, scoring
from streamd.train.digits import evaluate
from streamd.signal.vad import VadParams

FAMILY = "words"
FRONT_END = "wordwin"
DIM = 2048
WORD_CARD = Path(__file__).resolve().parents[2] / "models" / "words.card.json"
PLAN = data.HEAD_PLAN
BATCH = 128
LR = 2e-3
LOSS_TEXT = "cross-entropy, label smoothing 0.05, AdamW (lr 2e-3, wd 1e-2); word model frozen"


class Head(nn.Module):
    def __init__(self, dims: int = DIM, hidden: int = 256, n_classes: int = len(data.CLASSES)):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dims, hidden), nn.ReLU(), nn.Dropout(0.2), nn.Linear(hidden, n_classes))

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.net(embedding)


@dataclass
class Options:
    data_dir: Path
    out_dir: Path
    epochs: int = 30
    seed: int = 0
    synth: bool = True
    workers: int = 2


def training_items(data_dir: Path, seed: int, synth: bool) -> data.FeatureSet:
    """The training clip versions (as load_digit_split's), without features: the head
    trains on their embeddings."""
    data.build_babble(data_dir, seed)
    clips = [c for c in data.real_clips(data_dir) if not c.heldout and not data.is_validation(c)]
    if synth:
        clips += data.synth_clips(seed=seed, voices=data.digit_training_voices(seed))
    variants = [data.variants_for(c, True, PLAN) for c in clips]
    n = sum(len(vs) for vs in variants)
    return data.FeatureSet(clips, np.zeros((0, DIM), np.float32), np.zeros(n + 1, np.int64),
                           np.array([i for i, vs in enumerate(variants) for _ in vs], np.int32),
                           np.array([v.speed for vs in variants for v in vs], np.float32),
                           np.array([v.index for vs in variants for v in vs], np.int16), front_end=FRONT_END)


_worker: tuple | None = None


def _embed_item(i: int) -> np.ndarray:
    session, items, seed = _worker
    window = data.clip_features(data.item_audio(items, i, seed), FRONT_END, data.variant_of(items, i).stream)
    return session.run(None, {"input": window[None, None]})[0][0].astype(np.float16)


def _embed(items: data.FeatureSet, which: list[int], seed: int, model: Path, workers: int) -> np.ndarray:
    import onnxruntime as ort

    global _worker
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    _worker = (ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"]), items, seed)
    try:
        if workers <= 1:
            return np.array([_embed_item(i) for i in which])
        with mp.get_context("fork").Pool(workers) as pool:
            return np.array(pool.map(_embed_item, which, chunksize=32))
    finally:
        _worker = None


def embeddings(items: data.FeatureSet, seed: int, model: Path, workers: int = 2, check: int = 8) -> np.ndarray:
    """The word model's embedding (float16) of every item, cached in WORK_DIR/words-head and
    trusted only if ``check`` random items, embedded afresh, match."""
    blob = json.dumps({"model": sha256_of(model), "aug": data.AUG_VERSION, "vad": asdict(VadParams()),
                       "seed": seed, "items": [[data.clip_id(items.clips[c]), int(v)]
                                               for c, v in zip(items.clip_index, items.variant)]})
    path = data.WORK_DIR / "words-head" / f"train-{hashlib.sha1(blob.encode()).hexdigest()[:16]}.npy"
    if path.exists():
        cached = np.load(path, allow_pickle=False)
        sample = np.random.default_rng().choice(len(items), size=min(check, len(items)), replace=False).tolist()
        if len(cached) == len(items) and np.allclose(_embed(items, sample, seed, model, 1), cached[sample], atol=2e-3):
            return cached
        print(f"{path.name}: cached embeddings differ from today's code; recomputing", flush=True)
    out = _embed(items, list(range(len(items))), seed, model, workers)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, out)
    return out


def train_head(vectors: np.ndarray, labels: np.ndarray, opts: Options) -> Head:
    rng = common.seed_everything(opts.seed)
    head = Head()
    opt = torch.optim.AdamW(head.parameters(), lr=LR, weight_decay=1e-2)
    x, y = torch.from_numpy(vectors.astype(np.float32)), torch.from_numpy(labels)
    for epoch in range(opts.epochs):
        head.train()
        order = torch.from_numpy(rng.permutation(len(x)))
        losses, correct = [], 0
        for items in order.split(BATCH):
            logits = head(x[items])
            loss = F.cross_entropy(logits, y[items], label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            correct += int((logits.argmax(1) == y[items]).sum())
        if epoch % 5 == 4 or epoch == opts.epochs - 1:
            print(f"digits {FAMILY} epoch {epoch + 1}/{opts.epochs} loss {np.mean(losses):.4f} "
                  f"train-acc {correct / len(x):.4f}", flush=True)
    return head.eval()


def export(head: Head, word_model: Path, path: Path, sample: list[np.ndarray]) -> dict:
    """The word model with the head after it, as one ONNX file reading the word window
    (batch, 149, 64); returns its largest logit difference from the word model + torch head."""
    import onnx
    from onnx import compose, helper, TensorProto

    words = onnx.load(str(word_model))
    opset = next(o.version for o in words.opset_import if o.domain == "")
    head_path = path.with_name(path.stem + "-head.onnx")
    torch.onnx.export(head, (torch.zeros(1, DIM),), str(head_path), dynamo=False, opset_version=opset,
                      input_names=["embedding"], output_names=["logits"],
                      dynamic_axes={"embedding": {0: "batch"}, "logits": {0: "batch"}})
    head_model = onnx.load(str(head_path))
    head_path.unlink()
    frames, filters = sample[0].shape
    pre = helper.make_model(helper.make_graph(
        [helper.make_node("Unsqueeze", ["feats", "one"], ["window"])], "wordwin",
        [helper.make_tensor_value_info("feats", TensorProto.FLOAT, ["batch", frames, filters])],
        [helper.make_tensor_value_info("window", TensorProto.FLOAT, ["batch", 1, frames, filters])],
        [helper.make_tensor("one", TensorProto.INT64, [1], [1])]), opset_imports=[helper.make_opsetid("", opset)])
    for m in (pre, head_model):
        m.ir_version = words.ir_version
    joined = compose.merge_models(pre, words, io_map=[("window", "input")], prefix1="pre/")
    joined = compose.merge_models(joined, head_model, io_map=[("feature_output", "embedding")], prefix2="head/")
    onnx.checker.check_model(joined)
    onnx.save(joined, str(path))
    embedded = scoring.ort_outputs(scoring.ort_session(word_model), [s[None] for s in sample])
    with torch.no_grad():
        ref = head(torch.from_numpy(embedded)).numpy()
    got = scoring.ort_outputs(scoring.ort_session(path), sample)
    return {"onnx_vs_word_model_and_torch_head_max_abs_diff": float(np.abs(got - ref).max())}


def model_card(path: Path, split: data.DigitSplit, metrics: dict, threshold: dict, info: card.TrainingInfo,
               head: Head) -> dict:
    words = load_card(WORD_CARD, "words").data
    c = card.digits_card(path, split, metrics, threshold, info, head)
    c["trainable_parameters"] = c["parameters"]
    c["features"] = word_window_params().as_dict()
    c["normalization"] = "none: the word model reads its log filterbanks as they are (streamd.signal.features.word_input)"
    c["input"] = {"name": "feats", "shape": ["batch", 149, 64], "dtype": "float32", "bucket": False,
                  "notes": "the utterance's 1.5 s word window (cut or zero-padded, centred), from its audio, not a ring"}
    c["pretrained"] = {**words["provenance"], "sha256": words["sha256"],
                       "use": "the shipped word model (models/words.onnx), frozen, before the head"}
    c["training"]["augmentation"] = card.head_augmentation()
    return c


def run(opts: Options) -> int:
    t0 = time.time()
    word_model = WORD_CARD.parent / load_card(WORD_CARD, "words").data["file"]
    items = training_items(opts.data_dir, opts.seed, opts.synth)
    vectors = embeddings(items, opts.seed, word_model, opts.workers)
    t_feats = time.time() - t0
    head = train_head(vectors, items.labels(), opts)
    t_train = time.time() - t0 - t_feats
    split = data.DigitSplit(items, *data.load_digit_eval_sets(opts.data_dir, 0, opts.synth, FRONT_END))
    path = opts.out_dir / scoring.member_file(FAMILY, opts.seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    sample = [split.test.item(i) for i in range(0, len(split.test), max(1, len(split.test) // 32))]
    parity = export(head, word_model, path, sample)
    metrics, threshold = evaluate(path, split)
    metrics.update(parity)
    info = card.TrainingInfo("digits", opts.epochs, opts.seed, opts.synth, LOSS_TEXT, t_feats, t_train,
                             opts.data_dir, opts.out_dir, FAMILY)
    card.write_card(path, model_card(path, split, metrics, threshold, info, head))
    print(card.summary(metrics), flush=True)
    return 0
