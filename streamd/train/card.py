"""Model cards (``<model>.card.json``) and the human summary in ``docs/models.md``."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from streamd.signal.features import FeatureParams
from streamd.models.cards import sha256_of
from streamd.train import data, scoring
from streamd.signal.vad import VadParams

SPLIT_TEXT = (
    "Speaker-disjoint, fixed: FSDD speaker 'theo' is held out (train: jackson, nicolas, "
    "yweweler); ASC speakers whose manifest split is 'val' (00000002, 00000007, 00000008, "
    "00000012, 00000021, 00000025) are held out (train: the 18 'train' speakers). Synthetic "
    "espeak-ng speech is used for training only. All metrics are on clean held-out clips, "
    "computed with the exported ONNX model in onnxruntime (CPU), features made by "
    "streamd.signal.vad.utterance_audio + streamd.signal.features.feature_frames/normalize as in the daemon."
)


DIGITS_SPLIT_TEXT = (
    "Speaker-disjoint, three ways. Test (every reported figure): FSDD speaker 'theo' and the ASC "
    "speakers of the authors' 'val' split (00000002, 00000007, 00000008, 00000012, 00000021, "
    "00000025). Validation (fits the rejection threshold and the late-fusion layer; never "
    "trained on): ASC 'train' speakers 00000006, 00000016, 00000022, 00000030 and 10 espeak-ng "
    "voices. Training: FSDD jackson, nicolas, yweweler, the other 14 ASC 'train' speakers, and "
    "80 espeak-ng voices. Synthetic speech is never reported on. Metrics are computed with "
    "the exported ONNX model in onnxruntime (CPU) on features made by "
    "streamd.signal.vad.utterance_audio + streamd.signal.features.feature_frames/normalize as in the daemon."
)


ARCHITECTURES = {
    "cnn": "DigitNet: 5 residual 1-D convolution (TDNN) blocks of 128 channels, mean+max pooling over time, 2-layer head",
    "rnn": "DigitRNN: strided convolution (20 ms steps), 2-layer bidirectional GRU (96 per direction), mean+max pooling over time, 2-layer head",
    "ge2e": "Resemblyzer's pretrained GE2E encoder, frozen (3 LSTM layers of 256; layers 2-3 int8): every "
            "layer's states every 20 ms -> LayerNorm, linear 768->160, 2 residual 1-D convolutions (kernel 5), "
            "attention + max pooling over time, linear -> 11 logits (streamd.train.digits_ge2e)",
    "kd": "DigitNet (as cnn), trained also to predict a pretrained word embedding's output (the teacher, "
          "card entry 'teacher') from its pooled features; that map is dropped at export",
    "kd-rnn": "DigitRNN (as rnn), trained also to predict the teacher's embedding (as kd)",
    "words": "the shipped word model (EfficientWord-Net ResNet-50, int8), frozen: its 2048-d embedding of the "
             "1.5 s word window -> linear 2048->256, ReLU, dropout 0.2, linear -> 11 logits "
             "(streamd.train.digits_words)",
}


FLITE_SPLIT_TEXT = " Training also: 40 flite voices (5 voices x 8 duration/pitch variants; --flite)."
ARABIC_SYNTH_SPLIT_TEXT = (f" Training also: espeak-ng's Arabic voice in {data.ARABIC_SYNTH_VOICES} variant/speed/pitch "
                           "draws, the ten digits and 24 other Arabic words each (--arabic-synth).")


DIGITS_TUNING_NOTE = (
    "No model selection on test speakers (the last epoch is shipped; thresholds and fusion come "
    "from the validation speakers), but the augmentation was made milder once (noise floor 0 -> "
    "5 dB SNR, babble p 0.4 -> 0.3, VTLP p 0.5 -> 0.3) after a first CNN run with the harsher one "
    "was measured on the test speakers (86.6% English, 96.5% Arabic, argmax 0-9; train accuracy 0.83)."
)


@dataclass
class TrainingInfo:
    kind: str
    epochs: int
    seed: int
    synth: bool
    loss: str
    feature_seconds: float
    train_seconds: float
    data_dir: Path
    out_dir: Path
    family: str = ""

    @property
    def command(self) -> str:
        cmd = f"streamd train {self.kind} --data {self.data_dir} --out {self.out_dir} --epochs {self.epochs} --seed {self.seed}"
        cmd += " --scratch" if self.kind == "speaker" else ""  # the from-scratch baseline
        cmd += f" --family {self.family}" if self.family else ""
        return cmd + ("" if self.synth else " --no-synth")


def data_section(train: data.FeatureSet, heldout: data.FeatureSet, validation: data.FeatureSet | None = None) -> dict:
    def count(clips: list[data.Clip], corpus: str) -> int:
        return sum(c.corpus == corpus for c in clips)

    synth_voices = sorted({c.speaker.split("/", 1)[1] for c in train.clips if c.corpus == "synth"})
    corpora = {}
    for corpus, name in (("fsdd", "Free Spoken Digit Dataset (English digits)"),
                         ("asc", "Arabic Speech Commands (40 keywords)")):
        corpora[corpus] = {
            "name": name, "licence": data.LICENCES[corpus],
            "train_clips": count(train.clips, corpus), "heldout_clips": count(heldout.clips, corpus),
            "train_speakers": sorted(c.split("/")[1] for c in data.speakers(train.clips, False) if c.startswith(corpus)),
            "heldout_speakers": sorted(c.split("/")[1] for c in data.speakers(heldout.clips, True) if c.startswith(corpus)),
        }
        if validation is not None:
            corpora[corpus]["validation_speakers"] = sorted(
                {c.speaker.split("/")[1] for c in validation.clips if c.corpus == corpus})
    return {
        "corpora": corpora,
        "synthetic": {
            "tool": ("espeak-ng and flite" if any(v.startswith("flite-") for v in synth_voices) else "espeak-ng")
                    + " (training only)", "clips": count(train.clips, "synth"),
            "voices": synth_voices, "words": "English digits zero..nine and "
            f"{len(data.NON_DIGIT_WORDS)} English non-digit words (as 'not_digit')",
        },
        "training_feature_items": len(train),
    }


def base_card(kind: str, path: Path, output: dict, train: data.FeatureSet, heldout: data.FeatureSet,
              metrics: dict, threshold: dict, info: TrainingInfo) -> dict:
    import onnxruntime

    return {
        "name": f"streamd-{kind}",
        "kind": kind,
        "file": path.name,
        "sha256": sha256_of(path),
        "size_bytes": path.stat().st_size,
        "input": {"name": "feats", "shape": ["batch", "time", FeatureParams().numcep], "dtype": "float32",
                  "notes": "time >= 10 frames; tested up to 1500 frames"},
        "output": output,
        "features": FeatureParams().as_dict(),
        "vad": asdict(VadParams()),
        "normalization": "per-utterance mean/variance (streamd.signal.features.normalize)",
        "data": data_section(train, heldout),
        "split": SPLIT_TEXT,
        "training": {
            "epochs": info.epochs, "seed": info.seed, "loss": info.loss,
            "augmentation": data.AUGMENTATION_TEXT, "synthetic_speech": info.synth,
            "feature_seconds": round(info.feature_seconds, 1),
            "features_from_cache": bool(train.cached and heldout.cached),
            "train_seconds": round(info.train_seconds, 1), "command": info.command,
        },
        "metrics": metrics,
        "suggested_threshold": threshold,
        "created": dt.date.today().isoformat(),
        "torch_version": _torch_version(),
        "onnx_opset": scoring.OPSET,
        "onnxruntime_version": onnxruntime.__version__,
    }


def _torch_version() -> str:
    import torch

    return torch.__version__


def digits_card(path: Path, split: data.DigitSplit, metrics: dict, threshold: dict, info: TrainingInfo,
                net) -> dict:
    out = {"name": "logits", "shape": ["batch", len(data.CLASSES)], "dtype": "float32",
           "notes": "raw logits; apply softmax"}
    card = base_card("digits", path, out, split.train, split.test, metrics, threshold, info)
    card["name"] = ("streamd-digits" if info.family == "cnn" else f"streamd-digits-{info.family}") \
        + (f"-s{info.seed}" if info.seed else "")
    card["family"] = info.family
    card["architecture"] = ARCHITECTURES[info.family]
    card["parameters"] = sum(p.numel() for p in net.parameters())
    card["classes"] = data.CLASSES
    card["split"] = DIGITS_SPLIT_TEXT
    card["training"]["notes"] = DIGITS_TUNING_NOTE
    card["data"] = data_section(split.train, split.test, split.validation)
    card["data"]["synthetic"]["validation_voices"] = sorted(
        {c.speaker.split("/", 1)[1] for c in split.validation.clips if c.corpus == "synth"})
    card["training"]["features_from_cache"] = bool(split.train.cached and split.test.cached)
    return card


def head_augmentation() -> str:
    """The augmentation text of a head on a frozen encoder (data.HEAD_PLAN's versions)."""
    return data.AUGMENTATION_TEXT.rsplit("; every clip", 1)[0] + "; " + data.HEAD_PLAN_TEXT


def speaker_card(path: Path, train: data.FeatureSet, heldout: data.FeatureSet, metrics: dict,
                 threshold: dict, info: TrainingInfo, dim: int, n_classes: int) -> dict:
    out = {"name": "embedding", "shape": ["batch", dim], "dtype": "float32",
           "notes": "L2-normalised inside the graph; score = cosine = dot product"}
    card = base_card("speaker", path, out, train, heldout, metrics, threshold, info)
    card["embedding_dim"] = dim
    card["training"]["classes"] = n_classes
    return card


def write_card(onnx_path: Path, card: dict) -> Path:
    path = onnx_path.with_suffix(".card.json")
    path.write_text(json.dumps(card, indent=2) + "\n")
    write_docs(onnx_path.parent)
    return path


def summary(metrics: dict) -> str:
    return json.dumps(metrics, indent=2)


# --------------------------------------------------------------------------- docs/models.md

# Settled from the licence texts inside the wheel (issue 4 asked: use it, or leave it out).
OPENWAKEWORD_TEXT = (
    "- Left out: the speech embedding in the `openwakeword` 0.5.1 wheel (`resources/models/"
    "melspectrogram.onnx`, `embedding_model.onnx`). Its README (the wheel's METADATA) says Google's "
    "speech_embedding is Apache-2.0 on TFHub but that openWakeWord re-implemented it, and that \"all "
    "of the included pre-trained models are licensed under\" CC BY-NC-SA 4.0; the wheel's LICENSE "
    "(Apache-2.0) covers its code. The files the wheel holds are thus offered to us non-commercially, "
    "whatever Google's original allows, and Google's original cannot be fetched here (no download), "
    "so no streamd model starts from them.")

TEACHER_TEXT = (
    "- Teacher of the distilled digit models (`streamd train digits --family kd|kd-rnn`; not used by the "
    "shipped models, docs/measurements.md says why): the ResNet-50 word embedding in the "
    "`EfficientWord-Net` 1.0.5 wheel (`eff_word_net/models/resnet_50_arc/…_qint8.onnx`, by Ant-Brain). "
    "The wheel's LICENSE.md is Apache-2.0 and names no other terms for its models; its README says the "
    "model was trained on the Multilingual Spoken Words Corpus (MLCommons, CC BY 4.0). The same file "
    "ships as `models/words.onnx` (vocabularies taught at run time) and, with a head after it, as "
    "`models/digits-words.onnx` (the digit family `words`, run only where the other members are unsure).")


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _digits_md(c: dict) -> list[str]:
    m = c["metrics"]
    en, ar = m["english_fsdd_heldout"], m["arabic_asc_heldout"]
    t = c["suggested_threshold"]
    return [
        f"## {c['file']} — spoken digit classifier, {c.get('family', 'cnn')} family", "",
        f"{c.get('architecture', '')}; {c.get('parameters', 0):,} parameters"
        + (f" ({c['trainable_parameters']:,} trained)" if "trainable_parameters" in c else "") + ".", "",
    ] + ([f"Starts from: {c['pretrained']['source']} (sha256 `{c['pretrained']['sha256'][:16]}…`; "
          f"{c['pretrained']['use']}).", ""] if "pretrained" in c else []) + [
        f"Input `feats` float32 [batch, time, {c['input']['shape'][-1]}] "
        f"({c['features'].get('kind', 'mfcc')}); output `logits` [batch, 11] (classes "
        f"{', '.join(c['classes'])}). {c['size_bytes'] / 1e6:.2f} MB, sha256 `{c['sha256'][:16]}…`.", "",
        "| held-out set | clips | digit acc. (argmax 0-9) | digit acc. (11-class) | non-digit → digit |",
        "|---|---|---|---|---|",
        f"| English, FSDD `theo` | {en['n_digit_clips']} | {_pct(en['digit_accuracy_argmax_0_9'])} | "
        f"{_pct(en['digit_accuracy_11_class'])} | – |",
        f"| Arabic, ASC val speakers (digits) | {ar['n_digit_clips']} | {_pct(ar['digit_accuracy_argmax_0_9'])} | "
        f"{_pct(ar['digit_accuracy_11_class'])} | – |",
        f"| Arabic, ASC val speakers (30 other keywords) | {ar['n_non_digit_clips']} | – | – | "
        f"{_pct(ar['non_digit_predicted_as_digit'])} |", "",
        f"Suggested confidence threshold: **{t['value']}** ({t['rule']}).", "",
        "Operating points on all held-out clips (English + Arabic):", "",
        "| threshold | digit clips → right digit | digit clips → wrong digit | non-digit clips → a digit |",
        "|---|---|---|---|",
    ] + [f"| {p['threshold']} | {_pct(p['digit_correct'])} | {_pct(p['digit_wrong'])} | "
         f"{_pct(p['non_digit_accepted'])} |" for p in t["operating_points"]] + [
        "", f"Input length: any number of frames >= 10 (checked against torch up to 1500). "
        f"{c['training'].get('notes', '')}", ""]


def _fusion_md(f: dict) -> list[str]:
    weights = ", ".join(f"{m['name']} {w:.3f}" for m, w in zip(f["members"], f["weights"]))
    lines = ["## digits.fusion.json — the digit models, one decision", "",
             f"Rule: {f['rule']}. Weights {weights}; fitted on {f['fitted_on']}. Thresholds: "
             f"{f['min_confidence_rule']}. `digits.model = \"auto\"` uses **{f['choice']}** ({f['choice_rule']}).", "",
             "| decision | threshold | validation: digits right | validation: other words → digit | "
             "test English right | test Arabic right | test other words → digit |", "|---|---|---|---|---|---|---|"]
    for name, d in f["decisions"].items():
        v, t = d["validation"], d["test"]["at_threshold"]
        lines.append(f"| {name} | {f['min_confidence'][name]:.2f} | {_pct(v['digit_correct'])} | "
                     f"{_pct(v['non_digit_accepted'])} | {_pct(t['fsdd_digits_right'])} | {_pct(t['asc_digits_right'])} | "
                     f"{_pct(t['non_digit_accepted'])} |")
    if "cascade" in f:
        c = f["cascade"]
        lines += ["", f"Cascade (`digits.cascade = true`; {c['gate_rule']}):", ""]
        for stage, val, test in zip(c["stages"], c["validation"]["settled_by_stage"], c["test"]["settled_by_stage"]):
            lines.append(f"- the fusion of {', '.join(stage['members'])} decides where its best class has "
                         f"p >= {stage['gate']}: {_pct(val)} of the validation clips, {_pct(test)} of the test clips")
        lines.append("- the rest: every member, the full fusion")
    return lines + ["", f"Reproduce: `{f['command']}`", ""]


def _eer_rows(metrics: dict, prefix: str = "") -> list[tuple[str, dict]]:
    """Every metrics entry holding an ``eer``, with its dotted name (works for any card layout)."""
    rows = []
    for key, value in metrics.items():
        if isinstance(value, dict):
            name = f"{prefix}{key}"
            rows += [(name, value)] if "eer" in value else _eer_rows(value, name + ".")
    return rows


def _num(r: dict, *keys: str) -> str:
    for k in keys:
        if isinstance(r.get(k), (int, float)):
            return f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k])
    return "–"


