"""ONNX models: model cards, sha256 and feature checks, provider choice, sessions.

This module sees arrays, not streams.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Callable

import numpy as np

from streamd.models.digits import Cascade, Fusion, cascaded
from streamd.signal.features import FeatureParams, features_of_audio, kaldi_fbank_params, word_window_params

log = logging.getLogger(__name__)

MIN_FRAMES = 10  # the models' convolutions need a few frames; shorter input is padded


class ModelError(RuntimeError):
    """A model cannot be used; the message is one line naming the file."""


CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
# on_fallback(model, sha256, requested, stage, old_provider, new_provider): a model runs on CPU
# although models.provider asked for CUDA ("auto" or "cuda"); stage is "load" (CUDA could not
# start) or "run" (a CUDA session failed while running and was replaced by a CPU one).
FallbackListener = Callable[[str, str, str, str, str, str], None]


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
    model = card.model_path
    if not model.is_file():
        raise ModelError(f"{model}: model file missing (expected sha256 {card.sha256})")
    actual = sha256_of(model)
    if actual != card.sha256:
        raise ModelError(f"{model}: sha256 mismatch: expected {card.sha256}, got {actual}")
    wanted = features.as_dict()
    theirs = {"kind": "mfcc", **card.data["features"]}
    section = {"melpower": "mel", "kaldifbank": "kaldifbank (fixed)", "wordwin": "wordwin (fixed)"}.get(
        features.kind, "features")
    diff = [k for k in wanted if theirs.get(k) != wanted[k]]
    if diff:
        k = diff[0]
        raise ModelError(
            f"{model}: trained on features.{k}={theirs.get(k)!r} but config has {section}.{k}={wanted[k]!r}")


def session_options(threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    # Spinning worker threads steal the CPU from capture and VAD in the same process.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


# cuDNN's default, an exhaustive timing of every convolution algorithm, runs again for each
# input shape it has not seen, and a stream of utterances of every length and batch size is
# nothing but new shapes: on an H200 it cost 60 ms a call and put the bench 10 s behind
# (BENCHMARKS.md, "CUDA"). Its heuristic choice cut that to 10 ms.
CUDA_OPTIONS = {"cudnn_conv_algo_search": "HEURISTIC"}


def gains_on_cuda(card: ModelCard) -> bool:
    """Whether ``models.provider = "auto"`` runs this model on CUDA: only a model of fixed
    windows whose rows batch together. On an H200 (BENCHMARKS.md, "CUDA") a call whose input
    length differs from the last one cost the digit models 5-10 ms of host time on CUDA
    (0.2-0.9 ms on a CPU core), and the int8 layers of a rows-alone model run on the CPU anyway."""
    return card.window is not None and not card.rows_alone


def wanted_providers(choice: str, card: ModelCard) -> list:
    import onnxruntime as ort

    # onnxruntime-gpu lists CUDA even without a GPU; only a session tells whether it works.
    available = ort.get_available_providers()
    if choice == "cpu" or CUDA not in available or (choice == "auto" and not gains_on_cuda(card)):
        return [CPU]
    return [(CUDA, CUDA_OPTIONS), CPU]


def window_starts(frames: int, window: int, hop: int, min_coverage: float) -> list[int]:
    """Where fixed windows start so they cover an utterance; the last, zero-padded, one is
    kept only if the utterance fills ``min_coverage`` of it (as Resemblyzer does)."""
    starts = list(range(0, max(1, frames - window + hop + 1), hop))
    if len(starts) > 1 and (frames - starts[-1]) / window < min_coverage:
        starts.pop()
    return starts


class OnnxModel:
    def __init__(self, card: ModelCard, params: FeatureParams, provider: str = "auto", threads: int = 1,
                 bucket_frames: int = 8, on_fallback: FallbackListener | None = None):
        import onnxruntime as ort

        ort.set_default_logger_severity(4)  # a failed CUDA load is logged once, by us, in one line
        self.card = card
        self.params = params
        self.bucket_frames = bucket_frames
        self.requested = provider
        self.on_fallback = on_fallback
        self._threads = threads
        wanted = wanted_providers(provider, card)
        self.session = self._session(wanted)
        # onnxruntime falls back to CPU silently when CUDA cannot start: read what really runs.
        self.provider = self.session.get_providers()[0]
        if provider == "cuda" and len(wanted) == 1:
            self._fell_back("load", "CUDA provider not in this onnxruntime build "
                               "(install onnxruntime-gpu)")
        elif len(wanted) > 1 and self.provider != CUDA:
            self._fell_back("load", "CUDA provider not usable here (no GPU or CUDA libraries)")
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    def _session(self, providers: list):
        import onnxruntime as ort

        try:
            return ort.InferenceSession(str(self.card.model_path), sess_options=session_options(self._threads),
                                        providers=providers)
        except Exception as exc:  # onnxruntime raises several unrelated types for a bad file
            raise ModelError(f"{self.card.model_path}: cannot load model: {str(exc).splitlines()[0]}") from None

    def _fell_back(self, stage: str, reason: str) -> None:
        # "auto" on a machine without a GPU is expected: info. Anything else is worth a warning.
        level = logging.INFO if self.requested == "auto" and stage == "load" else logging.WARNING
        log.log(level, "%s: %s; using CPU", self.card.name, reason)
        if self.on_fallback is not None:
            with contextlib.suppress(Exception):  # metrics must never break inference
                self.on_fallback(self.card.name, self.card.sha256, self.requested, stage, CUDA, CPU)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """The model's outputs for a batch of inputs: one session call, or one per row for a
        model whose rows must run alone (``ModelCard.rows_alone``)."""
        if self.card.rows_alone and len(batch) > 1:
            return np.concatenate([self._call(batch[i : i + 1]) for i in range(len(batch))])
        return self._call(batch)

    def _call(self, batch: np.ndarray) -> np.ndarray:
        """One session call. A CUDA session that fails (GPU lost, out of GPU memory, driver
        reset) is replaced by a CPU one and the call repeated."""
        feed = {self.input_name: np.ascontiguousarray(batch, np.float32)}
        try:
            return self.session.run([self.output_name], feed)[0]
        except Exception as exc:
            if self.provider == CPU:
                raise
            first = (str(exc).splitlines() or [type(exc).__name__])[0]
            self.session = self._session([CPU])
            self.provider = CPU
            self._fell_back("run", f"CUDA failed while running ({first})")
            return self.session.run([self.output_name], feed)[0]

    def inputs(self, feats: np.ndarray) -> np.ndarray:
        """One utterance's normalised features (frames, dims) as model input rows.

        A model with a fixed window sees the utterance as overlapping windows (the last
        zero-padded). Any other model sees the whole utterance, its last frame repeated up to
        a multiple of ``bucket_frames``, so that utterances of similar length share one input
        shape: they batch together, and onnxruntime plans few shapes. Every path (daemon,
        eval, enrollment) pads the same way."""
        if self.card.window is None:
            target = max(MIN_FRAMES, len(feats))
            if self.bucket_frames > 1 and self.card.bucketed:
                target = -(-target // self.bucket_frames) * self.bucket_frames
            if target > len(feats):
                edge = feats[-1:] if len(feats) else np.zeros((1, feats.shape[1]), np.float32)
                feats = np.concatenate((feats, np.repeat(edge, target - len(feats), axis=0)))
            return np.asarray(feats, np.float32)[None]
        window, hop, coverage = self.card.window
        starts = window_starts(len(feats), window, hop, coverage)
        padded = np.zeros((starts[-1] + window, feats.shape[1]), np.float32)
        padded[: len(feats)] = feats[: len(padded)]
        return np.stack([padded[s : s + window] for s in starts])

    def combine(self, outputs: np.ndarray) -> np.ndarray:
        """The model's output for one utterance from the outputs of its input rows."""
        if self.card.window is None:
            return outputs[0]
        out = outputs.mean(axis=0)
        return out / max(float(np.linalg.norm(out)), 1e-12)

    def run(self, feats: np.ndarray) -> np.ndarray:
        """One utterance's normalised features (frames, dims) -> the model's output row."""
        return self.combine(self.infer(self.inputs(feats)))


