"""Would the GE2E digit head gain from the 4 ASC validation speakers' clips? Measured, not shipped
(docs/measurements.md, "A second GE2E head, cross-fitted heads").

Two heads are trained as ``streamd train digits --family ge2e`` trains one, each also on the
augmented clips of half of the ASC validation speakers (~35 min on 2 cores; kept under
WORK_DIR/crossfit and reused). A validation clip is scored by the head that never heard its
speaker (both, averaged, for the espeak-ng validation voices), so the fusion is still fitted on
scores of unheard voices; the held-out speakers get the heads' mean. The five-model fusion is
then scored as scripts/fusion_probe.py scores it (leave one validation speaker out, and fitted
on all of them for the held-out speakers) with the shipped head, with the two cross-fitted heads,
and with all three.

    python scripts/crossfit_probe.py --data ../shared/datasets [--form matrix]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import streamd  # noqa: F401  (before numpy: sets the thread defaults)
import numpy as np

import streamd.train.fusion as F
from fusion_probe import best_at, fitted, member_logprobs
from streamd.digits import log_softmax
from streamd.train import common, data, scoring
from streamd.train import digits_ge2e as G

ND = data.NOT_DIGIT
HALVES = {"a": data.ASC_VALIDATION[:2], "b": data.ASC_VALIDATION[2:]}
OUT = data.WORK_DIR / "crossfit"


def train_heads(data_dir: Path, split: data.DigitSplit) -> dict[str, Path]:
    """Head ``k`` trained on the training clips and half ``k`` of the ASC validation speakers,
    exported as the shipped model is; the ONNX paths."""
    paths = {k: OUT / f"digits-ge2e-{k}.onnx" for k in HALVES}
    if all(p.exists() for p in paths.values()):
        return paths
    OUT.mkdir(parents=True, exist_ok=True)
    clips = [c for c in data.real_clips(data_dir) if data.is_validation(c)]
    extra = data.build_features(clips, "digits-valtrain", 0, front_end=G.FRONT_END, plan=G.PLAN)
    common.seed_everything(0)
    encoder = G.FrozenEncoder(G.load_encoder(G.pretrained_path()).lstm)
    states, extra_states = G.encoder_states(encoder, split.train), G.encoder_states(encoder, extra)
    speaker = np.array([s.split("/")[1] for s in extra.speakers()])
    sample = [split.test.item(i) for i in range(0, len(split.test), max(1, len(split.test) // 64))]
    for k, half in HALVES.items():
        keep = np.isin(speaker, half)
        head = G.train_head(states + [s for s, kept in zip(extra_states, keep) if kept],
                            np.concatenate([split.train.labels(), extra.labels()[keep]]),
                            G.Options(data_dir, OUT))
        print(k, G.export(G.GE2EDigitNet(encoder, head).eval(), paths[k], sample), flush=True)
    return paths


def head_logprobs(paths: dict[str, Path], sets: dict[str, data.FeatureSet], validation: bool) -> dict[str, np.ndarray]:
    fs = sets[G.FRONT_END]
    out = {k: log_softmax(scoring.onnx_logits(p, fs)) for k, p in paths.items()}
    if validation:  # each half scored by the head that did not hear it
        speaker = np.array([s.split("/")[-1] for s in fs.speakers()])
        for k, half in HALVES.items():
            out[k][np.isin(speaker, half)] = np.nan
    return out


def unheard_mean(*lps: np.ndarray) -> np.ndarray:
    """Per clip, the mean of the heads that did not hear its speaker (NaN rows: heard)."""
    return log_softmax(np.nanmean(np.stack(lps), axis=0))


def report(name: str, lp: np.ndarray, y: np.ndarray, speaker: np.ndarray, corpus: np.ndarray,
           lpt: np.ndarray, test: data.FeatureSet, form: str) -> None:
    z = np.empty(lp.shape[1:])
    for s in np.unique(speaker):
        fuse, _ = fitted(form, 0.03, lp[:, speaker != s], y[speaker != s])
        z[speaker == s] = log_softmax(fuse(lp[:, speaker == s]))
    fuse, threshold = fitted(form, 0.03, lp, y)
    at = F.held_out_report(fuse(lpt), test, threshold)["at_threshold"]
    print(f"{name}, {form} fusion: validation, leave one speaker out, named at <= 1% of other words: "
          "{:.1%} (ASC {:.1%}); held-out: ".format(*best_at(z, y, corpus, 0.01))
          + ", ".join(f"{k} {v:.1%}" for k, v in at.items()), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--form", choices=("weights", "matrix"), default="weights", help="as in fusion_probe.py")
    args = p.parse_args()
    split = data.load_digit_split(args.data, 0, True, front_end=G.FRONT_END, plan=G.PLAN)
    heads = train_heads(args.data, split)
    paths = list(F.member_cards(F.Options(args.data, Path("models"), seeds=(0, 1), extra=("ge2e",))).values())
    sets = {fe: data.load_digit_eval_sets(args.data, 0, True, fe) for fe in {F.front_end(path) for path in paths}}
    val_sets, test_sets = ({fe: pair[k] for fe, pair in sets.items()} for k in (0, 1))
    val, test = val_sets[G.FRONT_END], test_sets[G.FRONT_END]
    lp, lpt = member_logprobs(paths, val_sets, [1.0]), member_logprobs(paths, test_sets, [1.0])
    y, speaker = val.labels(), np.array(val.speakers())
    corpus = np.array([s.split("/")[0] for s in speaker])
    hv, ht = head_logprobs(heads, val_sets, True), head_logprobs(heads, test_sets, False)
    with_heads = {"shipped head": (lp[4], lpt[4]),
                  "two cross-fitted heads": (unheard_mean(hv["a"], hv["b"]), unheard_mean(ht["a"], ht["b"])),
                  "shipped + two cross-fitted heads": (unheard_mean(lp[4], hv["a"], hv["b"]),
                                                       unheard_mean(lpt[4], ht["a"], ht["b"]))}
    for name, (v, t) in with_heads.items():
        report(name, np.concatenate([lp[:4], v[None]]), y, speaker, corpus,
               np.concatenate([lpt[:4], t[None]]), test, args.form)


if __name__ == "__main__":
    main()
