"""The speaker model: Resemblyzer's pretrained GE2E voice encoder, made the project's own.

Resemblyzer (PyPI ``Resemblyzer==0.1.4``, Apache-2.0) ships ``pretrained.pt``: a 3-layer LSTM
trained with the GE2E loss on thousands of speakers, which our 21 training speakers cannot
match (an x-vector trained here from scratch reached 17.5% EER on single held-out clips,
this encoder 10.9%). This module loads those weights into our own torch module, exports the
ONNX model the daemon runs on the ``mel`` front end (streamd.features, kind ``melpower``),
builds an impostor cohort from the training speakers, measures the model on held-out
speakers and writes the model card. Nothing is downloaded: the wheel is installed by
``make train`` (``pip install --no-deps Resemblyzer==0.1.4``; its own dependencies are not
needed).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import importlib.metadata
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
from torch import nn

from streamd import evaluate
from streamd.features import mel_params, mfcc, normalize
from streamd.identity import l2_normalize
from streamd.inference import ModelCard, OnnxModel
from streamd.vad import VadParams, utterance_audio

WINDOW = {"frames": 160, "hop_frames": 77, "min_coverage": 0.75}  # Resemblyzer's partials: 1.6 s, 1.3/s
COHORT_PER_SPEAKER = 20


class VoiceEncoder(nn.Module):
    """Resemblyzer's architecture: LSTM(40 -> 256, 3 layers) -> linear -> ReLU -> L2 norm."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(40, 256, 3, batch_first=True)
        self.linear = nn.Linear(256, 256)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        _, (hidden, _) = self.lstm(feats)
        return F.normalize(F.relu(self.linear(hidden[-1])), p=2.0, dim=1)


@dataclass
class Options:
    data_dir: Path
    out_dir: Path
    pretrained: Path | None = None


def pretrained_path() -> Path:
    try:
        dist = importlib.metadata.distribution("Resemblyzer")
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit("streamd train speaker needs Resemblyzer's weights: "
                         "pip install --no-deps Resemblyzer==0.1.4 (make train does)") from None
    return Path(str(dist.locate_file("resemblyzer/pretrained.pt")))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_encoder(path: Path) -> VoiceEncoder:
    state = torch.load(path, map_location="cpu", weights_only=True)["model_state"]
    enc = VoiceEncoder()
    enc.load_state_dict({k: v for k, v in state.items() if not k.startswith("similarity_")})
    return enc.eval()


def export(enc: VoiceEncoder, path: Path) -> float:
    """Write the ONNX model; returns the largest difference from torch on random input."""
    x = torch.rand(3, WINDOW["frames"], 40) * 0.1
    torch.onnx.export(enc, (x,), str(path), input_names=["feats"], output_names=["embedding"],
                      dynamic_axes={"feats": {0: "batch", 1: "time"}, "embedding": {0: "batch"}},
                      opset_version=17, dynamo=False)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = enc(x).numpy()
    return float(np.abs(sess.run(None, {"feats": x.numpy()})[0] - ref).max())