def run_batched(model: OnnxModel, utterances: list[np.ndarray], max_batch: int) -> list[np.ndarray]:
    """The model's output for each utterance, with one session call per input shape and
    ``max_batch`` rows."""
    inputs = [model.inputs(f) for f in utterances]
    by_shape: dict[tuple, list[int]] = {}
    for i, rows in enumerate(inputs):
        by_shape.setdefault(rows.shape[1:], []).append(i)
    results: list[np.ndarray | None] = [None] * len(inputs)
    for members in by_shape.values():
        rows = np.concatenate([inputs[i] for i in members])
        out = np.concatenate([model.infer(rows[k : k + max_batch]) for k in range(0, len(rows), max_batch)])
        start = 0
        for i in members:
            n = len(inputs[i])
            results[i] = model.combine(out[start : start + n])
            start += n
    return results  # type: ignore[return-value]


# One utterance's normalised features for each front end a model reads; a front end computed
# from the utterance's audio (the word window) may come as a function, called only if a member
# that reads it runs (a cascade's last stage runs for few utterances).
FeaturesByFrontEnd = Mapping[FeatureParams, "np.ndarray | Callable[[], np.ndarray]"]


class DigitModels:
    """What decides the digit: one model family, or several whose outputs are fused
    (``streamd.models.digits.Fusion``). Members may read different front ends (MFCC, mel power):
    they are given one utterance's features per front end."""

    def __init__(self, members: dict[str, OnnxModel], fusion: Fusion | None = None, choice: str = "",
                 thresholds: dict[str, float] | None = None, cascade: tuple[Cascade, ...] = ()):
        if fusion is None and len(members) != 1:
            raise ModelError("several digit models need a fusion")
        self.members = members
        self.fusion = fusion
        self.cascade = cascade if fusion is not None else ()  # its stages, cheapest first
        self.choice = choice or next(iter(members))
        self.front_ends = tuple(dict.fromkeys(m.params for m in members.values()))
        self.card = next(iter(members.values())).card
        self.thresholds = thresholds or {}

    def features_of(self, audio: np.ndarray) -> dict[FeatureParams, np.ndarray]:
        """An utterance's audio (int16) as each member's input features, offline."""
        return {p: features_of_audio(audio, p) for p in self.front_ends}

    def min_confidence(self, configured: float, choice: str = "") -> float:
        """``digits.min_confidence``; below 0: the one chosen on validation speakers for the
        model in use, or ``choice`` (fusion card, else model card, else 0.5)."""
        choice = choice or self.choice
        if configured >= 0:
            return configured
        if choice in self.thresholds:
            return self.thresholds[choice]
        card = self.members[choice].card if choice in self.members else self.card
        value = card.data.get("suggested_threshold", {}).get("value")
        return float(value) if isinstance(value, (int, float)) else 0.5

    def combine(self, outputs: list[np.ndarray]) -> np.ndarray:
        """The decision's logits from every member's (the cascade's, when there is one)."""
        if self.fusion is None:
            return outputs[0]
        return cascaded(self.cascade, outputs, self.fusion)

    def run(self, feats: FeaturesByFrontEnd) -> np.ndarray:
        return self.run_many([feats], 1)[0]

    def run_many(self, utterances: list[FeaturesByFrontEnd], max_batch: int) -> list[np.ndarray]:
        """Each utterance's decision logits; with a cascade, each stage's new members run only
        on the utterances the stages before it leave unsettled."""
        if not utterances:
            return []
        models = list(self.members.values())
        outputs: list[list] = [[None] * len(models) for _ in utterances]
        decided: list[np.ndarray | None] = [None] * len(utterances)
        open_, ran = list(range(len(utterances))), set()
        for stage in self.cascade:
            self._run_members(models, [k for k in stage.first if k not in ran], utterances, open_, outputs, max_batch)
            ran.update(stage.first)
            for i in open_:
                decided[i] = stage.settles([outputs[i][k] for k in stage.first])
            open_ = [i for i in open_ if decided[i] is None]
        self._run_members(models, [k for k in range(len(models)) if k not in ran], utterances, open_, outputs,
                          max_batch)
        for i in open_:
            decided[i] = self.fusion(outputs[i]) if self.fusion is not None else outputs[i][0]
        return decided  # type: ignore[return-value]

    @staticmethod
    def _run_members(models: list[OnnxModel], which, utterances, rows, outputs, max_batch: int) -> None:
        """Fill ``outputs[i][k]`` for the utterances ``rows`` and the members ``which``."""
        rows = list(rows)
        for k in which if rows else ():
            feats = [utterances[i][models[k].params] for i in rows]
            feats = [f() if callable(f) else f for f in feats]
            for i, out in zip(rows, run_batched(models[k], feats, max_batch)):
                outputs[i][k] = out


