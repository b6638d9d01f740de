"""Digit strings and challenge-response (issue 32): the pure segmenter on real words, and a real
daemon on stdin answering real control requests with the bundled held-out speakers' words."""

import shutil
import time

import numpy as np
import pytest

from streamd.audio.sources import read_audio
from streamd.audio.stream_audio import speech_span
from streamd.models import digit_strings as ds
from streamd.service.challenge import Challenge, verdict
from streamd.signal.vad import VadParams, segment_clip
from conftest import DATA, stop
from helpers import LiveDaemon, by_type, collect

RATE = 16000


def digit_words(clip: str) -> list[np.ndarray]:
    """The ten words of an enrollment clip (0-9 in order), each trimmed to its speech."""
    audio = read_audio(str(DATA / clip))
    out = []
    for e in segment_clip(audio, VadParams()):
        if e.usable:
            word = audio[int(max(0.0, e.audio_t) * RATE) : int((e.t_end + 0.2) * RATE)]
            a, b, _ = speech_span(word)
            out.append(word[a:b])
    assert len(out) == 10, len(out)
    return out


def say(words: list[np.ndarray], code: str, seed: int = 0) -> tuple[np.ndarray, list[int]]:
    """``code`` said with 0-150 ms of silence between digits; where each gap is (samples)."""
    rng = np.random.default_rng(seed)
    parts, gaps, pos = [np.zeros(RATE // 2, np.int16)], [], RATE // 2
    for k, ch in enumerate(code):
        parts.append(words[int(ch)])
        pos += len(words[int(ch)])
        if k < len(code) - 1:
            gap = int(rng.uniform(0.0, 0.15) * RATE)
            gaps.append(pos + gap // 2)
            parts.append(np.zeros(gap, np.int16))
            pos += gap
    parts.append(np.zeros(RATE // 2, np.int16))
    return np.concatenate(parts), gaps


@pytest.fixture(scope="module")
def theo():
    return digit_words("enroll_theo.flac")


# ---------------------------------------------------------------- the pure segmenter


def test_a_word_is_not_segmented(theo):
    assert ds.plan(np.concatenate((np.zeros(3200, np.int16), theo[3], np.zeros(3200, np.int16)))) is None


def test_every_gap_between_digits_is_a_candidate_boundary(theo):
    audio, gaps = say(theo, "4719")
    plan = ds.plan(audio)
    assert plan is not None and len(plan.spans) <= ds.StringParams().max_pieces
    for gap in gaps:
        assert min(abs(b - gap) for b in plan.boundaries) <= 0.1 * RATE, (gap, plan.boundaries)


def test_the_most_confident_segmentation_wins_and_a_non_digit_piece_makes_it_null(theo):
    audio, gaps = say(theo, "4719")
    plan = ds.plan(audio)
    truth = {min(range(len(plan.boundaries)), key=lambda i: abs(plan.boundaries[i] - g)) for g in gaps}
    cuts = [0, *sorted(truth), len(plan.boundaries) - 1]
    right = set(zip(cuts, cuts[1:]))
    sure = {span: k for k, span in enumerate(zip(cuts, cuts[1:]))}

    def logits(not_digit: int | None = None):
        out = []
        for span in plan.spans:
            z = np.full(11, -5.0)
            if span in right:
                k = sure[span]
                z[NOT if k == not_digit else int("4719"[k])] = 5.0
            out.append(z)
        return out

    NOT = ds.NOT_A_DIGIT
    got = ds.decode(plan, logits(), 0.5)
    assert got.digits == "4719" and got.reason is None and len(got.items) == 4
    assert all(a.t_end <= b.t_start + 1e-9 for a, b in zip(got.items, got.items[1:]))
    refused = ds.decode(plan, logits(not_digit=2), 0.5)
    assert refused.digits is None and refused.reason == "not_a_digit"


def test_strings_are_searched_in_challenges_answers_and_elsewhere_only_when_asked(theo):
    """Searching costs up to 80 pieces' scoring: on streams of words and phrases it took 2.5
    times the CPU, so outside a challenge only utterances over digits.strings_min_s are."""
    from streamd.service.strings import DigitStrings

    string, _ = say(theo, "4719")
    assert len(string) > 1.2 * RATE + RATE  # over 1.2 s of speech
    off = DigitStrings("s", None, (), min_s=0.0)
    assert off.task(string, challenged=False).plan is None
    assert off.task(string, challenged=True).plan is not None
    on = DigitStrings("s", None, (), min_s=1.2)
    assert on.task(string, challenged=False).plan is not None
    assert on.task(say(theo, "4")[0], challenged=False).plan is None


def test_pieces_scored_are_capped(theo):
    audio, _ = say(theo, "0123456789" * 2)
    plan = ds.plan(audio, ds.StringParams(max_pieces=30))
    assert plan is not None and len(plan.spans) <= 30


def test_a_piece_is_a_clip_of_its_own_between_the_utterance_background(theo):
    audio, _ = say(theo, "47")
    plan = ds.plan(audio)
    piece = plan.pieces[0]
    clip = ds.piece_audio(audio, piece, plan)
    p = ds.StringParams()
    assert len(clip) == piece.end - piece.start + int(p.pre_s * RATE) + int(p.tail_s * RATE)


def test_the_verdict_needs_the_code_and_the_voice():
    c = Challenge("id", "theo", "4719", 0.0, 0.0, 0)
    assert verdict(c, "4719", None, 5.0, True).result == "pass"
    assert verdict(c, "4718", None, 5.0, True).reason == "wrong_digits"
    assert verdict(c, "4719", None, -3.0, False).reason == "voice"
    assert verdict(c, None, "not_a_digit", 5.0, True).reason == "no_digits:not_a_digit"


# ---------------------------------------------------------------- a real daemon


@pytest.fixture
def daemon(iso, notify, tmp_path, enrolled_state):
    shutil.copytree(enrolled_state, tmp_path / "state")
    d = LiveDaemon(iso, notify, tmp_path, f'state.dir="{tmp_path}/state"')
    yield d
    if d.proc.poll() is None:
        stop(d.proc)


def play(daemon, audio: np.ndarray) -> None:
    daemon.proc.stdin.buffer.write(np.concatenate((audio, np.zeros(RATE, np.int16))).astype("<i2").tobytes())
    daemon.proc.stdin.buffer.flush()


def next_of(daemon, kind: str, timeout: float = 60.0) -> dict:
    events = collect(daemon.sub, until=lambda ev: bool(by_type(ev, kind)), timeout=timeout)
    found = by_type(events, kind)
    assert found, f"no {kind} event; got {[e['type'] for e in events]}"
    return found[0]


def challenge(daemon, **kw) -> dict:
    reply = daemon.ask({"cmd": "challenge", "stream": "default", "speaker": "theo", "length": 4, **kw})
    assert reply is not None and reply["ok"], reply
    assert len(reply["digits"]) == kw.get("length", 4) and reply["expires"] > time.time()
    return reply


def test_bad_challenges_are_error_replies(daemon):
    for request, error in (({"speaker": "nobody"}, "no enrolled speaker"), ({"stream": "door"}, "no stream"),
                           ({"length": 13}, "length"), ({"ttl_s": 0}, "ttl_s"), ({"length": "4"}, "must be int")):
        message = {"cmd": "challenge", "stream": "default", "speaker": "theo", **request}
        reply = daemon.ask(message)
        assert reply is not None and reply["ok"] is False and error in reply["error"], (request, reply)
    assert daemon.ask({"cmd": "challenge", "speaker": "theo"})["ok"] is False  # the stream must be named
    assert daemon.ask({"cmd": "stats"})["ok"]


@pytest.mark.slow
def test_right_code_passes_once_and_replay_wrong_code_wrong_voice_and_expiry_fail(daemon, theo):
    # The daemon draws the code, and a string is heard right about 4 times in 5 (docs/measurements.md):
    # a wrong one must fail on its digits alone, and a new code is asked for. Three tries failed in
    # CI once (0.2^3); eight leave 3 in a million.
    for attempt in range(8):
        c = challenge(daemon)
        answer, _ = say(theo, c["digits"], seed=attempt)
        play(daemon, answer)
        digits = next_of(daemon, "digits")
        v = next_of(daemon, "verification")
        if digits["digits"] == c["digits"]:
            break
        assert (v["result"], v["digits_ok"]) == ("fail", False) and "voice" not in (v["reason"] or ""), v
    assert digits["digits"] == c["digits"] and len(digits["items"]) == 4, digits
    assert (v["id"], v["result"], v["digits_ok"], v["voice_ok"], v["reason"]) == (c["id"], "pass", True, True, None), v
    assert v["digits_heard"] == c["digits"] and v["speaker"] == "theo"

    play(daemon, answer)  # answered once: the same words again give no verification
    assert not by_type(collect(daemon.sub, until=lambda ev: bool(by_type(ev, "digits")), timeout=30), "verification")

    replay = challenge(daemon)  # a recording of the earlier right answer: another code now
    assert replay["digits"] != c["digits"] or pytest.skip("the same code twice (1 in 10,000)")
    play(daemon, answer)
    v = next_of(daemon, "verification")
    assert (v["id"], v["result"], v["digits_ok"], v["voice_ok"]) == (replay["id"], "fail", False, True), v

    wrong = challenge(daemon)
    other = "".join(str((int(d) + 1) % 10) for d in wrong["digits"])
    play(daemon, say(theo, other, seed=1)[0])
    v = next_of(daemon, "verification")
    # It fails on its digits, heard as other digits or (strings are heard right about 4 in 5) as
    # no string at all: CI once heard a piece as "not a digit" (reason no_digits:not_a_digit).
    assert (v["result"], v["digits_ok"]) == ("fail", False), v
    first = v["reason"].split(",")[0]
    assert first == "wrong_digits" or first.startswith("no_digits:"), v

    voice = challenge(daemon)  # another enrolled speaker says theo's code, in Arabic
    play(daemon, say(digit_words("enroll_asc02.flac"), voice["digits"], seed=2)[0])
    v = next_of(daemon, "verification")
    assert (v["result"], v["voice_ok"]) == ("fail", False) and "voice" in v["reason"], v

    late = challenge(daemon, ttl_s=1.0)
    v = next_of(daemon, "verification", timeout=10)
    assert (v["id"], v["result"], v["reason"]) == (late["id"], "fail", "expired"), v
    assert daemon.close() == 0
