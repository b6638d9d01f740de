"""``streamd train fusion``: one digit decision from the two model families.

The late-fusion layer (``streamd.models.digits.Fusion``: a weight per family on its log-probabilities
and a bias per class) is fitted on the validation speakers, which neither family was trained
on, by minimising the cross-entropy. On the same speakers each decision (each family alone,
and fused) gets its rejection threshold, and the one identifying most digits there at <= 2%
non-digits accepted becomes ``choice`` (what ``digits.model = "auto"`` uses). The held-out
test speakers only report: the card shows every decision on them, side by side.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import minimize

from streamd.models.digits import Fusion, log_softmax
from streamd.models.cards import load_card, sha256_of
from streamd.train import card, data, scoring
from streamd.train.scoring import accepted, confidence_threshold, corpus_metrics, onnx_logits, softmax

FUSION_CARD = "digits.fusion.json"
MAX_NON_DIGIT = 0.02
# The bias shift spends only half of that budget on the validation speakers: their other words
# come from 4 real speakers, and a shift that spends it all left 3.2% of held-out speakers'
# other words accepted.
SHIFT_NON_DIGIT = MAX_NON_DIGIT / 2
BIAS_L2 = 1e-3
# Gates tried for a cascade, most skipping first: the first one giving every validation clip the
# full fusion's decision is kept.
GATES = (0.9, 0.95, 0.98, 0.99, 0.995, 0.999)


@dataclass
class Options:
    data_dir: Path
    out_dir: Path
    seeds: tuple[int, ...] = (0,)  # fuse the cnn and rnn families trained with each of these seeds
    synth: bool = True
    card_name: str = FUSION_CARD  # another name keeps the daemon's default card as it is
    extra: tuple[str, ...] = ()  # and these members too, by name (e.g. "kd")
    cascade: tuple[str, ...] = ()  # members run only when the others are unsure (e.g. "ge2e")


def member_cards(opts: Options) -> dict[str, Path]:
    names = [scoring.member_name(family, seed) for seed in opts.seeds for family in ("cnn", "rnn")]
    names += [n for n in opts.extra if n not in names]
    return {name: opts.out_dir / scoring.member_file(*scoring.parse_member(name)) for name in names}


def front_end(model_path: Path) -> str:
    """Which of data.FRONT_ENDS a trained digit model reads, from its card."""
    return load_card(model_path.with_suffix(".card.json"), "digits").feature_kind


def fit(member_logits: list[np.ndarray], labels: np.ndarray) -> Fusion:
    """Weights and biases minimising the mean cross-entropy of the fused logits."""
    logp = [log_softmax(z) for z in member_logits]
    k, n_classes = len(logp), logp[0].shape[1]

    def loss(theta: np.ndarray) -> float:
        z = sum(w * lp for w, lp in zip(theta[:k], logp)) + theta[k:]
        return float(-np.mean(log_softmax(z)[np.arange(len(labels)), labels]) + BIAS_L2 * np.sum(theta[k:] ** 2))

    start = np.concatenate((np.full(k, 1.0 / k), np.zeros(n_classes)))
    theta = minimize(loss, start, method="L-BFGS-B", bounds=[(0, 10)] * k + [(-5, 5)] * n_classes).x
    return Fusion(tuple(round(float(w), 6) for w in theta[:k]), tuple(round(float(b), 6) for b in theta[k:]))


def shift_non_digit(fusion: Fusion, member_logits: list[np.ndarray], labels: np.ndarray,
                    max_fa: float = MAX_NON_DIGIT) -> tuple[Fusion, float]:
    """The fused "not a digit" bias moved to where the validation speakers' digits are named
    right most often with <= ``max_fa`` of their other words accepted (each shift with its own
    confidence threshold). Cross-entropy weighs every class alike; the daemon's rule does not:
    a digit it rejects costs as much as the 2% of other words it may let through."""
    best_shift = non_digit_shift(fusion(member_logits), labels, max_fa)
    bias = list(fusion.bias)
    bias[data.NOT_DIGIT] = round(bias[data.NOT_DIGIT] + best_shift, 6)
    return Fusion(fusion.weights, tuple(bias)), best_shift


def non_digit_shift(fused: np.ndarray, labels: np.ndarray, max_fa: float) -> float:
    """The shift of the "not a digit" logit (step 0.1, -4 to 2) naming most digits right with
    <= ``max_fa`` of the other words accepted, each shift at its own confidence threshold."""
    best, best_shift = -1.0, 0.0
    for shift in sorted(np.round(np.arange(-4.0, 2.01, 0.1), 2), key=abs):  # ties: the smallest shift
        z = fused.copy()
        z[:, data.NOT_DIGIT] += shift
        right = confidence_threshold(softmax(z), labels, max_fa)["at_value"]["digit_correct"]
        if right > best + 1e-9:
            best, best_shift = right, float(shift)
    return best_shift


def decisions(members: dict[str, np.ndarray], fusion: Fusion) -> dict[str, np.ndarray]:
    return {**members, "fused": fusion(list(members.values()))}


def run(opts: Options) -> int:
    cards = member_cards(opts)
    missing = [str(p) for p in cards.values() if not p.exists()]
    if missing:
        print(f"streamd train fusion: train every member first; missing {', '.join(missing)}")
        return 2
    front_ends = {name: front_end(path) for name, path in cards.items()}
    # The same clips in the same order for every front end: labels and corpora are shared.
    sets = {fe: data.load_digit_eval_sets(opts.data_dir, 0, opts.synth, fe) for fe in sorted(set(front_ends.values()))}
    validation, test = next(iter(sets.values()))
    val = {name: onnx_logits(path, sets[front_ends[name]][0]) for name, path in cards.items()}
    fusion, shift = shift_non_digit(fit(list(val.values()), validation.labels()), list(val.values()),
                                    validation.labels(), SHIFT_NON_DIGIT)
    tested = decisions({name: onnx_logits(path, sets[front_ends[name]][1]) for name, path in cards.items()}, fusion)
    report, thresholds = {}, {}
    for name, logits in decisions(val, fusion).items():
        t = confidence_threshold(softmax(logits), validation.labels(), MAX_NON_DIGIT)
        thresholds[name] = t["value"]
        validation_figures = t["at_value"] | {
            f"{c}_digits_right": v for c, v in digits_right(logits, validation, t["value"], ("asc", "synth")).items()}
        report[name] = {"validation": validation_figures, "test": held_out_report(tested[name], test, t["value"])}
    choice = max(report, key=lambda n: report[n]["validation"]["digit_correct"])
    cascade = cascade_entry(opts, val, tested, validation, test, fusion, thresholds["fused"]) if opts.cascade else None
    write(opts, cards, fusion, shift, thresholds, report, choice, cascade)
    if opts.card_name == FUSION_CARD:
        card.write_docs(opts.out_dir)
    for name, r in report.items():
        print(f"{name:>6}: validation {r['validation']['digit_correct']:.1%} right at threshold {thresholds[name]:.2f}; "
              f"test {json.dumps(r['test']['at_threshold'])}")
    print(f"choice (auto): {choice}")
    return 0


def decisions_at(logits: np.ndarray, threshold: float) -> np.ndarray:
    pred, accept = accepted(softmax(logits), threshold)
    return np.where(accept, pred, data.NOT_DIGIT)


def cascade_entry(opts: Options, val: dict[str, np.ndarray], tested: dict[str, np.ndarray],
                  validation: data.FeatureSet, test: data.FeatureSet, full: Fusion, threshold: float) -> dict | None:
    """A stage per member of ``opts.cascade``, in order: the members before it fused alone
    (fitted and shifted as the full fusion) with the lowest gate at which the cascade so far,
    where sure, gives every validation clip the full fusion's decision. A stage no gate allows
    is left out (its members then run with the next). None when no stage is kept."""
    first = [n for n in val if n not in opts.cascade]
    wanted = decisions_at(full(list(val.values())), threshold)
    stages: list[dict] = []
    for k in range(len(opts.cascade)):
        members = first + list(opts.cascade[:k])
        fusion, _ = shift_non_digit(fit([val[n] for n in members], validation.labels()), [val[n] for n in members],
                                    validation.labels(), SHIFT_NON_DIGIT)
        stage = {"members": members, "weights": list(fusion.weights), "bias": list(fusion.bias)}
        for gate in GATES:
            z, _ = cascade_logits([*stages, stage | {"gate": gate}], val, full)
            if np.array_equal(decisions_at(z, threshold), wanted):
                stages.append(stage | {"gate": gate})
                break
    if not stages:
        return None
    _, settled = cascade_logits(stages, val, full)
    zt, settled_t = cascade_logits(stages, tested, full)
    return {"stages": stages, "then": list(opts.cascade),
            "rule": "each stage's members' fusion decides where its best class has p >= its gate; elsewhere the "
                    "next stage's members run too, and after the last every member runs and the full fusion "
                    "decides (streamd.models.digits.Cascade)",
            "gate_rule": f"per stage, the lowest of {list(GATES)} giving every validation clip the full fusion's "
                         "decision",
            "validation": {"settled_by_stage": settled, "decisions_differing": 0},
            "test": {"settled_by_stage": settled_t,
                     "decisions_differing": float(np.mean(decisions_at(zt, threshold)
                                                          != decisions_at(tested["fused"], threshold))),
                     **held_out_report(zt, test, threshold)["at_threshold"]}}


def cascade_logits(stages: list[dict], members: dict[str, np.ndarray], full: Fusion) -> tuple[np.ndarray, list[float]]:
    """The cascade's logits for every clip, and the share of clips each stage settles."""
    z = full([members[n] for n in members if n != "fused"])
    open_ = np.ones(len(z), bool)
    shares = []
    for stage in stages:
        zs = Fusion(tuple(stage["weights"]), tuple(stage["bias"]))([members[n] for n in stage["members"]])
        settled = open_ & (softmax(zs).max(axis=1) >= stage["gate"])
        z[settled] = zs[settled]
        open_ &= ~settled
        shares.append(float(settled.mean()))
    return z, shares


