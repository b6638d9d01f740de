"""Helpers shared by the two trainers: seeding, padded batches, ONNX export and checks."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from streamd.train.scoring import OPSET, ort_session

PARITY_TOL = 1e-4


def seed_everything(seed: int, threads: int = 2) -> np.random.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    return np.random.default_rng(seed)


def pad_batch(mats: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad (time, numcep) matrices into (batch, time, numcep) plus a (batch, 1, time) mask."""
    t = max(len(m) for m in mats)
    x = np.zeros((len(mats), t, mats[0].shape[1]), dtype=np.float32)
    mask = np.zeros((len(mats), 1, t), dtype=np.float32)
    for i, m in enumerate(mats):
        x[i, : len(m)] = m
        mask[i, 0, : len(m)] = 1.0
    return torch.from_numpy(x), torch.from_numpy(mask)


def length_batches(items: np.ndarray, lengths: np.ndarray, batch_size: int,
                   rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Shuffled batches of ``items`` with similar lengths (little padding)."""
    jitter = lengths[items] + rng.uniform(0, 8, size=len(items))
    ordered = items[np.argsort(jitter)]
    batches = [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]
    for j in rng.permutation(len(batches)):
        yield batches[j]


def cosine_lr(opt: torch.optim.Optimizer, step: int, total: int, peak: float, warmup: int) -> None:
    lr = peak * step / warmup if step < warmup else 0.5 * peak * (1 + np.cos(np.pi * (step - warmup) / max(1, total - warmup)))
    for g in opt.param_groups:
        g["lr"] = lr


def export_onnx(model: nn.Module, path: Path, output: str, numcep: int = 20) -> None:
    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    dummy = torch.randn(2, 100, numcep)
    torch.onnx.export(
        model, (dummy,), str(path), dynamo=False, opset_version=OPSET,
        input_names=["feats"], output_names=[output],
        dynamic_axes={"feats": {0: "batch", 1: "time"}, output: {0: "batch"}},
    )


def check_parity(model: nn.Module, path: Path, seed: int = 0) -> float:
    """Largest |torch - onnxruntime| over random inputs of several lengths and batch sizes."""
    model.eval()
    session = ort_session(path)
    rng = np.random.default_rng(seed)
    worst = 0.0
    for batch, t in ((1, 10), (1, 57), (3, 100), (2, 400), (1, 1000), (1, 1500)):
        x = rng.standard_normal((batch, t, 20)).astype(np.float32)
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        got = session.run(None, {"feats": x})[0]
        worst = max(worst, float(np.abs(ref - got).max()))
    if worst > PARITY_TOL:
        raise RuntimeError(f"ONNX export differs from torch by {worst:.2e} > {PARITY_TOL}")
    return worst