def _speaker_md(c: dict) -> list[str]:
    dim = c.get("embedding_dim", c["output"]["shape"][-1])
    lines = [
        f"## {c['file']} — speaker embedding (`{c.get('name', 'speaker')}`)", "",
        f"Input `{c['input']['name']}` float32 {c['input']['shape']} ({c['features'].get('kind', 'mfcc')} "
        f"features); output `{c['output']['name']}` [batch, {dim}], L2-normalised (score = cosine). "
        f"{c['size_bytes'] / 1e6:.2f} MB, sha256 `{c['sha256'][:16]}…`.", "",
    ]
    if "provenance" in c:
        lines += [f"Provenance: {c['provenance'].get('source', '')}; licence "
                  f"{c['provenance'].get('licence', '')}.", ""]
    if q := c.get("quantization"):
        agree = q["agreement_with_float_on_speech"]
        lines += [f"Quantised: {q['kind']}; {q['quantized']}. Cosine to the float model's embeddings on "
                  f"{agree['windows']} speech windows: mean {agree['cosine_mean']}, min {agree['cosine_min']}. "
                  "Back end, cohort and calibration were fitted on the quantised encoder's outputs.", ""]
    if "back_end" in c:
        lines += [f"Back end (in the graph): {c['back_end']['kind'].upper()}, {c['back_end']['dims_removed']} "
                  f"within-speaker directions removed; {c['back_end']['graph']}. Fitted on "
                  f"{c['back_end']['fitted_on']}.", ""]
    if "cohort" in c:
        lines += [f"AS-norm cohort `{c['cohort']['file']}`: {c['cohort']['vectors']} vectors, {c['cohort']['source']}.", ""]
    if "calibration" in c and "trials" in c["calibration"]:
        cal = c["calibration"]
        lines += [f"Calibration (AS-norm threshold per false-accept rate): {cal['trials']}; {cal.get('note', '')}."]
        if short := cal.get("single_word"):
            lines += [f"A second table from single-word trials serves short utterances: {short['seconds']} s or "
                      f"less (the single words' median), the phrases' table from {cal['phrase_seconds']} s (their "
                      "median), a linear mix in between."]
        if q := cal.get("quality"):
            lines += [f"Decisions on enrolled speakers threshold a fused score over {', '.join(q['measures'])}, "
                      f"not the AS-norm score alone: {q['rule']}. Fitted by {q['fit']}. Its tables come from "
                      f"{q['thresholds_from']}; {q['length_rule']} ({q['single_word']['seconds']} s). "
                      "Unknown-voice clusters keep the AS-norm tables."]
        lines += [""]
    lines += ["| held-out trials | EER | threshold at EER | threshold at FAR 1% |", "|---|---|---|---|"]
    for name, r in _eer_rows(c.get("metrics", {})):
        lines.append(f"| {name} | {_pct(r['eer'])} | {_num(r, 'threshold_at_eer')} | "
                     f"{_num(r, 'threshold_at_far_1pct', 'threshold_at_far_1pct_single')} |")
    lines += ["", "Suggested threshold: `" + json.dumps(c.get("suggested_threshold", {})) + "`", ""]
    return lines


