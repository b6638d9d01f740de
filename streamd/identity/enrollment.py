"""Enrollment material from audio files: the files go through the same VAD cut and
features as live audio, one Utterance per utterance found."""

from __future__ import annotations

import numpy as np

from streamd.config import Config
from streamd.signal.features import features_of_audio
from streamd.audio.frames import SAMPLE_RATE
from streamd.identity.scoring import Utterance
from streamd.signal.vad import audio_level
from streamd.models.inference import OnnxModel
from streamd.audio.sources import SourceError, read_audio
from streamd.signal.vad import SpeechEnd, segment_clip

# Enrollment needs seconds of speech, not hours: a longer file is refused from its header,
# before a sample is read, so a huge file cannot take the memory (reading holds the whole
# file as float64: 10 min of 48 kHz stereo is 460 MB).
MAX_ENROLL_SECONDS = 600
MAX_ENROLL_SAMPLES = MAX_ENROLL_SECONDS * 48000 * 2  # frames x channels


def check_size(path: str) -> None:
    import soundfile as sf

    try:
        info = sf.info(path)
    except Exception:  # not audio, unreadable: read_audio says so in its own words
        return
    if info.duration > MAX_ENROLL_SECONDS or info.frames * info.channels > MAX_ENROLL_SAMPLES:
        raise SourceError(f"{path}: too long to enroll from ({info.duration:.0f} s, {info.channels} channels at "
                          f"{info.samplerate} Hz; at most {MAX_ENROLL_SECONDS} s): use a few clips of speech")


def file_utterances(path: str, cfg: Config, model: OnnxModel) -> list[Utterance]:
    check_size(path)
    return audio_utterances(read_audio(path), cfg, model)


def speech_cuts(audio, cfg: Config) -> list[tuple[SpeechEnd, np.ndarray]]:
    """Each usable utterance the VAD finds in 16 kHz int16 audio, with the audio the models see."""
    out = []
    for end in segment_clip(audio, cfg.vad):
        if end.usable:
            a, b = (int(round(t * SAMPLE_RATE)) for t in end.model_span(cfg.vad))
            out.append((end, audio[a:b]))
    return out


def audio_utterances(audio, cfg: Config, model: OnnxModel) -> list[Utterance]:
    """One Utterance per usable utterance the VAD finds in 16 kHz int16 audio."""
    out = []
    for end, cut in speech_cuts(audio, cfg):
        feats = features_of_audio(cut, model.params)
        if len(feats):
            out.append(Utterance(feats, end.t_end - end.t_start, *audio_level(cut)))
    return out


def file_words(path: str, cfg: Config) -> list[np.ndarray]:
    """The words said in an audio file (each usable utterance, as the VAD cuts it): each becomes
    a template of ``streamd digits enroll``."""
    check_size(path)
    return [cut for _, cut in speech_cuts(read_audio(path), cfg)]
