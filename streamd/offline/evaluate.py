"""``streamd eval``: the shipped ONNX models on speakers held out of training.

Clips go through exactly the daemon's path (VAD cut, MFCC, normalisation, ONNX, decision
rule), so the figures are those of the product, not of a training script.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from streamd.models import digits as digit_rule
from streamd.config import Config
from streamd.signal.features import features_of_audio
from streamd.identity.scoring import l2_normalize
from streamd.models.inference import Models
from streamd.signal.vad import heard_utterance

# The speaker-disjoint split the shipped models were trained with (see docs/models.md).
HELD_OUT_FSDD = {"theo"}


@dataclass(frozen=True)
class Clip:
    path: Path
    corpus: str
    speaker: str
    digit: int | None  # None: a word that is not a digit


def held_out_clips(data: Path) -> list[Clip]:
    return corpus_clips(data, HELD_OUT_FSDD, lambda row: row["split"] == "val")


def corpus_clips(data: Path, fsdd_speakers, keep_asc) -> list[Clip]:
    """FSDD clips of ``fsdd_speakers`` and the ASC clips whose manifest row ``keep_asc`` takes."""
    clips: list[Clip] = []
    with open(data / "fsdd" / "manifest.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            if row["speaker"] in fsdd_speakers:
                clips.append(Clip(data / "fsdd" / row["path"], "fsdd", row["speaker"], int(row["digit"])))
    asc = data / "arabic-speech-commands"
    with open(asc / "manifest.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            if keep_asc(row):
                digit = int(row["digit"]) if row["digit"] != "" else None
                clips.append(Clip(asc / row["path"], "asc", row["speaker"], digit))
    return clips


def run_models(clip: Clip, cfg: Config, models: Models) -> tuple[np.ndarray, np.ndarray, bool]:
    """Speaker embedding and digit logits of a clip's VAD cut (the clip whole if the VAD finds
    no speech), and whether it found speech."""
    audio, rate = sf.read(clip.path, dtype="int16")
    assert rate == 16000, clip.path
    speech, heard = heard_utterance(audio, cfg.vad)
    emb = models.speaker.run(features_of_audio(speech, models.speaker.params))
    return emb, models.digits.run(models.digits.features_of(speech)), heard


def error_rates(scores: np.ndarray, same: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds, false-accept rates, false-reject rates), highest threshold first. A trial is
    accepted when its score is at least the threshold, and the thresholds tried are the scores
    themselves, so tied scores fall on the same side."""
    scores, same = np.asarray(scores, np.float64), np.asarray(same, bool)
    targets, impostors = np.sort(scores[same]), np.sort(scores[~same])
    thresholds = np.unique(scores)[::-1]
    far = (len(impostors) - np.searchsorted(impostors, thresholds, side="left")) / max(1, len(impostors))
    frr = np.searchsorted(targets, thresholds, side="left") / max(1, len(targets))
    return thresholds, far, frr


def eer(scores: np.ndarray, same: np.ndarray) -> tuple[float, float, float]:
    """Equal error rate, its threshold, and the threshold at 1% false accepts: the one EER
    computation (training's summaries wrap it).

    The EER is the mean of the false-accept and false-reject rates at the threshold where they
    are closest (the higher threshold when two are as close); the 1% threshold is the lowest
    with at most 1% false accepts (above every score when none has)."""
    thresholds, far, frr = error_rates(scores, same)
    i = int(np.argmin(np.abs(far - frr)))
    within = np.flatnonzero(far <= 0.01)  # far grows as the threshold falls: a leading run
    at1 = thresholds[within[-1]] if len(within) else np.nextafter(thresholds[0], np.inf)
    return float((far[i] + frr[i]) / 2), float(thresholds[i]), float(at1)


def open_set_rates(scores: np.ndarray, truth: np.ndarray, threshold_for_gallery) -> tuple[float, float]:
    """Open-set identification with each speaker in turn left out of the gallery (its probes
    are then strangers). ``scores`` (probes, speakers), ``truth`` each probe's speaker index,
    ``threshold_for_gallery(n)`` the threshold with n speakers enrolled (one, or one per probe).
    Returns (share of enrolled speakers' probes named right, share of strangers' probes named)."""
    n = scores.shape[1]
    named, strangers = [], []
    for left_out in range(n):
        keep = np.array([i for i in range(n) if i != left_out])
        best = keep[np.argmax(scores[:, keep], axis=1)]
        accepted = scores[np.arange(len(scores)), best] >= threshold_for_gallery(len(keep))
        enrolled = truth != left_out
        named.append(np.mean(accepted[enrolled] & (best[enrolled] == truth[enrolled])))
        strangers.append(np.mean(accepted[~enrolled]))
    return float(np.mean(named)), float(np.mean(strangers))


NOT_A_DIGIT = 10  # the confusion matrix's last column: the daemon said `digit: null`


