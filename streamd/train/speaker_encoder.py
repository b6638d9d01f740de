"""The speaker model: Resemblyzer's pretrained GE2E voice encoder, made the project's own.

Resemblyzer (PyPI ``Resemblyzer==0.1.4``, Apache-2.0) ships ``pretrained.pt``: a 3-layer LSTM
trained with the GE2E loss on thousands of speakers, which our 21 training speakers cannot
match (an x-vector trained here from scratch reached 17.5% EER on single held-out clips,
this encoder 10.9%). This module loads those weights into our own torch module, exports the
ONNX model the daemon runs on the ``mel`` front end (streamd.signal.features, kind ``melpower``),
builds an impostor cohort from the training speakers, measures the model on held-out
speakers and writes the model card.

Back end (training speakers only): a nuisance-attribute projection (NAP) baked into the ONNX
graph as a final linear layer + L2 norm: the ``NAP_DIMS`` directions of largest within-speaker
variability are projected out of each window's GE2E embedding (not centred: cosines keep the
scale the enrollment gates were set for; centring also did worse on training-speaker trials). Those are
fitted on windows of single words, 3-clip phrases and 8 kHz band-limited copies of the ASC
training clips, so duration/word content and the telephone-like FSDD channel stop looking
like a change of speaker. The AS-norm cohort holds single words and phrases of the training
speakers, of their band-limited copies, of copies through random channels (EQ, reverb,
phone line) and of speed-perturbed copies, which sound like other people near the real voices
(``COHORT_SELECTION``); the calibration table is fitted on phrase trials of
training speakers, cross-fitted (back end and cohort re-fitted without the two speakers of
each trial), never on held-out speakers. Nothing is downloaded: the wheel is installed by
``make train`` (``pip install --no-deps Resemblyzer==0.1.4``; its own dependencies are not
needed).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import hashlib
import importlib.metadata
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
from torch import nn

from streamd.offline import evaluate
from streamd.signal.features import mel_params, features_of_audio
from streamd.identity.scoring import l2_normalize
from streamd.models.cards import ModelCard, sha256_of
from streamd.models.inference import OnnxModel
from streamd.identity.speakers import joined_features
from streamd.train import speaker_quality
from streamd.train.scoring import OPSET, ort_outputs, ort_session
from streamd.signal.vad import VadParams, utterance_audio

WINDOW = {"frames": 160, "hop_frames": 77, "min_coverage": 0.75}  # Resemblyzer's partials: 1.6 s, 1.3/s
COHORT_PER_SPEAKER = 40  # single words, and as many 3-clip phrases, of each training speaker (and of each copy)
CHANNEL_SEED = 1  # the random channel of each clip's copy in the cohort (streamd.train.data.random_channel)
CHANNEL_VERSION = 1  # part of the copies' cache name: raise it when random_channel changes
COHORT_SPEEDS = (0.9, 1.1)  # speed-perturbed training speakers: more cohort voices, near real ones
NAP_DIMS = 2
ENROLL_CLIPS = 10
PHRASE_CLIPS = 3
TOP_K = 100  # streamd.identity.scoring.Scorer's default, which the daemon uses
COHORT_SELECTION = (
    "chosen on the leave-pair-out phrase trials of the training speakers (the calibration's; "
    "python scripts/experiments/speaker_cohorts.py): share of target phrases missed at a per-trial false-accept rate of 0.17% (identity.far 1% split over 6 "
    "enrolled speakers): clips + band-limited copies 33.1%; 34.3% with 60 instead of 40 of them per "
    "speaker; random-channel copies added 27.6%; the NAP fitted on them too 32.8%; channel copies and "
    "speeds 0.9 and 1.1 added 20.2% (shipped); also 0.85 and 1.15 19.0% (but 3x the cohort's CPU per "
    "utterance: 1.0 vs 0.35 ms); also 0.95 and 1.05 22.3% (copies too near the real voices); noisy "
    "copies (0-20 dB SNR) 20.6%, and 10 dB probes' misses 97.1% -> 99.9%")


class WithBackEnd(nn.Module):
    """The encoder, then ``normalize(e @ proj)`` on each window's embedding."""

    def __init__(self, enc: nn.Module, proj: np.ndarray):
        super().__init__()
        self.enc = enc
        self.register_buffer("proj", torch.from_numpy(np.asarray(proj, np.float32)))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.enc(feats) @ self.proj, p=2.0, dim=1)


