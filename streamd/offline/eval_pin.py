"""``streamd eval pin``: digit strings and challenge-response on held-out speakers.

Strings of 4 and 6 digits, each said by one speaker from that speaker's clips with 0-150 ms
between their speech, 1.5 s apart, one stream per condition (clean, and pink noise at 10 dB
SNR), through the daemon's own Engine (VAD, batching, models, the ``digits`` event). Then the
verification trials, decided as the daemon decides them (``streamd.service.challenge.verdict``
on the string and the claimed voice at ``identity.verify_far``), for each enrolled speaker's
4-digit strings: the genuine speaker with the right code; another held-out speaker saying the
same code (an impostor who knows the code); the genuine speaker with a wrong code; and a
replay of an earlier right answer (the recording of the previous string, against a new code).
"""

from __future__ import annotations

import tempfile
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from streamd.audio.frames import SAMPLE_RATE
from streamd.audio.stream_audio import Condition, Word, build
from streamd.config import Config
from streamd.identity.gallery import Gallery
from streamd.models.inference import Models
from streamd.offline.eval_stream import HeldOut, enroll_book, run_streams
from streamd.service.challenge import Challenge, verdict
from streamd.models.digit_strings import StringParams

ANSWER_MIN_S = StringParams().min_string_s  # what a challenge's answer is searched from

GAP_S = (0.0, 0.15)
BETWEEN_S = 1.5  # silence around each string: one utterance each
CONDITIONS = (Condition("clean", "clean", pause_s=GAP_S), Condition("pink_10db", "noise", pause_s=GAP_S,
                                                                   noise="pink", snr_db=10.0))


@dataclass(frozen=True)
class Said:
    """One string in a stream: who, what, and where (stream seconds)."""

    speaker: str
    corpus: str
    digits: str
    t_start: float
    t_end: float


def pick_strings(held: HeldOut, length: int, per_speaker: int, rng: np.random.Generator) -> list[list[Word]]:
    """``per_speaker`` strings of ``length`` digits for each speaker with enough digit clips."""
    by_speaker: dict[str, list[Word]] = {}
    for w in held.words:
        if w.digit is not None:
            by_speaker.setdefault(w.speaker, []).append(w)
    out = []
    for speaker in sorted(by_speaker):
        pool = by_speaker[speaker]
        if len(pool) < length:
            continue
        out += [[pool[i] for i in rng.choice(len(pool), length, replace=False)] for _ in range(per_speaker)]
    return out


def lay_strings(cond: Condition, strings: list[list[Word]], rng: np.random.Generator) -> tuple[np.ndarray, list[Said]]:
    """One stream: each string built as a stream of its own (the condition's gaps, level and
    noise), with ``BETWEEN_S`` of its background before and after, end to end."""
    parts, said, pos = [], [], 0
    for words in strings:
        built = build(cond, words, rng, [])
        lead = int(BETWEEN_S * SAMPLE_RATE) - int(0.5 * SAMPLE_RATE)
        audio = np.concatenate((built.audio[: max(0, lead)], built.audio)) if lead > 0 else built.audio
        t0 = pos / SAMPLE_RATE + max(0, lead) / SAMPLE_RATE
        said.append(Said(words[0].speaker, words[0].corpus, "".join(str(w.digit) for w in words),
                         t0 + built.words[0].t_start, t0 + built.words[-1].t_end))
        parts.append(audio)
        pos += len(audio)
    return np.concatenate(parts), said


def answers(said: list[Said], events: list[dict]) -> list[dict | None]:
    """Each string's ``digits`` event (with its utterance's speaker embedding score fields), or
    None when no utterance lies over it alone."""
    digits = [e for e in events if e["type"] == "digits"]
    out = []
    for s in said:
        over = [e for e in digits if e["t_start"] < s.t_end and e["t_end"] > s.t_start]
        out.append(over[0] if len(over) == 1 else None)
    return out


def string_scores(said: list[Said], got: list[dict | None]) -> dict:
    per = {}
    for corpus in sorted({s.corpus for s in said}):
        idx = [i for i, s in enumerate(said) if s.corpus == corpus]
        exact = sum(got[i] is not None and got[i]["digits"] == said[i].digits for i in idx)
        wrong = sum(got[i] is not None and got[i]["digits"] not in (None, said[i].digits) for i in idx)
        right_digits = sum(_digits_right(said[i].digits, got[i]) for i in idx)
        split = sum(got[i] is None for i in idx)
        per[corpus] = {"strings": len(idx), "exact": exact / len(idx), "wrong_string": wrong / len(idx),
                       "per_digit": right_digits / sum(len(said[i].digits) for i in idx),
                       "not_one_utterance": split / len(idx)}
    return per


def _digits_right(truth: str, event: dict | None) -> int:
    """Digits named right, position by position (a string of another length: none)."""
    if event is None or event["items"] is None or len(event["items"]) != len(truth):
        return 0
    return sum(str(it["digit"]) == d for it, d in zip(event["items"], truth))


