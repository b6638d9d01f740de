"""``streamd eval digits``: the digit model on held-out speakers, clean and in noise.

Each clip goes through the daemon's path (VAD cut, features, ONNX, the daemon's decision rule
with ``digits.min_confidence``). A clip the VAD finds no speech in counts as said nothing
(``not_heard``); the model's choice is still scored on the clip whole. Noisy conditions add
noise to the whole recorded clip before any of that, at a signal-to-noise ratio measured
against the clip's speech (the VAD-cut part), so the VAD has to find the word in the noise as
it would live.

With a fusion card, every model family alone and the fused decision are scored on the same
clips (each at its own threshold chosen on validation speakers); ``conditions`` is the
decision the daemon uses (``digits.model``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

from streamd.config import Config
from streamd.models.digits import softmax
from streamd.offline.evaluate import NOT_A_DIGIT, Clip, daemon_answers, digit_lines, digit_report, held_out_clips
from streamd.models.inference import DigitModels
from streamd.audio.stream_audio import pink
from streamd.signal.vad import heard_utterance, utterance_audio

NOISY = (10.0, 0.0)  # SNR in dB
CONDITIONS = ("clean", *NOISY)


def add_noise(audio: np.ndarray, speech: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """``audio`` (int16) plus pink noise whose power is ``snr_db`` below the power of ``speech``."""
    speech_power = float(np.mean(speech.astype(np.float64) ** 2)) if len(speech) else 0.0
    noise = pink(len(audio), rng) * np.sqrt(speech_power / 10 ** (snr_db / 10))
    return np.clip(np.round(audio + noise), -32768, 32767).astype(np.int16)


def clip_logits(clip: Clip, cfg: Config, digits: DigitModels, snr_db: float | None,
                seed: int) -> tuple[list[np.ndarray], bool]:
    """Each member model's logits for one clip (features computed once), and whether the VAD
    heard the word (if not, the logits are of the clip whole)."""
    audio, rate = sf.read(clip.path, dtype="int16")
    assert rate == 16000, clip.path
    if snr_db is not None:
        audio = add_noise(audio, utterance_audio(audio, cfg.vad), snr_db, np.random.default_rng(seed))
    speech, heard = heard_utterance(audio, cfg.vad)
    feats = digits.features_of(speech)
    return [m.run(feats[m.params]) for m in digits.members.values()], heard


def variants(digits: DigitModels, outputs: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Logits of every decision on offer: each member alone, and fused when there is a fusion."""
    out = dict(zip(digits.members, outputs))
    if digits.fusion is not None:
        out["fused"] = digits.combine(outputs)  # the cascade's decision when the card has one
    return out


def clip_rows(condition: str, clips: list[Clip], logits: np.ndarray, min_conf: float,
              heard: np.ndarray, root: Path) -> list[dict]:
    """One row per clip: what was said, the daemon's answer (empty: said nothing), the model's
    choice among all 11 classes with its probability, and the "not a digit" probability."""
    rows = []
    for clip, row, answer, h in zip(clips, logits, daemon_answers(logits, min_conf, heard), heard):
        p = softmax(row)
        rows.append({"condition": condition, "corpus": clip.corpus, "speaker": clip.speaker,
                     "path": str(clip.path.relative_to(root)), "said": "" if clip.digit is None else clip.digit,
                     "answer": "" if answer == NOT_A_DIGIT else int(answer), "choice": int(np.argmax(p)),
                     "p_choice": round(float(p.max()), 4), "p_not_digit": round(float(p[NOT_A_DIGIT]), 4),
                     "heard": bool(h)})
    return rows


