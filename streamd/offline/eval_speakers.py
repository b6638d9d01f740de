"""``streamd eval speakers``: open-set identification as the daemon does it, on held-out
speakers: each enrolled from 10 clips, probed with single clips and with ~2-3 s phrases,
scored with the daemon's SpeakerBook scoring (AS-norm, threshold from ``identity.far``).

Reports EER, minDCF, closed-set top-1, and open-set identification at the configured FAR
with each speaker in turn left out of the gallery (its utterances are then strangers), and
draws a DET curve (PNG). Speakers enrol from clean clips; probes are also scored with pink
noise at 10 and 0 dB SNR added before the VAD (as ``streamd eval digits`` does).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

from streamd.offline.eval_digits import NOISY, add_noise
from streamd.offline.evaluate import Clip, eer, error_rates, held_out_clips, open_set_rates
from streamd.signal.features import features_of_audio
from streamd.identity.scoring import Enrolled, l2_normalize, quality_measures
from streamd.identity.speakers import SpeakerBook
from streamd.signal.vad import utterance_audio

ENROLL_CLIPS = 10
PHRASE_CLIPS = 3  # 3 words or 1-s keywords: about 2-3 s of speech


def min_dcf(scores: np.ndarray, same: np.ndarray, p_target: float = 0.01) -> float:
    """Normalised minimum detection cost (C_miss = C_fa = 1)."""
    _, far, frr = error_rates(scores, same)
    fa, miss = np.concatenate(([0.0], far)), np.concatenate(([1.0], frr))  # and: accept nothing
    cost = p_target * miss + (1 - p_target) * fa
    return float(cost.min() / min(p_target, 1 - p_target))


def clip_cut(clip: Clip, cfg, snr_db: float | None = None, seed: int = 0) -> np.ndarray:
    audio, _ = sf.read(clip.path, dtype="int16")
    if snr_db is not None:
        audio = add_noise(audio, utterance_audio(audio, cfg.vad), snr_db, np.random.default_rng(seed))
    return utterance_audio(audio, cfg.vad)


def features(book: SpeakerBook, audio: np.ndarray) -> np.ndarray:
    p = book.model.params
    return features_of_audio(audio, p)


def probe(book: SpeakerBook, name: str, audio: np.ndarray) -> tuple[str, np.ndarray, float]:
    """A probe as the daemon scores it: whose it is, its embedding, its length in seconds."""
    feats = features(book, audio)
    return name, book.model.run(feats), book.seconds_of(feats)


def trials(book: SpeakerBook, clips: list[Clip], clean: list[np.ndarray], cuts: list[np.ndarray],
           seed: int = 0, phrase_clips: int = PHRASE_CLIPS) -> dict:
    """Enrolment from the ``clean`` cuts, joined as the daemon joins a speaker's enrollments;
    probes (the other clips, alone and as phrases) from ``cuts`` (the same, or the clips in noise)."""
    rng = np.random.default_rng(seed)
    names = sorted({c.speaker for c in clips})
    spk = np.array([c.speaker for c in clips])
    enrolled, singles, phrases = {}, [], []
    for name in names:
        idx = rng.permutation(np.flatnonzero(spk == name))
        enrolled[name] = book.voice_of([features(book, clean[i]) for i in idx[:ENROLL_CLIPS]])[None]
        rest = idx[ENROLL_CLIPS:]
        singles += [probe(book, name, cuts[i]) for i in rest]
        for k in range(0, len(rest) - phrase_clips + 1, phrase_clips):
            phrases.append(probe(book, name, np.concatenate([cuts[i] for i in rest[k : k + phrase_clips]])))
    return {"names": names, "enrolled": enrolled, "single": singles, "phrase": phrases, "phrase_clips": phrase_clips}


def trial_measures(book: SpeakerBook, gallery: Enrolled, probes: list[tuple[str, np.ndarray, float]]) -> np.ndarray:
    """Each probe's quality measures against each enrolled speaker (probes, speakers, measures)
    as the daemon forms them; the first is the AS-norm score."""
    e = l2_normalize(np.stack([v for _, v, _ in probes]))
    raw = e @ gallery.centroids.T
    stats = book.scorer.stats(e)
    return np.stack([quality_measures(raw[i], stats[i], gallery.stats, book.windows_in(seconds))
                     for i, (_, _, seconds) in enumerate(probes)])


def figures(scores: np.ndarray, truth: np.ndarray, threshold_for_gallery) -> dict:
    same = truth[:, None] == np.arange(scores.shape[1])[None, :]
    rate, _, _ = eer(scores.ravel(), same.ravel())
    named, strangers = open_set_rates(scores, truth, threshold_for_gallery)
    return {"eer": rate, "min_dcf_p0.01": min_dcf(scores.ravel(), same.ravel()),
            "closed_set_top1": float(np.mean(np.argmax(scores, axis=1) == truth)),
            "open_set_identified": named, "open_set_strangers_named": strangers,
            "at_1pct_strangers_named": operating_point(scores, truth, 0.01)}


def report(book: SpeakerBook, t: dict) -> dict:
    """The daemon's figures per kind of probe; with a quality fusion, the AS-norm score's alone
    too (``as_norm_alone``, at its own tables), so each is seen on the same trials."""
    names = t["names"]
    gallery = Enrolled.build(t["enrolled"], book.scorer)
    out = {}
    for kind in ("single", "phrase"):
        probes = t[kind]
        if not probes:
            continue
        measures = trial_measures(book, gallery, probes)
        scores = book.scorer.from_measures(measures)
        truth = np.array([names.index(n) for n, _, _ in probes])
        seconds = np.array([t for _, _, t in probes])
        same = truth[:, None] == np.arange(len(names))[None, :]
        out[kind] = {"probes": len(probes), **figures(scores, truth, lambda n: book.threshold_for(n, seconds=seconds)),
                     "_scores": scores.ravel(), "_same": same.ravel()}
        if book.scorer.fusion is not None:
            out[kind]["as_norm_alone"] = figures(measures[..., 0], truth, lambda n: book.threshold_in(
                book.cluster_calibration, n, seconds=seconds))
    return {"speakers": len(names), "enroll_clips": ENROLL_CLIPS, "phrase_clips": t["phrase_clips"],
            "far": book.far, "calibrated": book.calibration is not None, "score": score_kind(book), **out}


def score_kind(book: SpeakerBook) -> str:
    if book.calibration is None:
        return "cosine threshold"
    return "AS-norm fused with quality measures" if book.scorer.fusion is not None else "AS-norm calibrated"


def det_plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.stats import norm

    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    for kind, label in (("single", "single words"), ("phrase", f"{result['phrase_clips']}-clip phrases")):
        if kind not in result:
            continue
        s, y = result[kind]["_scores"], result[kind]["_same"]
        _, far, frr = error_rates(s, y)
        fa, miss = np.clip(far, 1e-4, 1 - 1e-4), np.clip(frr, 1e-4, 1 - 1e-4)
        ax.plot(norm.ppf(fa), norm.ppf(miss), label=f"{label} (EER {result[kind]['eer']:.1%})")
    ticks = [0.001, 0.01, 0.05, 0.2, 0.5]
    ax.set_xticks(norm.ppf(ticks), [f"{t:.1%}" for t in ticks])
    ax.set_yticks(norm.ppf(ticks), [f"{t:.1%}" for t in ticks])
    ax.set_xlim(norm.ppf(5e-4), norm.ppf(0.6))
    ax.set_ylim(norm.ppf(5e-4), norm.ppf(0.6))
    ax.set_xlabel("false accept rate")
    ax.set_ylabel("miss rate")
    ax.set_title(f"DET, {result['speakers']} held-out speakers, enrolled from {ENROLL_CLIPS} clips")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def operating_point(scores: np.ndarray, truth: np.ndarray, strangers_at_most: float) -> dict:
    """The DET curve read at the lowest threshold that names at most ``strangers_at_most`` of
    strangers (read off these scores: a measurement, not a setting the daemon can know)."""
    thresholds = np.unique(scores.ravel())
    lo, hi = 0, len(thresholds) - 1  # strangers named falls as the threshold rises: bisect
    while lo < hi:
        mid = (lo + hi) // 2
        if open_set_rates(scores, truth, lambda n: thresholds[mid])[1] <= strangers_at_most:
            hi = mid
        else:
            lo = mid + 1
    named, strangers = open_set_rates(scores, truth, lambda n: thresholds[lo])
    return {"threshold": float(thresholds[lo]), "identified": named, "strangers_named": strangers}


def public(result: dict) -> dict:
    """The report without the raw score arrays."""
    return {k: ({kk: vv for kk, vv in v.items() if not kk.startswith("_")} if isinstance(v, dict) else v)
            for k, v in result.items()}


def evaluate_speakers(data: Path, cfg, book: SpeakerBook, noisy: tuple[float, ...] = NOISY,
                      phrase_clips: int = PHRASE_CLIPS) -> dict:
    """``phrase_clips``: how many clips make a phrase probe (3: ~2-3 s; more for long utterances)."""
    clips = held_out_clips(data)
    clean = [clip_cut(c, cfg) for c in clips]
    result = report(book, trials(book, clips, clean, clean, phrase_clips=phrase_clips))
    result["noisy_probes"] = {}
    for snr in noisy:
        noisy_cuts = [clip_cut(c, cfg, snr, n) for n, c in enumerate(clips)]
        t = trials(book, clips, clean, noisy_cuts, phrase_clips=phrase_clips)
        result["noisy_probes"][f"snr_{snr:g}db"] = public(report(book, t))
    return result


def format_report(r: dict) -> str:
    lines = [f"{r['speakers']} held-out speakers, each enrolled from {r['enroll_clips']} clips; "
             f"identity.far {r['far']} ({r.get('score', 'AS-norm calibrated' if r['calibrated'] else 'cosine threshold')})"]
    for kind, label in (("single", "single clips"), ("phrase", f"{r['phrase_clips']}-clip phrases")):
        if kind in r:
            m = r[kind]
            lines.append(f"{label} ({m['probes']} probes): EER {m['eer']:.1%}, minDCF(0.01) {m['min_dcf_p0.01']:.3f}, "
                         f"closed-set top-1 {m['closed_set_top1']:.1%}, open-set identified {m['open_set_identified']:.1%} "
                         f"with {m['open_set_strangers_named']:.1%} of strangers named; at the threshold naming "
                         f"<= 1% of strangers {m['at_1pct_strangers_named']['identified']:.1%} identified")
            if a := m.get("as_norm_alone"):
                lines.append(f"  AS-norm score alone: EER {a['eer']:.1%}, closed-set top-1 {a['closed_set_top1']:.1%}, "
                             f"open-set identified {a['open_set_identified']:.1%} with "
                             f"{a['open_set_strangers_named']:.1%} of strangers named")
    for name, n in r.get("noisy_probes", {}).items():
        cells = [f"{kind} EER {n[kind]['eer']:.1%}, top-1 {n[kind]['closed_set_top1']:.1%}, identified "
                 f"{n[kind]['open_set_identified']:.1%} ({n[kind]['open_set_strangers_named']:.1%} strangers named)"
                 for kind in ("single", "phrase") if kind in n]
        lines.append(f"probes at {name}: " + "; ".join(cells))
    return "\n".join(lines)
