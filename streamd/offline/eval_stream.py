"""``streamd eval stream``: the daemon on continuous audio, as users send it.

Held-out speakers' clips are laid end to end with pauses, at a speech level, over a noise
floor, with noise and channel effects (``streamd.audio.stream_audio``), one stream per condition,
and run through the daemon's own Engine (VAD, rings, batching, models, decisions, events).
The published events are then lined up with where each word's speech really is:

- a word's answer is the ``digit`` events of the utterances that overlap it most; named right
  when exactly one digit was named and it is the one said; wrong when any other was;
  otherwise null (missed words included);
- segmentation: missed words (no utterance), merged (an utterance over two or more words),
  split (a word in two or more utterances), false utterances (over no word) per hour of
  audio without speech;
- speakers: held-out speakers enrolled from clips that are not streamed, two left as
  strangers; named right, unknown, named wrong, strangers named.
"""

from __future__ import annotations

import csv
import logging
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from streamd.config import Config
from streamd.service.engine import Engine
from streamd.identity.enrollment import audio_utterances
from streamd.offline.evaluate import Clip, corpus_clips, held_out_clips
from streamd.service.events import Publisher
from streamd.audio.frames import SAMPLE_RATE, Frame
from streamd.identity.gallery import Gallery, GalleryError
from streamd.models.inference import Models
from streamd.service.metrics import Metrics
from streamd.identity.speakers import SpeakerBook, book_settings
from streamd.audio.stream_audio import Built, Condition, Placed, Word, build, standard_conditions

log = logging.getLogger("streamd")

STRANGERS = {"00000008", "00000025", "00000030"}  # ASC speakers never enrolled (held out / validation)
ENROLL_CLIPS = 20  # FSDD digits are short: 20 of them are the 3 s of speech enrollment asks
OVERLAP_S = 0.05  # an utterance and a word's speech overlapping less than this are apart
SPLITS = {
    "held-out": "held-out speakers: FSDD theo; ASC speakers of the authors' val split (two of them strangers)",
    # For tuning the segmentation without reading the held-out figures. The English speakers
    # here are the digit models' training speakers: their digit figures flatter the models.
    "validation": "validation speakers: ASC 00000006, 00000016, 00000022, 00000030 (the digit fusion's "
                  "validation speakers; 00000030 a stranger) and FSDD jackson, nicolas, yweweler (training "
                  "speakers of the digit models: English digit figures flatter them)",
}
ASC_VALIDATION = ("00000006", "00000016", "00000022", "00000030")  # as streamd.train.data (no torch here)
FSDD_TRAINING = ("jackson", "nicolas", "yweweler")


@dataclass(frozen=True)
class HeldOut:
    words: list[Word]  # what the streams are made of
    enroll: dict[str, list[np.ndarray]]  # clips each enrolled speaker is enrolled from
    talkers: list[np.ndarray]  # other speakers' speech, for babble
    split: str = SPLITS["held-out"]


def _rep(path: Path) -> int:
    return int(path.stem.rsplit("_", 1)[1])


def validation_clips(data: Path) -> list[Clip]:
    return corpus_clips(data, FSDD_TRAINING, lambda row: row["speaker"] in ASC_VALIDATION)


def load_held_out(data: Path, split: str = "held-out") -> HeldOut:
    """Held-out clips: per enrolled speaker, ``ENROLL_CLIPS`` clips (FSDD: digits of
    repetitions 0 and 1; ASC: other words of repetition 1) are kept for enrollment and never
    streamed. Babble is made of LibriSpeech readers, none of whom is in the streams."""
    words, enroll = [], {}
    for clip in held_out_clips(data) if split == "held-out" else validation_clips(data):
        audio, rate = sf.read(clip.path, dtype="int16")
        if rate != SAMPLE_RATE:
            raise ValueError(f"{clip.path}: {rate} Hz, expected {SAMPLE_RATE}")
        for_enroll = clip.speaker not in STRANGERS and len(enroll.get(clip.speaker, [])) < ENROLL_CLIPS and (
            (clip.corpus == "fsdd" and _rep(clip.path) < 2) or (clip.corpus == "asc" and clip.digit is None
                                                                  and _rep(clip.path) == 1))
        if for_enroll:
            enroll.setdefault(clip.speaker, []).append(audio)
        else:
            words.append(Word(audio, clip.corpus, clip.speaker, clip.digit))
    return HeldOut(words, enroll, _talkers(data / "librispeech-excerpts"), SPLITS[split])


