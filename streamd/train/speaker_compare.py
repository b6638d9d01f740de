"""Speaker encoders compared as the daemon runs them: raw-cosine EER and CPU cost.

Any speaker model card (the shipped GE2E ``speaker.card.json``, CAM++'s
``speaker-campplus.card.json``) is loaded as the daemon loads it and each utterance goes
through the daemon's path: VAD cut (held-out clips), ``streamd.signal.features`` front end named by
the card, per-utterance normalisation, ``OnnxModel.run`` (windows or the whole utterance, as
the card says). Scores are raw cosines, no back end or cohort: the encoders themselves are
compared, on

- 3 s segments of the LibriSpeech readers (``librispeech-excerpts``: one passage each, cut into
  consecutive 3 s segments, no VAD: read speech), every pair of segments;
- single words of the held-out FSDD/ASC speakers (``streamd.offline.evaluate.held_out_clips``), every pair;
- 3-word phrases of the same (their VAD cuts joined, ~2-3 s, as ``streamd eval speakers`` forms them).

CPU cost: CPU time of the model call on one onnxruntime thread per second of speech
(``time.thread_time``, so that other processes on the machine do not count), and the front end's.
No torch here: ``python -m streamd.train.speaker_compare --data DIR CARD [CARD ...]``.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from streamd.offline import evaluate
from streamd.signal.features import FeatureParams, mel_params, kaldi_fbank_params, features_of_audio
from streamd.identity.scoring import l2_normalize
from streamd.models.cards import load_card, verify
from streamd.models.inference import OnnxModel
from streamd.signal.vad import VadParams, utterance_audio

SEGMENT_S = 3.0
PHRASE_CLIPS = 3
FRONT_ENDS = {"melpower": mel_params, "kaldifbank": kaldi_fbank_params, "mfcc": FeatureParams}


def load_speaker_model(card_path: Path, threads: int = 1) -> OnnxModel:
    """A speaker model card, verified against its front end, on a CPU session."""
    card = load_card(card_path, "speaker")
    params = FRONT_ENDS[card.feature_kind]()
    verify(card, params)
    return OnnxModel(card, params, "cpu", threads)


def embed(model: OnnxModel, audio: np.ndarray) -> np.ndarray:
    """One utterance's embedding as the daemon computes it."""
    return model.run(features_of_audio(audio, model.params))


def librispeech_segments(folder: Path, seconds: float = SEGMENT_S) -> list[tuple[str, np.ndarray]]:
    """(reader, audio) for each whole ``seconds`` segment of each reader's passage."""
    out = []
    with open(folder / "manifest.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            audio, rate = sf.read(folder / row["path"], dtype="int16")
            assert rate == 16000, row["path"]
            n = int(round(seconds * rate))
            out += [(row["speaker"], audio[k : k + n]) for k in range(0, len(audio) - n + 1, n)]
    return out


def pair_eer(emb: np.ndarray, who: np.ndarray) -> dict:
    """EER of every pair of utterances (targets: same speaker), on raw cosines."""
    e = l2_normalize(emb)
    iu = np.triu_indices(len(e), k=1)
    same = (who[:, None] == who[None, :])[iu]
    rate, thr, thr1 = evaluate.eer((e @ e.T)[iu], same)
    return {"utterances": len(e), "speakers": int(len(set(who))), "target_pairs": int(same.sum()),
            "impostor_pairs": int((~same).sum()), "eer": round(rate, 5), "threshold_at_eer": round(thr, 4),
            "threshold_at_far_1pct": round(thr1, 4)}


def held_out_cuts(data: Path) -> list[tuple[evaluate.Clip, np.ndarray]]:
    vad = VadParams()
    return [(c, utterance_audio(sf.read(c.path, dtype="int16")[0], vad)) for c in evaluate.held_out_clips(data)]


def phrases(cuts: list[tuple[evaluate.Clip, np.ndarray]], per: int = PHRASE_CLIPS, seed: int = 0):
    """Each held-out speaker's cuts in a seeded random order, joined ``per`` at a time."""
    rng = np.random.default_rng(seed)
    spk = np.array([c.speaker for c, _ in cuts])
    out = []
    for name in sorted(set(spk)):
        idx = rng.permutation(np.flatnonzero(spk == name))
        out += [(name, np.concatenate([cuts[i][1] for i in idx[k : k + per]]))
                for k in range(0, len(idx) - per + 1, per)]
    return out


def cpu_cost(model: OnnxModel, audio: np.ndarray, repeats: int = 20) -> dict:
    """CPU milliseconds per second of speech: the model call (one thread) and the front end."""
    feats = features_of_audio(audio, model.params)
    model.run(feats)  # first call plans the shapes
    t0 = time.thread_time()
    for _ in range(repeats):
        model.run(feats)
    t_model = (time.thread_time() - t0) / repeats
    t0 = time.thread_time()
    for _ in range(repeats):
        features_of_audio(audio, model.params)
    t_feat = (time.thread_time() - t0) / repeats
    seconds = len(audio) / model.params.sample_rate
    return {"utterance_s": round(seconds, 2), "model_ms_per_s": round(1000 * t_model / seconds, 2),
            "features_ms_per_s": round(1000 * t_feat / seconds, 2), "threads": 1,
            "clock": "CPU time of the calling thread (time.thread_time)"}


def compare(model: OnnxModel, data: Path, held: list | None = None, full: bool = True) -> dict:
    """Every figure for one model (``held``: the held-out cuts, when already read); without
    ``full``, only the LibriSpeech segments and the CPU cost."""
    segs = librispeech_segments(data / "librispeech-excerpts")
    out = {"librispeech_3s_segments": pair_eer(np.stack([embed(model, a) for _, a in segs]),
                                               np.array([s for s, _ in segs]))}
    if not full:
        return out | {"cpu": {"3s": cpu_cost(model, segs[0][1]), "1s": cpu_cost(model, segs[0][1][:16000])}}
    held = held if held is not None else held_out_cuts(data)
    emb = np.stack([embed(model, a) for _, a in held])
    out["held_out_single_words"] = evaluate.speaker_report([c for c, _ in held], emb)
    ph = phrases(held)
    out["held_out_3_word_phrases"] = pair_eer(np.stack([embed(model, a) for _, a in ph]), np.array([s for s, _ in ph]))
    out["cpu"] = {"3s": cpu_cost(model, segs[0][1]), "1s": cpu_cost(model, segs[0][1][:16000])}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m streamd.train.speaker_compare", description=__doc__.split("\n")[0])
    p.add_argument("cards", nargs="+", type=Path, help="speaker model cards (.card.json)")
    p.add_argument("--data", type=Path, default=Path("../shared/datasets"))
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)
    held = held_out_cuts(args.data)
    result = {}
    for card in args.cards:
        t0 = time.time()
        result[str(card)] = compare(load_speaker_model(card), args.data, held)
        result[str(card)]["seconds"] = round(time.time() - t0, 1)
        print(str(card), json.dumps(result[str(card)], indent=1), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