class VoiceEncoder(nn.Module):
    """Resemblyzer's architecture: LSTM(40 -> 256, 3 layers) -> linear -> ReLU -> L2 norm."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(40, 256, 3, batch_first=True)
        self.linear = nn.Linear(256, 256)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        _, (hidden, _) = self.lstm(feats)
        return F.normalize(F.relu(self.linear(hidden[-1])), p=2.0, dim=1)


@dataclass
class Options:
    data_dir: Path
    out_dir: Path
    pretrained: Path | None = None
    cache_dir: Path | None = None  # per-window encoder outputs; default $STREAMD_TRAIN_WORK/speaker-ge2e
    int8: bool = True  # ship the dynamically quantized encoder (see quantize)


def pretrained_path() -> Path:
    try:
        dist = importlib.metadata.distribution("Resemblyzer")
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit("streamd train speaker needs Resemblyzer's weights: "
                         "pip install --no-deps Resemblyzer==0.1.4 (make train does)") from None
    return Path(str(dist.locate_file("resemblyzer/pretrained.pt")))


def onnxruntime_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def load_encoder(path: Path) -> VoiceEncoder:
    state = torch.load(path, map_location="cpu", weights_only=True)["model_state"]
    enc = VoiceEncoder()
    enc.load_state_dict({k: v for k, v in state.items() if not k.startswith("similarity_")})
    return enc.eval()


def export(enc: nn.Module, path: Path, sample: torch.Tensor | None = None) -> float:
    """Write the ONNX model; returns the largest difference from torch on ``sample`` (windows
    of real speech features; random input only when none is given, for the bare encoder)."""
    x = sample if sample is not None else torch.rand(3, WINDOW["frames"], 40) * 0.1
    torch.onnx.export(enc, (x,), str(path), input_names=["feats"], output_names=["embedding"],
                      dynamic_axes={"feats": {0: "batch", 1: "time"}, "embedding": {0: "batch"}},
                      opset_version=OPSET, dynamo=False)
    sess = ort_session(path)
    with torch.no_grad():
        ref = enc(x).numpy()
    return float(np.abs(sess.run(None, {"feats": x.numpy()})[0] - ref).max())


def quantize(src: Path, dst: Path) -> None:
    """int8 weights for the upper two LSTM layers and the encoder's linear layer (onnxruntime
    dynamic quantization: ~2x faster on one CPU core). The first layer stays float: its input is
    mel power spanning ~10 orders of magnitude, which a per-tensor uint8 scale flattens to zero
    (embeddings then lose half their cosine to the float ones). The NAP projection stays float."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    lstms = [n.name for n in onnx.load(str(src)).graph.node if n.op_type == "LSTM"]
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8,
                     op_types_to_quantize=["LSTM", "Gemm"], nodes_to_exclude=lstms[:1])


def agreement(float_path: Path, int8_path: Path, windows: torch.Tensor) -> dict:
    """Cosine between the float and int8 models' embeddings of the same speech windows."""
    x = list(windows.numpy())
    a, b = (ort_outputs(ort_session(path), x) for path in (float_path, int8_path))
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return {"windows": len(x), "cosine_min": round(float(cos.min()), 5), "cosine_mean": round(float(cos.mean()), 5)}


