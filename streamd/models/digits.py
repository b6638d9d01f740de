"""The digit decision: how the digit models' logits are fused and cascaded (``Fusion``,
``Cascade``), the plan that says which digit models to load and how to combine them
(``digit_plan``, from config and the fusion card), and the decision from the logits: classes
0-9 are digit values, the last class (when present) means "not a digit"; low confidence also
gives no digit."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streamd.models.cards import ModelCard, ModelError, load_card, read_card


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


@dataclass(frozen=True)
class DigitPlan:
    """Which digit model cards to load and how to combine them (from config and the fusion card)."""

    cards: dict[str, ModelCard]
    fusion: Fusion | None
    choice: str
    thresholds: dict[str, float]  # min_confidence per choice, chosen on validation speakers
    source: Path  # the card the plan was read from: the fusion card, or the single model's
    cascade: tuple[Cascade, ...] = ()  # fused: the costly members only when the others are unsure


def _fusion_card(path: Path) -> dict:
    data = read_card(path, "fusion card", ("kind", "members", "weights", "bias", "choice", "min_confidence"))
    if data["kind"] != "digits-fusion" or len(data["weights"]) != len(data["members"]):
        raise ModelError(f"{path}: not a digits-fusion card with one weight per member")
    return data


def _cascade(path: Path, data: dict, names: list[str]) -> tuple[Cascade, ...]:
    """The card's cascade stages (``cascade.stages``, cheapest first), or none."""
    spec = data.get("cascade")
    if spec is None:
        return ()
    try:
        stages = tuple(_stage(s, names) for s in spec["stages"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{path}: malformed cascade entry ({type(exc).__name__}: {exc})") from None
    for stage in stages:
        if len(stage.fusion.weights) != len(stage.first) or len(stage.fusion.bias) != len(data["bias"]) \
                or not 0 < stage.gate <= 1:
            raise ModelError(f"{path}: each cascade stage needs a weight per member, {len(data['bias'])} biases "
                             "and 0 < gate <= 1")
    return stages


def _stage(spec: dict, names: list[str]) -> Cascade:
    return Cascade(tuple(names.index(n) for n in spec["members"]),
                   Fusion(tuple(spec["weights"]), tuple(spec["bias"])), float(spec["gate"]))


def digit_plan(cfg) -> DigitPlan:
    """``digits.model``: auto (what the fusion card found best on validation speakers), fused,
    or one family by name. Without a fusion card, the single ``models.digits`` model."""
    models_dir = cfg.path(cfg.models.dir)
    want = cfg.digits.model
    fusion_path = models_dir / cfg.models.digits_fusion if cfg.models.digits_fusion else None
    if fusion_path is None or not fusion_path.exists():
        if want == "fused":
            raise ModelError(f"digits.model = 'fused' needs a fusion card (models.digits_fusion: {fusion_path})")
        card = load_card(models_dir / cfg.models.digits, "digits")
        return DigitPlan({str(card.data.get("family", "digits")): card}, None, "single", {}, card.path)
    data = _fusion_card(fusion_path)
    cards = {m["name"]: load_card(models_dir / m["card"], "digits") for m in data["members"]}
    for m in data["members"]:
        if cards[m["name"]].sha256 != m["sha256"]:
            raise ModelError(f"{fusion_path}: fitted on {m['card']} sha256 {m['sha256'][:12]}, which now has "
                             f"{cards[m['name']].sha256[:12]}: run `streamd train fusion`")
    classes = {c.data["output"]["shape"][-1] for c in cards.values()}
    if classes != {len(data["bias"])}:
        raise ModelError(f"{fusion_path}: {len(data['bias'])} biases for models with {sorted(classes)} classes")
    choice = data["choice"] if want == "auto" else want
    thresholds = {k: float(v) for k, v in data["min_confidence"].items()}
    if choice == "fused":
        cascade = _cascade(fusion_path, data, list(cards)) if cfg.digits.cascade else ()
        return DigitPlan(cards, Fusion(tuple(data["weights"]), tuple(data["bias"])), choice, thresholds, fusion_path,
                         cascade)
    if choice not in cards:
        raise ModelError(f"digits.model = {want!r}: {fusion_path} offers {', '.join(cards)} and fused")
    return DigitPlan({choice: cards[choice]}, None, choice, thresholds, fusion_path)


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
