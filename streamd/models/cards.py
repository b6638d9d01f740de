"""Model cards: the JSON beside each model file that names it, its sha256, the features it
was trained on and its input, and the checks that refuse a file the card does not describe.

The sha256 check lives here once (``verified``): model files, the word model and the speaker
model's impostor cohort all go through it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streamd.signal.features import FeatureParams, kaldi_fbank_params, word_window_params


class ModelError(RuntimeError):
    """A model cannot be used; the message is one line naming the file."""


def sha256_of(path: Path) -> str:
    """The file's sha256 (hex), read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verified(path: Path, expected_sha256: str, what: str = "model file") -> Path:
    """``path`` when it is a file whose sha256 is ``expected_sha256``; otherwise a one-line
    ModelError naming the file (``what`` says what it is: model file, cohort file)."""
    if not path.is_file():
        raise ModelError(f"{path}: {what} missing (expected sha256 {expected_sha256})")
    actual = sha256_of(path)
    if actual != expected_sha256:
        raise ModelError(f"{path}: sha256 mismatch: expected {expected_sha256}, got {actual}")
    return path


@dataclass(frozen=True)
class ModelCard:
    path: Path  # the card file
    data: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.data.get("name", self.path.stem))

    @property
    def kind(self) -> str:
        return str(self.data["kind"])

    @property
    def model_path(self) -> Path:
        return self.path.parent / self.data["file"]

    @property
    def sha256(self) -> str:
        return str(self.data["sha256"])

    @property
    def feature_kind(self) -> str:
        return str(self.data["features"].get("kind", "mfcc"))

    @property
    def window(self) -> tuple[int, int, float] | None:
        """(window_frames, hop_frames, min_coverage) for models run on fixed windows."""
        spec = self.data["input"].get("window")
        if not spec:
            return None
        return int(spec["frames"]), int(spec["hop_frames"]), float(spec.get("min_coverage", 0.75))

    @property
    def rows_alone(self) -> bool:
        """Whether each input row must go through the model alone. Dynamically quantised
        layers scale their inputs by the whole batch's range, so a row's output would depend
        on the other rows in its batch (other windows, other streams)."""
        return self.data["input"].get("batch_invariant", True) is False

    @property
    def bucketed(self) -> bool:
        """Whether whole-utterance input may be padded to a multiple of ``bucket_frames``
        (a model that pools over every frame it is given says no: it was trained unpadded)."""
        return self.data["input"].get("bucket", True) is not False


def read_card(path: Path, what: str, keys: tuple[str, ...]) -> dict:
    """A JSON card with ``keys``; anything else is a one-line ModelError naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ModelError(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}: {what} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: {what} is not a JSON object")
    for key in keys:
        if key not in data:
            raise ModelError(f"{path}: {what} lacks {key!r}")
    return data


def load_card(path: Path, kind: str) -> ModelCard:
    data = read_card(path, "model card", ("kind", "file", "sha256", "features", "input", "output"))
    if data["kind"] != kind:
        raise ModelError(f"{path}: model card is for a {data['kind']!r} model, expected {kind!r}")
    return ModelCard(path, data)


def front_end(cfg, kind: str) -> FeatureParams:
    """The front end a model card names: MFCC and mel power as configured (``features``,
    ``mel``); Kaldi fbank (CAM++) and the word window are fixed, their parameters those the
    model was trained with."""
    fixed = {"kaldifbank": kaldi_fbank_params, "wordwin": word_window_params}
    return fixed[kind]() if kind in fixed else cfg.feature_params(kind)


def verify(card: ModelCard, features: FeatureParams) -> None:
    """Refuse a model whose file is missing or altered, or that expects other features."""
    model = verified(card.model_path, card.sha256)
    wanted = features.as_dict()
    theirs = {"kind": "mfcc", **card.data["features"]}
    section = {"melpower": "mel", "kaldifbank": "kaldifbank (fixed)", "wordwin": "wordwin (fixed)"}.get(
        features.kind, "features")
    diff = [k for k in wanted if theirs.get(k) != wanted[k]]
    if diff:
        k = diff[0]
        raise ModelError(
            f"{model}: trained on features.{k}={theirs.get(k)!r} but config has {section}.{k}={wanted[k]!r}")