def training_clips(data: Path, per_speaker: int) -> list[evaluate.Clip]:
    """A few clips of each *training* speaker (never a held-out one): the impostor cohort."""
    import csv

    out: list[evaluate.Clip] = []
    with open(data / "fsdd" / "manifest.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["speaker"] not in evaluate.HELD_OUT_FSDD]
    asc = data / "arabic-speech-commands"
    with open(asc / "manifest.csv", newline="") as fh:
        rows_asc = [r for r in csv.DictReader(fh) if r["split"] == "train"]
    rng = np.random.default_rng(0)
    for corpus, root, table in (("fsdd", data / "fsdd", rows), ("asc", asc, rows_asc)):
        for spk in sorted({r["speaker"] for r in table}):
            mine = [r for r in table if r["speaker"] == spk]
            for r in rng.choice(mine, size=min(per_speaker, len(mine)), replace=False):
                out.append(evaluate.Clip(root / r["path"], corpus, spk, None))
    return out


def embed_clips(model: OnnxModel, clips: list[evaluate.Clip]) -> np.ndarray:
    vad = VadParams()
    out = []
    for clip in clips:
        audio, _ = sf.read(clip.path, dtype="int16")
        cut = utterance_audio(audio, vad)
        out.append(model.run(normalize(mfcc(cut, model.params), model.params)))
    return np.stack(out)


def phrase_metrics(emb: np.ndarray, spk: np.ndarray, per_phrase: int = 3) -> dict:
    """EER of ~2-3 s phrases: the mean embedding of 3 clips of one speaker."""
    rng = np.random.default_rng(0)
    groups = []
    for s in sorted(set(spk)):
        idx = rng.permutation(np.flatnonzero(spk == s))
        groups += [(s, idx[i : i + per_phrase]) for i in range(0, len(idx) - per_phrase + 1, per_phrase)]
    e = l2_normalize(np.stack([l2_normalize(emb[g]).mean(axis=0) for _, g in groups]))
    names = np.array([s for s, _ in groups])
    iu = np.triu_indices(len(e), k=1)
    rate, thr, thr1 = evaluate.eer((e @ e.T)[iu], (names[:, None] == names[None, :])[iu])
    return {"phrases": len(e), "clips_per_phrase": per_phrase, "eer": rate, "threshold_at_eer": thr,
            "threshold_at_far_1pct": thr1}


def enrolled_metrics(emb: np.ndarray, spk: np.ndarray, n_enroll: int = 10) -> dict:
    """Each held-out speaker enrolled from ``n_enroll`` single clips (their mean embedding);
    every other clip is a probe scored against every enrolled speaker. Reports EER, the
    threshold at 1% false accepts, closed-set top-1, and open-set identification at that
    threshold with each speaker in turn left out of the gallery (its clips are strangers)."""
    rng = np.random.default_rng(0)
    names = sorted(set(spk))
    enroll, probes = {}, []
    for s in names:
        idx = rng.permutation(np.flatnonzero(spk == s))
        enroll[s] = l2_normalize(l2_normalize(emb[idx[:n_enroll]]).mean(axis=0))
        probes += list(idx[n_enroll:])
    probes = np.array(probes)
    cents = np.stack([enroll[s] for s in names])
    scores = l2_normalize(emb[probes]) @ cents.T
    truth = np.array([names.index(s) for s in spk[probes]])
    same = truth[:, None] == np.arange(len(names))[None, :]
    rate, thr_eer, thr1 = evaluate.eer(scores.ravel(), same.ravel())
    closed = float(np.mean(np.argmax(scores, axis=1) == truth))
    named, stranger_named = evaluate.open_set_rates(scores, truth, lambda n: thr1)
    return {"enroll_clips": n_enroll, "probes": int(len(probes)), "eer": rate, "threshold_at_eer": thr_eer,
            "threshold_at_far_1pct": thr1, "closed_set_top1": closed,
            "open_set_identified_at_far_1pct": named,
            "open_set_strangers_named_at_far_1pct": stranger_named}


CALIBRATION_FARS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)


def calibration(emb: np.ndarray, spk: np.ndarray, cohort: np.ndarray, n_enroll: int = 10) -> dict:
    """AS-norm score thresholds per false-accept rate: held-out speakers enrolled from
    ``n_enroll`` clips, every other clip scored against every enrolled speaker, scores
    normalised against the cohort of training speakers. Also open-set identification at each
    rate (each speaker in turn left out of the gallery, so its clips are strangers)."""
    from streamd.identity import Scorer

    scorer = Scorer(cohort)
    rng = np.random.default_rng(1)
    names = sorted(set(spk))
    cents, probes = [], []
    for s in names:
        idx = rng.permutation(np.flatnonzero(spk == s))
        cents.append(l2_normalize(l2_normalize(emb[idx[:n_enroll]]).mean(axis=0)))
        probes += list(idx[n_enroll:])
    cents, probes = np.stack(cents), np.array(probes)
    raw = l2_normalize(emb[probes]) @ cents.T
    p_stats, e_stats = scorer.stats(emb[probes]), scorer.stats(cents)
    norm = 0.5 * ((raw - e_stats[None, :, 0]) / e_stats[None, :, 1] + (raw - p_stats[:, :1]) / p_stats[:, 1:])
    truth = np.array([names.index(s) for s in spk[probes]])
    same = truth[:, None] == np.arange(len(names))[None, :]
    nontarget = np.sort(norm[~same])
    thresholds = [float(np.quantile(nontarget, 1 - far)) for far in CALIBRATION_FARS]
    open_set = []
    for thr in thresholds:
        named, strangers = evaluate.open_set_rates(norm, truth, lambda n, thr=thr: thr)
        open_set.append({"identified": named, "strangers_named": strangers})
    rate, _, _ = evaluate.eer(norm.ravel(), same.ravel())
    return {"score": "as-norm", "top_k": scorer.top_k, "far": list(CALIBRATION_FARS), "threshold": thresholds,
            "enroll_clips": n_enroll, "probes": int(len(probes)), "eer_normalised": rate,
            "closed_set_top1": float(np.mean(np.argmax(norm, axis=1) == truth)), "open_set": open_set,
            "note": "measured on the held-out speakers (the same ones the metrics report)"}


