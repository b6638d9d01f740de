"""Would the GE2E digit head gain from the 4 ASC validation speakers' clips? Measured, not shipped
(docs/measurements.md, section "The cascade", paragraph "Nor were heads that also heard the
validation speakers").

Two heads are trained as ``streamd train digits --family ge2e`` trains one, each also on the
augmented clips of half of the ASC validation speakers (~35 min on 2 cores with 12 epochs; kept
under WORK_DIR/crossfit/epochs-N and reused). A validation clip is scored by the head that never heard its
speaker (both, averaged, for the espeak-ng validation voices), so the fusion is still fitted on
scores of unheard voices; the held-out speakers get the heads' mean. The five-model fusion is
then scored as scripts/experiments/fusion_probe.py scores it (leave one validation speaker out, and fitted
on all of them for the held-out speakers) with the shipped head, with the two cross-fitted heads,
and with all three; and each head alone on the held-out speakers.

    python scripts/experiments/crossfit_probe.py --data ../shared/datasets [--form matrix] [--epochs 1]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import streamd  # noqa: F401  (before numpy: sets the thread defaults)
import numpy as np

import streamd.train.fusion as F
from fusion_probe import best_at, fitted, member_logprobs
from streamd.models.digits import log_softmax
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


@dataclass
class Members:
    """The shipped fusion members' log-probabilities (members, clips, 11) on the validation
    clips (``lp``) and the held-out ones (``lpt``), with what scoring them needs."""

    lp: np.ndarray
    lpt: np.ndarray
    val: data.FeatureSet
    test: data.FeatureSet
    ge2e: int

    def report(self, name: str, ge2e_val: list[np.ndarray], ge2e_test: list[np.ndarray], form: str) -> None:
        """The fusion with the shipped GE2E member replaced by ``ge2e_*`` (one or more members)."""
        others = [i for i in range(len(self.lp)) if i != self.ge2e]
        y, speaker = self.val.labels(), np.array(self.val.speakers())
        corpus = np.array([self.val.clips[c].corpus for c in self.val.clip_index])
        report(name, np.concatenate([self.lp[others], ge2e_val]), y, speaker, corpus,
               np.concatenate([self.lpt[others], ge2e_test]), self.test, form)


def shipped_members(data_dir: Path) -> Members:
    cards = F.member_cards(F.Options(data_dir, Path("models"), seeds=(0, 1), extra=("ge2e",)))
    paths = list(cards.values())
    sets = {fe: data.load_digit_eval_sets(data_dir, 0, True, fe) for fe in {F.front_end(path) for path in paths}}
    val_sets, test_sets = ({fe: pair[k] for fe, pair in sets.items()} for k in (0, 1))
    return Members(member_logprobs(paths, val_sets, [1.0]), member_logprobs(paths, test_sets, [1.0]),
                   val_sets[G.FRONT_END], test_sets[G.FRONT_END], list(cards).index("ge2e"))


def print_alone(test: data.FeatureSet, logprobs: dict[str, np.ndarray]) -> None:
    for name, z in logprobs.items():
        alone = scoring.corpus_metrics(z, test)
        print(f"{name} alone, held-out model's choice: " + ", ".join(
            f"{corpus} {m['digit_accuracy_argmax_0_9']:.1%}" for corpus, m in alone.items()), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--form", choices=("weights", "matrix"), default="weights", help="as in fusion_probe.py")
    p.add_argument("--epochs", type=int, default=G.Options.epochs, help="per head (a quick check: 1)")
    args = p.parse_args()
    heads = train_heads(args.data, args.epochs)
    m = shipped_members(args.data)
    hv, ht = head_logprobs(heads, m.val, True), head_logprobs(heads, m.test, False)
    print_alone(m.test, {"shipped head": m.lpt[m.ge2e], **{f"head {k}": ht[k] for k in HALVES}})
    with_heads = {"shipped head": (m.lp[m.ge2e], m.lpt[m.ge2e]),
                  "two cross-fitted heads": (unheard_mean(hv["a"], hv["b"]), unheard_mean(ht["a"], ht["b"])),
                  "shipped + two cross-fitted heads": (unheard_mean(m.lp[m.ge2e], hv["a"], hv["b"]),
                                                       unheard_mean(m.lpt[m.ge2e], ht["a"], ht["b"]))}
    for name, (v, t) in with_heads.items():
        m.report(name, [v], [t], args.form)


if __name__ == "__main__":
    main()
