"""Compare AS-norm cohorts for the speaker model on the calibration's own trials: every pair of
the 21 training speakers left out of back end and cohort in turn, phrases scored as the daemon
scores them. Prints, per cohort, the share of target phrases missed at a per-trial false-accept
rate of 0.17% (identity.far 1% split over 6 enrolled speakers), with clean probes and with
probes in 10 dB pink noise (speakers enrolled clean), thresholds from the clean trials.

Needs the [train] extra; reuses (or fills) the per-window cache of `streamd train speaker`.
Run from the repo root: python scripts/experiments/speaker_cohorts.py --data ../shared/datasets  (~15 min
with that cache). --top-k K [K ...]: the shipped cohort only, AS-norm over each K closest
cohort vectors instead of the daemon's 100."""

import argparse
import functools
import itertools
import tempfile
from pathlib import Path

import numpy as np

from streamd.offline.eval_digits import add_noise
from streamd.train import data
from streamd.train import speaker_encoder as se
from streamd.signal.vad import VadParams, utterance_audio

FAR = 0.0017


def probe_in_noise(audio: np.ndarray, index: int) -> np.ndarray:
    """As `streamd eval speakers` adds noise: pink, 10 dB below the speech."""
    return add_noise(audio, utterance_audio(audio, VadParams()), 10.0, np.random.default_rng(index))


def noisy_copy(audio: np.ndarray, index: int) -> np.ndarray:
    """A cohort copy in white, pink or brown noise at 0-20 dB SNR."""
    rng = np.random.default_rng([7, index])
    speech = utterance_audio(audio, VadParams()).astype(np.float64)
    power = float(np.mean(speech**2)) if len(speech) else 0.0
    noise = data.colored_noise(len(audio), rng) * np.sqrt(power / 10 ** (rng.uniform(0, 20) / 10))
    return data.to_int16(audio + noise)


def missed(base: list[dict], nap_sets: list[dict], cohort_sets: list[dict], noisy: dict, per: int,
           top_k: int = se.TOP_K) -> tuple:
    names = sorted(set(base[0]["names"]))
    scores = {"impostor": [], "target": [], "noisy target": []}
    for pair in itertools.combinations(names, 2):
        rest = set(names) - set(pair)
        proj = se.fit_nap(*se.windows_of(nap_sets, rest))
        cohort = se.make_cohort(cohort_sets, rest, proj, per=per)
        for t, kinds in ((base[0], ("impostor", "target")), (noisy, (None, "noisy target"))):
            s, truth = se.trial_scores(t, list(pair), proj, cohort, "phrase", top_k)
            same = truth[:, None] == np.arange(s.shape[1])[None, :]
            if kinds[0]:
                scores[kinds[0]].append(s[~same])
            scores[kinds[1]].append(s[same])
    imp, tgt, ntgt = (np.concatenate(scores[k]) for k in ("impostor", "target", "noisy target"))
    threshold = np.quantile(imp, 1 - FAR)
    return float(np.mean(tgt < threshold)), float(np.mean(ntgt < threshold))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/datasets"))
    ap.add_argument("--top-k", type=int, nargs="+", help="score the shipped cohort with each of these top_k")
    args = ap.parse_args()
    weights = se.pretrained_path()
    key = se.cache_key(weights, args.data, int8=True)
    cache = data.WORK_DIR / "speaker-ge2e"
    tmp = Path(tempfile.mkdtemp())
    raw = functools.cache(lambda: se.window_model(se.load_encoder(weights), tmp, int8=True))
    train = se.training_clips(args.data)

    def sets(name: str, copy=None, clips=train) -> dict:
        return se.cached_sets(cache, f"{name}-{key}", lambda: se.speaker_sets(raw(), clips, copy))

    base = [sets("train"), sets("train-band", se.band_copy, [c for c in train if c.corpus == "asc"])]
    speeds = (0.9, 1.1) if args.top_k else (0.9, 1.1, 0.85, 1.15, 0.95, 1.05)
    channel, slow, fast, *others = se.copy_sets(cache, key, raw, train, speeds)
    noisy_probes = sets("train-noisyprobe10", probe_in_noise)
    noisy = {**noisy_probes, "enrolled": base[0]["enrolled"]}  # enrolled from clean clips
    shipped = base + [channel, slow, fast]
    if args.top_k:
        rows = [(f"shipped, top_k {k}" + (" (the daemon's)" if k == se.TOP_K else ""), base, shipped, 40, k)
                for k in args.top_k]
    else:
        slower, faster, nearslow, nearfast = others
        rows = [(label, nap, coh, per, se.TOP_K) for label, nap, coh, per in [
            ("clips + band-limited copies (before)", base, base, 40),
            ("the same, 60 instead of 40 per speaker", base, base, 60),
            ("+ random-channel copies", base, base + [channel], 40),
            ("+ channel copies, NAP fitted on them too", base + [channel], base + [channel], 40),
            ("+ channel copies + speeds 0.9, 1.1 (shipped)", base, shipped, 40),
            ("shipped + speeds 0.85, 1.15", base, shipped + [slower, faster], 40),
            ("shipped + speeds 0.95, 1.05", base, shipped + [nearslow, nearfast], 40),
            ("shipped + noisy copies (0-20 dB)", base, shipped + [sets("train-noisycohort", noisy_copy)], 40),
        ]]
    print(f"| cohort | clean phrases missed at {FAR:.2%} per trial | 10 dB phrases missed |")
    print("| --- | --- | --- |")
    for label, nap_sets, cohort_sets, per, top_k in rows:
        clean, in_noise = missed(base, nap_sets, cohort_sets, noisy, per, top_k)
        print(f"| {label} | {clean:.1%} | {in_noise:.1%} |", flush=True)


if __name__ == "__main__":
    main()