def run(opts: Options) -> int:
    t0 = time.time()
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    weights = opts.pretrained or pretrained_path()
    enc = load_encoder(weights)
    onnx_path = opts.out_dir / "speaker.onnx"
    parity = export(enc, onnx_path)
    params = mel_params()
    card_data = {"kind": "speaker", "file": onnx_path.name, "sha256": sha256(onnx_path),
                 "features": params.as_dict(), "input": {"name": "feats", "window": WINDOW}, "output": {}}
    model = OnnxModel(ModelCard(opts.out_dir / "speaker.card.json", card_data), params, "cpu")

    held = evaluate.held_out_clips(opts.data_dir)
    emb = embed_clips(model, held)
    single = evaluate.speaker_report(held, emb)
    spk = np.array([c.speaker for c in held])
    cohort_clips = training_clips(opts.data_dir, COHORT_PER_SPEAKER)
    cohort = embed_clips(model, cohort_clips).astype(np.float32)
    cohort_path = opts.out_dir / "speaker.cohort.npy"
    np.save(cohort_path, cohort, allow_pickle=False)

    card = {
        "name": "speaker-ge2e",
        "kind": "speaker",
        "file": onnx_path.name,
        "sha256": sha256(onnx_path),
        "size_bytes": onnx_path.stat().st_size,
        "input": {"name": "feats", "shape": ["batch", "time", 40], "window": WINDOW,
                  "note": "the daemon runs 1.6 s windows (hop 0.77 s, last zero-padded) and averages them"},
        "output": {"name": "embedding", "shape": ["batch", 256], "l2_normalized": True},
        "embedding_dim": 256,
        "features": params.as_dict(),
        "vad": dataclasses.asdict(VadParams()),
        "normalization": "per-utterance gain up to -30 dBFS, never down (streamd.features.normalize, kind melpower)",
        "provenance": {
            "source": "Resemblyzer 0.1.4 (PyPI wheel), resemblyzer/pretrained.pt: GE2E voice encoder by Resemble AI",
            "licence": "Apache-2.0 (the wheel's LICENSE covers the code and the bundled pretrained model)",
            "pretrained_sha256": sha256(weights),
            "conversion": "weights loaded into streamd.train.speaker_encoder.VoiceEncoder and exported to ONNX; "
                          "the front end (librosa mel) re-implemented in streamd.features (Slaney mel, power, "
                          "uncentred frames for streaming); not fine-tuned",
        },
        "cohort": {"file": cohort_path.name, "sha256": sha256(cohort_path), "vectors": len(cohort),
                   "source": f"{COHORT_PER_SPEAKER} clips of each training speaker (never held-out speakers)"},
        "calibration": calibration(emb, spk, cohort),
        "data": {"validation": "FSDD (CC BY-SA 4.0) speaker theo; Arabic Speech Commands (CC BY 4.0) val-split speakers",
                 "training": "none here (pretrained); cohort from the training speakers"},
        "split": "speaker-disjoint: held-out speakers are FSDD theo and the ASC authors' val split",
        "metrics": {"single_clips": single, "phrases_3_clips": phrase_metrics(emb, spk),
                    "enrolled_10_clips_vs_single_clips": enrolled_metrics(emb, spk),
                    "onnx_vs_torch_max_abs_diff": parity},
        "suggested_threshold": {
            "default": round(enrolled_metrics(emb, spk)["threshold_at_far_1pct"], 3),
            "default_rule": "cosine at 1% false accepts, speakers enrolled from 10 clips vs single held-out clips",
            "cosine_at_far_1pct_single_clips": single["all_held_out"]["threshold_at_far_1pct"],
            "cosine_at_eer_single_clips": single["all_held_out"]["threshold_at_eer"]},
        "training": {"command": f"streamd train speaker --data {opts.data_dir} --out {opts.out_dir}",
                     "seconds": round(time.time() - t0, 1)},
        "created": dt.date.today().isoformat(),
        "torch_version": torch.__version__,
    }
    (opts.out_dir / "speaker.card.json").write_text(json.dumps(card, indent=2) + "\n")
    from streamd.train.card import write_docs

    write_docs(opts.out_dir)
    print(json.dumps(card["metrics"], indent=2))
    return 0