@dataclass
class Models:
    speaker: OnnxModel
    digits: DigitModels

    def all(self) -> list[OnnxModel]:
        return [self.speaker, *self.digits.members.values()]


def load_model(cfg, kind: str, provider: str | None = None, on_fallback: FallbackListener | None = None) -> OnnxModel:
    """One model named by the config (``speaker`` or ``digits``), verified, on a session."""
    card = load_card(cfg.path(cfg.models.dir) / getattr(cfg.models, kind), kind)
    params = front_end(cfg, card.feature_kind)
    verify(card, params)
    return OnnxModel(card, params, provider or cfg.models.provider, cfg.models.threads, cfg.models.bucket_frames,
                     on_fallback)


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


def load_digits(cfg, provider: str | None = None, on_fallback: FallbackListener | None = None) -> DigitModels:
    """The digit model(s) the config chooses, verified, on sessions."""
    plan = digit_plan(cfg)
    for card in plan.cards.values():
        verify(card, front_end(cfg, card.feature_kind))
    members = {name: _session_for(cfg, card, provider or cfg.models.provider, on_fallback)
               for name, card in plan.cards.items()}
    return DigitModels(members, plan.fusion, plan.choice, plan.thresholds, plan.cascade)


def _session_for(cfg, card: ModelCard, provider: str, on_fallback: FallbackListener | None) -> OnnxModel:
    model = OnnxModel(card, front_end(cfg, card.feature_kind), provider, cfg.models.threads,
                      cfg.models.bucket_frames, on_fallback)
    log.info("model %s (%s, sha256 %s) on %s", card.name, card.model_path.name, card.sha256[:12], model.provider)
    return model


def load_models(cfg, provider: str | None = None, on_fallback: FallbackListener | None = None) -> Models:
    """The speaker and digit models; every file is checked before any session is created."""
    provider = provider or cfg.models.provider
    speaker = load_card(cfg.path(cfg.models.dir) / cfg.models.speaker, "speaker")
    plan = digit_plan(cfg)
    for card in [speaker, *plan.cards.values()]:
        verify(card, front_end(cfg, card.feature_kind))
    speaker_model = _session_for(cfg, speaker, provider, on_fallback)
    if provider == "auto" and speaker_model.provider == CPU and gains_on_cuda(speaker):
        provider = "cpu"  # CUDA failed once: do not try (and fail) again
    members = {name: _session_for(cfg, card, provider, on_fallback) for name, card in plan.cards.items()}
    return Models(speaker_model, DigitModels(members, plan.fusion, plan.choice, plan.thresholds, plan.cascade))
