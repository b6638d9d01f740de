"""Small 1-D convolutional (TDNN-style) networks over normalised MFCC frames.

Both networks take ``feats`` shaped (batch, time, numcep) and accept any length; an optional
``mask`` (batch, 1, time) marks real frames when a training batch is zero-padded, so that
padded and unpadded inputs give the same result for the real frames.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

Mask = torch.Tensor | None


class ConvBlock(nn.Module):
    """Conv1d (same length) + batch norm + ReLU, residual when the shapes allow it."""

    def __init__(self, cin: int, cout: int, kernel: int, dilation: int = 1):
        super().__init__()
        pad = dilation * (kernel - 1) // 2
        self.conv = nn.Conv1d(cin, cout, kernel, padding=pad, dilation=dilation, bias=False)
        self.bn = nn.BatchNorm1d(cout)
        self.residual = cin == cout

    def forward(self, x: torch.Tensor, mask: Mask = None) -> torch.Tensor:
        y = F.relu(self.bn(self.conv(x)))
        if self.residual:
            y = y + x
        return y if mask is None else y * mask


class Trunk(nn.Module):
    def __init__(self, n_in: int, channels: int, layers: list[tuple[int, int]], out: int):
        super().__init__()
        sizes = [n_in] + [channels] * len(layers)
        self.blocks = nn.ModuleList(
            ConvBlock(a, b, k, d) for a, b, (k, d) in zip(sizes[:-1], sizes[1:], layers)
        )
        self.expand = ConvBlock(channels, out, 1)

    def forward(self, feats: torch.Tensor, mask: Mask = None) -> torch.Tensor:
        x = feats.transpose(1, 2)  # (batch, numcep, time)
        for block in self.blocks:
            x = block(x, mask)
        return self.expand(x, mask)


def mean_max_pool(x: torch.Tensor, mask: Mask = None) -> torch.Tensor:
    if mask is None:
        return torch.cat((x.mean(dim=2), x.amax(dim=2)), dim=1)
    n = mask.sum(dim=2).clamp(min=1.0)
    mean = (x * mask).sum(dim=2) / n
    peak = x.masked_fill(mask == 0, -1e4).amax(dim=2)
    return torch.cat((mean, peak), dim=1)


def mean_std_pool(x: torch.Tensor, mask: Mask = None) -> torch.Tensor:
    if mask is None:
        mean = x.mean(dim=2)
        var = (x * x).mean(dim=2) - mean * mean
    else:
        n = mask.sum(dim=2).clamp(min=1.0)
        mean = (x * mask).sum(dim=2) / n
        var = (x * x * mask).sum(dim=2) / n - mean * mean
    return torch.cat((mean, torch.sqrt(var.clamp(min=1e-5))), dim=1)


class AttentiveStatsPool(nn.Module):
    """Attention-weighted mean and std over time, one weight per channel and frame, so
    silence and noise frames (VAD pre-roll, tail) can be discounted."""

    def __init__(self, channels: int, hidden: int = 64):
        super().__init__()
        self.attn = nn.Sequential(nn.Conv1d(channels, hidden, 1), nn.Tanh(), nn.Conv1d(hidden, channels, 1))

    def forward(self, x: torch.Tensor, mask: Mask = None) -> torch.Tensor:
        score = self.attn(x)
        if mask is not None:
            score = score.masked_fill(mask == 0, -1e4)
        w = torch.softmax(score, dim=2)
        mean = (w * x).sum(dim=2)
        var = (w * x * x).sum(dim=2) - mean * mean
        return torch.cat((mean, torch.sqrt(var.clamp(min=1e-5))), dim=1)


class DigitNet(nn.Module):
    """Spoken digit classifier: logits over 10 digits + "not a digit"."""

    def __init__(self, numcep: int = 20, channels: int = 128, n_classes: int = 11):
        super().__init__()
        layers = [(5, 1), (3, 2), (3, 3), (3, 4), (3, 1)]
        self.trunk = Trunk(numcep, channels, layers, 2 * channels)
        self.head = nn.Sequential(
            nn.Linear(4 * channels, 128), nn.ReLU(), nn.Dropout(0.2), nn.Linear(128, n_classes)
        )

    def forward(self, feats: torch.Tensor, mask: Mask = None) -> torch.Tensor:
        return self.head(mean_max_pool(self.trunk(feats, mask), mask))


class DistilledDigitNet(DigitNet):
    """A DigitNet that also predicts a teacher's embedding from its pooled features (training
    only: the exported graph is DigitNet's, logits alone)."""

    def __init__(self, teacher_dim: int = 2048):
        super().__init__()
        self.distill = nn.Linear(self.head[0].in_features, teacher_dim)

    def logits_and_embedding(self, feats: torch.Tensor, mask: Mask = None) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = mean_max_pool(self.trunk(feats, mask), mask)
        return self.head(pooled), self.distill(pooled)


