"""Vocabularies taught at run time, end to end: the real word model, real audio, a real
gallery file, the CLI and a running daemon's control socket."""

import numpy as np
import pytest

from streamd import config as config_mod
from streamd.service.engine import Engine
from streamd.offline.eval_stream import CollectingPublisher
from streamd.audio.frames import Frame
from streamd.identity.gallery import Gallery, GalleryError
from streamd.models.inference import load_models
from streamd.service.metrics import Metrics
from streamd.audio.sources import read_audio
from streamd.identity.vocabulary import WordBook, load_word_model
from conftest import DATA, MODELS, stop, streamd
from helpers import LiveDaemon, by_type, collect

pytestmark = pytest.mark.skipif(not (MODELS / "words.card.json").exists(), reason="no word model (streamd train words)")

ARABIC_DEMO = {3: 5, 4: 2, 5: 9, 6: 4, 7: 6}  # demo.flac's utterance: the Arabic digit said (demo.csv)


def words_of(path) -> list[np.ndarray]:
    """Each word of a bundled recording, as the daemon's VAD cuts it."""
    from streamd.identity.enrollment import speech_cuts

    cfg = config_mod.load(None, [])
    return [cut for _, cut in speech_cuts(read_audio(str(DATA / path)), cfg)]


@pytest.fixture(scope="module")
def cfg():
    return config_mod.load(None, [])


@pytest.fixture(scope="module")
def models(cfg):
    return load_models(cfg, "cpu"), load_word_model(cfg)


