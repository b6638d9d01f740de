"""Digit family ``ge2e``: a classifier on the frame states of a pretrained speech encoder.

Resemblyzer's GE2E encoder (Apache-2.0, trained on thousands of speakers; the speaker model
starts from it too) is kept frozen; its three LSTM layers' states, every 20 ms, feed a small
convolutional head trained on our digits. The encoder heard far more voices than our 17 real
training speakers, and that is what the MFCC families lack on voices they never heard. The
states are computed once per training clip version, so training costs only the head's epochs.
The shipped ONNX model holds encoder and head: mel power in (the speaker model's front end, the
same ring of features in the daemon), logits out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from streamd.signal.features import mel_params
from streamd.models.cards import sha256_of
from streamd.train import card, common, data, scoring
from streamd.train.digits import evaluate
from streamd.train.speaker_encoder import load_encoder, pretrained_path, quantize

FAMILY = "ge2e"
FRONT_END = "melpower"
STATE_DIMS = 3 * 256  # the three LSTM layers' outputs, concatenated
STRIDE = 2  # states kept every 20 ms
PLAN = data.HEAD_PLAN
BATCH = 64
PEAK_LR = 3e-3
LOSS_TEXT = "cross-entropy, label smoothing 0.05, AdamW (wd 1e-2), one-cycle LR (peak 3e-3); encoder frozen"


class FrozenEncoder(nn.Module):
    """The encoder's LSTM as three single-layer LSTMs, so that every layer's states come out."""

    def __init__(self, lstm: nn.LSTM):
        super().__init__()
        self.layers = nn.ModuleList()
        for k in range(lstm.num_layers):
            layer = nn.LSTM(lstm.input_size if k == 0 else lstm.hidden_size, lstm.hidden_size, 1, batch_first=True)
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(layer, f"{name}_l0").data = getattr(lstm, f"{name}_l{k}").data.clone()
            self.layers.append(layer)
        self.requires_grad_(False)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        states, x = [], feats
        for layer in self.layers:
            x, _ = layer(x)
            states.append(x)
        return torch.cat(states, dim=2)[:, ::STRIDE]


class Head(nn.Module):
    def __init__(self, dims: int = STATE_DIMS, channels: int = 160, n_classes: int = len(data.CLASSES)):
        super().__init__()
        self.inp = nn.Sequential(nn.LayerNorm(dims), nn.Linear(dims, channels))
        self.convs = nn.ModuleList(nn.Conv1d(channels, channels, 5, padding=2) for _ in range(2))
        self.attention = nn.Linear(channels, 1)
        self.out = nn.Sequential(nn.Dropout(0.2), nn.Linear(2 * channels, n_classes))

    def forward(self, states: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, time, dims) states -> logits; ``mask`` (batch, time) marks real frames.
        Padding is zeroed before each convolution, so that a padded row's edge frames see the
        zeros an unpadded row's convolution pads with: a batch gives what each row alone gives."""
        keep = None if mask is None else mask[:, None, :].to(states.dtype)
        x = self.inp(states).transpose(1, 2)
        for conv in self.convs:
            x = x if keep is None else x * keep
            x = x + F.relu(conv(F.dropout(x, 0.1, self.training)))
        x = x.transpose(1, 2)
        score = self.attention(x).squeeze(2)
        if mask is not None:
            score = score.masked_fill(~mask, -1e9)
            x_max = x.masked_fill(~mask[..., None], -1e9)
        else:
            x_max = x
        weights = score.softmax(dim=1)
        return self.out(torch.cat(((weights[..., None] * x).sum(1), x_max.max(1).values), dim=1))


class GE2EDigitNet(nn.Module):
    """What ships: mel power (batch, time, 40) of one utterance per row -> logits."""

    def __init__(self, encoder: FrozenEncoder, head: Head):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(feats))


@dataclass
class Options:
    data_dir: Path
    out_dir: Path
    epochs: int = 12
    seed: int = 0
    synth: bool = True