def evaluate_digits(data: Path, cfg: Config, digits: DigitModels, in_use: str, conditions=CONDITIONS,
                    progress=None, rows: list[dict] | None = None) -> dict:
    """``digits`` holds every member (and the fusion); ``in_use`` names the daemon's choice.
    ``rows``, if given, gets the decision in use's answer for every clip (clip_rows)."""
    clips = held_out_clips(data)
    out: dict = {"split": "held-out speakers: FSDD theo; ASC speakers of the authors' val split",
                 "models": {name: m.card.sha256 for name, m in digits.members.items()}, "in_use": in_use,
                 "noise": "pink, added to the whole clip, SNR against the clip's VAD-cut speech", "variants": {}}
    for condition in conditions:
        snr = None if condition == "clean" else float(condition)
        by_variant: dict[str, list[np.ndarray]] = {}
        heard = np.zeros(len(clips), bool)
        for n, clip in enumerate(clips):
            outputs, heard[n] = clip_logits(clip, cfg, digits, snr, seed=n)
            for name, logits in variants(digits, outputs).items():
                by_variant.setdefault(name, []).append(logits)
            if progress is not None:
                progress(str(condition), n + 1, len(clips))
        name = "clean" if snr is None else f"snr_{snr:g}db"
        for variant, rows_of_logits in by_variant.items():
            logits = np.stack(rows_of_logits)
            threshold = digits.min_confidence(cfg.digits.min_confidence, variant)
            entry = out["variants"].setdefault(variant, {"min_confidence": threshold, "conditions": {}})
            entry["conditions"][name] = digit_report(clips, logits, threshold, heard)
            if rows is not None and variant == in_use:
                rows += clip_rows(name, clips, logits, threshold, heard, data)
    out["min_confidence"] = out["variants"][in_use]["min_confidence"]
    out["conditions"] = out["variants"][in_use]["conditions"]
    return out


def comparison(r: dict) -> list[str]:
    """One line per condition and corpus: each decision's accuracy (daemon's rule) side by side."""
    if len(r["variants"]) < 2:
        return []
    lines = ["each decision alone (daemon's rule, own threshold): " + ", ".join(
        f"{v} (>= {e['min_confidence']:.2f})" for v, e in r["variants"].items())]
    for name in r["conditions"]:
        for corpus, label in (("fsdd", "English"), ("asc", "Arabic")):
            cells = [f"{v} {e['conditions'][name][corpus]['accuracy_with_rejection']:.1%}"
                     for v, e in r["variants"].items() if corpus in e["conditions"][name]]
            if cells:
                lines.append(f"{name:>10} {label}: " + " | ".join(cells))
        cells = [f"{v} {e['conditions'][name]['non_digit_called_digit']['rate']:.1%}"
                 for v, e in r["variants"].items() if e["conditions"][name]["non_digit_called_digit"]["rate"] is not None]
        if cells:
            lines.append(f"{name:>10} other words called a digit: " + " | ".join(cells))
    return lines


def format_report(r: dict) -> str:
    lines = [f"split: {r['split']}; noise: {r['noise']}",
             f"decision in use: {r['in_use']} (min_confidence {r['min_confidence']:.2f})"]
    for name, c in r["conditions"].items():
        lines += digit_lines(c, f"{name:>10} ")
    return "\n".join(lines + comparison(r))


def confusion_plot(r: dict, path: Path) -> None:
    """One confusion matrix per condition and corpus (rows: digit said; columns: the daemon's
    answer, the last one `null`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    corpora = [c for c in ("fsdd", "asc") if any(c in cond for cond in r["conditions"].values())]
    names = list(r["conditions"])
    fig, axes = plt.subplots(len(corpora), len(names), figsize=(3.4 * len(names), 3.4 * len(corpora)), squeeze=False)
    for row, corpus in enumerate(corpora):
        for col, name in enumerate(names):
            ax, m = axes[row][col], r["conditions"][name].get(corpus)
            if m is None:
                ax.axis("off")
                continue
            matrix = np.array(m["confusion_with_rejection"])
            ax.imshow(matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1), cmap="Blues", vmin=0, vmax=1)
            ax.set_title(f"{'English' if corpus == 'fsdd' else 'Arabic'}, {name}: "
                         f"{m['accuracy_with_rejection']:.0%} right", fontsize=9)
            ax.set_xticks(range(11), [str(d) for d in range(10)] + ["null"], fontsize=7)
            ax.set_yticks(range(10), [str(d) for d in range(10)], fontsize=7)
            ax.set_xlabel("daemon said", fontsize=8)
            ax.set_ylabel("digit spoken", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
