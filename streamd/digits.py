"""Digit decision from classifier logits: classes 0-9 are digit values, the last class
(when present) means "not a digit"; low confidence also gives no digit."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DigitDecision:
    digit: int | None
    confidence: float
    candidates: list[dict]


@dataclass(frozen=True)
class Fusion:
    """Late fusion of several classifiers' logits into one: a weighted sum of their
    log-probabilities plus a per-class bias (fitted on validation speakers by
    ``streamd train fusion``). The result is used as logits."""

    weights: tuple[float, ...]
    bias: tuple[float, ...]

    def __call__(self, logits: list[np.ndarray]) -> np.ndarray:
        if len(logits) != len(self.weights):
            raise ValueError(f"fusion of {len(self.weights)} models given {len(logits)} outputs")
        z = np.array(self.bias, np.float64)
        for w, out in zip(self.weights, logits):
            z = z + w * log_softmax(out)
        return z


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64) - np.max(logits)
    e = np.exp(z)
    return e / e.sum()


def decide(logits: np.ndarray, min_confidence: float, top: int = 3) -> DigitDecision:
    p = softmax(logits)
    digit_p = p[:10]
    order = np.argsort(-digit_p)[:top]
    candidates = [{"digit": int(i), "p": float(digit_p[i])} for i in order]
    best = int(np.argmax(p))
    confidence = float(p[best])
    if best >= 10 or confidence < min_confidence:
        return DigitDecision(None, float(digit_p[order[0]]), candidates)
    return DigitDecision(best, confidence, candidates)