def _words_md(c: dict) -> list[str]:
    figures, rule = c["heldout_eval"]["figures"], c["match_rule"]

    def line(key: str, what: str) -> str:
        x = figures[key]
        other = f"; other words named {_pct(x['other_named'])}" if x.get("other_named") is not None else ""
        return f"| {what} | {_pct(x['nearest'])} | {_pct(x['right'])} | {_pct(x['null'])} | {_pct(x['wrong'])}{other} |"

    return [f"## {c['file']} — word embedding for vocabularies taught at run time", "",
            f"{c['provenance']['source']}. Licence: {c['licence']} Nothing trained here: "
            f"{c['provenance']['changes']}. {c['size_bytes'] / 1e6:.1f} MB, sha256 `{c['sha256'][:16]}…`.", "",
            f"Input: {c['input']['note']}. Output: a unit-length {c['output']['shape'][-1]}-dim vector, compared by "
            f"cosine with the templates users teach (`streamd digits enroll`, control `enroll_word`).", "",
            f"Match rule (min score {rule['min_score']:.2f}, min margin {rule['min_margin']:.2f}): {rule['rule']}. "
            f"Fitted on {rule['fitted_on']}.", "",
            "Templates only, no digit model, on held-out speakers (`" + c["heldout_eval"]["command"] + "`):", "",
            "| taught by -> tested on | nearest template (no rejection) | named right | null | wrong |",
            "| --- | --- | --- | --- | --- |",
            line("arabic_5_teachers", "5 ASC training speakers x 5 reps -> the 6 ASC val speakers"),
            line("arabic_1_teacher", "1 ASC training speaker x 5 reps (mean of 5) -> the 6 ASC val speakers"),
            line("english_3_teachers", "3 FSDD training speakers x 5 reps -> theo"), ""]