def run_engine(cfg, models, words, audio) -> list[dict]:
    publisher = CollectingPublisher("tcp://127.0.0.1:*", 1000)
    engine = Engine(cfg, models, None, publisher, Metrics(), words=words)
    pipe = engine.add_stream("s")
    step = cfg.vad.frame_samples
    try:
        for i in range(len(audio) // step):
            pipe.push(Frame("s", i, audio[i * step : (i + 1) * step], i * step / 16000, 0.0))
            engine.pump(force=True)
        engine.flush()
        word_cpu = engine.batcher.model_cpu_s["words"]
    finally:
        engine.close()
        publisher.close(0)
    return by_type(publisher.events["s"], "digit"), word_cpu


def test_taught_arabic_digits_are_named_by_their_vocabulary_and_the_rest_by_the_models(cfg, models, tmp_path):
    digit_models, word_model = models
    gallery = Gallery(tmp_path / "gallery.sqlite3")
    words = WordBook(gallery, word_model)
    demo = read_audio(str(DATA / "demo.flac"))
    before, cpu_before = run_engine(cfg, digit_models, words, demo)
    assert cpu_before == 0  # no templates: the word model never runs
    assert {e["vocabulary"] for e in before} <= {"builtin", None}
    # Teach Arabic from two speakers saying each digit once (the demo's words are other takes).
    for clip in ("enroll_asc02.flac", "enroll_asc07.flac"):
        cuts = words_of(clip)
        assert len(cuts) == 10
        for digit, cut in enumerate(cuts):
            words.enroll("ar", digit, [cut], clip)
    assert words.listing() == [{"vocabulary": "ar", "digits": {str(d): 2 for d in range(10)}}]
    after, cpu_after = run_engine(cfg, digit_models, words, demo)
    assert cpu_after > 0
    named = {e["utterance"]: e for e in after}
    by_ar = {u: e["digit"] for u, e in named.items() if e["vocabulary"] == "ar"}
    assert all(ARABIC_DEMO.get(u) == d for u, d in by_ar.items()), by_ar  # never a wrong one, never an English word
    assert len(set(by_ar) & {3, 4, 5, 6}) >= 3, by_ar  # the two teachers' own voices
    for u in (0, 1, 2, 9):  # English: still the digit models'
        assert named[u]["vocabulary"] in ("builtin", None)
    gallery.close()


def test_bad_vocabulary_requests_are_refused_and_nothing_is_stored(models, tmp_path):
    _, word_model = models
    gallery = Gallery(tmp_path / "gallery.sqlite3")
    words = WordBook(gallery, word_model)
    cut = words_of("word.flac")
    for vocabulary, digit, audios, error in (("builtin", 7, cut, "not 'builtin'"), ("a b", 7, cut, "letters"),
                                             ("en", 10, cut, "0-9"), ("en", True, cut, "0-9"),
                                             ("en", 7, [], "no word heard"),
                                             ("en", 7, [np.zeros(100, np.int16)], "too short")):
        with pytest.raises(GalleryError, match=error):
            words.enroll(vocabulary, digit, audios, "test")
    assert words.listing() == []
    gallery.close()


def test_cli_teaches_a_running_daemon_without_a_restart(iso, notify, tmp_path):
    daemon = LiveDaemon(iso, notify, tmp_path)
    try:
        daemon.speak("word.flac")
        first = collect(daemon.sub, until=lambda ev: by_type(ev, "digit"), timeout=60)
        assert by_type(first, "digit")[0]["vocabulary"] in ("builtin", None)
        r = streamd("digits", "enroll", "--vocabulary", "en-test", "7", str(DATA / "word.flac"), *iso.sets())
        assert r.returncode == 0 and "1 templates added" in r.stdout, r.stderr
        r = streamd("digits", "list", *iso.sets(f'control.endpoint="{daemon.endpoint}"'))
        assert r.returncode == 0 and r.stdout.split() == ["en-test", "7:", "1"], (r.stdout, r.stderr)
        daemon.speak("word.flac")
        taught = collect(daemon.sub, until=lambda ev: by_type(ev, "digit"), timeout=60)
        event = by_type(taught, "digit")[0]
        assert (event["vocabulary"], event["digit"]) == ("en-test", 7), event
        assert event["candidates"][0]["vocabulary"] == "en-test"
        r = streamd("digits", "remove", "--vocabulary", "en-test", *iso.sets(f'control.endpoint="{daemon.endpoint}"'))
        assert r.returncode == 0 and "removed 1" in r.stdout, r.stderr
        daemon.speak("word.flac")
        last = collect(daemon.sub, until=lambda ev: by_type(ev, "digit"), timeout=60)
        assert by_type(last, "digit")[0]["vocabulary"] in ("builtin", None)
        assert daemon.close() == 0
    finally:
        if daemon.proc.poll() is None:
            stop(daemon.proc)


def test_enroll_word_takes_the_next_utterances_and_enroll_word_recent_earlier_ones(iso, notify, tmp_path):
    import zmq

    daemon = LiveDaemon(iso, notify, tmp_path)
    try:
        ctx = zmq.Context.instance()
        req = ctx.socket(zmq.REQ)
        req.connect(daemon.endpoint)
        req.send_json({"cmd": "enroll_word", "vocabulary": "ar", "digit": 3, "count": 2, "timeout_s": 60})
        assert not req.poll(300)  # nothing heard yet
        assert daemon.ask({"cmd": "stats"})["ok"]  # others are served meanwhile
        daemon.speak("word.flac")
        daemon.speak("word.flac")
        assert req.poll(60000), "no reply to enroll_word"
        reply = req.recv_json()
        req.close(0)
        assert {k: reply.get(k) for k in ("ok", "vocabulary", "digit", "added", "templates")} == {
            "ok": True, "vocabulary": "ar", "digit": 3, "added": 2, "templates": 2}, reply
        # Utterances 0 and 1 were the words above; 2 is next.
        daemon.speak("enroll_asc02.flac")
        collect(daemon.sub, until=lambda ev: len(by_type(ev, "digit")) >= 12, timeout=60)
        reply = daemon.ask({"cmd": "enroll_word_recent", "vocabulary": "ar", "digit": 0, "utterances": [2]})
        assert reply["ok"] and reply["templates"] == 1, reply
        assert daemon.ask({"cmd": "enroll_word_recent", "vocabulary": "ar", "digit": 0, "utterances": [99]})[
            "error"] == "enroll_word_recent: utterances not heard recently: [99]"
        bad = daemon.ask({"cmd": "enroll_word", "vocabulary": "ar", "digit": "3"})
        assert bad["ok"] is False and "0-9" in bad["error"]
        listed = daemon.ask({"cmd": "words"})
        assert listed["ok"] and listed["vocabularies"] == [{"vocabulary": "ar", "digits": {"0": 1, "3": 2}}]
        removed = daemon.ask({"cmd": "remove_words", "vocabulary": "ar", "digit": 3})
        assert (removed["ok"], removed["vocabulary"], removed["removed"]) == (True, "ar", 2)
        assert daemon.ask({"cmd": "remove_words", "vocabulary": "nope"})["ok"] is False
        assert daemon.close() == 0
    finally:
        if daemon.proc.poll() is None:
            stop(daemon.proc)
    # The templates are in the gallery file: a new CLI sees what the daemon stored.
    r = streamd("digits", "list", *iso.sets())
    assert r.returncode == 0 and r.stdout.split() == ["ar", "0:", "1"], (r.stdout, r.stderr)


def test_cli_errors_are_one_line(iso, tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio at all")
    for args, code, text in (
            (("digits", "enroll", "--vocabulary", "en", "7"), 2, "the following arguments are required: audio"),
            (("digits", "enroll", "--vocabulary", "builtin", "7", str(DATA / "word.flac")), 65, "not 'builtin'"),
            (("digits", "enroll", "--vocabulary", "en", "7", str(bad)), 65, "bad.wav"),
            (("digits", "remove"), 2, "the following arguments are required: --vocabulary"),
            (("digits", "remove", "--vocabulary", "none"), 1, "nothing enrolled"),  # and no gallery made
            (("digits", "list"), 0, "nothing enrolled")):
        r = streamd(*args, *iso.sets())
        assert r.returncode == code and text in r.stderr, (args, r)
        assert len(r.stderr.strip().splitlines()) == 1 or code == 2, (args, r)  # argparse adds its usage line
        assert not iso.state.exists()  # no gallery made by a refused or read-only command