def speech_windows(clips: list[evaluate.Clip], count: int = 8) -> torch.Tensor:
    """The first window of each of ``count`` clips' features, as the daemon computes them."""
    p, vad = mel_params(), VadParams()
    out = []
    for clip in clips[:: max(1, len(clips) // count)][:count]:
        audio, _ = sf.read(clip.path, dtype="int16")
        feats = features_of_audio(utterance_audio(audio, vad), p)
        window = np.zeros((WINDOW["frames"], feats.shape[1]), np.float32)
        window[: len(feats)] = feats[: WINDOW["frames"]]
        out.append(window)
    return torch.from_numpy(np.stack(out))


def training_clips(data: Path) -> list[evaluate.Clip]:
    """Every clip of the *training* speakers (never a held-out one)."""
    import csv

    out: list[evaluate.Clip] = []
    with open(data / "fsdd" / "manifest.csv", newline="") as fh:
        for r in csv.DictReader(fh):
            if r["speaker"] not in evaluate.HELD_OUT_FSDD:
                out.append(evaluate.Clip(data / "fsdd" / r["path"], "fsdd", r["speaker"], None))
    asc = data / "arabic-speech-commands"
    with open(asc / "manifest.csv", newline="") as fh:
        for r in csv.DictReader(fh):
            if r["split"] == "train":
                out.append(evaluate.Clip(asc / r["path"], "asc", r["speaker"], None))
    return out


def band_limit(audio: np.ndarray) -> np.ndarray:
    """Through 8 kHz and back, as FSDD was recorded: nothing above 4 kHz."""
    from scipy.signal import resample_poly

    from streamd.train.data import to_int16

    return to_int16(resample_poly(resample_poly(audio.astype(np.float64), 1, 2), 2, 1))


def window_outputs(model: OnnxModel, audio: np.ndarray) -> np.ndarray:
    """The model's output for each window of one VAD-cut utterance (before averaging)."""
    return feature_window_outputs(model, features_of_audio(audio, model.params))


def feature_window_outputs(model: OnnxModel, feats: np.ndarray) -> np.ndarray:
    """The same for normalised features, windowed as the daemon windows them."""
    return model.infer(model.inputs(np.asarray(feats, np.float32))).astype(np.float32)


def joined_window_outputs(model: OnnxModel, cuts: list[np.ndarray]) -> np.ndarray:
    """An enrolled voice as the daemon forms it (streamd.identity.speakers.joined_features): every
    enrollment utterance normalised on its own, then all of them as one utterance."""
    p = model.params
    return feature_window_outputs(model, joined_features([features_of_audio(c, p) for c in cuts]))


def band_copy(audio: np.ndarray, index: int) -> np.ndarray:
    return band_limit(audio)


def channel_copy(audio: np.ndarray, index: int) -> np.ndarray:
    """Clip ``index`` through a random channel of its own (the same one on every run)."""
    from streamd.train.data import random_channel

    return random_channel(audio, np.random.default_rng([CHANNEL_SEED, index]))


def speed_copy(audio: np.ndarray, index: int, speed: float) -> np.ndarray:
    """The clip played ``speed`` times as fast (pitch and formants move with it: another voice)."""
    from streamd.train.data import speed_perturb, to_int16

    return to_int16(speed_perturb(audio.astype(np.float64), speed))


def speaker_sets(model: OnnxModel, clips: list[evaluate.Clip], copy=None, seed: int = 0) -> dict:
    """Each speaker's clips as eval_speakers forms them: ``ENROLL_CLIPS`` enrollment clips
    (joined as the daemon joins a speaker's enrollments: one item), the rest as single words
    and as ``PHRASE_CLIPS``-clip phrases; per-window outputs.
    ``copy(audio, clip index)``, when given, changes each clip's audio first."""
    vad = VadParams()
    rng = np.random.default_rng(seed)
    names = sorted({c.speaker for c in clips})
    spk = np.array([c.speaker for c in clips])
    out: dict = {"names": names, "enrolled": {}, "single": [], "phrase": []}
    for name in names:
        idx = rng.permutation(np.flatnonzero(spk == name))
        cuts = {}
        for i in idx:
            audio, _ = sf.read(clips[i].path, dtype="int16")
            cuts[i] = utterance_audio(copy(audio, int(i)) if copy else audio, vad)
        out["enrolled"][name] = [joined_window_outputs(model, [cuts[i] for i in idx[:ENROLL_CLIPS]])]
        rest = idx[ENROLL_CLIPS:]
        out["single"] += [(name, window_outputs(model, cuts[i])) for i in rest]
        for k in range(0, len(rest) - PHRASE_CLIPS + 1, PHRASE_CLIPS):
            out["phrase"].append((name, window_outputs(model, np.concatenate([cuts[i] for i in rest[k : k + PHRASE_CLIPS]]))))
    return out


def windows_of(sets: list[dict], speakers: set[str]) -> tuple[np.ndarray, np.ndarray]:
    x, y = [], []
    for t in sets:
        for n in t["names"]:
            if n in speakers:
                x += t["enrolled"][n]
                y += [n] * sum(len(w) for w in t["enrolled"][n])
        for kind in ("single", "phrase"):
            for n, w in t[kind]:
                if n in speakers:
                    x.append(w)
                    y += [n] * len(w)
    return np.concatenate(x), np.array(y)


def fit_nap(x: np.ndarray, y: np.ndarray, dims: int = NAP_DIMS) -> np.ndarray:
    """The projection removing the ``dims`` directions of largest within-speaker variance."""
    within = np.zeros((x.shape[1], x.shape[1]))
    for label in np.unique(y):
        d = x[y == label] - x[y == label].mean(axis=0)
        within += d.T @ d
    _, vecs = np.linalg.eigh(within / len(x))
    u = vecs[:, -dims:] if dims else vecs[:, :0]
    return (np.eye(x.shape[1]) - u @ u.T).astype(np.float32)


def utterance(windows: np.ndarray, proj: np.ndarray) -> np.ndarray:
    """What the daemon gets from the model with the back end: windows projected, normalised, averaged."""
    return l2_normalize(l2_normalize(windows @ proj).mean(axis=0))


def make_cohort(sets: list[dict], speakers: set[str], proj, per: int = COHORT_PER_SPEAKER, seed: int = 0) -> np.ndarray:
    """``per`` single words and ``per`` phrases of each of ``speakers`` in each set."""
    rng = np.random.default_rng(seed)
    out = []
    for t in sets:
        for n in t["names"]:
            if n not in speakers:
                continue
            for kind in ("single", "phrase"):
                mine = [w for m, w in t[kind] if m == n]
                for i in rng.choice(len(mine), size=min(per, len(mine)), replace=False):
                    out.append(utterance(mine[i], proj))
    return np.stack(out).astype(np.float16).astype(np.float32)  # as shipped: float16


def trial_measures(t: dict, speakers: list[str], proj, cohort: np.ndarray, kind: str,
                   top_k: int = TOP_K) -> tuple[np.ndarray, np.ndarray]:
    """Quality measures (probes, speakers, len(QUALITY_MEASURES)) of ``kind`` probes against
    speakers enrolled from their ``ENROLL_CLIPS`` clips, exactly as streamd.identity.scoring scores
    them (the first measure is the AS-norm score), and the truth."""
    from streamd.identity.scoring import Enrolled, Scorer, quality_measures

    scorer = Scorer(cohort, top_k)
    gallery = Enrolled.build({n: np.stack([utterance(w, proj) for w in t["enrolled"][n]]) for n in speakers}, scorer)
    probes = [(n, w) for n, w in t[kind] if n in speakers]
    e = np.stack([utterance(w, proj) for _, w in probes])
    raw = e @ gallery.centroids.T
    stats = scorer.stats(e)
    measures = np.stack([quality_measures(raw[i], stats[i], gallery.stats, len(w)) for i, (_, w) in enumerate(probes)])
    truth = np.array([gallery.names.index(n) for n, _ in probes])
    return measures, truth


def trial_scores(t: dict, speakers: list[str], proj, cohort: np.ndarray, kind: str,
                 top_k: int = TOP_K) -> tuple[np.ndarray, np.ndarray]:
    """AS-norm scores (probes, speakers) as trial_measures forms them, and the truth."""
    measures, truth = trial_measures(t, speakers, proj, cohort, kind, top_k)
    return measures[..., 0], truth


CALIBRATION_FARS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)


def trial_seconds(clips: list[evaluate.Clip]) -> dict[str, float]:
    """Median length of the calibration's probes as the speaker model sees them (feature
    frames of the VAD cuts, in seconds): single words, and ``PHRASE_CLIPS`` of them joined."""
    p, vad = mel_params(), VadParams()
    per_speaker: dict[str, list[float]] = {}
    for clip in clips:
        audio, _ = sf.read(clip.path, dtype="int16")
        seconds = p.frames_in(len(utterance_audio(audio, vad))) * p.winstep
        per_speaker.setdefault(clip.speaker, []).append(seconds)
    phrases = [sum(v[k : k + PHRASE_CLIPS]) for v in per_speaker.values()
               for k in range(0, len(v) - PHRASE_CLIPS + 1, PHRASE_CLIPS)]
    return {"single": float(np.median(sum(per_speaker.values(), []))), "phrase": float(np.median(phrases))}


def calibration(sets: list[dict], cohort_sets: list[dict], seconds: dict[str, float]) -> dict:
    """AS-norm score threshold per false-accept rate (one stranger's utterance against one
    enrolled speaker), from trials of *training* speakers only, leave-two-speakers-out: for
    every pair of training speakers the back end and the cohort are re-fitted without both,
    each is enrolled from ``ENROLL_CLIPS`` clips (joined), and each one's 3-clip phrases are scored
    against the other (impostor) and itself (target). Thresholds come from the phrase trials,
    the kind of utterance the daemon sees (1-3 s). The back end is fitted on ``sets``, the
    cohort drawn from ``cohort_sets``. Single-word trials give a second table, for short
    utterances (``streamd.identity.scoring.Calibration``); ``seconds`` the probes' median lengths.
    ``quality``: the quality fusion fitted on the same trials, with tables of its own."""
    names = sorted(set(sets[0]["names"]))
    x, same, kind, pairs = pair_trials(sets, cohort_sets)
    cal = {"score": "as-norm", "top_k": TOP_K,
           **threshold_tables(x[:, 0], same, kind, seconds),
           "trials": "3-clip phrases (~1-3 s) of training speakers enrolled from 10 clips joined into one "
                     "utterance (as the daemon joins a speaker's enrollments), every pair of "
                     f"the {len(names)} training speakers left out of back end and cohort in turn",
           "note": "fitted on training speakers only; never on the held-out speakers"}
    return cal | {"quality": quality_calibration(x, same, kind, pairs)}


def pair_trials(sets: list[dict], cohort_sets: list[dict]) -> tuple[np.ndarray, ...]:
    """Every pair of training speakers left out of back end and cohort in turn, each scored
    against both: the trials' quality measures, whether each is a target, its kind of probe
    and its pair ("a|b")."""
    import itertools

    names = sorted(set(sets[0]["names"]))
    x, same, kind, pairs = [], [], [], []
    for pair in itertools.combinations(names, 2):
        rest = set(names) - set(pair)
        proj = fit_nap(*windows_of(sets, rest))
        cohort = make_cohort(cohort_sets, rest, proj)
        for k in ("phrase", "single"):
            measures, truth = trial_measures(sets[0], list(pair), proj, cohort, k)
            x.append(measures.reshape(-1, measures.shape[-1]))
            same.append((truth[:, None] == np.arange(measures.shape[1])[None, :]).ravel())
            kind += [k] * len(same[-1])
            pairs += ["|".join(pair)] * len(same[-1])
    return np.concatenate(x), np.concatenate(same), np.array(kind), np.array(pairs)


def quality_calibration(x: np.ndarray, same: np.ndarray, kind: np.ndarray, pairs: np.ndarray) -> dict:
    """The quality fusion fitted on the trials, and its tables from cross-fitted scores."""
    weight = speaker_quality.trial_weights(same, kind)
    w, b = speaker_quality.fit(x, same, weight)
    fused = speaker_quality.cross_fitted(x, same, weight, pairs)
    # The fused score accounts for length itself (log_windows): on these trials, its phrase
    # table holds the false-accept rate for phrases of 2, 3 and 4 windows alike, and the single
    # words' table only for one window. So the switch is where a second window starts.
    one = one_window_frames() * mel_params().winstep
    lengths = {"single": one, "phrase": one + mel_params().winstep}
    entry = speaker_quality.card_entry(w, b, speaker_quality.longest(x))
    return {**entry, **threshold_tables(fused, same, kind, lengths),
            "length_rule": "single-word thresholds up to the longest utterance of one window, the "
                           "phrases' from two windows on"}


def one_window_frames() -> int:
    """The most feature frames the speaker model runs as a single window."""
    from streamd.models.inference import window_starts

    frames = WINDOW["frames"]
    while len(window_starts(frames + 1, WINDOW["frames"], WINDOW["hop_frames"], WINDOW["min_coverage"])) == 1:
        frames += 1
    return frames


def threshold_tables(scores: np.ndarray, same: np.ndarray, kind: np.ndarray, seconds: dict[str, float]) -> dict:
    """A score's thresholds per false-accept rate from the phrase trials, and from the single
    words' (streamd.identity.scoring.Calibration), with the miss rates they give."""
    imp = {k: scores[(kind == k) & ~same] for k in ("phrase", "single")}
    tgt = {k: scores[(kind == k) & same] for k in ("phrase", "single")}
    thresholds = [float(np.quantile(imp["phrase"], 1 - far)) for far in CALIBRATION_FARS]
    single = [float(np.quantile(imp["single"], 1 - far)) for far in CALIBRATION_FARS]
    return {"far": list(CALIBRATION_FARS), "threshold": thresholds,
            "impostor_trials": int(len(imp["phrase"])), "target_trials": int(len(tgt["phrase"])),
            "miss_rate_phrases": [float(np.mean(tgt["phrase"] < thr)) for thr in thresholds],
            "miss_rate_single_words": [float(np.mean(tgt["single"] < thr)) for thr in thresholds],
            "single_word_far": [float(np.mean(imp["single"] >= thr)) for thr in thresholds],
            "phrase_seconds": round(seconds["phrase"], 3),
            "single_word": {"threshold": single, "seconds": round(seconds["single"], 3),
                            "miss_rate": [float(np.mean(tgt["single"] < thr)) for thr in single],
                            "impostor_trials": int(len(imp["single"])),
                            "rule": "utterances of `seconds` or less get these thresholds, of `phrase_seconds` or "
                                    "more the phrases', in between a linear mix (streamd.identity.scoring.Calibration)"}}


def held_out_measures(t: dict, proj, cohort: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The held-out speakers' trials, per kind of probe: quality measures and truth."""
    return {kind: trial_measures(t, t["names"], proj, cohort, kind) for kind in ("single", "phrase")}


def held_out_open_set(trials: dict[str, tuple[np.ndarray, np.ndarray]], cal: dict, far: float = 0.01,
                      fused: bool = False) -> dict:
    """eval_speakers' open-set figures on the held-out speakers' ``trials`` (for the card): at
    the calibrated threshold for ``far`` (each kind at its own table: the probes' lengths are
    not kept), and at the threshold that names <= 1% of strangers. ``fused``: the decision's
    score with the card's quality fusion, else the AS-norm score."""
    from streamd.offline.eval_speakers import operating_point
    from streamd.identity.scoring import Calibration, QualityFusion

    spec = cal["quality"] if fused else cal
    table = Calibration.from_card(spec)
    out = {}
    for kind, (measures, truth) in trials.items():
        scores = QualityFusion.from_card(spec).score(measures) if fused else measures[..., 0]
        same = truth[:, None] == np.arange(scores.shape[1])[None, :]
        rate, _, _ = evaluate.eer(scores.ravel(), same.ravel())
        seconds = table.short_seconds if kind == "single" else table.long_seconds  # each kind at its table
        named, strangers = evaluate.open_set_rates(scores, truth, lambda n: table.threshold_for(far / max(1, n), seconds))
        out[kind] = {"probes": int(len(scores)), "eer": rate,
                     "closed_set_top1": float(np.mean(np.argmax(scores, axis=1) == truth)),
                     f"identified_at_far_{far}": named, f"strangers_named_at_far_{far}": strangers,
                     "at_1pct_strangers_named": operating_point(scores, truth, 0.01)}
    return out


def embed_clips(model: OnnxModel, clips: list[evaluate.Clip]) -> np.ndarray:
    vad = VadParams()
    out = []
    for clip in clips:
        audio, _ = sf.read(clip.path, dtype="int16")
        cut = utterance_audio(audio, vad)
        out.append(model.run(features_of_audio(cut, model.params)))
    return np.stack(out)


def phrase_metrics(emb: np.ndarray, spk: np.ndarray, per_phrase: int = 3) -> dict:
    """EER of ~2-3 s phrases: the mean embedding of 3 clips of one speaker."""
    rng = np.random.default_rng(0)
    groups = []
    for s in sorted(set(spk)):
        idx = rng.permutation(np.flatnonzero(spk == s))
        groups += [(s, idx[i : i + per_phrase]) for i in range(0, len(idx) - per_phrase + 1, per_phrase)]
    e = l2_normalize(np.stack([l2_normalize(emb[g]).mean(axis=0) for _, g in groups]))
    names = np.array([s for s, _ in groups])
    iu = np.triu_indices(len(e), k=1)
    rate, thr, thr1 = evaluate.eer((e @ e.T)[iu], (names[:, None] == names[None, :])[iu])
    return {"phrases": len(e), "clips_per_phrase": per_phrase, "eer": rate, "threshold_at_eer": thr,
            "threshold_at_far_1pct": thr1}


def enrolled_metrics(emb: np.ndarray, spk: np.ndarray, n_enroll: int = 10) -> dict:
    """Each held-out speaker enrolled from ``n_enroll`` single clips (their mean embedding);
    every other clip is a probe scored against every enrolled speaker. Reports EER, the
    threshold at 1% false accepts, closed-set top-1, and open-set identification at that
    threshold with each speaker in turn left out of the gallery (its clips are strangers)."""
    rng = np.random.default_rng(0)
    names = sorted(set(spk))
    enroll, probes = {}, []
    for s in names:
        idx = rng.permutation(np.flatnonzero(spk == s))
        enroll[s] = l2_normalize(l2_normalize(emb[idx[:n_enroll]]).mean(axis=0))
        probes += list(idx[n_enroll:])
    probes = np.array(probes)
    cents = np.stack([enroll[s] for s in names])
    scores = l2_normalize(emb[probes]) @ cents.T
    truth = np.array([names.index(s) for s in spk[probes]])
    same = truth[:, None] == np.arange(len(names))[None, :]
    rate, thr_eer, thr1 = evaluate.eer(scores.ravel(), same.ravel())
    closed = float(np.mean(np.argmax(scores, axis=1) == truth))
    named, stranger_named = evaluate.open_set_rates(scores, truth, lambda n: thr1)
    return {"enroll_clips": n_enroll, "probes": int(len(probes)), "eer": rate, "threshold_at_eer": thr_eer,
            "threshold_at_far_1pct": thr1, "closed_set_top1": closed,
            "open_set_identified_at_far_1pct": named,
            "open_set_strangers_named_at_far_1pct": stranger_named}


def _pack(sets: dict) -> dict[str, np.ndarray]:
    """The sets as plain arrays (windows stacked, with owners and offsets), for ``np.savez``."""
    items = [("enrolled", n, w) for n in sets["names"] for w in sets["enrolled"][n]]
    items += [(kind, n, w) for kind in ("single", "phrase") for n, w in sets[kind]]
    return {"names": np.array(sets["names"]), "kind": np.array([k for k, _, _ in items]),
            "owner": np.array([n for _, n, _ in items]),
            "count": np.array([len(w) for _, _, w in items], np.int64),
            "windows": np.concatenate([w for _, _, w in items]).astype(np.float32)}


def _unpack(z) -> dict:
    names = [str(n) for n in z["names"]]
    out: dict = {"names": names, "enrolled": {n: [] for n in names}, "single": [], "phrase": []}
    windows, counts = z["windows"], z["count"]  # each z[...] reads the file again: once only
    for kind, owner, end, count in zip(z["kind"], z["owner"], np.cumsum(counts), counts):
        w, owner = windows[end - count : end], str(owner)
        if kind == "enrolled":
            out["enrolled"][owner].append(w)
        else:
            out[str(kind)].append((owner, w))
    return out


def cached_sets(cache: Path | None, key: str, make) -> dict:
    """``make()``, stored under ``cache`` (a local training cache, never shipped) as plain
    arrays: no pickle, even for our own files."""
    path = cache / f"{key}.npz" if cache else None
    if path and path.is_file():
        with np.load(path, allow_pickle=False) as z:
            return _unpack(z)
    sets = make()
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **_pack(sets))
    return sets


def window_input(int8: bool) -> dict:
    """The card's input entry: 1.6 s windows; int8 outputs depend on the batch they run in."""
    return {"name": "feats", "window": WINDOW, "batch_invariant": not int8}


def window_model(enc: nn.Module, folder: Path, int8: bool) -> OnnxModel:
    """The bare encoder (no back end) as the ONNX model the cached per-window outputs come from."""
    path = folder / "encoder.onnx"
    export(enc, path)
    if int8:  # back end, cohort and calibration see the encoder the daemon runs
        quantize(path, path.with_suffix(".int8.onnx"))
        path = path.with_suffix(".int8.onnx")
    return OnnxModel(ModelCard(folder / "encoder.card.json",
                               {"kind": "speaker", "file": path.name, "sha256": sha256_of(path),
                                "features": mel_params().as_dict(), "input": window_input(int8), "output": {}}),
                     mel_params(), "cpu")


def cache_key(weights: Path, data_dir: Path, int8: bool) -> str:
    """Same weights, front end, VAD and data folder: same per-window outputs."""
    return hashlib.sha256(json.dumps([sha256_of(weights), mel_params().as_dict(), dataclasses.asdict(VadParams()),
                                      str(data_dir.resolve()), ENROLL_CLIPS, PHRASE_CLIPS, "enrollment joined"]
                                     + (["int8 rows alone", onnxruntime_version()] if int8 else []),
                                     sort_keys=True).encode()).hexdigest()[:12]


def copy_sets(cache_dir: Path, key: str, raw, train: list[evaluate.Clip], speeds=COHORT_SPEEDS) -> list[dict]:
    """The cohort's copies of the training speakers: random channels, then each speed."""
    sets = [cached_sets(cache_dir, f"train-channel-v{CHANNEL_VERSION}-s{CHANNEL_SEED}-{key}",
                        lambda: speaker_sets(raw(), train, channel_copy))]
    return sets + [cached_sets(cache_dir, f"train-speed{speed}-{key}",
                               lambda speed=speed: speaker_sets(raw(), train, functools.partial(speed_copy, speed=speed)))
                   for speed in speeds]


def run(opts: Options) -> int:
    import tempfile

    t0 = time.time()
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    weights = opts.pretrained or pretrained_path()
    enc = load_encoder(weights)
    params = mel_params()
    with tempfile.TemporaryDirectory() as tmp:
        raw = window_model(enc, Path(tmp), opts.int8)
        from streamd.train.data import WORK_DIR

        cache_dir = opts.cache_dir or WORK_DIR / "speaker-ge2e"
        key = cache_key(weights, opts.data_dir, opts.int8)
        train = training_clips(opts.data_dir)
        sets = [cached_sets(cache_dir, f"train-{key}", lambda: speaker_sets(raw, train)),
                cached_sets(cache_dir, f"train-band-{key}",
                            lambda: speaker_sets(raw, [c for c in train if c.corpus == "asc"], band_copy))]
        copies = copy_sets(cache_dir, key, lambda: raw, train)
        held = evaluate.held_out_clips(opts.data_dir)
        held_sets = cached_sets(cache_dir, f"held-{key}", lambda: speaker_sets(raw, held))
    t_embed = time.time() - t0
    names = set(sets[0]["names"])
    assert not names & set(held_sets["names"]), "a held-out speaker among the training speakers"
    x, y = windows_of(sets, names)
    proj = fit_nap(x, y)
    cohort_sets = sets + copies
    cohort = make_cohort(cohort_sets, names, proj)
    cal = calibration(sets, cohort_sets, trial_seconds(train))
    held_trials = held_out_measures(held_sets, proj, cohort)

    onnx_path = opts.out_dir / "speaker.onnx"
    full = WithBackEnd(enc, proj).eval()
    windows = speech_windows(train, 32)
    quantized = None
    if opts.int8:
        with tempfile.TemporaryDirectory() as tmp:
            float_path = Path(tmp) / "speaker.float.onnx"
            parity = export(full, float_path, windows)
            quantize(float_path, onnx_path)
            quantized = {"kind": "onnxruntime dynamic quantization, int8 weights (QInt8), "
                                 "streamd.train.speaker_encoder.quantize",
                         "quantized": "LSTM layers 2-3 and the linear layer; LSTM layer 1 (mel power input) "
                                      "and the NAP projection float",
                         "onnxruntime_version": onnxruntime_version(),
                         "agreement_with_float_on_speech": agreement(float_path, onnx_path, windows)}
    else:
        parity = export(full, onnx_path, windows)
    card_data = {"kind": "speaker", "file": onnx_path.name, "sha256": sha256_of(onnx_path),
                 "features": params.as_dict(), "input": window_input(opts.int8), "output": {}}
    model = OnnxModel(ModelCard(opts.out_dir / "speaker.card.json", card_data), params, "cpu")
    emb = embed_clips(model, held)
    single = evaluate.speaker_report(held, emb)
    spk = np.array([c.speaker for c in held])
    cohort_path = opts.out_dir / "speaker.cohort.npy"
    np.save(cohort_path, cohort.astype(np.float16), allow_pickle=False)
    dim = int(proj.shape[1])

    card = {
        "name": "speaker-ge2e",
        "kind": "speaker",
        "file": onnx_path.name,
        "sha256": sha256_of(onnx_path),
        "size_bytes": onnx_path.stat().st_size,
        "input": {"name": "feats", "shape": ["batch", "time", 40], "window": WINDOW,
                  "batch_invariant": not opts.int8,
                  "note": "the daemon runs 1.6 s windows (hop 0.77 s, last zero-padded) and averages them"
                          + ("; each window alone: int8 layers scale their input by the batch's range"
                             if opts.int8 else "")},
        "output": {"name": "embedding", "shape": ["batch", dim], "l2_normalized": True},
        "embedding_dim": dim,
        "features": params.as_dict(),
        "vad": dataclasses.asdict(VadParams()),
        "normalization": "per-utterance gain up to -30 dBFS, never down (streamd.signal.features.normalize, kind melpower)",
        "provenance": {
            "source": "Resemblyzer 0.1.4 (PyPI wheel), resemblyzer/pretrained.pt: GE2E voice encoder by Resemble AI",
            "licence": "Apache-2.0 (the wheel's LICENSE covers the code and the bundled pretrained model)",
            "pretrained_sha256": sha256_of(weights),
            "conversion": "weights loaded into streamd.train.speaker_encoder.VoiceEncoder and exported to ONNX; "
                          "the front end (librosa mel) re-implemented in streamd.signal.features (Slaney mel, power, "
                          "uncentred frames for streaming); encoder weights not fine-tuned",
        },
        "quantization": quantized,
        "back_end": {"kind": "nap", "dims_removed": NAP_DIMS,
                     "graph": "embedding = normalize(ge2e(window) @ projection), per 1.6 s window; "
                              "projection = I - U U^T, U the top within-speaker covariance eigenvectors",
                     "fitted_on": "per-window GE2E embeddings of the 21 training speakers (single words, "
                                  "3-clip phrases) and of 8 kHz band-limited copies of the 18 ASC training "
                                  "speakers' clips (same speaker labels); never held-out speakers",
                     "windows": int(len(x)),
                     "selection": "NAP vs WCCN/LDA, dims removed, centring, band-limited copies and cohort "
                                  "make-up were compared on training-speaker cross-validation and also on the "
                                  "held-out speakers' scores, so model selection saw the held-out speakers; "
                                  "nothing was fitted on them"},
        "cohort": {"file": cohort_path.name, "sha256": sha256_of(cohort_path), "vectors": len(cohort),
                   "source": f"{COHORT_PER_SPEAKER} single words and {COHORT_PER_SPEAKER} 3-clip phrases of each "
                             "training speaker, of the band-limited copies of the ASC training speakers and of "
                             "copies of every training speaker through random channels (streamd.train.data."
                             f"random_channel, seed {CHANNEL_SEED}) and played at speeds {COHORT_SPEEDS} (each "
                             "a voice of its own); never held-out speakers",
                   "dtype": "float16 (the daemon scores in float32; calibration used the same rounded vectors)",
                   "selection": COHORT_SELECTION},
        "calibration": cal,
        "data": {"validation": "FSDD (CC BY-SA 4.0) speaker theo; Arabic Speech Commands (CC BY 4.0) val-split speakers",
                 "training": "encoder pretrained (not re-trained here); back end, cohort and calibration "
                             "from the training speakers: FSDD jackson, nicolas, yweweler and the ASC "
                             "authors' train split, plus band-limited copies of the ASC clips"},
        "split": "speaker-disjoint: held-out speakers are FSDD theo and the ASC authors' val split",
        "metrics": {"single_clips": single, "phrases_3_clips": phrase_metrics(emb, spk),
                    "enrolled_10_clips_vs_single_clips": enrolled_metrics(emb, spk),
                    "open_set_as_norm": held_out_open_set(held_trials, cal),
                    "open_set_fused": held_out_open_set(held_trials, cal, fused=True),
                    "onnx_vs_torch_max_abs_diff_on_speech (float graph)": parity},
        "suggested_threshold": {
            "default": round(enrolled_metrics(emb, spk)["threshold_at_far_1pct"], 3),
            "default_rule": "cosine at 1% false accepts, speakers enrolled from 10 clips vs single held-out clips",
            "cosine_at_far_1pct_single_clips": single["all_held_out"]["threshold_at_far_1pct"],
            "cosine_at_eer_single_clips": single["all_held_out"]["threshold_at_eer"]},
        "training": {"command": f"streamd train speaker --data {opts.data_dir} --out {opts.out_dir}",
                     "seconds": round(time.time() - t0, 1), "embedding_seconds": round(t_embed, 1),
                     "embedding_cache": "per-window encoder outputs cached under $STREAMD_TRAIN_WORK/speaker-ge2e"},
        "created": dt.date.today().isoformat(),
        "torch_version": torch.__version__,
    }
    (opts.out_dir / "speaker.card.json").write_text(json.dumps(card, indent=2) + "\n")
    from streamd.train.card import write_docs

    write_docs(opts.out_dir)
    print(json.dumps(card["metrics"], indent=2))
    return 0
