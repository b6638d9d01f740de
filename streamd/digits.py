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
