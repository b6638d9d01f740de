"""``streamd train words``: the pretrained word embedding, made shippable, its match rule fitted.

Nothing is trained. EfficientWord-Net's ResNet-50 word embedding (ArcFace, trained on the
Multilingual Spoken Words Corpus) ships inside the ``EfficientWord-Net`` 1.0.5 wheel under
Apache-2.0; its int8 ONNX file is taken from the installed wheel, its batch axis made dynamic
(its four Reshape nodes had batch 1 written into their shapes), checked to give the wheel's
own outputs row for row, and written as ``words.onnx`` with a card: provenance, licence,
sha256, the front end, the match rule fitted on validation speakers and the held-out
templates-only figures (``streamd.offline.eval_words``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from streamd.models.cards import sha256_of
from streamd.offline import eval_words
from streamd.train import teacher
from streamd.signal.vad import VadParams
from streamd.signal.features import FILTERS, FRAMES

BATCH_SHAPES = {"/Reshape": [0, -1], "/Reshape_1": [-1, 1], "/Reshape_2": [-1, 1], "/Reshape_3": [-1, 1, FRAMES, FILTERS]}


@dataclass
class Options:
    data_dir: Path
    out_dir: Path
    reps: int = 5


def batchable(source: Path, out: Path) -> None:
    """The wheel's model with a dynamic batch axis."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(source))
    inits = {i.name: i for i in model.graph.initializer}
    found = {n.name for n in model.graph.node if n.op_type == "Reshape" and n.name in BATCH_SHAPES}
    if found != set(BATCH_SHAPES):
        raise SystemExit(f"{source}: not the expected graph (Reshape nodes {sorted(found)})")
    for node in model.graph.node:
        if node.name in BATCH_SHAPES:
            shape = np.array(BATCH_SHAPES[node.name], np.int64)
            inits[node.input[1]].CopyFrom(numpy_helper.from_array(shape, node.input[1]))
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    del model.graph.value_info[:]  # shapes inferred for batch 1
    onnx.save(model, str(out))


def check_parity(source: Path, out: Path, inputs: list[np.ndarray]) -> float:
    """Largest difference between the wheel's model (one row at a time) and ours (batched)."""
    import onnxruntime as ort

    theirs = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    ours = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    batch = np.stack(inputs).astype(np.float32)
    one = np.concatenate([theirs.run(None, {"input": x[None]})[0] for x in batch])
    return float(np.abs(ours.run(None, {"input": batch})[0] - one).max())


def embed(path: Path, inputs: list[np.ndarray], batch: int = 32) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"input": np.stack(inputs[i : i + batch])})[0]
                           for i in range(0, len(inputs), batch)])


def card(out: Path, source: Path, rule: dict, report: dict, parity: float, clips: int) -> dict:
    return {
        "name": "words", "kind": "words", "file": out.name, "sha256": sha256_of(out), "size_bytes": out.stat().st_size,
        "input": {"name": "input", "shape": ["batch", 1, FRAMES, FILTERS],
                  "note": "64 log mel filterbanks (python_speech_features.logfbank: 25 ms / 10 ms, NFFT 512, "
                          "no pre-emphasis) of a 1.5 s window, the VAD-cut utterance centred in it "
                          "(streamd.signal.features.word_input)"},
        "output": {"name": "feature_output", "shape": ["batch", 2048], "l2_normalized": True},
        "features": {"kind": "logfbank64-1.5s", "note": "computed from the utterance's audio, not from a ring"},
        "vad": asdict(VadParams()),  # the cuts its templates and match rule were measured on
        "provenance": {**teacher.PROVENANCE, "use": "shipped: names the digits users teach at run time",
                       "source_sha256": sha256_of(source),
                       "changes": "batch axis made dynamic (Reshape shapes), shape annotations dropped; "
                                  f"weights untouched; largest output difference from the wheel's file: {parity:.1e}"},
        "licence": "Apache-2.0 (the wheel's LICENSE.md, read for this card; no other terms for its models). "
                   "Its training data, the Multilingual Spoken Words Corpus, is CC BY 4.0 (MLCommons).",
        "match_rule": {**rule, "rule": "a digit's score is the mean cosine of its 3 nearest templates; the best "
                                       "(vocabulary, digit) is named when its score >= min_score and it leads every "
                                       "other digit by >= min_margin (streamd.models.words.TemplateIndex.match)",
                       "fitted_on": "ASC validation speakers 00000006/16/22/30 teaching Arabic with 5 repetitions "
                                    "per digit, each alone (tested on the other three) and three together (tested on "
                                    "the fourth), digits and other words, with the FSDD training speakers' English "
                                    "digits as other words too (another language's words): "
                                    f"the most digits named with <= {eval_words.MAX_OTHER_ACCEPTED:.0%} other words "
                                    "named", "validation_clips": clips},
        "heldout_eval": {"command": "streamd eval words --data ../shared/datasets", "figures": report},
        "created": dt.date.today().isoformat(),
    }


def cache_path(model: Path, clips: list) -> Path:
    """Where the clips' embeddings by this model are kept (training work folder)."""
    from streamd.train.data import WORK_DIR

    key = hashlib.sha1((sha256_of(model) + "".join(str(c.path) for c in clips)).encode()).hexdigest()[:16]
    return WORK_DIR / "words" / f"vectors-{key}.npy"


def run(opts: Options) -> int:
    source = teacher.model_path()
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    out = opts.out_dir / "words.onnx"
    batchable(source, out)
    clips = eval_words.needed(eval_words.corpus_words(opts.data_dir))
    cache = cache_path(out, clips)
    if cache.exists():
        inputs, vectors = None, np.load(cache, allow_pickle=False)
    else:
        print(f"word inputs of {len(clips)} clips ...", flush=True)
        inputs = eval_words.clip_inputs(clips)
        vectors = embed(out, inputs)
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache, vectors)
    probe = inputs[:: max(1, len(inputs) // 16)][:16] if inputs else eval_words.clip_inputs(clips[::400][:16])
    parity = check_parity(source, out, probe)
    if parity > 1e-4:
        raise SystemExit(f"{out}: batched outputs differ from the wheel's by {parity}")
    trials = eval_words.validation_trials(clips, vectors, opts.reps)
    rule = eval_words.fit_rule(trials, clips, vectors)
    from streamd.models.words import MatchRule

    report = eval_words.held_out_report(clips, vectors, MatchRule(rule["min_score"], rule["min_margin"]), opts.reps)
    path = out.with_suffix(".card.json")
    path.write_text(json.dumps(card(out, source, rule, report, parity, sum(len(t) for _, t in trials)), indent=2) + "\n")
    print(eval_words.format_report(report))
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB) and {path}")
    from streamd.train.card import write_docs

    write_docs(opts.out_dir)
    return 0
