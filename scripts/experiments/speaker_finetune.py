"""Fine-tuning the GE2E speaker encoder's top layers on our training speakers.

LSTM layers 1-2 stay as pretrained (their outputs are computed once); LSTM layer 3 and the
linear layer learn with the GE2E softmax loss on 1.6 s windows of one speaker's clips joined
together. Not used by the shipped model: on training speakers held out of the fine-tune
(scripts/experiments/speaker_finetune_probe.py) 100 steps at lr 1e-5 helped raw cosines in every fold but
hurt every fold once scored as the daemon scores (NAP back end, AS-norm cohort of the
fine-tune's own speakers); 300 steps at 1e-4 learned its 14 speakers and forgot the rest.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from streamd.train.speaker_encoder import WINDOW, VoiceEncoder

FRAMES = WINDOW["frames"]
WINDOWS_PER_SPEAKER = 96
BATCH_SPEAKERS, BATCH_WINDOWS = 8, 6


class Top(nn.Module):
    """LSTM layer 3 and the linear layer: layer 2's output sequence -> unit embedding."""

    def __init__(self, top: nn.LSTM, linear: nn.Linear):
        super().__init__()
        self.top, self.linear = top, linear

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        _, (hidden, _) = self.top(h)
        return F.normalize(F.relu(self.linear(hidden[-1])), p=2.0, dim=1)


def split(enc: VoiceEncoder) -> tuple[nn.LSTM, Top]:
    """Copies of (LSTM layers 1-2, the rest) with the encoder's weights; ``enc`` is not shared."""
    low, top = nn.LSTM(40, 256, 2, batch_first=True), nn.LSTM(256, 256, 1, batch_first=True)
    sd = enc.lstm.state_dict()
    low.load_state_dict({k: v for k, v in sd.items() if k.endswith(("l0", "l1"))})
    top.load_state_dict({k.replace("l2", "l0"): v for k, v in sd.items() if k.endswith("l2")})
    return low, Top(top, copy.deepcopy(enc.linear))


def join(low: nn.LSTM, rest: Top) -> VoiceEncoder:
    """The two parts back in one encoder."""
    enc = VoiceEncoder()
    sd = {f"lstm.{k}": v for k, v in low.state_dict().items()}
    sd |= {f"lstm.{k.replace('l0', 'l2')}": v for k, v in rest.top.state_dict().items()}
    sd |= {f"linear.{k}": v for k, v in rest.linear.state_dict().items()}
    enc.load_state_dict(sd)
    return enc.eval()


def speaker_windows(feats: list[np.ndarray], n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` full windows, each of random clips of one speaker joined until it is full."""
    out = np.zeros((n, FRAMES, 40), np.float32)
    for k in range(n):
        parts, total = [], 0
        while total < FRAMES:
            parts.append(feats[rng.integers(len(feats))])
            total += len(parts[-1])
        out[k] = np.concatenate(parts)[:FRAMES]
    return out


def ge2e_loss(e: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """GE2E softmax loss on (N speakers, M windows, D) unit embeddings: each window against
    every speaker's centroid, its own speaker's computed without it."""
    n, m, _ = e.shape
    total = e.sum(dim=1)
    cent = F.normalize(total / m, dim=1)
    own = F.normalize((total[:, None] - e) / (m - 1), dim=2)
    sim = torch.einsum("nmd,kd->nmk", e, cent)
    eye = torch.eye(n, dtype=torch.bool)[:, None, :].expand(n, m, n)
    sim = torch.where(eye, (e * own).sum(dim=2, keepdim=True).expand(n, m, n), sim)
    return F.cross_entropy((w * sim + b).reshape(n * m, n), torch.arange(n).repeat_interleave(m))


def fine_tune(enc: VoiceEncoder, feats: dict[str, list[np.ndarray]], steps: int, lr: float, seed: int,
              log=print) -> VoiceEncoder:
    """A fine-tuned copy of ``enc`` (``enc`` itself unchanged); ``feats``: each speaker's clips
    as mel feature matrices (the daemon's front end)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    low, rest = split(enc)
    names = sorted(feats)
    with torch.no_grad():
        h = {s: low(torch.from_numpy(speaker_windows(feats[s], WINDOWS_PER_SPEAKER, rng)))[0] for s in names}
    w, b = nn.Parameter(torch.tensor(10.0)), nn.Parameter(torch.tensor(-5.0))  # GE2E's initial scale
    opt = torch.optim.Adam(list(rest.parameters()) + [w, b], lr=lr)
    for step in range(steps):
        spk = rng.choice(len(names), size=min(BATCH_SPEAKERS, len(names)), replace=False)
        batch = torch.stack([h[names[s]][rng.choice(WINDOWS_PER_SPEAKER, size=BATCH_WINDOWS, replace=False)]
                             for s in spk])
        loss = ge2e_loss(rest(batch.reshape(-1, FRAMES, 256)).reshape(len(spk), BATCH_WINDOWS, -1), w, b)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"  step {step} loss {loss.item():.3f}")
    return join(low, rest)
