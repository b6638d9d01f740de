"""``streamd train enroll-gate``: fit the two-voice enrollment gate (streamd.identity.voice_count) on
simulated enrollments of the speaker model's training speakers, measure it on held-out ones,
and record both in the speaker model's card.

An enrollment is what a user hands ``streamd enroll``: several clips of single words (ASC,
FSDD) or one read passage (LibriSpeech excerpts). Two people enrolled as one are the same
material from two speakers of one corpus: half the clips each, both passages, or one file
holding the first half of one passage and the second half of another. The threshold refuses
at most ``--one-person-refused`` of the fitting speakers' one-person enrollments.

Passages under MIN_PASSAGE_S are left out. Speakers: the card's training speakers (FSDD jackson, nicolas, yweweler; the ASC train
split) and the odd-numbered LibriSpeech readers fit; FSDD theo, the ASC val split and the
even-numbered readers are held out.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from streamd.config import load as load_config
from streamd.identity.enrollment import audio_utterances
from streamd.identity.scoring import Scorer
from streamd.identity.speakers import load_cohort, load_fusion
from streamd.train import data
from streamd.train.card import write_card
from streamd.train.speaker_compare import load_speaker_model
from streamd.identity.voice_count import split_score, window_embeddings

WORD_CLIPS = 12  # clips in a word enrollment: 3-8 s of speech (FSDD words are short)
MIN_PASSAGE_S = 6.0
MIN_PERSON_S = 1.5  # two people: each says at least this much


@dataclass(frozen=True)
class Trial:
    group: str  # asc | fsdd | librispeech
    people: int  # 1 or 2
    files: tuple  # each a key of Material, or ("join", key_a, key_b)
    second: int = 0  # two people: the first file of the second person's


def librispeech(data_dir: Path) -> dict[str, np.ndarray]:
    """Each reader's passage; the few of under MIN_PASSAGE_S are left out (too little to split)."""
    folder = data_dir / "librispeech-excerpts"
    with open(folder / "manifest.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if float(r["duration_s"]) >= MIN_PASSAGE_S]
    return {r["speaker"]: sf.read(folder / r["path"], dtype="int16")[0] for r in rows}


def speakers_by_group(data_dir: Path, heldout: bool) -> dict[str, dict[str, list[str]]]:
    """{group: {speaker: [audio keys]}} of the fitting (or held-out) speakers."""
    out: dict[str, dict[str, list[str]]] = {"asc": {}, "fsdd": {}, "librispeech": {}}
    for clip in data.real_clips(data_dir):
        if clip.heldout == heldout:
            out[clip.corpus].setdefault(clip.speaker, []).append(clip.path)
    readers = sorted(librispeech(data_dir), key=int)
    for i, reader in enumerate(readers):
        if (i % 2 == 0) == heldout:
            out["librispeech"][reader] = [f"libri:{reader}"]
    return out


def trials(groups: dict[str, dict[str, list[str]]], per_group: int, seed: int) -> list[Trial]:
    rng = random.Random(seed)
    out = []
    for group, spk in groups.items():
        names = sorted(spk)
        for k in range(per_group if names else 0):
            a, b = rng.sample(names, 2) if len(names) > 1 else (names[0], None)
            if group == "librispeech":
                out.append(Trial(group, 1, (spk[a][0],)))
                if b is not None:
                    out.append(Trial(group, 2, (spk[a][0], spk[b][0]), 1) if k % 2 else
                               Trial(group, 2, (("join", spk[a][0], spk[b][0]),)))
            else:
                out.append(Trial(group, 1, tuple(rng.sample(spk[a], WORD_CLIPS))))
                half = WORD_CLIPS // 2
                if b is not None:
                    out.append(Trial(group, 2, tuple(rng.sample(spk[a], half) + rng.sample(spk[b], WORD_CLIPS - half)), half))
    return out


class Material:
    """The enrollment material by key: audio of clips and passages, and the utterances the
    VAD finds in it (features as enrollment computes them), each worked out once."""

    def __init__(self, data_dir: Path, cfg, model):
        self.passages = librispeech(data_dir)
        self.cfg, self.model = cfg, model
        self._utterances: dict = {}

    def audio(self, key) -> np.ndarray:
        if isinstance(key, tuple) and key[0] == "half":  # the first half of a passage
            a = self.audio(key[1])
            return a[: len(a) // 2]
        if isinstance(key, tuple):  # the first half of one passage, then the second of another
            a, b = self.audio(key[1]), self.audio(key[2])
            return np.concatenate([a[: len(a) // 2], b[len(b) // 2 :]])
        if key.startswith("libri:"):
            return self.passages[key[6:]]
        return sf.read(key, dtype="int16")[0]

    def utterances(self, key) -> list:
        if key not in self._utterances:
            self._utterances[key] = audio_utterances(self.audio(key), self.cfg, self.model)
        return self._utterances[key]

    def speech_seconds(self, key) -> float:
        return sum(u.seconds for u in self.utterances(key))


def with_speech(groups: dict[str, dict[str, list[str]]], material: Material) -> dict[str, dict[str, list[str]]]:
    """Without the passages in which the VAD finds under MIN_PASSAGE_S of speech: they could
    not be enrolled from (a few readers' passages are almost all refused as noise)."""
    readers = groups["librispeech"]
    keep = {r: keys for r, keys in readers.items() if material.speech_seconds(keys[0]) >= MIN_PASSAGE_S}
    return {**groups, "librispeech": keep}


def person_seconds(t: Trial, material: Material) -> list[float]:
    """Seconds of speech the VAD finds of each person of a trial."""
    if t.people == 1:
        return [sum(material.speech_seconds(key) for key in t.files)]
    if isinstance(t.files[0], tuple):
        first = material.speech_seconds(("half", t.files[0][1]))
        return [first, material.speech_seconds(t.files[0]) - first]
    return [sum(material.speech_seconds(key) for key in t.files[: t.second]),
            sum(material.speech_seconds(key) for key in t.files[t.second :])]


def scores(trial_list: list[Trial], material: Material, scorer: Scorer, min_seconds: float) -> np.ndarray:
    """Each trial's split score; NaN where the enrollment has under ``min_seconds`` of speech
    (refused before the two-voice gate) or a second person under MIN_PERSON_S (in a passage
    joined after a louder one, the VAD may find next to none of it: one voice is enrolled)."""
    windows_of: dict = {}
    out = []
    for t in trial_list:
        each = person_seconds(t, material)
        if sum(each) < min_seconds or min(each) < MIN_PERSON_S:
            out.append(np.nan)
            continue
        for key in t.files:
            if key not in windows_of:
                windows_of[key] = window_embeddings(material.model, [u.features for u in material.utterances(key)])
        split = split_score(np.concatenate([windows_of[key] for key in t.files if len(windows_of[key])]), scorer)
        out.append(np.nan if split is None else split.score)
    return np.array(out)


def rates(trial_list: list[Trial], s: np.ndarray, threshold: float) -> dict:
    out = {}
    for group in sorted({t.group for t in trial_list}) + ["all"]:
        keep = [i for i, t in enumerate(trial_list) if group in ("all", t.group)]
        one = np.array([s[i] for i in keep if trial_list[i].people == 1 and not np.isnan(s[i])])
        two = np.array([s[i] for i in keep if trial_list[i].people == 2 and not np.isnan(s[i])])
        out[group] = {"one_person": len(one), "one_person_refused": int(np.sum(~(one >= threshold))),
                      "two_people": len(two), "two_people_accepted": int(np.sum(two >= threshold))}
    return out


def fit(data_dir: Path, card_path: Path, per_group: int = 150, one_person_refused: float = 0.05,
        seed: int = 0) -> dict:
    """The gate's threshold from the fitting speakers' trials, and its rates on held-out ones."""
    cfg = load_config(None)
    model = load_speaker_model(card_path)
    fusion = load_fusion(model)
    if fusion is None:
        raise SystemExit(f"{card_path}: the two-voice gate needs a calibrated speaker model with a quality fusion")
    scorer = Scorer(load_cohort(model), fusion=fusion[0])
    material = Material(data_dir, cfg, model)
    fitting = trials(with_speech(speakers_by_group(data_dir, heldout=False), material), per_group, seed)
    s_fit = scores(fitting, material, scorer, cfg.identity.enroll_min_seconds)
    one = np.array([v for v, t in zip(s_fit, fitting) if t.people == 1 and not np.isnan(v)])
    threshold = float(np.quantile(one, one_person_refused))
    held = trials(with_speech(speakers_by_group(data_dir, heldout=True), material), per_group, seed + 1)
    s_held = scores(held, material, scorer, cfg.identity.enroll_min_seconds)
    two = [v >= threshold for v, t in zip(s_fit, fitting) if t.people == 2 and not np.isnan(v)]
    return {"threshold": round(threshold, 4),
            "statistic": "the lowest fused score between the model windows before and after a point of the "
                         "enrollment's speech (streamd.identity.voice_count.split_score)",
            "one_person_refused": round(float(np.mean(~(one >= threshold))), 4),
            "two_people_accepted": round(float(np.mean(two)), 4),
            "rule": f"refuses {one_person_refused:.0%} of the fitting speakers' one-person enrollments",
            "trials": f"{per_group} one- and {per_group} two-person enrollments per corpus and side: {WORD_CLIPS} "
                      "word clips (half each of two speakers), or a LibriSpeech passage (two passages, or the "
                      "halves of two joined in one file)",
            "fitting": rates(fitting, s_fit, threshold), "held_out": rates(held, s_held, threshold),
            "scores": {"fitting": _quantiles(s_fit, fitting), "held_out": _quantiles(s_held, held)}}


def _quantiles(s: np.ndarray, trial_list: list[Trial]) -> dict:
    out = {}
    for people in (1, 2):
        v = np.array([x for x, t in zip(s, trial_list) if t.people == people and not np.isnan(x)])
        out[f"{people}_person"] = [round(float(q), 2) for q in np.quantile(v, [0, 0.01, 0.05, 0.5, 0.95, 0.99, 1])]
    return out


def run(data_dir: Path, out: Path, per_group: int = 150, one_person_refused: float = 0.05, seed: int = 0) -> int:
    card_path = out / "speaker.card.json"
    spec = fit(data_dir, card_path, per_group, one_person_refused, seed)
    spec["command"] = "streamd train enroll-gate --data " + str(data_dir)
    card = json.loads(card_path.read_text())
    card["enroll_gate"] = spec
    write_card(card_path.with_name(card["file"]), card)
    print(json.dumps(spec, indent=1))
    return 0
