"""Spoken digit model: training, ONNX export and held-out evaluation."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from streamd.models.cards import sha256_of
from streamd.train import card, common, data, teacher
from streamd.train.scoring import confidence_threshold, corpus_metrics, member_file, onnx_logits, operating_points, softmax
from streamd.train.nets import DigitNet, DigitRNN, DistilledDigitNet, DistilledDigitRNN

# The model families: a convolutional (TDNN) and a recurrent (GRU) classifier, and each of them
# distilled from a pretrained word embedding (streamd.train.teacher).
FAMILIES = {"cnn": DigitNet, "rnn": DigitRNN, "kd": DistilledDigitNet, "kd-rnn": DistilledDigitRNN}
DISTILLED = ("kd", "kd-rnn")

BATCH = 64
PEAK_LR = 3e-3
NON_DIGIT_FRACTION = 0.35  # share of "not a digit" clips drawn each epoch
LOSS_TEXT = "cross-entropy, label smoothing 0.05, AdamW (wd 1e-3), one-cycle cosine LR"
KD_WEIGHT = 1.0
KD_LOSS_TEXT = (f"{LOSS_TEXT}, plus {KD_WEIGHT} x (1 - cosine) between a linear map of the pooled features "
                "and the teacher's embedding of the same augmented clip")


@dataclass
class Options:
    data_dir: Path
    out_dir: Path
    epochs: int = 30
    seed: int = 0
    synth: bool = True
    family: str = "cnn"
    english_only: bool = False  # FSDD and synthetic English only: the base of the adaptation experiment
    flite: bool = False  # add the flite voices to training (measured: no gain; docs/measurements.md)
    arabic_synth: bool = False  # add espeak-ng's Arabic voice in 40 variants to training


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


def batch_inputs(net: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A zero-padded training batch as either family's arguments, so that padding is ignored."""
    if isinstance(net, DigitRNN):
        return x, mask.sum(dim=(1, 2)).long()
    return x * mask.transpose(1, 2), mask


def batch_loss(net: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor, y: torch.Tensor,
               teacher_emb: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, logits) of one batch; with the teacher's embeddings, the distillation term too."""
    if teacher_emb is None:
        logits = net(*batch_inputs(net, x, mask))
        return F.cross_entropy(logits, y, label_smoothing=0.05), logits
    logits, emb = net.logits_and_embedding(*batch_inputs(net, x, mask))
    kd = (1 - F.cosine_similarity(emb, teacher_emb, dim=1)).mean()
    return F.cross_entropy(logits, y, label_smoothing=0.05) + KD_WEIGHT * kd, logits


def train(fs: data.FeatureSet, opts: Options, teacher_emb: np.ndarray | None = None) -> torch.nn.Module:
    """``teacher_emb``: the teacher's embedding of every item of ``fs`` (families kd, kd-rnn)."""
    rng = common.seed_everything(opts.seed)
    net = FAMILIES[opts.family]()
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
            emb = None if teacher_emb is None else torch.from_numpy(teacher_emb[batch].astype(np.float32))
            loss, logits = batch_loss(net, spec_augment(x, rng), mask, y, emb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            losses.append(loss.item())
            correct += int((logits.argmax(1) == y).sum())
            seen += len(batch)
        print(f"digits {opts.family} epoch {epoch + 1}/{opts.epochs} loss {np.mean(losses):.4f} "
              f"train-acc {correct / seen:.4f} ({time.time() - t0:.0f}s)", flush=True)
    return net.eval()


def evaluate(onnx_path: Path, split: data.DigitSplit) -> tuple[dict, dict]:
    """Held-out metrics of the shipped ONNX model per corpus, and its confidence threshold,
    chosen on the validation speakers, with operating points on the held-out ones."""
    test = onnx_logits(onnx_path, split.test)
    threshold = confidence_threshold(softmax(onnx_logits(onnx_path, split.validation)), split.validation.labels())
    threshold["chosen_on"] = "validation speakers"
    threshold["operating_points"] = operating_points(softmax(test), split.test.labels())
    return corpus_metrics(test, split.test), threshold


def run(opts: Options) -> int:
    t0 = time.time()
    split = data.load_digit_split(opts.data_dir, opts.seed, opts.synth, opts.flite, opts.arabic_synth)
    if opts.english_only:
        split.train = data.select(split.train, lambda clip: clip.corpus != "asc")
    targets = teacher.targets(split.train, "digits-train", opts.seed) if opts.family in DISTILLED else None
    t_feats = time.time() - t0
    net = train(split.train, opts, targets)
    t_train = time.time() - t0 - t_feats
    path = opts.out_dir / member_file(opts.family, opts.seed)
    if opts.english_only:
        path = path.with_name(path.stem + "-en.onnx")
    common.export_onnx(net, path, "logits")
    parity = common.check_parity(net, path)
    metrics, threshold = evaluate(path, split)
    metrics["onnx_vs_torch_max_abs_diff"] = parity
    info = card.TrainingInfo("digits", opts.epochs, opts.seed, opts.synth, KD_LOSS_TEXT if targets is not None else LOSS_TEXT,
                             t_feats, t_train, opts.data_dir, opts.out_dir, opts.family)
    c = card.digits_card(path, split, metrics, threshold, info, net)
    if targets is not None:
        c["teacher"] = teacher.PROVENANCE | {"sha256": sha256_of(teacher.model_path())}
    if opts.flite:
        c["training"]["command"] += " --flite"
        c["split"] += card.FLITE_SPLIT_TEXT
    if opts.arabic_synth:
        c["training"]["command"] += " --arabic-synth"
        c["split"] += card.ARABIC_SYNTH_SPLIT_TEXT
    if opts.english_only:
        c["name"] += "-en"
        c["training"]["command"] += " --english-only"
        c["data"]["corpora"]["asc"].update(train_clips=0, train_speakers=[], note="English-only base model")
        c["data"]["training_feature_items"] = len(split.train)
    card.write_card(path, c)
    print(card.summary(metrics), flush=True)
    return 0
