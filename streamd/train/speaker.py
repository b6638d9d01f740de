"""Speaker embedding model: AAM-softmax training, ONNX export and verification metrics."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from streamd.offline.evaluate import eer
from streamd.signal.features import FeatureParams, feature_frames, normalize
from streamd.train import card, common, data, scoring
from streamd.train.digits import spec_augment
from streamd.train.nets import AAMSoftmax, NormalizedEmbedding, SpeakerNet
from streamd.signal.vad import VadParams, utterance_audio

BATCH = 128
PEAK_LR = 2e-3


@dataclass
class Options:
    data_dir: Path
    out_dir: Path
    epochs: int = 30
    seed: int = 0
    synth: bool = True  # synthetic voices as extra classes
    channels: int = 128
    dim: int = 192
    margin: float = 0.2
    scale: float = 30.0
    crop: tuple[int, int] = (40, 120)  # random crop length range in frames
    speed_classes: bool = True  # speed-perturbed speaker = new class
    weight_decay: float = 5e-4
    specaug: bool = False  # zero a random cepstral band and time span per batch
    attention: bool = False  # attentive statistics pooling instead of plain mean/std

    def loss_text(self) -> str:
        classes = "training speaker x speed factor (0.9/1.0/1.1)" if self.speed_classes else "training speaker"
        synth = ", synthetic espeak-ng voices as extra classes (at their own speed)" if self.synth else ""
        return (f"AAM-softmax (ArcFace) margin {self.margin} (ramped up over the first 30% of epochs), "
                f"scale {self.scale}; classes = {classes}{synth}; random crops of {self.crop[0]}-"
                f"{self.crop[1]} frames; AdamW (wd {self.weight_decay}), one-cycle cosine LR")


def usable_items(fs: data.FeatureSet, synth: bool = True) -> np.ndarray:
    """Every real clip version; synthetic voices only at their own speed (one class each)."""
    is_synth = np.array([fs.clips[c].corpus == "synth" for c in fs.clip_index])
    return np.flatnonzero(~is_synth | ((fs.speed == 1.0) & synth))


def class_labels(fs: data.FeatureSet, items: np.ndarray, by_speed: bool = True) -> tuple[np.ndarray, list[str]]:
    """Class per item (-1 for unused items): speaker x speed factor, since speed
    perturbation changes pitch and formants and so makes a new voice."""
    spk = fs.speakers()
    keys = {int(i): f"{spk[i]}@{fs.speed[i] if by_speed else 1.0:.1f}" for i in items}
    names = sorted(set(keys.values()))
    lookup = {k: n for n, k in enumerate(names)}
    labels = np.full(len(fs), -1, dtype=np.int64)
    for i, k in keys.items():
        labels[i] = lookup[k]
    return labels, names


def epoch_items(fs: data.FeatureSet, items: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One random usable version of every training clip, shuffled."""
    order = rng.permutation(items)
    _, first = np.unique(fs.clip_index[order], return_index=True)
    return rng.permutation(order[first])


def crop_batch(fs: data.FeatureSet, items: np.ndarray, rng: np.random.Generator, crop: tuple[int, int]):
    length = int(rng.integers(crop[0], crop[1] + 1))
    mats = []
    for i in items:
        m = fs.item(i)
        start = int(rng.integers(0, len(m) - length + 1)) if len(m) > length else 0
        mats.append(m[start : start + length])
    return common.pad_batch(mats)


def train(fs: data.FeatureSet, opts: Options) -> tuple[SpeakerNet, int]:
    rng = common.seed_everything(opts.seed)
    usable = usable_items(fs, opts.synth)
    labels, names = class_labels(fs, usable, opts.speed_classes)
    net = SpeakerNet(channels=opts.channels, dim=opts.dim, attention=opts.attention)
    head = AAMSoftmax(opts.dim, len(names), opts.margin, opts.scale)
    params = list(net.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=PEAK_LR, weight_decay=opts.weight_decay)
    n_clips = len(np.unique(fs.clip_index[usable]))
    steps_per_epoch = int(np.ceil(n_clips / BATCH))
    total, step = steps_per_epoch * opts.epochs, 0
    print(f"speaker: {len(names)} classes, {n_clips} clips, {len(usable)} items", flush=True)
    for epoch in range(opts.epochs):
        net.train()
        t0, losses = time.time(), []
        margin = opts.margin * min(1.0, epoch / max(1.0, 0.3 * opts.epochs))
        items = epoch_items(fs, usable, rng)
        for b in range(0, len(items), BATCH):
            batch = items[b : b + BATCH]
            x, mask = crop_batch(fs, batch, rng, opts.crop)
            common.cosine_lr(opt, step, total, PEAK_LR, warmup=steps_per_epoch)
            if opts.specaug:
                x = spec_augment(x, rng) * mask.transpose(1, 2)
            loss = head(net(x, mask), torch.from_numpy(labels[batch]), margin)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            losses.append(loss.item())
        print(f"speaker epoch {epoch + 1}/{opts.epochs} margin {margin:.2f} loss {np.mean(losses):.4f} "
              f"({time.time() - t0:.0f}s)", flush=True)
    return net.eval(), len(names)


# --------------------------------------------------------------------------- evaluation


