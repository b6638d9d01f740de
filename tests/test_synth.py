"""The synthetic training voices: what espeak-ng is asked to say, and under which label."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest

from streamd.train import data

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs Debian's espeak-ng")


def phonemes(text: str, voice: str = "ar") -> str:
    out = subprocess.run(["espeak-ng", "-v", voice, "-q", "-x", text], capture_output=True, text=True, check=True)
    return re.sub(r"[^a-zA-Z?]", "", out.stdout)  # stress, length and emphasis marks dropped


def edits(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        diagonal, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (ca != cb))
    return row[-1]


@needs_espeak
def test_the_arabic_voice_says_the_numerals_as_arabic_digit_words():
    said = [phonemes(t) for t in data.ARABIC_DIGITS]
    assert said[5].startswith("xams") and said[1].startswith("waHid") and said[0].startswith("sif")
    assert said[5] != phonemes("5", "en-us")  # not the English "five"
    assert len(set(said)) == 10


@needs_espeak
def test_no_arabic_non_digit_word_sounds_like_a_digit():
    """Taught as "not a digit", a word that sounds like one would teach the models to reject it."""
    digits = [phonemes(t) for t in data.ARABIC_DIGITS]
    for name, text in data.ARABIC_NON_DIGIT_WORDS:
        closest = min(edits(phonemes(text), d) for d in digits)
        assert closest >= 2, f"{name} ({text}) sounds like a digit"
    assert min(edits(phonemes("سِفْر"), d) for d in digits) < 2  # "sifr" (book) is zero: the check can fail


def test_arabic_voices_say_ten_digits_and_other_words_under_their_own_names(monkeypatch, tmp_path):
    spoken: list[tuple[str, str]] = []
    monkeypatch.setattr(data, "WORK_DIR", tmp_path)
    monkeypatch.setattr(data, "synthesize", lambda voice, text, out: spoken.append((voice.name, text)))
    clips = data.arabic_synth_clips(seed=0, words_per_voice=24)
    voices = data.arabic_synth_voices()
    assert len(clips) == len(voices) * 34 == len(spoken)
    assert all(v.voice == "ar" for v in voices) and len({v.name for v in voices}) == len(voices)
    texts = dict(data.ARABIC_NON_DIGIT_WORDS)
    for clip, (voice, text) in zip(clips, spoken):
        assert clip.speaker == f"synth/{voice}" and clip.corpus == "synth" and not clip.heldout
        if clip.label == data.NOT_DIGIT:
            assert texts[clip.word] == text
        else:
            assert text == data.ARABIC_DIGITS[clip.label] and clip.word == data.DIGIT_WORDS[clip.label]
    english = {v.name for v in data.synth_voices(data.SYNTH_TRAIN_VOICES + data.SYNTH_VALIDATION_VOICES, 0)}
    assert not english & {v.name for v in voices}  # no clip folder shared with an English voice


def test_english_voices_still_draw_the_words_they_were_trained_on(monkeypatch, tmp_path):
    """The shipped models' synthetic English: each voice's 24 other words are the same draw."""
    monkeypatch.setattr(data, "WORK_DIR", tmp_path)
    monkeypatch.setattr(data, "synthesize", lambda voice, text, out: None)
    clips = data.synth_clips(seed=0, voices=data.digit_training_voices(0)[:3])
    rng = np.random.default_rng([0, 11])
    for v in range(3):
        drawn = [data.NON_DIGIT_WORDS[i] for i in rng.choice(len(data.NON_DIGIT_WORDS), size=24, replace=False)]
        mine = clips[v * 34:(v + 1) * 34]
        assert [c.word for c in mine] == list(data.DIGIT_WORDS) + drawn