def write_docs(models_dir: Path) -> Path | None:
    """Summarise whichever cards exist into ``docs/models.md`` beside the models folder."""
    docs = models_dir.resolve().parent / "docs"
    if not docs.is_dir():
        return None
    fusion = models_dir / "digits.fusion.json"
    members = [m["card"].removesuffix(".card.json") for m in json.loads(fusion.read_text())["members"]] \
        if fusion.exists() else []
    digit_keys = list(dict.fromkeys(["digits", "digits-rnn", *members]))
    cards = {k: json.loads(p.read_text()) for k in (*digit_keys, "speaker")
             if (p := models_dir / f"{k}.card.json").exists()}
    lines = ["# streamd models", "",
             "Generated by `streamd train` (streamd/train/card.py) from the model cards "
             "`models/*.card.json`, which hold the full details.", "",
             "Every model reads frames of the VAD-cut utterance (`streamd.signal.vad.utterance_audio`) "
             "computed by `streamd.signal.features` with the parameters in its card's `features` entry "
             "(digits cnn and rnn: per-utterance mean/variance normalised 20-dim MFCC; digits ge2e and "
             "the speaker model: 40 mel power bands, gain-normalised; digits words and the word model: "
             "64 log filterbanks of the 1.5 s window the utterance is centred in), exactly as the daemon "
             "computes them.", "", "## Held-out split", "", "Speaker model: " + SPLIT_TEXT, "",
             "Digit models: " + DIGITS_SPLIT_TEXT, ""]
    for k in digit_keys:
        if k in cards:
            lines += _digits_md(cards[k])
    if fusion.exists():
        lines += _fusion_md(json.loads(fusion.read_text()))
    if "speaker" in cards:
        lines += _speaker_md(cards["speaker"])
    if (words := models_dir / "words.card.json").exists():
        lines += _words_md(json.loads(words.read_text()))
    lines += ["## Data and licences", "",
              "- Free Spoken Digit Dataset: CC BY-SA 4.0. Arabic Speech Commands (Ghandoura et al., 2021): CC BY 4.0.",
              "- Synthetic English speech from espeak-ng voices, training only; never used for metrics. The digit trainer's `--flite` option (not used by the shipped models) adds flite voices: flite and its voices (awb, kal, kal16, rms, slt) are under CMU's permissive BSD-style licence (Debian's /usr/share/doc/flite/copyright); only their synthesised speech is used, in training. The `--arabic-synth` option (not used by the shipped models either: docs/measurements.md) adds espeak-ng's Arabic voice; espeak-ng is GPL-3.0, its synthesised speech is data the project makes, used in training only.",
              OPENWAKEWORD_TEXT, TEACHER_TEXT, "",
              "## Training", "", f"Augmentation in the current training code (each card's `training.augmentation` "
              f"says what its model was trained with): {data.AUGMENTATION_TEXT}.", ""]
    for k, c in cards.items():
        tr = c.get("training", {})
        if "loss" not in tr:  # a card written by another tool (e.g. a pretrained encoder)
            lines += [f"- {k}: see `models/{k}.card.json` (`{c.get('name', k)}`)."]
            continue
        how = "loaded from the cache" if tr.get("features_from_cache") else "computed, then cached"
        lines += [f"- {k}: {tr['loss']}; {tr['epochs']} epochs, seed {tr['seed']}; features "
                  f"{tr['feature_seconds']:.0f} s ({how}), training {tr['train_seconds']:.0f} s "
                  f"on 2 CPU cores; torch {c['torch_version']}."]
    lines += ["", "## Reproduce", "", "From the repository root, with the `[train]` extra (torch) installed "
              "(the word model first: the digit family `words` is a head on it):", "", "```"]
    if (models_dir / "words.card.json").exists():
        lines += ["streamd train words --data ../shared/datasets --out models"]
    lines += [cards[k].get("training", {}).get("command", f"streamd train {k}") for k in cards]
    lines += [json.loads(f.read_text())["command"] for f in sorted(models_dir.glob("digits.fusion*.json"))]
    lines += ["```", "",
              "Feature and synthetic-speech caches go to `$STREAMD_TRAIN_WORK` (default `/tmp/train_work`). "
              "Without a cache the first run synthesises the espeak-ng clips (~40 s) and computes the "
              "features of every clip version (71,780 training items + 2,900 held-out clips: ~6.5 min "
              "on 2 cores). A cache is reused only if a random sample of its items, recomputed with "
              "the current streamd code, matches. Each clip's augmentation is drawn from a seed made of "
              "the training seed and the clip's speaker and file name (`streamd.train.data.clip_id`), so "
              "the same command gives the same draws wherever the corpora lie.", "",
              "Training writes fresh cards; their held-out figures clean and in noise (`heldout_eval`) "
              "come from `streamd eval digits --data ../shared/datasets --card` and `streamd eval speakers "
              "--data ../shared/datasets --card`.", ""]
    path = docs / "models.md"
    path.write_text("\n".join(lines))
    return path
