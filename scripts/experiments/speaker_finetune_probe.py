"""Would fine-tuning the GE2E encoder on our training speakers help speakers it never saw?

Cross-validated on the training speakers only (never the held-out ones): the 21 training
speakers are split into folds; for each fold the encoder's last LSTM layer and linear layer
are fine-tuned (GE2E loss, Resemblyzer's own) on the other folds' speakers, and the pretrained
and the fine-tuned encoder are compared on the fold's speakers, which neither saw: each
enrolled from 10 clips joined (as the daemon joins enrollments), probed with 3-clip phrases, raw
cosine against the enrolled centroids (``--back-end``: scored as the daemon scores, every clip
of the fold's speakers, NAP and AS-norm fitted on the other folds' speakers). Printed per fold: phrase EER, phrases missed at a
per-trial false-accept rate of 0.17% (identity.far 1% over 6 enrolled) and of 1%, closed-set top-1.

    python scripts/experiments/speaker_finetune_probe.py --data ../shared/datasets [--folds 3] [--steps 100] [--lr 1e-5]

Needs the [train] extra and Resemblyzer (make train installs both).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import streamd  # noqa: F401  (before numpy: see streamd/__init__.py)
import numpy as np
import soundfile as sf
import torch

from streamd.offline.evaluate import eer
from streamd.signal.features import features_of_audio, mel_params
from streamd.models.inference import window_starts
from streamd.train import speaker_encoder as se
from speaker_finetune import fine_tune  # beside this probe
from streamd.signal.vad import VadParams, utterance_audio

FRAMES, HOP, COVER = se.WINDOW["frames"], se.WINDOW["hop_frames"], se.WINDOW["min_coverage"]
PER_TRIAL_FAR = 0.01 / 6


def clip_features(clips, max_per_speaker: int, seed: int = 0) -> dict[str, list[np.ndarray]]:
    """Each speaker's VAD-cut clips as the daemon's mel features (at most ``max_per_speaker``)."""
    p, vad, rng = mel_params(), VadParams(), np.random.default_rng(seed)
    by: dict[str, list] = {}
    for c in clips:
        by.setdefault(c.speaker, []).append(c)
    out = {}
    for name, cs in sorted(by.items()):
        pick = rng.permutation(len(cs))[:max_per_speaker]
        out[name] = [features_of_audio(utterance_audio(sf.read(cs[i].path, dtype="int16")[0], vad), p) for i in pick]
    return out


def embed(enc: se.VoiceEncoder, feats: np.ndarray) -> np.ndarray:
    """The daemon's utterance embedding: zero-padded windows, each L2-normalised, averaged."""
    starts = window_starts(len(feats), FRAMES, HOP, COVER)
    padded = np.zeros((starts[-1] + FRAMES, 40), np.float32)
    padded[: len(feats)] = feats[: len(padded)]
    with torch.no_grad():
        e = enc(torch.from_numpy(np.stack([padded[s : s + FRAMES] for s in starts]))).numpy()
    m = e.mean(axis=0)
    return m / np.linalg.norm(m)


def open_set(enc: se.VoiceEncoder, feats: dict[str, list[np.ndarray]]) -> dict:
    names = sorted(feats)
    cents, probes, truth = [], [], []
    for k, s in enumerate(names):
        clips = feats[s]
        c = np.mean([embed(enc, f) for f in clips[: se.ENROLL_CLIPS]], axis=0)
        cents.append(c / np.linalg.norm(c))
        rest = clips[se.ENROLL_CLIPS :]
        for i in range(0, len(rest) - 2, 3):
            probes.append(embed(enc, np.concatenate(rest[i : i + 3])))
            truth.append(k)
    return trial_metrics(np.stack(probes) @ np.stack(cents).T, np.array(truth))


def daemon_sets(enc: se.VoiceEncoder, clips) -> dict:
    """Per-window outputs of the int8 ONNX encoder on every clip, as streamd train speaker forms them."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return se.speaker_sets(se.window_model(enc, Path(tmp), int8=True), clips)


def with_back_end(sets: dict, unseen: set[str]) -> dict:
    """The daemon's scoring: a NAP back end and an AS-norm cohort fitted on the seen speakers'
    clean clips (streamd train speaker also adds channel and speed copies to the cohort), the
    unseen speakers' phrases against their enrolled centroids."""
    seen = set(sets["names"]) - unseen
    proj = se.fit_nap(*se.windows_of([sets], seen))
    scores, truth = se.trial_scores(sets, sorted(unseen), proj, se.make_cohort([sets], seen, proj), "phrase")
    return trial_metrics(scores, truth)


def trial_metrics(scores: np.ndarray, truth: np.ndarray) -> dict:
    """scores (probes, enrolled), truth (probes,) -> EER, misses at the operating points, top-1."""
    same = truth[:, None] == np.arange(scores.shape[1])[None, :]
    tgt, imp = scores[same], scores[~same]
    thr = np.quantile(imp, 1 - PER_TRIAL_FAR)
    return {"eer": eer(scores.ravel(), same.ravel())[0], "missed_at_far": float(np.mean(tgt < thr)),
            "missed_at_1pct": float(np.mean(tgt < np.quantile(imp, 0.99))),
            "top1": float(np.mean(np.argmax(scores, axis=1) == truth)), "phrases": len(tgt)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/datasets"))
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--only-fold", type=int, default=None, help="run this fold only")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--per-speaker", type=int, default=400, help="clips per speaker used")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--back-end", action="store_true",
                    help="score as the daemon does (int8 ONNX, NAP, AS-norm cohort of the seen speakers' clean clips)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    clips = se.training_clips(args.data)
    feats = clip_features(clips, args.per_speaker)
    names = sorted(feats)
    order = np.random.default_rng(0).permutation(len(names))
    enc = se.load_encoder(se.pretrained_path())
    results: dict[str, list[dict]] = {"pretrained": [], "fine-tuned": []}
    pretrained_sets = None
    for k in range(args.folds):
        if args.only_fold is not None and k != args.only_fold:
            continue
        unseen = {names[i] for i in order[k :: args.folds]}
        print(f"fold {k}: unseen {sorted(unseen)}", flush=True)
        tuned = fine_tune(enc, {s: f for s, f in feats.items() if s not in unseen}, args.steps, args.lr, seed=k,
                          log=lambda line: print(line, flush=True))
        if args.back_end:
            pretrained_sets = pretrained_sets or daemon_sets(enc, clips)
            before, after = with_back_end(pretrained_sets, unseen), with_back_end(daemon_sets(tuned, clips), unseen)
        else:
            before, after = (open_set(e, {s: feats[s] for s in unseen}) for e in (enc, tuned))
        for label, r in (("pretrained", before), ("fine-tuned", after)):
            results[label].append(r)
            print(f"  {label}: {summary(r)} ({r['phrases']} phrases)", flush=True)
    if len(results["pretrained"]) > 1:
        print("mean over folds:")
        for label, rs in results.items():
            print(f"  {label}: {summary({k: float(np.mean([r[k] for r in rs])) for k in rs[0]})}")


def summary(r: dict) -> str:
    return (f"phrase EER {r['eer']:.1%}, missed at {PER_TRIAL_FAR:.2%} per trial {r['missed_at_far']:.1%}, "
            f"at 1% {r['missed_at_1pct']:.1%}, closed-set top-1 {r['top1']:.1%}")


if __name__ == "__main__":
    main()