def digits_right(logits: np.ndarray, fs: data.FeatureSet, threshold: float, corpora: tuple[str, ...]) -> dict:
    """Per corpus, the share of its digit clips that one decision names right at ``threshold``."""
    probs, labels = softmax(logits), fs.labels()
    corpus = np.array([fs.clips[c].corpus for c in fs.clip_index])
    pred, accept = accepted(probs, threshold)
    right = accept & (pred == labels)
    return {c: float(right[(labels != data.NOT_DIGIT) & (corpus == c)].mean()) for c in corpora}


def held_out_report(logits: np.ndarray, test: data.FeatureSet, threshold: float) -> dict:
    """Held-out figures of one decision: per corpus, and at its validation threshold."""
    at = {f"{c}_digits_right": v for c, v in digits_right(logits, test, threshold, ("fsdd", "asc")).items()}
    pred, accept = accepted(softmax(logits), threshold)
    at["non_digit_accepted"] = float(accept[test.labels() == data.NOT_DIGIT].mean())
    return {"per_corpus": corpus_metrics(logits, test), "at_threshold": at}


def write(opts: Options, cards: dict[str, Path], fusion: Fusion, shift: float, thresholds: dict, report: dict,
          choice: str, cascade: dict | None = None) -> Path:
    fusion_card = {
        "name": "streamd-digits-fusion",
        "kind": "digits-fusion",
        "members": [{"name": name, "card": path.with_suffix(".card.json").name, "sha256": sha256_of(path)}
                    for name, path in cards.items()],
        "rule": "z = bias + sum_k weights[k] * log_softmax(logits_k); z is used as the logits (streamd.models.digits.Fusion)",
        "weights": list(fusion.weights),
        "bias": list(fusion.bias),
        "non_digit_bias_shift": shift,
        "non_digit_bias_rule": "added to the cross-entropy fit's 'not a digit' bias: the shift (step 0.1, "
                               "-4 to 2) naming most validation digits right at <= "
                               f"{SHIFT_NON_DIGIT:.0%} of their other words accepted (streamd.train.fusion.shift_non_digit)",
        "fitted_on": "validation speakers (clean clips): " + ", ".join(
            f"ASC {s}" for s in data.ASC_VALIDATION) + f", {data.SYNTH_VALIDATION_VOICES} espeak-ng voices",
        "min_confidence": thresholds,
        "min_confidence_rule": f"smallest threshold (step 0.01) accepting <= {MAX_NON_DIGIT:.0%} of the validation "
                               "speakers' non-digit words",
        "choice": choice,
        "choice_rule": "the decision naming most validation digits right at its threshold",
        "decisions": report,
        "test_split": "held-out speakers: FSDD theo; ASC val speakers (00000002, 00000007, 00000008, 00000012, "
                      "00000021, 00000025); clean clips, onnxruntime CPU",
        "command": f"streamd train fusion --data {opts.data_dir} --out {opts.out_dir}"
                   + (f" --seeds {' '.join(map(str, opts.seeds))}" if opts.seeds != (0,) else "")
                   + (f" --with {' '.join(opts.extra)}" if opts.extra else "")
                   + (f" --cascade {' '.join(opts.cascade)}" if opts.cascade else "")
                   + (f" --card {opts.card_name}" if opts.card_name != FUSION_CARD else ""),
        "created": dt.date.today().isoformat(),
    }
    if cascade is not None:
        fusion_card["cascade"] = cascade
    path = opts.out_dir / opts.card_name
    path.write_text(json.dumps(fusion_card, indent=2) + "\n")
    return path
