"""ONNX sessions: a model card's file on its session (``OnnxModel``), batched runs, and the
models the daemon loads: the speaker model and the digit model(s), fused and cascaded as the
plan read from the fusion card says (``streamd.models.digits.digit_plan``).

Cards and their checks live in ``streamd.models.cards``, provider choice in
``streamd.models.providers``. This module sees arrays, not streams.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from streamd.models.cards import ModelCard, ModelError, front_end, load_card, verify
from streamd.models.digits import Cascade, Fusion, cascaded, digit_plan
from streamd.models.providers import (CPU, CUDA, FallbackListener, gains_on_cuda, open_session, report_fallback,
                                      wanted_providers)
from streamd.signal.features import FeatureParams, features_of_audio

log = logging.getLogger(__name__)

MIN_FRAMES = 10  # the models' convolutions need a few frames; shorter input is padded


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
        return open_session(self.card, self._threads, providers)

    def _fell_back(self, stage: str, reason: str) -> None:
        report_fallback(self.card, self.requested, stage, reason, self.on_fallback)

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

    def row_count(self, frames: int) -> int:
        """How many input rows ``inputs`` makes of an utterance of ``frames`` frames."""
        if self.card.window is None:
            return 1
        window, hop, coverage = self.card.window
        return len(window_starts(frames, window, hop, coverage))

    def combine(self, outputs: np.ndarray) -> np.ndarray:
        """The model's output for one utterance from the outputs of its input rows."""
        if self.card.window is None:
            return outputs[0]
        out = outputs.mean(axis=0)
        return out / max(float(np.linalg.norm(out)), 1e-12)

    def run(self, feats: np.ndarray) -> np.ndarray:
        """One utterance's normalised features (frames, dims) -> the model's output row."""
        return self.combine(self.infer(self.inputs(feats)))


def run_batched(model: OnnxModel, utterances: list[np.ndarray], max_batch: int,
                max_rows: int | None = None) -> list[np.ndarray]:
    """The model's output for each utterance, with one session call per input shape and
    ``max_batch`` rows. ``max_rows``: an utterance with more input rows (windows) keeps that
    many, spread evenly over it (work shed under overload, streamd.models.batching)."""
    inputs = [model.inputs(f) for f in utterances]
    if max_rows is not None:
        inputs = [rows if len(rows) <= max_rows else rows[np.linspace(0, len(rows) - 1, max_rows).round().astype(int)]
                  for rows in inputs]
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
        return self.run_shed(utterances, max_batch)[0]

    def run_shed(self, utterances: list[FeaturesByFrontEnd], max_batch: int,
                 cheap_only: bool = False) -> tuple[list[np.ndarray], list[bool]]:
        """``run_many``'s logits, and for each utterance whether it was cut short: with
        ``cheap_only`` (work shed under overload) the cascade's first stage decides every
        utterance, its fusion taken where its gate would have run the costly members (those
        are cut short)."""
        if not utterances:
            return [], []
        models = list(self.members.values())
        outputs: list[list] = [[None] * len(models) for _ in utterances]
        decided: list[np.ndarray | None] = [None] * len(utterances)
        cut = [False] * len(utterances)
        open_, ran = list(range(len(utterances))), set()
        for stage in self.cascade:
            self._run_members(models, [k for k in stage.first if k not in ran], utterances, open_, outputs, max_batch)
            ran.update(stage.first)
            for i in open_:
                decided[i] = stage.settles([outputs[i][k] for k in stage.first])
                if decided[i] is None and cheap_only:
                    decided[i], cut[i] = stage.fusion([outputs[i][k] for k in stage.first]), True
            open_ = [i for i in open_ if decided[i] is None]
        self._run_members(models, [k for k in range(len(models)) if k not in ran], utterances, open_, outputs,
                          max_batch)
        for i in open_:
            decided[i] = self.fusion(outputs[i]) if self.fusion is not None else outputs[i][0]
        return decided, cut  # type: ignore[return-value]

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