def digit_report(clips: list[Clip], logits: np.ndarray, min_conf: float, heard: np.ndarray | None = None) -> dict:
    """Per corpus: the model's choice among 0-9, and what the daemon says with its rejection
    rule (per speaker, per digit, confusion with a `null` column); other words taken for a digit.
    Clips not ``heard`` (no speech found by the VAD) count as said nothing: in the `null` column."""
    out: dict = {}
    heard = np.ones(len(clips), bool) if heard is None else heard
    said = daemon_answers(logits, min_conf, heard)
    for corpus in ("fsdd", "asc"):
        idx = [i for i, c in enumerate(clips) if c.corpus == corpus and c.digit is not None]
        if not idx:
            continue
        truth = np.array([clips[i].digit for i in idx])
        best = np.argmax(logits[idx, :10], axis=1)
        named = said[idx]
        speakers = np.array([clips[i].speaker for i in idx])

        def per_speaker(answer: np.ndarray) -> dict[str, float]:
            return {s: float(np.mean(answer[speakers == s] == truth[speakers == s])) for s in sorted(set(speakers))}

        confusion = np.zeros((10, 11), int)
        np.add.at(confusion, (truth, named), 1)
        out[corpus] = {
            "clips": len(idx),
            "accuracy": float(np.mean(best == truth)),
            "accuracy_with_rejection": float(np.mean(named == truth)),
            "rejected": float(np.mean(named == NOT_A_DIGIT)),
            "not_heard": float(np.mean(~heard[idx])),
            "per_speaker": per_speaker(best),
            "per_speaker_with_rejection": per_speaker(named),
            "per_digit": {int(d): float(np.mean(best[truth == d] == d)) for d in sorted(set(truth))},
            "confusion_with_rejection": confusion.tolist(),
        }
    words = [i for i, c in enumerate(clips) if c.digit is None]
    out["non_digit_called_digit"] = {"clips": len(words),
                                     "rate": float(np.mean(said[words] != NOT_A_DIGIT)) if words else None}
    return out


def daemon_answers(logits: np.ndarray, min_conf: float, heard: np.ndarray) -> np.ndarray:
    """What a digit event would carry for each clip (NOT_A_DIGIT: `null`); a clip the VAD did
    not hear says nothing."""
    return np.array([_said(row, min_conf) if h else NOT_A_DIGIT for row, h in zip(logits, heard)], int)


def _said(logits: np.ndarray, min_conf: float) -> int:
    digit = digit_rule.decide(logits, min_conf).digit
    return NOT_A_DIGIT if digit is None else digit


def speaker_report(clips: list[Clip], emb: np.ndarray) -> dict:
    out: dict = {}
    for name, keep in (("all_held_out", lambda c: True), ("asc", lambda c: c.corpus == "asc")):
        idx = [i for i, c in enumerate(clips) if keep(c)]
        e = l2_normalize(emb[idx])
        spk = np.array([clips[i].speaker for i in idx])
        iu = np.triu_indices(len(idx), k=1)
        scores = (e @ e.T)[iu]
        same = (spk[:, None] == spk[None, :])[iu]
        rate, thr, thr1 = eer(scores, same)
        out[name] = {"speakers": int(len(set(spk))), "clips": len(idx), "pairs": int(len(scores)),
                     "eer": rate, "threshold_at_eer": thr, "threshold_at_far_1pct": thr1}
    return out


def evaluate(data: Path, cfg: Config, models: Models, progress=None) -> dict:
    clips = held_out_clips(data)
    emb, logits, heard = [], [], []
    for n, clip in enumerate(clips):
        e, l, h = run_models(clip, cfg, models)
        emb.append(e)
        logits.append(l)
        heard.append(h)
        if progress is not None:
            progress(n + 1, len(clips))
    return {
        "split": "held-out speakers: FSDD theo; ASC speakers of the authors' val split",
        "models": {"speaker": models.speaker.card.sha256, "digits": models.digits.card.sha256},
        "digits": digit_report(clips, np.stack(logits), models.digits.min_confidence(cfg.digits.min_confidence),
                               np.array(heard)),
        "speaker_single_clips": speaker_report(clips, np.stack(emb)),
    }


def digit_lines(d: dict, prefix: str) -> list[str]:
    """A ``digit_report`` in lines: per corpus the model's choice and the daemon's rule, then
    the other words taken for a digit."""
    lines = []
    for corpus, label in (("fsdd", "English"), ("asc", "Arabic")):
        if corpus in d:
            m = d[corpus]
            lines.append(f"{prefix}{label}: {m['accuracy']:.1%} of {m['clips']} (daemon's rule: "
                         f"{m['accuracy_with_rejection']:.1%} right, {m['rejected']:.1%} null"
                         + (f", of which {m['not_heard']:.1%} not heard by the VAD)" if m.get("not_heard") else ")"))
            if len(m["per_speaker"]) > 1:
                lines.append(f"{prefix}  per speaker (choice / right): " + ", ".join(
                    f"{s} {m['per_speaker'][s]:.0%}/{m['per_speaker_with_rejection'][s]:.0%}" for s in m["per_speaker"]))
    n = d["non_digit_called_digit"]
    if n["rate"] is not None:
        lines.append(f"{prefix}other words called a digit: {n['rate']:.1%} of {n['clips']}")
    return lines


def format_report(r: dict) -> str:
    s = r["speaker_single_clips"]
    lines = [f"split: {r['split']}"] + digit_lines(r["digits"], "digits ")
    for name, v in s.items():
        lines.append(f"speaker EER, single clips, {name}: {v['eer']:.1%} ({v['speakers']} speakers, {v['pairs']} pairs; "
                     f"threshold at EER {v['threshold_at_eer']:.3f}, at 1% FAR {v['threshold_at_far_1pct']:.3f})")
    return "\n".join(lines)


def to_json(r: dict) -> str:
    return json.dumps(r, indent=2)


def record_in_card(card: Path, report: dict, command: str) -> None:
    """Keep held-out figures in a model card, under ``heldout_eval`` (confusion matrices left to
    the pictures). Written beside it and renamed over it: the card is never half-written."""
    data = json.loads(card.read_text())
    data["heldout_eval"] = {"command": command, "figures": _without(report, "confusion_with_rejection")}
    tmp = card.with_name(card.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(card)


def _without(value, key: str):
    if isinstance(value, dict):
        return {k: _without(v, key) for k, v in value.items() if k != key}
    return value
