"""Enrollment material from audio files: the files go through the same VAD cut and
features as live audio, one Utterance per utterance found."""

from __future__ import annotations

from streamd.config import Config
from streamd.features import mfcc, normalize
from streamd.frames import SAMPLE_RATE
from streamd.gallery import Utterance, audio_level
from streamd.inference import OnnxModel
from streamd.sources import read_audio
from streamd.vad import segment_clip


def file_utterances(path: str, cfg: Config, model: OnnxModel) -> list[Utterance]:
    audio = read_audio(path)
    out = []
    for end in segment_clip(audio, cfg.vad):
        if not end.usable:
            continue
        a, b = (int(round(t * SAMPLE_RATE)) for t in end.model_span(cfg.vad))
        cut = audio[a:b]
        feats = normalize(mfcc(cut, model.params), model.params)
        if len(feats):
            out.append(Utterance(feats, end.t_end - end.t_start, *audio_level(cut)))
    return out
