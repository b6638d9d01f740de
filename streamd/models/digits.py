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


@dataclass(frozen=True)
class Cascade:
    """One stage of a cascade: the costly members run only for utterances the others are unsure
    of. When the fusion of the ``first`` members (indices into the full member list; each stage
    holds the members of the stages before it) gives its best class at least ``gate``, its
    logits are the decision; otherwise the next stage's members run too, and after the last
    stage every member runs and the full fusion decides. Each gate is chosen on validation
    speakers so that the cascade gives the full fusion's decisions there (``streamd train
    fusion --cascade``)."""

    first: tuple[int, ...]
    fusion: Fusion
    gate: float

    def settles(self, first_logits: list[np.ndarray]) -> np.ndarray | None:
        """The first members' fused logits when they settle the decision, else None."""
        z = self.fusion(first_logits)
        return z if float(np.max(softmax(z))) >= self.gate else None


def cascaded(stages: tuple[Cascade, ...], outputs: list[np.ndarray], full: Fusion) -> np.ndarray:
    """What a cascade decides from every member's logits (for evaluation): the first stage
    that settles, else the full fusion."""
    for stage in stages:
        z = stage.settles([outputs[i] for i in stage.first])
        if z is not None:
            return z
    return full(outputs)


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