def eer_summary(scores: np.ndarray, same: np.ndarray) -> dict:
    """``streamd.offline.evaluate.eer`` as the card's metrics entry: the EER, its threshold, and
    the threshold at a 1% false-accept rate with the error rates there."""
    rate, threshold, at1 = eer(scores, same)
    targets, impostors = scores[same], scores[~same]
    return {"eer": rate, "threshold_at_eer": threshold,
            "threshold_at_far_1pct": at1, "frr_at_far_1pct": float(np.mean(targets < at1)),
            "far_at_far_1pct_threshold": float(np.mean(impostors >= at1)),
            "n_target_pairs": int(len(targets)), "n_nontarget_pairs": int(len(impostors)),
            "n_pairs": int(len(targets) + len(impostors))}


def pair_metrics(emb: np.ndarray, spk: np.ndarray) -> dict:
    """All pairs i < j of the items, cosine scores."""
    iu = np.triu_indices(len(emb), k=1)
    scores = (emb @ emb.T)[iu]
    out = eer_summary(scores, spk[iu[0]] == spk[iu[1]])
    out["n_items"] = int(len(emb))
    out["n_speakers"] = int(len(set(spk)))
    return out


def enrolled_metrics(emb: np.ndarray, spk: np.ndarray, groups: list[np.ndarray]) -> dict:
    """Template (mean of a group's 3 clip embeddings) against every single clip outside it."""
    templates = unit(np.stack([emb[g].mean(axis=0) for g in groups]))
    scores = templates @ emb.T
    outside = np.ones_like(scores, dtype=bool)
    for k, g in enumerate(groups):
        outside[k, g] = False
    same = spk[[g[0] for g in groups]][:, None] == spk[None, :]
    out = eer_summary(scores[outside], same[outside])
    out["n_items"] = f"{len(groups)} templates x {len(emb)} clips"
    out["n_speakers"] = int(len(set(spk)))
    return out


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def phrases(heldout: data.FeatureSet, seed: int) -> list[np.ndarray]:
    """Groups of 3 clips of one speaker (different words), indices into ``heldout``."""
    rng = np.random.default_rng([seed, 3])
    spk = np.array(heldout.speakers())
    groups = []
    for s in sorted(set(spk)):
        idx = rng.permutation(np.flatnonzero(spk == s))
        groups += [idx[k : k + 3] for k in range(0, len(idx) - 2, 3)]
    return groups


def concatenated_features(clips: list[data.Clip]) -> np.ndarray:
    """A ~2-3 s phrase: the clips' VAD-cut audio back to back, then the daemon's features."""
    parts = [utterance_audio(sf.read(c.path, dtype="int16")[0], VadParams()) for c in clips]
    return normalize(feature_frames(np.concatenate(parts), FeatureParams()))


def evaluate(onnx_path: Path, heldout: data.FeatureSet, seed: int) -> tuple[dict, dict]:
    session = scoring.ort_session(onnx_path)
    emb = scoring.ort_outputs(session, [heldout.item(i) for i in range(len(heldout))])
    spk = np.array(heldout.speakers())
    asc = np.array([s.startswith("asc/") for s in spk])
    groups = phrases(heldout, seed)
    g_spk = np.array([spk[g[0]] for g in groups])
    mean3 = unit(np.stack([emb[g].mean(axis=0) for g in groups]))
    concat_feats = [concatenated_features([heldout.clips[heldout.clip_index[i]] for i in g]) for g in groups]
    concat = scoring.ort_outputs(session, concat_feats)
    metrics = {
        "single_clip": pair_metrics(emb, spk),
        "single_clip_asc_only": pair_metrics(emb[asc], spk[asc]),
        "phrase_mean_of_3": pair_metrics(mean3, g_spk),
        "phrase_concatenated": pair_metrics(concat, g_spk),
        "enrolled_3_clips_vs_single_clip": enrolled_metrics(emb, spk, groups),
        "embedding_norm_max_dev": float(np.abs(np.linalg.norm(emb, axis=1) - 1).max()),
        "phrase_frames_median": float(np.median([len(f) for f in concat_feats])),
    }
    single = metrics["single_clip"]
    threshold = {
        "default": round(single["threshold_at_far_1pct"], 3),
        "default_rule": "cosine at FAR 1% on single held-out clips",
        "single_clip_far_1pct": single["threshold_at_far_1pct"],
        "single_clip_eer": single["threshold_at_eer"],
        "phrase_concatenated_far_1pct": metrics["phrase_concatenated"]["threshold_at_far_1pct"],
        "phrase_concatenated_eer": metrics["phrase_concatenated"]["threshold_at_eer"],
        "enrolled_3_vs_single_far_1pct": metrics["enrolled_3_clips_vs_single_clip"]["threshold_at_far_1pct"],
        "enrolled_3_vs_single_eer": metrics["enrolled_3_clips_vs_single_clip"]["threshold_at_eer"],
    }
    return metrics, threshold


def run(opts: Options) -> int:
    t0 = time.time()
    train_fs, heldout = data.load_all(opts.data_dir, opts.seed, opts.synth)
    t_feats = time.time() - t0
    net, n_classes = train(train_fs, opts)
    t_train = time.time() - t0 - t_feats
    model = NormalizedEmbedding(net).eval()
    path = opts.out_dir / "speaker.onnx"
    common.export_onnx(model, path, "embedding")
    parity = common.check_parity(model, path)
    metrics, threshold = evaluate(path, heldout, opts.seed)
    metrics["onnx_vs_torch_max_abs_diff"] = parity
    info = card.TrainingInfo("speaker", opts.epochs, opts.seed, opts.synth, opts.loss_text(),
                             t_feats, t_train, opts.data_dir, opts.out_dir)
    card.write_card(path, card.speaker_card(path, train_fs, heldout, metrics, threshold, info, opts.dim, n_classes))
    print(card.summary(metrics), flush=True)
    return 0
