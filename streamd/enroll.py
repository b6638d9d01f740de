"""Enrollment from audio files: the files go through the same VAD cut and features as
live audio, and each utterance's embedding is stored in the gallery."""

from __future__ import annotations

import numpy as np

from streamd.config import Config
from streamd.features import mfcc, normalize
from streamd.frames import SAMPLE_RATE
from streamd.identity import Gallery, GalleryError
from streamd.inference import OnnxModel
from streamd.sources import read_audio
from streamd.vad import segment_clip

MIN_SPEECH_S = 1.0


def embed_file(path: str, cfg: Config, model: OnnxModel) -> tuple[list[np.ndarray], float]:
    """Embeddings of each utterance in a file, and the seconds of speech they cover."""
    audio = read_audio(path)
    vectors, seconds = [], 0.0
    for end in segment_clip(audio, cfg.vad):
        if not end.usable:
            continue
        a, b = (int(round(t * SAMPLE_RATE)) for t in end.model_span(cfg.vad))
        cut = audio[a:b]
        feats = normalize(mfcc(cut, model.params), model.params)
        if len(feats):
            vectors.append(model.run(feats))
            seconds += end.t_end - end.t_start
    return vectors, seconds


def enroll_files(name: str, paths: list[str], cfg: Config, model: OnnxModel, gallery: Gallery) -> tuple[int, float]:
    vectors: list[np.ndarray] = []
    seconds = 0.0
    for path in paths:
        v, s = embed_file(path, cfg, model)
        vectors += v
        seconds += s
    if not vectors or seconds < MIN_SPEECH_S:
        raise GalleryError(f"too little speech to enroll {name!r}: {seconds:.1f} s found, {MIN_SPEECH_S:.1f} s needed")
    gallery.enroll(name, np.stack(vectors), seconds, model.card.sha256, source="files:" + ",".join(paths))
    return len(vectors), seconds
