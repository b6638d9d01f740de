"""Spoken digit model: training, ONNX export and held-out evaluation."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from streamd.train import card, common, data
from streamd.train.nets import DigitNet

BATCH = 64
PEAK_LR = 3e-3
NON_DIGIT_FRACTION = 0.35  # share of "not a digit" clips drawn each epoch
LOSS_TEXT = "cross-entropy, label smoothing 0.05, AdamW (wd 1e-3), one-cycle cosine LR"


@dataclass
class Options:
    data_dir: Path
    out_dir: Path
    epochs: int = 30
    seed: int = 0
    synth: bool = True


def epoch_items(fs: data.FeatureSet, rng: np.random.Generator) -> np.ndarray:
    """One random version of every training clip; part of the non-digit clips."""
    order = rng.permutation(len(fs))
    _, first = np.unique(fs.clip_index[order], return_index=True)
    items = order[first]
    keep = (fs.labels()[items] != data.NOT_DIGIT) | (rng.random(len(items)) < NON_DIGIT_FRACTION)
    return items[keep]


def spec_augment(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Zero one band of up to 3 cepstra and one span of up to 8 frames per batch."""
    x = x.clone()
    c = int(rng.integers(1, x.shape[2]))
    x[:, :, c : c + int(rng.integers(0, 4))] = 0.0
    t = int(rng.integers(0, x.shape[1]))
    x[:, t : t + int(rng.integers(0, 9)), :] = 0.0
    return x


def train(fs: data.FeatureSet, opts: Options) -> DigitNet:
    rng = common.seed_everything(opts.seed)
    net = DigitNet()
    opt = torch.optim.AdamW(net.parameters(), lr=PEAK_LR, weight_decay=1e-3)
    labels, lengths = fs.labels(), fs.lengths()
    steps_per_epoch = int(np.ceil(len(epoch_items(fs, np.random.default_rng(0))) / BATCH))
    total, step = steps_per_epoch * opts.epochs, 0
    for epoch in range(opts.epochs):
        net.train()
        t0, losses, correct, seen = time.time(), [], 0, 0
        for batch in common.length_batches(epoch_items(fs, rng), lengths, BATCH, rng):
            x, mask = common.pad_batch([fs.item(i) for i in batch])
            y = torch.from_numpy(labels[batch])
            common.cosine_lr(opt, step, total, PEAK_LR, warmup=steps_per_epoch)
            logits = net(spec_augment(x, rng) * mask.transpose(1, 2), mask)
            loss = F.cross_entropy(logits, y, label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            losses.append(loss.item())
            correct += int((logits.argmax(1) == y).sum())
            seen += len(batch)
        print(f"digits epoch {epoch + 1}/{opts.epochs} loss {np.mean(losses):.4f} "
              f"train-acc {correct / seen:.4f} ({time.time() - t0:.0f}s)", flush=True)
    return net.eval()


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def operating_points(probs: np.ndarray, labels: np.ndarray) -> list[dict]:
    """For confidence thresholds: share of digit clips accepted with the right digit, with a
    wrong digit, and share of non-digit clips accepted as some digit (daemon rule: the 11-class
    argmax must be a digit and its probability >= threshold)."""
    pred, conf = probs.argmax(1), probs.max(1)
    digit = labels != data.NOT_DIGIT
    points = []
    for thr in (0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95):
        accept = (pred != data.NOT_DIGIT) & (conf >= thr)
        points.append({
            "threshold": thr,
            "digit_correct": float((accept & (pred == labels))[digit].mean()),
            "digit_wrong": float((accept & (pred != labels))[digit].mean()),
            "non_digit_accepted": float(accept[~digit].mean()),
        })
    return points


def confidence_threshold(probs: np.ndarray, labels: np.ndarray, max_fa: float = 0.02) -> dict:
    """Smallest threshold letting at most ``max_fa`` of held-out non-digit clips through."""
    points = operating_points(probs, labels)
    ok = [p for p in points if p["non_digit_accepted"] <= max_fa] or points[-1:]
    best = ok[0]
    return {"value": best["threshold"],
            "rule": "daemon emits the 11-class argmax digit if its softmax prob >= value "
                    f"(smallest value keeping held-out non-digit acceptance <= {max_fa:.0%})",
            "at_value": best, "operating_points": points}


def group_metrics(logits: np.ndarray, labels: np.ndarray) -> dict:
    digit = labels != data.NOT_DIGIT
    out: dict = {}
    if digit.any():
        out["n_digit_clips"] = int(digit.sum())
        out["digit_accuracy_argmax_0_9"] = float((logits[digit, :10].argmax(1) == labels[digit]).mean())
        out["digit_accuracy_11_class"] = float((logits[digit].argmax(1) == labels[digit]).mean())
    if (~digit).any():
        out["n_non_digit_clips"] = int((~digit).sum())
        out["non_digit_predicted_as_digit"] = float((logits[~digit].argmax(1) != data.NOT_DIGIT).mean())
    out["accuracy_11_class_all_clips"] = float((logits.argmax(1) == labels).mean())
    out["n_clips"] = int(len(labels))
    return out


def evaluate(onnx_path: Path, heldout: data.FeatureSet) -> tuple[dict, dict]:
    """Held-out metrics of the shipped ONNX model, per corpus; plus a confidence threshold."""
    session = common.ort_session(onnx_path)
    logits = common.ort_outputs(session, [heldout.item(i) for i in range(len(heldout))])
    labels = heldout.labels()
    corpus = np.array([heldout.clips[c].corpus for c in heldout.clip_index])
    metrics = {
        "english_fsdd_heldout": group_metrics(logits[corpus == "fsdd"], labels[corpus == "fsdd"]),
        "arabic_asc_heldout": group_metrics(logits[corpus == "asc"], labels[corpus == "asc"]),
    }
    threshold = confidence_threshold(softmax(logits), labels)
    return metrics, threshold


def run(opts: Options) -> int:
    t0 = time.time()
    train_fs, heldout = data.load_all(opts.data_dir, opts.seed, opts.synth)
    t_feats = time.time() - t0
    net = train(train_fs, opts)
    t_train = time.time() - t0 - t_feats
    path = opts.out_dir / "digits.onnx"
    common.export_onnx(net, path, "logits")
    parity = common.check_parity(net, path)
    metrics, threshold = evaluate(path, heldout)
    metrics["onnx_vs_torch_max_abs_diff"] = parity
    info = card.TrainingInfo("digits", opts.epochs, opts.seed, opts.synth, LOSS_TEXT,
                             t_feats, t_train, opts.data_dir, opts.out_dir)
    card.write_card(path, card.digits_card(path, train_fs, heldout, metrics, threshold, info))
    print(card.summary(metrics), flush=True)
    return 0
