"""Vocabularies taught by example, measured: templates from some speakers, tested on others.

``streamd eval words`` and ``streamd train words`` (which fits the match rule on validation
speakers and records the held-out figures in the word model's card) share this. A
"vocabulary" here is one corpus's digits taught by ``teachers`` (``reps`` repetitions of each
digit each); every clip of the test speakers is then matched against the templates alone
(no digit model): digits named right / null / wrong, and other words named as a digit.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from streamd.signal.vad import VadParams, heard_utterance
from streamd.signal.features import word_input
from streamd.models.words import MatchRule, TemplateIndex, choose

ASC = "arabic-speech-commands"
FSDD_TRAINING = ("jackson", "nicolas", "yweweler")  # the digit models' English training speakers
FSDD_HELD_OUT = ("theo",)
ASC_VALIDATION = ("00000006", "00000016", "00000022", "00000030")  # as streamd.train.data
MAX_OTHER_ACCEPTED = 0.02  # the rule may name at most this share of other words as digits
SCORES = np.round(np.arange(0.05, 0.96, 0.01), 2)
MARGINS = tuple(np.round(np.arange(0.0, 0.31, 0.02), 2))


@dataclass(frozen=True)
class WordClip:
    path: Path
    corpus: str
    speaker: str
    split: str  # ASC: train | val; FSDD: train | held-out
    rep: int
    digit: int | None  # None: a word that is not a digit


def corpus_words(data: Path) -> list[WordClip]:
    clips = []
    with open(data / "fsdd" / "manifest.csv", newline="") as fh:
        for r in csv.DictReader(fh):
            split = "held-out" if r["speaker"] in FSDD_HELD_OUT else "train"
            clips.append(WordClip(data / "fsdd" / r["path"], "fsdd", r["speaker"], split, int(r["rep"]), int(r["digit"])))
    with open(data / ASC / "manifest.csv", newline="") as fh:
        for r in csv.DictReader(fh):
            digit = int(r["digit"]) if r["digit"] != "" else None
            clips.append(WordClip(data / ASC / r["path"], "asc", r["speaker"], r["split"], int(r["rep"]), digit))
    return clips


def asc_teachers(clips: list[WordClip]) -> list[str]:
    """The 5 ASC training speakers who teach Arabic in the held-out report (the first by number
    that are neither validation nor test speakers)."""
    return sorted({c.speaker for c in clips if c.corpus == "asc" and c.split == "train"
                   and c.speaker not in ASC_VALIDATION})[:5]


def needed(clips: list[WordClip]) -> list[WordClip]:
    """The clips the validation trials and the held-out report read (embedding is the cost)."""
    teachers = set(asc_teachers(clips))
    return [c for c in clips if c.corpus == "fsdd" or c.speaker in ASC_VALIDATION or c.split == "val"
            or (c.speaker in teachers and c.digit is not None)]


def clip_inputs(clips: list[WordClip]) -> list[np.ndarray]:
    """The word model's input for each clip's VAD cut (as the daemon cuts a clip)."""
    out = []
    for c in clips:
        audio, rate = sf.read(c.path, dtype="int16")
        if rate != 16000:
            raise ValueError(f"{c.path}: {rate} Hz, expected 16000")
        out.append(word_input(heard_utterance(audio, VadParams())[0]))
    return out


def templates(clips: list[WordClip], vectors: np.ndarray, teachers, reps: int, vocabulary: str) -> TemplateIndex:
    """Each teacher's first ``reps`` repetitions of every digit."""
    chosen = {}
    for i, c in enumerate(clips):
        if c.speaker in teachers and c.digit is not None:
            chosen.setdefault((c.speaker, c.digit), []).append((c.rep, i))
    picked = [i for group in chosen.values() for _, i in sorted(group)[:reps]]
    return TemplateIndex([(vocabulary, clips[i].digit, vectors[i]) for i in picked])


def named(index: TemplateIndex, vectors: np.ndarray, rule: MatchRule) -> np.ndarray:
    """Each vector's digit as ``index.match`` names it (-1: none), for many vectors at once."""
    scores = index.score_matrix(vectors)
    return decide(scores, index.keys, rule)


def decide(scores: np.ndarray, keys: list[tuple[str, int]], rule: MatchRule) -> np.ndarray:
    """``TemplateIndex.match`` over a (vectors, keys) score matrix: the digit named, or -1."""
    best, _, ok = choose(scores, keys, rule)
    return np.where(ok, np.array([d for _, d in keys])[best], -1)


def outcomes(said: np.ndarray, truth: np.ndarray) -> dict:
    """Digits named right / null / wrong (truth >= 0) and other words named (truth -1)."""
    digit, other = truth >= 0, truth < 0
    n, others = int(digit.sum()), int(other.sum())
    frac = lambda mask, total: float(mask.sum() / total) if total else None  # noqa: E731
    return {"digits": n, "right": frac(digit & (said == truth), n), "null": frac(digit & (said < 0), n),
            "wrong": frac(digit & (said >= 0) & (said != truth), n), "other_words": others,
            "other_named": frac(other & (said >= 0), others)}


