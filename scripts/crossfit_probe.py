"""Would the GE2E digit head gain from the 4 ASC validation speakers' clips? Measured, not shipped
(docs/measurements.md, section "The cascade", paragraph "Nor were heads that also heard the
validation speakers").

Two heads are trained as ``streamd train digits --family ge2e`` trains one, each also on the
augmented clips of half of the ASC validation speakers (~35 min on 2 cores with 12 epochs; kept
under WORK_DIR/crossfit/epochs-N and reused). A validation clip is scored by the head that never heard its
speaker (both, averaged, for the espeak-ng validation voices), so the fusion is still fitted on
scores of unheard voices; the held-out speakers get the heads' mean. The five-model fusion is
then scored as scripts/fusion_probe.py scores it (leave one validation speaker out, and fitted
on all of them for the held-out speakers) with the shipped head, with the two cross-fitted heads,
and with all three; and each head alone on the held-out speakers.

    python scripts/crossfit_probe.py --data ../shared/datasets [--form matrix] [--epochs 1]
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
HALVES = {k: [f"asc/{s}" for s in half] for k, half in
          (("a", data.ASC_VALIDATION[:2]), ("b", data.ASC_VALIDATION[2:]))}


def train_heads(data_dir: Path, epochs: int) -> dict[str, Path]:
    """Head ``k`` trained on the training clips and half ``k`` of the ASC validation speakers,
    exported as the shipped model is; the ONNX paths."""
    out = data.WORK_DIR / "crossfit" / f"epochs-{epochs}"
    paths = {k: out / f"digits-ge2e-{k}.onnx" for k in HALVES}
    if all(p.exists() for p in paths.values()):
        return paths
    out.mkdir(parents=True, exist_ok=True)
    split = data.load_digit_split(data_dir, 0, True, front_end=G.FRONT_END, plan=G.PLAN)
    clips = [c for c in data.real_clips(data_dir) if data.is_validation(c)]
    extra = data.build_features(clips, "digits-valtrain", 0, front_end=G.FRONT_END, plan=G.PLAN)
    common.seed_everything(0)
    encoder = G.FrozenEncoder(G.load_encoder(G.pretrained_path()).lstm)
    states, extra_states = G.encoder_states(encoder, split.train), G.encoder_states(encoder, extra)
    sample = [split.test.item(i) for i in range(0, len(split.test), max(1, len(split.test) // 64))]
    for k, half in HALVES.items():
        keep = np.isin(extra.speakers(), half)
        head = G.train_head(states + [s for s, kept in zip(extra_states, keep) if kept],
                            np.concatenate([split.train.labels(), extra.labels()[keep]]),
                            G.Options(data_dir, out, epochs=epochs))
        print(k, G.export(G.GE2EDigitNet(encoder, head).eval(), paths[k], sample), flush=True)
    return paths


def head_logprobs(paths: dict[str, Path], fs: data.FeatureSet, validation: bool) -> dict[str, np.ndarray]:
    out = {k: log_softmax(scoring.onnx_logits(p, fs)) for k, p in paths.items()}
    if validation:  # each half scored by the head that did not hear it
        for k, half in HALVES.items():
            out[k][np.isin(fs.speakers(), half)] = np.nan
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
    p.add_argument("--epochs", type=int, default=G.Options.epochs, help="per head (a quick check: 1)")
    args = p.parse_args()
    heads = train_heads(args.data, args.epochs)
    cards = F.member_cards(F.Options(args.data, Path("models"), seeds=(0, 1), extra=("ge2e",)))
    paths, ge2e = list(cards.values()), list(cards).index("ge2e")
    others = [i for i in range(len(paths)) if i != ge2e]
    sets = {fe: data.load_digit_eval_sets(args.data, 0, True, fe) for fe in {F.front_end(path) for path in paths}}
    val_sets, test_sets = ({fe: pair[k] for fe, pair in sets.items()} for k in (0, 1))
    val, test = val_sets[G.FRONT_END], test_sets[G.FRONT_END]
    lp, lpt = member_logprobs(paths, val_sets, [1.0]), member_logprobs(paths, test_sets, [1.0])
    y, speaker = val.labels(), np.array(val.speakers())
    corpus = np.array([val.clips[c].corpus for c in val.clip_index])
    hv, ht = head_logprobs(heads, val, True), head_logprobs(heads, test, False)
    for name, z in (("shipped head", lpt[ge2e]), *((f"head {k}", ht[k]) for k in HALVES)):
        alone = scoring.corpus_metrics(z, test)
        print(f"{name} alone, held-out model's choice: " + ", ".join(
            f"{corpus} {m['digit_accuracy_argmax_0_9']:.1%}" for corpus, m in alone.items()), flush=True)
    with_heads = {"shipped head": (lp[ge2e], lpt[ge2e]),
                  "two cross-fitted heads": (unheard_mean(hv["a"], hv["b"]), unheard_mean(ht["a"], ht["b"])),
                  "shipped + two cross-fitted heads": (unheard_mean(lp[ge2e], hv["a"], hv["b"]),
                                                       unheard_mean(lpt[ge2e], ht["a"], ht["b"]))}
    for name, (v, t) in with_heads.items():
        report(name, np.concatenate([lp[others], v[None]]), y, speaker, corpus,
               np.concatenate([lpt[others], t[None]]), test, args.form)


if __name__ == "__main__":
    main()
