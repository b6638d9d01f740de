"""Continuous audio as microphones deliver it, through a real daemon (``streamd run --pace
fast --events-jsonl``): a noise floor, dips of digital silence, noise, and noise alone must
neither invent words nor merge or lose the ones said (issue: streams as users have them)."""

import csv
import json

import numpy as np
import pytest
import soundfile as sf

from streamd.audio import stream_audio as sa
from streamd.audio.sources import read_audio
from conftest import DATA, streamd

RATE = 16000


def demo_words() -> list[dict]:
    with open(DATA / "demo.csv") as fh:
        return list(csv.DictReader(fh))


def word_spans(audio: np.ndarray) -> list[tuple[int, int]]:
    """Where the demo's words are: it is words separated by exact zeros."""
    loud = np.abs(audio.astype(np.int32)) > 0
    spans, start, quiet = [], None, 0
    for i in range(0, len(audio), 160):
        if loud[i : i + 160].any():
            start = i if start is None else start
            quiet = 0
        elif start is not None:
            quiet += 160
            if quiet >= int(0.3 * RATE):
                spans.append((start, i - quiet + 160))
                start, quiet = None, 0
    if start is not None:
        spans.append((start, len(audio)))
    return spans


def with_floor(audio: np.ndarray, dbfs: float, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).standard_normal(len(audio)) * sa.dbfs_to_rms(dbfs)
    return audio.astype(np.float64) + noise


def to_int16(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x), -32768, 32767).astype(np.int16)


def run_daemon(tmp_path, audio: np.ndarray, name: str) -> list[dict]:
    path = tmp_path / f"{name}.flac"
    sf.write(path, audio, RATE)
    jsonl = tmp_path / f"{name}.jsonl"
    r = streamd("run", "--set", f'state.dir="{tmp_path / "state"}"', "--set", 'events.endpoint="tcp://127.0.0.1:*"',
                "--set", 'metrics.listen=""', "--source", f"file:{path}", "--pace", "fast",
                "--events-jsonl", str(jsonl))
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in jsonl.read_text().splitlines()]


def digits_said(events: list[dict]) -> list[int | None]:
    return [e["digit"] for e in events if e["type"] == "digit"]


def same_digits(said: list[int | None], clean: list[int | None]) -> None:
    """One decision per word, in order, and at most two answers changed. The segmentation is
    what these tests hold; the digit models, trained on clips padded with digital silence,
    still hear theo's quiet "7" and "8" (-45 and -42 dBFS) over a -60 dBFS floor as null and
    "6" (the issue's item 4, training on the VAD's cuts of continuous audio, is open)."""
    assert len(said) == len(clean)
    assert sum(a == b for a, b in zip(said, clean)) >= len(clean) - 2, (said, clean)


@pytest.fixture(scope="module")
def demo() -> np.ndarray:
    return read_audio(str(DATA / "demo.flac"))


@pytest.fixture(scope="module")
def clean_digits(demo, tmp_path_factory) -> list[int | None]:
    said = digits_said(run_daemon(tmp_path_factory.mktemp("clean"), demo, "clean"))
    assert len(said) == len(demo_words()) == len(word_spans(demo))
    return said


def test_no_phantom_word_at_start_up_over_a_noise_floor(demo, clean_digits, tmp_path):
    # webrtcvad fires on the first frames of any floor: that was a "digit 6" at t = 0.0-0.1 s.
    events = run_daemon(tmp_path, to_int16(with_floor(demo, -60.0)), "floor60")
    first_word = word_spans(demo)[0][0] / RATE
    assert all(e["t_start"] >= first_word - 0.1 for e in events if "t_start" in e), events[:3]
    same_digits(digits_said(events), clean_digits)


def test_dips_of_digital_silence_neither_merge_nor_split_words(demo, clean_digits, tmp_path):
    # A -60 dBFS floor with 0.3 s of exact zeros in the middle of each pause (a muted
    # microphone, lost network frames): this gave 3 utterances instead of 10.
    x = with_floor(demo, -60.0)
    spans = word_spans(demo)
    dips = 0
    for (_, end), (start, _) in zip(spans, spans[1:]):
        mid = (end + start) // 2
        x[mid - int(0.15 * RATE) : mid + int(0.15 * RATE)] = 0
        dips += 1
    assert dips == 9
    events = run_daemon(tmp_path, to_int16(x), "dips")
    ends = [e for e in events if e["type"] == "vad.end"]
    assert len(ends) == len(spans), [(e["t_start"], e["t_end"]) for e in ends]
    same_digits(digits_said(events), clean_digits)