def _talkers(folder: Path, limit: int = 40) -> list[np.ndarray]:
    manifest = folder / "manifest.csv"
    if not manifest.exists():
        return []
    with open(manifest, newline="") as fh:
        rows = list(csv.DictReader(fh))[:limit]
    return [sf.read(folder / r["path"], dtype="int16")[0] for r in rows]


def pick_words(words: list[Word], per_corpus: int, rng: np.random.Generator) -> list[Word]:
    """``per_corpus`` digits of each corpus and half as many other words, shuffled (0: all)."""
    chosen = []
    for corpus in sorted({w.corpus for w in words}):
        for is_digit, n in ((True, per_corpus), (False, per_corpus // 2)):
            pool = [w for w in words if w.corpus == corpus and (w.digit is not None) == is_digit]
            if per_corpus and len(pool) > n:
                pool = [pool[i] for i in sorted(rng.choice(len(pool), n, replace=False))]
            chosen += pool
    return [chosen[i] for i in rng.permutation(len(chosen))]


class CollectingPublisher(Publisher):
    """Publishes as the daemon does and keeps every event, per stream, with the stream's audio
    time when it was published (``heard_s``: the end of the last frame pushed)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.events: dict[str, list[dict]] = {}
        self.heard_s: dict[str, float] = {}

    def publish(self, event):
        body = super().publish(event)
        self.events.setdefault(body["stream"], []).append({**body, "heard_s": self.heard_s.get(body["stream"])})
        return body


def run_streams(cfg: Config, models: Models, book: SpeakerBook | None, streams: dict[str, np.ndarray],
                progress=None) -> tuple[dict[str, list[dict]], float]:
    """Every stream through one Engine, frame i of each at once, as fast as the models take
    them (as ``streamd run --pace fast`` does). Returns each stream's events and the CPU seconds."""
    publisher = CollectingPublisher("tcp://127.0.0.1:*", cfg.events.hwm)
    engine = Engine(cfg, models, book, publisher, Metrics())
    for name in streams:
        engine.add_stream(name)
    step, frame_s = cfg.vad.frame_samples, cfg.vad.frame_ms / 1000
    ticks = max(len(a) for a in streams.values()) // step
    cpu0 = time.process_time()
    try:
        for i in range(ticks):
            frames = []
            for name, audio in streams.items():
                if (i + 1) * step <= len(audio):
                    publisher.heard_s[name] = (i + 1) * frame_s
                    frames.append(Frame(name, i, audio[i * step : (i + 1) * step], i * frame_s, time.monotonic()))
            engine.push_many(frames)  # as the daemon hands over the frames that arrived together
            engine.pump(force=True)
            while engine.backlogged():
                engine.pump(force=True, wait_s=0.05)
            if progress is not None and i % 500 == 0:
                progress(i, ticks)
        engine.flush()  # closes what is open and publishes everything
    finally:
        engine.close()
        publisher.close(0)
    return publisher.events, time.process_time() - cpu0


@dataclass
class Utt:
    t_start: float
    t_end: float
    digit: int | None
    speaker: str | None
    closed_s: float  # the stream's audio time when the VAD closed it (decisions are due then)


def utterances(events: list[dict]) -> tuple[list[Utt], int]:
    """The decided utterances of a stream's events, and how many the VAD announced too short."""
    by_id: dict[int, Utt] = {}
    closed: dict[int, float] = {}
    too_short = 0
    for e in events:
        if e["type"] == "vad.end":
            too_short += e["reason"] == "too_short"
            closed[e["utterance"]] = e["heard_s"]
        elif e["type"] in ("digit", "speaker"):
            u = by_id.setdefault(e["utterance"], Utt(e["t_start"], e["t_end"], None, None, closed[e["utterance"]]))
            if e["type"] == "digit":
                u.digit = e["digit"]
            else:
                u.speaker = e["speaker"]
    return list(by_id.values()), too_short


def _overlap(u: Utt, w: Placed) -> float:
    return min(u.t_end, w.t_end) - max(u.t_start, w.t_start)


def score(built: Built, events: list[dict], enrolled: set[str]) -> dict:
    """One stream's events against its words (see the module's docstring)."""
    utts, too_short = utterances(events)
    words = built.words
    touches = [[j for j, w in enumerate(words) if _overlap(u, w) >= OVERLAP_S] for u in utts]
    owner = [max(t, key=lambda j: _overlap(utts[i], words[j])) if t else None for i, t in enumerate(touches)]
    assigned: dict[int, list[int]] = {}
    for i, j in enumerate(owner):
        if j is not None:
            assigned.setdefault(j, []).append(i)
    merged_words = {j for t in touches if len(t) > 1 for j in t}
    out = {"words": len(words), "utterances": len(utts), "too_short": too_short}
    false_utts = [i for i, t in enumerate(touches) if not t]
    silence_h = max(built.seconds - built.speech_seconds(), 1e-9) / 3600
    out["segmentation"] = {
        "missed": sum(1 for j in range(len(words)) if not any(j in t for t in touches)),
        "merged": len(merged_words),
        "split": sum(1 for j, us in assigned.items() if len(us) > 1 and j not in merged_words),
        "false_utterances": len(false_utts),
        "false_per_hour": len(false_utts) / silence_h,
        "false_digits": sum(utts[i].digit is not None for i in false_utts),
        "false_speakers": sum(utts[i].speaker not in (None, "unknown") for i in false_utts),
    }
    out["digits"] = _digit_outcomes(words, utts, assigned)
    out["speakers"] = _speaker_outcomes(words, utts, assigned, enrolled)
    # Audio from the end of speech to the close, when the decisions are published (early finals
    # computed them by then); the models' own time is streamd bench's (latency_s at realtime pace).
    lat = [u.closed_s - u.t_end for u in utts]
    out["decision_after_speech_s"] = ({"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99))}
                                      if lat else None)
    return out


def _digit_outcomes(words: list[Placed], utts: list[Utt], assigned: dict[int, list[int]]) -> dict:
    out: dict = {}
    for corpus in sorted({p.word.corpus for p in words}):
        right = null = wrong = 0
        other_words = other_called = 0
        for j, p in enumerate(words):
            if p.word.corpus != corpus:
                continue
            named = [utts[i].digit for i in assigned.get(j, []) if utts[i].digit is not None]
            if p.word.digit is None:
                other_words += 1
                other_called += bool(named)
            elif named == [p.word.digit]:
                right += 1
            elif any(d != p.word.digit for d in named):
                wrong += 1
            else:
                null += 1
        n = right + null + wrong
        out[corpus] = {"digits": n, "right": right / n if n else None, "null": null / n if n else None,
                       "wrong": wrong / n if n else None, "other_words": other_words,
                       "other_called_digit": other_called / other_words if other_words else None}
    return out


def _speaker_outcomes(words: list[Placed], utts: list[Utt], assigned: dict[int, list[int]],
                      enrolled: set[str]) -> dict:
    named_right = unknown = named_wrong = known = strangers = strangers_named = 0
    for j, p in enumerate(words):
        us = assigned.get(j, [])
        if not us:
            continue
        said = utts[max(us, key=lambda i: utts[i].t_end - utts[i].t_start)].speaker
        if p.word.speaker in enrolled:
            known += 1
            named_right += said == p.word.speaker
            unknown += said in (None, "unknown")
            named_wrong += said not in (None, "unknown", p.word.speaker)
        else:
            strangers += 1
            strangers_named += said not in (None, "unknown")
    return {"enrolled_words": known, "named_right": named_right / known if known else None,
            "unknown": unknown / known if known else None, "named_wrong": named_wrong / known if known else None,
            "stranger_words": strangers, "strangers_named": strangers_named / strangers if strangers else None}


def enroll_book(cfg: Config, models: Models, gallery: Gallery,
                enroll: dict[str, list[np.ndarray]]) -> tuple[SpeakerBook, dict[str, str]]:
    """The speakers enrolled as `streamd enroll` would, and those it refused, with the reason
    (a refused speaker is not enrolled: their words count as a stranger's)."""
    book = SpeakerBook(gallery, models.speaker, **book_settings(cfg.identity))
    gap = np.zeros(int(0.5 * SAMPLE_RATE), np.int16)
    refused = {}
    for name, clips in enroll.items():
        recording = np.concatenate([gap] + [part for clip in clips for part in (clip, gap)])  # as `streamd enroll` gets it
        try:
            book.enroll(name, audio_utterances(recording, cfg, models.speaker), "eval stream")
        except GalleryError as e:
            log.warning("enrollment of %s refused: %s", name, e)
            refused[name] = str(e)
    return book, refused


def evaluate_streams(held: HeldOut, cfg: Config, models: Models, conditions: list[Condition] | None = None,
                     words_per_corpus: int = 200, seed: int = 0, progress=None) -> dict:
    conditions = conditions if conditions is not None else standard_conditions()
    rng = np.random.default_rng(seed)
    chosen = pick_words(held.words, words_per_corpus, rng)
    # Each condition's noise comes from its name: the same stream whichever others run with it.
    built = {c.name: build(c, chosen, np.random.default_rng([seed, zlib.crc32(c.name.encode())]), held.talkers)
             for c in conditions}
    with tempfile.TemporaryDirectory() as tmp:
        gallery = Gallery(Path(tmp) / "gallery.sqlite3")
        book, refused = enroll_book(cfg, models, gallery, held.enroll)
        try:
            events, cpu_s = run_streams(cfg, models, book, {n: b.audio for n, b in built.items()}, progress)
        finally:
            book.close()
            gallery.close()
    audio_s = sum(b.seconds for b in built.values())
    report = {"split": held.split, "seed": seed, "words_per_corpus": words_per_corpus,
              "models": {"speaker": models.speaker.card.sha256,
                         "digits": {n: m.card.sha256 for n, m in models.digits.members.items()}},
              "enrolled": sorted(set(held.enroll) - set(refused)), "enrollment_refused": refused, "audio_s": round(audio_s, 1), "cpu_s_per_audio_s": cpu_s / audio_s,
              "conditions": {}}
    for c in conditions:
        entry = {"group": c.group, "describe": c.describe(), "seconds": round(built[c.name].seconds, 1)}
        entry.update(score(built[c.name], events.get(c.name, []), set(report["enrolled"])))
        report["conditions"][c.name] = entry
    report["headline"] = headline(report)
    return report


def headline(r: dict) -> dict:
    """The figures the targets name (issue 27): English and Arabic digits named right clean,
    at 10 dB (white, pink, babble) and 0 dB; events in noise-only audio; segmentation errors."""
    cond = r["conditions"]

    def right(name: str, corpus: str):
        c = cond.get(name, {}).get("digits", {}).get(corpus)
        return None if c is None else c["right"]

    out = {}
    for corpus, label in (("fsdd", "english"), ("asc", "arabic")):
        out[f"{label}_clean"] = right("clean", corpus)
        for snr in ("10", "0"):
            vals = [right(f"{n}_{snr}db", corpus) for n in ("white", "pink", "babble")]
            out[f"{label}_{snr}db_worst"] = min((v for v in vals if v is not None), default=None)
    only = [c for c in cond.values() if c["group"] == "noise_only"]
    out["noise_only_events"] = sum(c["segmentation"]["false_utterances"] for c in only)  # each a speaker and a digit event
    out["noise_only_utterances_per_hour_worst"] = max((c["segmentation"]["false_per_hour"] for c in only), default=None)
    for name in ("clean", "white_10db", "pink_10db", "babble_10db"):
        if name in cond and cond[name]["words"]:
            s = cond[name]["segmentation"]
            out[f"merged_or_split_{name}"] = (s["merged"] + s["split"]) / cond[name]["words"]
    return out


def format_report(r: dict) -> str:
    lines = [f"split: {r['split']}; {r['words_per_corpus'] or 'all'} digits per corpus per condition "
             f"(and half as many other words); enrolled: {', '.join(r['enrolled'])}"
             + "".join(f"; {name} refused ({why})" for name, why in r.get("enrollment_refused", {}).items()),
             f"{'condition':<22} {'English right/null/wrong':>25} {'Arabic right/null/wrong':>25} "
             f"{'other->digit':>12} {'missed/merged/split':>20} {'false/h':>8} {'spk right/unk/strangers':>24} "
             f"{'due ms':>7}"]
    for name, c in r["conditions"].items():
        d, s, sp = c["digits"], c["segmentation"], c["speakers"]

        def triple(corpus: str) -> str:
            m = d.get(corpus)
            return "-" if m is None or m["right"] is None else f"{m['right']:.1%}/{m['null']:.1%}/{m['wrong']:.1%}"

        other = d.get("asc", {}).get("other_called_digit")
        seg = f"{s['missed']}/{s['merged']}/{s['split']}" if c["words"] else "-"
        spk = (f"{sp['named_right']:.0%}/{sp['unknown']:.0%}/{sp['strangers_named']:.0%}"
               if sp["named_right"] is not None and sp["strangers_named"] is not None else "-")
        lat = f"{1000 * c['decision_after_speech_s']['p99']:.0f}" if c["decision_after_speech_s"] else "-"
        lines.append(f"{name:<22} {triple('fsdd'):>25} {triple('asc'):>25} "
                     f"{'-' if other is None else f'{other:.1%}':>12} {seg:>20} {s['false_per_hour']:>8.1f} "
                     f"{spk:>24} {lat:>7}")
    h = r["headline"]
    lines.append("headline: " + ", ".join(f"{k} {v:.1%}" if isinstance(v, float) and k != "noise_only_utterances_per_hour_worst"
                                         else f"{k} {v}" for k, v in h.items()))
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    """Per condition: digits named right / null / wrong (English, Arabic), segmentation errors
    per 100 words, false utterances per hour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(r["conditions"])
    y = np.arange(len(names))
    fig, axes = plt.subplots(1, 4, figsize=(18, 0.28 * len(names) + 1.5), sharey=True)
    for ax, corpus, label in ((axes[0], "fsdd", "English digits"), (axes[1], "asc", "Arabic digits")):
        left = np.zeros(len(names))
        for key, color in (("right", "tab:green"), ("null", "tab:gray"), ("wrong", "tab:red")):
            vals = np.array([(r["conditions"][n]["digits"].get(corpus) or {}).get(key) or 0.0 for n in names])
            ax.barh(y, vals, left=left, color=color, label=key)
            left += vals
        ax.set_xlim(0, 1)
        ax.set_title(label)
        ax.legend(loc="lower left", fontsize=7)
    seg = axes[2]
    left = np.zeros(len(names))
    for key, color in (("missed", "tab:gray"), ("merged", "tab:orange"), ("split", "tab:purple")):
        vals = np.array([100 * r["conditions"][n]["segmentation"][key] / max(r["conditions"][n]["words"], 1)
                         for n in names])
        seg.barh(y, vals, left=left, color=color, label=key)
        left += vals
    seg.set_title("words missed / merged / split per 100")
    seg.legend(loc="lower right", fontsize=7)
    axes[3].barh(y, [r["conditions"][n]["segmentation"]["false_per_hour"] for n in names], color="tab:red")
    axes[3].set_title("false utterances per hour of non-speech")
    axes[0].set_yticks(y, names, fontsize=7)
    axes[0].invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
