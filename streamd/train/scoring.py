"""Scoring digit models on feature sets: onnxruntime outputs, held-out metrics, operating
points and thresholds. No torch here: adaptation and fusion run without it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from streamd.train import data

# The digit model families (streamd.train.nets DigitNet, DigitRNN; streamd.train.digits_ge2e's
# head on a pretrained encoder; and each of the first two distilled from a pretrained word
# embedding: DistilledDigitNet, DistilledDigitRNN) and their files.
FAMILY_FILES = {"cnn": "digits.onnx", "rnn": "digits-rnn.onnx", "ge2e": "digits-ge2e.onnx", "kd": "digits-kd.onnx",
                "kd-rnn": "digits-kd-rnn.onnx", "words": "digits-words.onnx"}


def member_name(family: str, seed: int) -> str:
    """A trained digit model's name in the fusion: its family, and its seed unless 0."""
    return family if seed == 0 else f"{family}-s{seed}"


def member_file(family: str, seed: int) -> str:
    """digits.onnx, digits-rnn.onnx for seed 0; digits-s1.onnx, digits-rnn-s1.onnx for seed 1."""
    name = FAMILY_FILES[family]
    return name if seed == 0 else name.replace(".onnx", f"-s{seed}.onnx")


def parse_member(name: str) -> tuple[str, int]:
    """(family, seed) of a member name: "rnn" -> ("rnn", 0), "cnn-s1" -> ("cnn", 1)."""
    family, _, seed = name.partition("-s")
    if family not in FAMILY_FILES or (seed and not seed.isdigit()):
        raise ValueError(f"{name!r} is no digit model: a family ({', '.join(FAMILY_FILES)}), "
                         "optionally with -sN for seed N")
    return family, int(seed or 0)


# The ONNX opset every exported model uses (streamd.train.common exports with it).
OPSET = 17

def ort_session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def ort_outputs(session, mats: list[np.ndarray]) -> np.ndarray:
    """Run the ONNX model on each matrix alone, a batch of one, unpadded (for checks of an
    export against its source; decisions are scored with :func:`onnx_logits`)."""
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: m[None].astype(np.float32)})[0] for m in mats])


def daemon_model(card_path: Path):
    """A digit model as the daemon runs it (its card's front end, the default
    ``models.bucket_frames``), on one CPU session."""
    from streamd.config import Config
    from streamd.models.cards import front_end, load_card
    from streamd.models.inference import OnnxModel

    cfg = Config()
    card = load_card(card_path, "digits")
    return OnnxModel(card, front_end(cfg, card.feature_kind), "cpu", 2, cfg.models.bucket_frames)


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def accepted(probs: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """The daemon's rule: (11-class argmax, whether it is emitted as a digit: it is one and its
    probability >= threshold)."""
    pred = probs.argmax(1)
    return pred, (pred != data.NOT_DIGIT) & (probs.max(1) >= threshold)


def operating_points(probs: np.ndarray, labels: np.ndarray,
                     thresholds=(0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)) -> list[dict]:
    """For confidence thresholds: share of digit clips accepted with the right digit, with a
    wrong digit, and share of non-digit clips accepted as some digit (daemon rule: the 11-class
    argmax must be a digit and its probability >= threshold)."""
    digit = labels != data.NOT_DIGIT
    points = []
    for thr in thresholds:
        pred, accept = accepted(probs, thr)
        points.append({
            "threshold": thr,
            "digit_correct": float((accept & (pred == labels))[digit].mean()),
            "digit_wrong": float((accept & (pred != labels))[digit].mean()),
            "non_digit_accepted": float(accept[~digit].mean()),
        })
    return points


def confidence_threshold(probs: np.ndarray, labels: np.ndarray, max_fa: float = 0.02) -> dict:
    """Smallest threshold (in steps of 0.01) letting at most ``max_fa`` of the non-digit clips
    through."""
    points = operating_points(probs, labels, tuple(np.round(np.arange(0, 1, 0.01), 2)))
    ok = [p for p in points if p["non_digit_accepted"] <= max_fa] or points[-1:]
    best = ok[0]
    return {"value": best["threshold"],
            "rule": "daemon emits the 11-class argmax digit if its softmax prob >= value "
                    f"(smallest value keeping validation speakers' non-digit acceptance <= {max_fa:.0%})",
            "at_value": best, "operating_points": operating_points(probs, labels)}


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


def onnx_logits(onnx_path: Path, fs: data.FeatureSet) -> np.ndarray:
    """Each item's logits as the daemon computes them for one utterance: with the model's card
    beside it, through the daemon's own OnnxModel, inputs padded to ``models.bucket_frames``
    as it pads them (fitting the fusion on unpadded logits changed 4-5 of 3880 validation
    decisions). A model without a card yet (being trained) runs each matrix alone."""
    card = onnx_path.with_suffix(".card.json")
    if not card.is_file():
        return ort_outputs(ort_session(onnx_path), [fs.item(i) for i in range(len(fs))])
    model = daemon_model(card)
    return np.stack([model.run(fs.item(i)) for i in range(len(fs))])


def corpus_metrics(logits: np.ndarray, fs: data.FeatureSet) -> dict:
    labels = fs.labels()
    corpus = np.array([fs.clips[c].corpus for c in fs.clip_index])
    out = {}
    for name, key in (("english_fsdd_heldout", "fsdd"), ("arabic_asc_heldout", "asc")):
        if (corpus == key).any():
            out[name] = group_metrics(logits[corpus == key], labels[corpus == key])
    return out