def test_ten_db_of_pink_noise_under_every_word(demo, clean_digits, tmp_path):
    # The demo's words differ by 27 dB in level; the noise is 10 dB below the quietest.
    quietest = min(sa.speech_span(demo[a:b])[2] for a, b in word_spans(demo))
    noise = sa.pink(len(demo), np.random.default_rng(1)) * np.sqrt(quietest / 10)
    events = run_daemon(tmp_path, to_int16(demo + noise), "pink10")
    ends = [e for e in events if e["type"] == "vad.end"]
    assert len(ends) == len(word_spans(demo)), [(e["t_start"], e["t_end"], e["reason"]) for e in ends]
    same_digits(digits_said(events), clean_digits)


@pytest.mark.parametrize("kind", ["floor", "pink", "hum50", "dips"])
def test_noise_alone_gives_no_speaker_or_digit_event(kind, tmp_path):
    rng = np.random.default_rng(2)
    n = 60 * RATE
    if kind == "floor":
        x = sa.white(n, rng) * sa.dbfs_to_rms(-45.0)
    elif kind == "dips":
        x = sa.white(n, rng) * sa.dbfs_to_rms(-55.0)
        for start in range(RATE, n - RATE, 3 * RATE):
            x[start : start + int(0.3 * RATE)] = 0
    else:
        x = sa.noise(kind, n, rng, []) * sa.dbfs_to_rms(-36.0)
    events = run_daemon(tmp_path, to_int16(x), kind)
    decided = [e for e in events if e["type"] in ("speaker", "digit", "speaker.partial")]
    assert decided == []


def test_words_ten_db_over_other_people_talking_stay_apart(demo):
    """Babble rises and falls: over the floor's gate alone webrtcvad's "speech" never paused
    and every word merged into 10 s pieces. The gate over the pauses' noise keeps them apart."""
    from streamd.signal.vad import SpeechEnd, VadParams, segment_clip

    spans = word_spans(demo)
    words = [sa.Word(demo[a:b], "x", "x", None) for a, b in spans]
    talkers = [read_audio(str(DATA / f)) for f in ("visitor12.flac", "visitor21.flac", "enroll_asc02.flac",
                                                   "enroll_asc07.flac", "enroll_theo.flac")]
    talkers = [t[t != 0] for t in talkers]  # people talking on, without the recordings' digital pauses
    cond = sa.Condition("babble", "noise", pause_s=(1.0, 1.5), noise="babble", snr_db=10.0)
    built = sa.build(cond, words * 2, np.random.default_rng(3), talkers)
    ends = [e for e in segment_clip(built.audio, VadParams()) if isinstance(e, SpeechEnd) and e.usable]
    assert max(e.t_end - e.t_start for e in ends) < 2.0, [(e.t_start, e.t_end) for e in ends]
    found = sum(any(e.t_start < p.t_end and e.t_end > p.t_start for e in ends) for p in built.words)
    assert found >= 0.8 * len(built.words)


def test_words_said_a_third_of_a_second_apart_stay_apart(demo, clean_digits, tmp_path):
    """The demo's words 0.3 s apart over a -60 dBFS floor: the hangover alone (300 ms of what
    webrtcvad calls silence) merged every word into one utterance; a quiet pause ends them."""
    spans = word_spans(demo)
    pause = np.zeros(int(0.3 * RATE))
    pieces = [np.zeros(RATE)]
    for a, b in spans:
        pieces += [demo[a:b].astype(np.float64), pause]
    x = with_floor(np.concatenate(pieces + [np.zeros(RATE)]), -60.0)
    events = run_daemon(tmp_path, to_int16(x), "pause03")
    ends = [e for e in events if e["type"] == "vad.end"]
    assert len(ends) == len(spans), [(e["t_start"], e["t_end"]) for e in ends]
    same_digits(digits_said(events), clean_digits)