def truth_of(clips: list[WordClip], tested: list[int]) -> np.ndarray:
    return np.array([-1 if clips[i].digit is None else clips[i].digit for i in tested])


def fit_rule(trials: list[tuple[TemplateIndex, list[int]]], clips: list[WordClip], vectors: np.ndarray) -> dict:
    """The (min_score, min_margin) naming most digits right, over all ``trials`` (templates and
    the clips tested against them), with at most MAX_OTHER_ACCEPTED of other words named."""
    prepared = [(index.score_matrix(vectors[tested]), index.keys, truth_of(clips, tested)) for index, tested in trials]
    best = None
    for margin in MARGINS:
        for score in SCORES:
            rule = MatchRule(float(score), margin)
            res = [outcomes(decide(m, keys, rule), truth) for m, keys, truth in prepared]
            right = float(np.mean([r["right"] for r in res]))
            other = float(np.mean([r["other_named"] for r in res if r["other_named"] is not None]))
            if other <= MAX_OTHER_ACCEPTED and (best is None or right > best["digits_right"]):
                best = {"min_score": float(score), "min_margin": margin, "digits_right": right, "other_named": other}
    if best is None:
        raise ValueError("no match rule keeps other words named under the limit")
    return best


def validation_trials(clips: list[WordClip], vectors: np.ndarray, reps: int = 5) -> list[tuple[TemplateIndex, list[int]]]:
    """Arabic taught on the ASC validation speakers: each alone (a user teaching by himself)
    and each three together, the others' words tested (the fourth speaker's, for three), with
    the English training speakers' digits (words of another language) as other words too. A
    digit's score grows with its templates, so the rule must hold for both."""
    english = [i for i, c in enumerate(clips) if c.corpus == "fsdd" and c.speaker in FSDD_TRAINING]
    trials = []
    for speaker in ASC_VALIDATION:
        for teachers in ({speaker}, set(ASC_VALIDATION) - {speaker}):
            tested = [i for i, c in enumerate(clips) if c.corpus == "asc" and c.speaker in ASC_VALIDATION
                      and c.speaker not in teachers]
            trials.append((templates(clips, vectors, teachers, reps, "ar"), tested + english))
    return trials


def held_out_report(clips: list[WordClip], vectors: np.ndarray, rule: MatchRule, reps: int = 5) -> dict:
    """Templates-only figures on speakers no rule or model was fitted on:
    Arabic taught by 5 ASC training speakers (and by each alone), tested on the ASC val split;
    English taught by the 3 FSDD training speakers, tested on theo."""
    asc_train = asc_teachers(clips)
    asc_test = [i for i, c in enumerate(clips) if c.corpus == "asc" and c.split == "val"]
    theo = [i for i, c in enumerate(clips) if c.corpus == "fsdd" and c.speaker in FSDD_HELD_OUT]
    def taught(teachers, vocabulary: str, tested: list[int]) -> dict:
        index = templates(clips, vectors, set(teachers), reps, vocabulary)
        truth = truth_of(clips, tested)
        nearest = decide(index.score_matrix(vectors[tested]), index.keys, MatchRule(-1.0, -1.0))
        return {**outcomes(named(index, vectors[tested], rule), truth),
                "nearest": float(np.mean(nearest[truth >= 0] == truth[truth >= 0]))}

    report = {
        "rule": {"min_score": rule.min_score, "min_margin": rule.min_margin},
        "arabic_5_teachers": {"teachers": asc_train, "reps": reps, **taught(asc_train, "ar", asc_test)},
        "english_3_teachers": {"teachers": list(FSDD_TRAINING), "reps": reps, **taught(FSDD_TRAINING, "en", theo)},
    }
    alone = [taught([t], "ar", asc_test) for t in asc_train]
    report["arabic_1_teacher"] = {"teachers": "each of the 5 alone, mean", "reps": reps,
                                  **{k: float(np.mean([a[k] for a in alone]))
                                     for k in ("right", "null", "wrong", "other_named", "nearest")}}
    return report


def format_report(r: dict) -> str:
    lines = [f"match rule: score >= {r['rule']['min_score']:.2f}, margin >= {r['rule']['min_margin']:.2f}"]
    for key, label in (("arabic_5_teachers", "Arabic, 5 teachers x 5 reps -> ASC val speakers"),
                       ("arabic_1_teacher", "Arabic, 1 teacher x 5 reps (mean of 5)"),
                       ("english_3_teachers", "English, 3 FSDD teachers x 5 reps -> theo")):
        x = r[key]
        other = f"; other words named {x['other_named']:.1%}" if x.get("other_named") is not None else ""
        lines.append(f"{label}: nearest template {x['nearest']:.1%}; named right {x['right']:.1%}, "
                     f"null {x['null']:.1%}, wrong {x['wrong']:.1%}{other}")
    return "\n".join(lines)