class DigitRNN(nn.Module):
    """The recurrent family of digit classifier: a strided convolution (10 ms -> 20 ms steps),
    a bidirectional GRU, mean+max pooling over time. Same input and output as DigitNet.

    ``lengths`` (training only) are the real frame counts of a zero-padded batch: the GRU runs
    on packed sequences, so padding never reaches the backward direction or the pooling."""

    def __init__(self, numcep: int = 20, channels: int = 96, hidden: int = 96, n_classes: int = 11):
        super().__init__()
        self.front = nn.Sequential(
            nn.Conv1d(numcep, channels, 5, stride=2, padding=2, bias=False), nn.BatchNorm1d(channels), nn.ReLU(),
        )
        self.gru = nn.GRU(channels, hidden, num_layers=2, batch_first=True, bidirectional=True, dropout=0.1)
        self.head = nn.Sequential(nn.Linear(4 * hidden, 128), nn.ReLU(), nn.Dropout(0.2), nn.Linear(128, n_classes))

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.pooled(feats, lengths))

    def pooled(self, feats: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        x = self.front(feats.transpose(1, 2)).transpose(1, 2)  # (batch, steps, channels)
        if lengths is None:
            y, _ = self.gru(x)
            return torch.cat((y.mean(dim=1), y.amax(dim=1)), dim=1)
        steps = (lengths + 1) // 2
        packed = nn.utils.rnn.pack_padded_sequence(x, steps.cpu(), batch_first=True, enforce_sorted=False)
        y, _ = nn.utils.rnn.pad_packed_sequence(self.gru(packed)[0], batch_first=True, total_length=x.shape[1])
        mask = (torch.arange(x.shape[1])[None, :] < steps[:, None]).unsqueeze(2).to(y.dtype)
        return mean_max_pool(y.transpose(1, 2), mask.transpose(1, 2))


class DistilledDigitRNN(DigitRNN):
    """A DigitRNN that also predicts a teacher's embedding (as DistilledDigitNet)."""

    def __init__(self, teacher_dim: int = 2048):
        super().__init__()
        self.distill = nn.Linear(self.head[0].in_features, teacher_dim)

    def logits_and_embedding(self, feats: torch.Tensor, lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.pooled(feats, lengths)
        return self.head(pooled), self.distill(pooled)


class SpeakerNet(nn.Module):
    """x-vector-like speaker embedder; returns the (unnormalised) embedding."""

    def __init__(self, numcep: int = 20, channels: int = 192, dim: int = 192, attention: bool = False):
        super().__init__()
        layers = [(5, 1), (3, 2), (3, 3), (3, 4), (3, 1)]
        self.trunk = Trunk(numcep, channels, layers, 512)
        self.pool = AttentiveStatsPool(512) if attention else None
        self.embed = nn.Linear(1024, dim)
        self.bn = nn.BatchNorm1d(dim)

    def forward(self, feats: torch.Tensor, mask: Mask = None) -> torch.Tensor:
        x = self.trunk(feats, mask)
        stats = mean_std_pool(x, mask) if self.pool is None else self.pool(x, mask)
        return self.bn(self.embed(stats))


class NormalizedEmbedding(nn.Module):
    """Export wrapper: the shipped graph returns L2-normalised embeddings."""

    def __init__(self, net: SpeakerNet):
        super().__init__()
        self.net = net

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(feats), p=2.0, dim=1)


class AAMSoftmax(nn.Module):
    """Additive angular margin softmax (ArcFace): logits s*cos(theta + m) for the target."""

    def __init__(self, dim: int, n_classes: int, margin: float = 0.2, scale: float = 30.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_classes, dim) * 0.01)
        self.margin, self.scale = margin, scale

    def logits(self, emb: torch.Tensor, target: torch.Tensor, margin: float) -> torch.Tensor:
        cos = F.linear(F.normalize(emb), F.normalize(self.weight)).clamp(-1 + 1e-7, 1 - 1e-7)
        sin = torch.sqrt(1.0 - cos * cos)
        cos_m = cos * math.cos(margin) - sin * math.sin(margin)
        # beyond theta = pi - m, cos(theta + m) is not monotonic: fall back to CosFace form
        cos_m = torch.where(cos > math.cos(math.pi - margin), cos_m, cos - math.sin(math.pi - margin) * margin)
        onehot = F.one_hot(target, cos.shape[1]).to(cos.dtype)
        return self.scale * (onehot * cos_m + (1 - onehot) * cos)

    def forward(self, emb: torch.Tensor, target: torch.Tensor, margin: float | None = None) -> torch.Tensor:
        m = self.margin if margin is None else margin
        return F.cross_entropy(self.logits(emb, target, m), target)