def evaluate_pins(held: HeldOut, cfg: Config, models: Models, per_speaker: int = 10, seed: int = 0,
                  progress=None) -> dict:
    rng = np.random.default_rng(seed)
    # Every utterance searched as a challenge's answer is (the daemon does so elsewhere only
    # above digits.strings_min_s): the trials below are challenges decided offline.
    cfg = replace(cfg, digits=replace(cfg.digits, strings_min_s=ANSWER_MIN_S))
    strings = {n: pick_strings(held, n, per_speaker, rng) for n in (4, 6)}
    report: dict = {"split": held.split, "seed": seed, "enrolled": sorted(held.enroll), "gap_s": list(GAP_S),
                    "verify_far": cfg.identity.verify_far, "conditions": {}}
    with tempfile.TemporaryDirectory() as tmp:
        gallery = Gallery(Path(tmp) / "gallery.sqlite3")
        book, refused = enroll_book(cfg, models, gallery, held.enroll)
        report["refused"] = refused
        try:
            for cond in CONDITIONS:
                crng = np.random.default_rng([seed, zlib.crc32(cond.name.encode())])
                laid = {n: lay_strings(cond, strings[n], crng) for n in strings}
                heard = VoiceLog(book)
                events, cpu_s = run_streams(cfg, models, book, {f"{cond.name}_{n}": a for n, (a, _) in laid.items()},
                                            progress)
                voices = heard.by_utterance(events)
                entry = {}
                for n, (audio, said) in laid.items():
                    got = answers(said, events.get(f"{cond.name}_{n}", []))
                    entry[f"{n}_digits"] = string_scores(said, got)
                    if n == 4:
                        entry["verification"] = verification_trials(said, got, voices, held, rng)
                entry["cpu_s_per_audio_s"] = cpu_s / sum(len(a) for a, _ in laid.values()) * SAMPLE_RATE
                report["conditions"][cond.name] = entry
        finally:
            book.close()
            gallery.close()
    return report


class VoiceLog:
    """The speaker embedding of every final decision the book makes (in publication order of
    the ``speaker`` events), verified against each enrolled speaker as a challenge would be."""

    def __init__(self, book):
        self.book, self.calls = book, []
        self._identify = book.identify
        book.identify = self._record

    def _record(self, embedding, utt):
        self.calls.append((embedding, self.book.seconds_of(utt.features)))
        return self._identify(embedding, utt)

    def by_utterance(self, events: dict[str, list[dict]]) -> dict[tuple[str, int], dict[str, tuple]]:
        self.book.identify = self._identify
        finals = sorted((e for evs in events.values() for e in evs if e["type"] == "speaker"), key=lambda e: e["seq"])
        names = self.book.enrolled().names
        return {(e["stream"], e["utterance"]): {n: self.book.verify(n, emb, secs) for n in names}
                for e, (emb, secs) in zip(finals, self.calls)}


def verification_trials(said: list[Said], got: list[dict | None], voices: dict, held: HeldOut,
                        rng: np.random.Generator) -> dict:
    """Pass rates of the four kinds of trial over the 4-digit strings (see the module's doc)."""
    voice = [voices.get((g["stream"], g["utterance"]), {}) if g is not None else {} for g in got]
    enrolled = sorted({n for v in voices.values() for n in v})
    trials: dict[str, list[bool]] = {"genuine": [], "impostor": [], "wrong_code": [], "replay": []}
    previous: dict[str, int] = {}
    for i, s in enumerate(said):
        heard = got[i]["digits"] if got[i] is not None else None
        reason = got[i]["reason"] if got[i] is not None else "not_one_utterance"
        if s.speaker in enrolled:
            score, ok = voice[i].get(s.speaker, (None, False))
            trials["genuine"].append(_passes(s.speaker, s.digits, heard, reason, score, ok))
            wrong = _other_code(s.digits, rng)
            trials["wrong_code"].append(_passes(s.speaker, wrong, heard, reason, score, ok))
            if s.speaker in previous:  # the earlier answer replayed against this (new) code
                j = previous[s.speaker]
                old = got[j]["digits"] if got[j] is not None else None
                score_j, ok_j = voice[j].get(s.speaker, (None, False))
                trials["replay"].append(_passes(s.speaker, s.digits, old, reason, score_j, ok_j))
            previous[s.speaker] = i
        for claimed in enrolled:  # another held-out speaker saying the claimed speaker's code
            if claimed != s.speaker:
                score, ok = voice[i].get(claimed, (None, False))
                trials["impostor"].append(_passes(claimed, s.digits, heard, reason, score, ok))
    return {k: {"trials": len(v), "pass": float(np.mean(v)) if v else None} for k, v in trials.items()}


def _passes(claimed: str, code: str, heard: str | None, reason: str | None, score, ok: bool) -> bool:
    c = Challenge("eval", claimed, code, 0.0, 0.0, 0)
    return verdict(c, heard, reason, score, ok).result == "pass"


def _other_code(code: str, rng: np.random.Generator) -> str:
    while True:
        other = "".join(str(d) for d in rng.integers(0, 10, len(code)))
        if other != code:
            return other


def format_report(r: dict) -> str:
    lines = [f"split: {r['split']}", f"gaps {r['gap_s'][0]:g}-{r['gap_s'][1]:g} s, identity.verify_far "
             f"{r['verify_far']:g}"]
    for name, c in r["conditions"].items():
        for n in (4, 6):
            for corpus, s in c[f"{n}_digits"].items():
                lines.append(f"{name:10s} {n} digits {corpus:5s} exact {s['exact']:6.1%}  per digit "
                             f"{s['per_digit']:6.1%}  wrong string {s['wrong_string']:5.1%}  not one utterance "
                             f"{s['not_one_utterance']:5.1%}  ({s['strings']} strings)")
        v = c["verification"]
        lines.append(f"{name:10s} verification: " + ", ".join(
            f"{k} {t['pass']:.1%} of {t['trials']}" if t["pass"] is not None else f"{k} -" for k, t in v.items()))
    return "\n".join(lines)