def encoder_states(encoder: FrozenEncoder, fs: data.FeatureSet, batch: int = 64) -> list[np.ndarray]:
    """Every item's states (float16), computed in batches of similar length."""
    lengths = fs.lengths()
    order = np.argsort(lengths)
    out: list[np.ndarray] = [np.empty(0)] * len(fs)
    with torch.no_grad():
        for start in range(0, len(order), batch):
            items = order[start : start + batch]
            x, _ = common.pad_batch([fs.item(i) for i in items])
            states = encoder(x).numpy().astype(np.float16)
            for row, i in enumerate(items):
                out[i] = states[row, : -(-int(lengths[i]) // STRIDE)]
    return out


def pad_states(states: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """(time, dims) float16 rows -> zero-padded (batch, time, dims) float32 and a (batch, time) mask."""
    t = max(len(s) for s in states)
    x = torch.zeros(len(states), t, states[0].shape[1])
    mask = torch.zeros(len(states), t, dtype=torch.bool)
    for row, s in enumerate(states):
        x[row, : len(s)] = torch.from_numpy(s.astype(np.float32))
        mask[row, : len(s)] = True
    return x, mask


def train_step(logits: torch.Tensor, target: torch.Tensor, opt: torch.optim.Optimizer, schedule) -> tuple[float, int]:
    """One optimiser step on a batch's logits; its loss and how many it got right."""
    loss = F.cross_entropy(logits, target, label_smoothing=0.05)
    opt.zero_grad()
    loss.backward()
    opt.step()
    schedule.step()
    return loss.item(), int((logits.argmax(1) == target).sum())


def train_head(states: list[np.ndarray], labels: np.ndarray, opts: Options) -> Head:
    rng = common.seed_everything(opts.seed)
    head = Head()
    opt = torch.optim.AdamW(head.parameters(), lr=PEAK_LR, weight_decay=1e-2)
    steps = opts.epochs * -(-len(states) // BATCH)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, PEAK_LR, total_steps=steps)
    y = torch.from_numpy(labels)
    for epoch in range(opts.epochs):
        head.train()
        t0, losses, correct = time.time(), [], 0
        order = rng.permutation(len(states))
        for start in range(0, len(order), BATCH):
            items = order[start : start + BATCH]
            x, mask = pad_states([states[i] for i in items])
            loss, right = train_step(head(x, mask), y[items], opt, schedule)
            losses.append(loss)
            correct += right
        print(f"digits {FAMILY} epoch {epoch + 1}/{opts.epochs} loss {np.mean(losses):.4f} "
              f"train-acc {correct / len(states):.4f} ({time.time() - t0:.0f}s)", flush=True)
    return head.eval()


def export(net: GE2EDigitNet, path: Path, sample: list[np.ndarray]) -> dict:
    """Float ONNX, then int8 LSTM layers 2-3 (as the speaker model); returns the parities:
    float ONNX against torch, and the int8 model's logits against the float ones."""
    float_path = path.with_name(path.stem + "-float.onnx")
    torch.onnx.export(net, (torch.zeros(1, 50, 40),), str(float_path), dynamo=False, opset_version=scoring.OPSET,
                      input_names=["feats"], output_names=["logits"],
                      dynamic_axes={"feats": {0: "batch", 1: "time"}, "logits": {0: "batch"}})
    quantize(float_path, path)
    with torch.no_grad():
        ref = np.concatenate([net(torch.from_numpy(feats[None].astype(np.float32))).numpy() for feats in sample])
    exact = float(np.abs(scoring.ort_outputs(scoring.ort_session(float_path), sample) - ref).max())
    got = scoring.ort_outputs(scoring.ort_session(path), sample)
    float_path.unlink()
    if exact > common.PARITY_TOL:
        raise RuntimeError(f"ONNX export differs from torch by {exact:.2e} > {common.PARITY_TOL}")
    return {"onnx_float_vs_torch_max_abs_diff": exact,
            "int8_vs_float_same_argmax": float(np.mean(ref.argmax(1) == got.argmax(1))),
            "int8_vs_float_max_abs_logit_diff": round(float(np.abs(ref - got).max()), 4)}


def model_card(path: Path, split: data.DigitSplit, metrics: dict, threshold: dict, info: card.TrainingInfo,
               net: GE2EDigitNet) -> dict:
    c = card.digits_card(path, split, metrics, threshold, info, net)
    c["name"] = f"streamd-digits-{FAMILY}" + (f"-s{info.seed}" if info.seed else "")
    c["trainable_parameters"] = sum(p.numel() for p in net.head.parameters())
    c["features"] = mel_params().as_dict()
    c["normalization"] = "per-utterance gain to the mel front end's target level (streamd.signal.features.normalize)"
    c["input"] = {"name": "feats", "shape": ["batch", "time", mel_params().numcep], "dtype": "float32",
                  "batch_invariant": False, "bucket": False,
                  "notes": "one utterance per row, unpadded (the head pools over every frame it is given; "
                           "int8 LSTM layers scale their input by the batch's range)"}
    c["pretrained"] = {
        "source": "Resemblyzer 0.1.4 wheel (PyPI), resemblyzer/pretrained.pt: GE2E speaker encoder by "
                  "Corentin Jemine, Apache-2.0 (the wheel's licence)",
        "sha256": sha256_of(pretrained_path()), "use": "LSTM weights copied unchanged and frozen"}
    c["training"]["augmentation"] = card.head_augmentation()
    return c


def run(opts: Options) -> int:
    t0 = time.time()
    split = data.load_digit_split(opts.data_dir, opts.seed, opts.synth, front_end=FRONT_END, plan=PLAN)
    common.seed_everything(opts.seed)
    encoder = FrozenEncoder(load_encoder(pretrained_path()).lstm)
    states = encoder_states(encoder, split.train)
    t_feats = time.time() - t0
    head = train_head(states, split.train.labels(), opts)
    t_train = time.time() - t0 - t_feats
    net = GE2EDigitNet(encoder, head).eval()
    path = opts.out_dir / scoring.member_file(FAMILY, opts.seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    sample = [split.test.item(i) for i in range(0, len(split.test), max(1, len(split.test) // 64))]
    parity = export(net, path, sample)
    metrics, threshold = evaluate(path, split)
    metrics.update(parity)
    info = card.TrainingInfo("digits", opts.epochs, opts.seed, opts.synth, LOSS_TEXT, t_feats, t_train,
                             opts.data_dir, opts.out_dir, FAMILY)
    card.write_card(path, model_card(path, split, metrics, threshold, info, net))
    print(card.summary(metrics), flush=True)
    return 0
