"""identity.keep_recent_audio (issue 33's playback of recent utterances): a real daemon fed real
audio keeps each recent utterance's audio in memory only when asked to, hands it out as WAV
(control command ``recent_audio``, the console's GET /api/recent/audio), and drops it with
the utterance, including on ``remove NAME``. The same with the option off: nothing kept."""

from __future__ import annotations

import base64
import io
import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from prometheus_client import CollectorRegistry

from conftest import DATA, Isolated, NotifySocket, free_port, start_streamd, stop
from helpers import LiveDaemon, by_type, collect
from streamd.audio.sources import read_audio
from streamd.config import Config
from streamd.identity.scoring import Utterance
from streamd.service.decisions import Decisions, StreamEvents
from streamd.service.metrics import Metrics, StageTimes
from streamd.signal.vad import SpeechEnd

SAMPLE_RATE = 16000
VAD = Config().vad
FRAME_S = VAD.frame_ms / 1000
CLIP = read_audio(str(DATA / "demo.flac"))  # the first clip each daemon hears: stream time 0 is its start
OFF_ERROR = "recent_audio: identity.keep_recent_audio is off: no audio is kept"


def wav_of(reply: dict) -> tuple[np.ndarray, int, str]:
    audio, rate = sf.read(io.BytesIO(base64.b64decode(reply["base64"])), dtype="int16")
    info = sf.info(io.BytesIO(base64.b64decode(reply["base64"])))
    return audio, rate, f"{info.format}/{info.subtype}"


def spoken(daemon: LiveDaemon, clip: str, speakers: int) -> tuple[list[dict], dict[int, dict]]:
    """The speaker events of a clip played into the daemon, and the vad.end event of each."""
    daemon.speak(clip)
    events = collect(daemon.sub, until=lambda ev: len(by_type(ev, "speaker")) >= speakers, timeout=60)
    ends = {e["utterance"]: e for e in by_type(events, "vad.end")}
    return by_type(events, "speaker"), ends


# ---------------------------------------------------------------- a daemon that keeps audio, and its console


@pytest.fixture(scope="module")
def kept(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kept")
    iso, notify = Isolated(tmp), NotifySocket(tmp / "notify.sock")
    daemon = LiveDaemon(iso, notify, tmp, "identity.enroll_min_seconds=1.0", "identity.keep_recent_audio=true")
    sets = iso.sets(f'control.endpoint="{daemon.endpoint}"')[1::2]
    args = [a for kv in sets for a in ("--set", kv)]
    listen = f"127.0.0.1:{free_port()}"
    console = start_streamd("console", *args, "--listen", listen)
    line = console.stderr.readline()
    assert line.startswith("console: "), line
    heard = spoken(daemon, "demo.flac", 10)
    yield daemon, f"http://{listen}", heard
    stop(console)
    stop(daemon.proc)
    daemon.sub.close(0)
    notify.close()


def test_each_recent_utterance_s_audio_comes_back_as_wav_as_long_as_the_utterance(kept):
    daemon, _, (speakers, ends) = kept
    assert [e["utterance"] for e in speakers] == list(range(10))
    total = 0.0
    for event in speakers:
        n = event["utterance"]
        reply = daemon.ask({"cmd": "recent_audio", "utterance": n})
        assert reply["ok"], reply
        assert (reply["stream"], reply["utterance"], reply["format"], reply["sample_rate"]) == ("default", n, "wav",
                                                                                              16000)
        audio, rate, kind = wav_of(reply)
        assert (rate, kind, audio.ndim) == (16000, "WAV/PCM_16", 1)
        seconds = len(audio) / rate
        span = ends[n]["t_end"] - ends[n]["t_start"]
        # The models see the pre-roll (vad.preroll_ms, and the onset frames heard before the
        # first voiced one: vad.onset_ms at most), the speech (the event's span) and the tail.
        low = span + VAD.tail_ms / 1000 - FRAME_S if ends[n]["reason"] == "silence" else span - FRAME_S
        high = span + (VAD.preroll_ms + VAD.onset_ms + VAD.tail_ms) / 1000 + FRAME_S
        assert low <= seconds <= high, (n, seconds, span, ends[n])
        assert reply["seconds"] == pytest.approx(seconds, abs=1e-3)
        end = int(round((ends[n]["t_end"] + VAD.tail_ms / 1000) * SAMPLE_RATE))
        assert np.array_equal(audio, CLIP[end - len(audio):end]), n  # the very samples heard, up to the tail
        total += seconds
    stats = daemon.ask({"cmd": "stats"})
    assert stats["keep_recent_audio"] is True
    assert stats["streams"]["default"]["recent_audio_s"] == pytest.approx(total, abs=0.01)


def test_an_utterance_not_among_the_recent_ones_or_a_bad_request_gets_one_line(kept):
    daemon = kept[0]
    reply = daemon.ask({"cmd": "recent_audio", "utterance": 999})
    assert not reply["ok"] and reply["error"].startswith("recent_audio: utterance 999 is not among the recent ones")
    for bad, error in (({}, "recent_audio: missing field 'utterance'"),
                       ({"utterance": "3"}, "recent_audio: field 'utterance' must be int"),
                       ({"utterance": True}, "recent_audio: field 'utterance' must be int"),
                       ({"utterance": 3, "stream": "hall"}, "no stream named 'hall'")):
        reply = daemon.ask({"cmd": "recent_audio", **bad})
        assert (reply["ok"], reply["error"]) == (False, error), bad
    assert daemon.ask({"cmd": "recent_audio", "utterance": 3})["ok"]  # still serving


def test_the_console_serves_a_recent_utterance_as_audio_wav(kept):
    daemon, url, _ = kept
    with urllib.request.urlopen(url + "/api/recent/audio?stream=default&utterance=3", timeout=15) as reply:
        assert reply.status == 200 and reply.headers["content-type"] == "audio/wav"
        body = reply.read()
    audio, rate = sf.read(io.BytesIO(body), dtype="int16")
    assert rate == 16000
    assert np.array_equal(audio, wav_of(daemon.ask({"cmd": "recent_audio", "utterance": 3}))[0])
    with urllib.request.urlopen(url + "/api/recent", timeout=15) as reply:
        recent = json.loads(reply.read())
    assert recent["audio_kept"] is True and "in memory" in recent["audio_note"]
    for query, status, error in (("utterance=999", 422, "recent_audio: utterance 999 is not among"),
                                 ("utterance=x", 400, "recent_audio: 'utterance' must be an utterance number"),
                                 ("", 400, "recent_audio: which utterance?")):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url + "/api/recent/audio?" + query, timeout=15)
        assert refused.value.code == status
        assert json.loads(refused.value.read())["error"].startswith(error), query


CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


def chromium(profile: Path):
    """Debian's headless Chromium (as tests/test_console.py drives it), or a skip without it."""
    if not CHROMIUM.exists():
        pytest.skip(f"no {CHROMIUM}: `make sysdeps` as root installs Debian's chromium and chromium-driver")
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,900", "--autoplay-policy=no-user-gesture-required", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=str(CHROMEDRIVER)))


def wait_for(check, what: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_the_recent_voices_page_has_a_play_button_per_utterance(kept, tmp_path):
    browser = chromium(tmp_path / "chromium")
    try:
        browser.get(kept[1] + "/recent")
        wait_for(lambda: len(browser.find_elements("css selector", "#recent button.play")) >= 10, "play buttons")
        assert "in memory" in browser.find_element("id", "audio-note").text
        browser.find_element("css selector", '#recent tr[data-utterance="3"] button.play').click()
        wait_for(lambda: browser.find_element("id", "play-message").text, "the play message")
        assert browser.find_element("id", "play-message").text == "playing utterance 3 of default"
        if folder := os.environ.get("STREAMD_CONSOLE_SCREENSHOTS"):  # as tests/test_console.py: for docs/console.md
            Path(folder).mkdir(parents=True, exist_ok=True)
            browser.save_screenshot(str(Path(folder) / "console-recent-audio.png"))
    finally:
        browser.quit()


def test_remove_drops_the_kept_audio_of_the_utterances_given_to_that_speaker(kept):
    daemon = kept[0]
    reply = daemon.ask({"cmd": "enroll_recent", "name": "theo", "utterances": [0, 1, 2, 9]})  # theo's (demo.csv)
    assert reply["ok"], reply
    speakers, _ = spoken(daemon, "demo.flac", 10)
    named = [e["utterance"] for e in speakers if e["speaker"] == "theo"]
    others = [e["utterance"] for e in speakers if e["speaker"] != "theo"]
    assert named and others, speakers
    assert all(daemon.ask({"cmd": "recent_audio", "utterance": n})["ok"] for n in named + [0, 3])
    before = daemon.ask({"cmd": "stats"})["streams"]["default"]["recent_audio_s"]
    reply = daemon.ask({"cmd": "remove", "name": "theo"})
    assert reply["ok"], reply
    for n in named + [0, 1, 2, 9]:  # named theo, or enrolled as theirs
        assert "is not among the recent ones" in daemon.ask({"cmd": "recent_audio", "utterance": n})["error"], n
    assert all(daemon.ask({"cmd": "recent_audio", "utterance": n})["ok"] for n in others + [3])  # others' stay
    after = daemon.ask({"cmd": "stats"})["streams"]["default"]["recent_audio_s"]
    assert 0 < after < before


# ---------------------------------------------------------------- the default: nothing kept


def test_with_the_option_off_no_audio_is_kept_and_the_command_says_so(tmp_path):
    iso, notify = Isolated(tmp_path), NotifySocket(tmp_path / "notify.sock")
    daemon = LiveDaemon(iso, notify, tmp_path)
    try:
        speakers, _ = spoken(daemon, "demo.flac", 10)
        assert len(speakers) == 10
        for n in (0, 5, 9):
            assert daemon.ask({"cmd": "recent_audio", "utterance": n})["error"] == OFF_ERROR
        stats = daemon.ask({"cmd": "stats"})
        assert stats["keep_recent_audio"] is False
        assert stats["streams"]["default"] == {"utterances": 10, "recent": 10, "recent_audio_s": 0.0}
    finally:
        stop(daemon.proc)
        daemon.sub.close(0)
        notify.close()


# ---------------------------------------------------------------- the part that keeps it


class Published:
    def __init__(self):
        self.events = []

    def publish(self, event) -> None:
        self.events.append(event)


def decisions(keep_audio: bool, recent: int = 3) -> Decisions:
    metrics = Metrics(CollectorRegistry())
    stages = StageTimes(metrics.stage, "hall")
    return Decisions("hall", None, None, 0.5, recent, StreamEvents("hall", Published(), metrics, stages), stages,
                     keep_audio=keep_audio)


def hear(d: Decisions, n: int, audio: np.ndarray) -> None:
    end = SpeechEnd(n, 1.0, 0.8, 1.0 + len(audio) / SAMPLE_RATE, "silence", time.monotonic())
    d.final(end, Utterance(np.zeros((50, 80), np.float32), 0.5), audio, np.ones(192, np.float32), np.zeros(11))


def test_off_the_recent_utterances_keep_no_audio_at_all():
    d = decisions(keep_audio=False)
    for n in range(5):
        hear(d, n, np.full(8000, 1000, np.int16))
    assert [r.utterance for r in d.recent] == [2, 3, 4]
    assert all(r.recording is None and r.audio is None for r in d.recent)  # no word model here either
    assert d.recording_seconds() == 0.0


def test_on_each_keeps_a_copy_of_its_audio_which_goes_with_it_or_when_turned_off():
    d = decisions(keep_audio=True)
    audio = np.arange(8000, dtype=np.int16)
    hear(d, 0, audio)
    audio[:] = 0  # the pipeline's buffer, reused: the kept copy is not
    assert np.array_equal(d.recent[0].recording, np.arange(8000, dtype=np.int16))
    for n in range(1, 4):
        hear(d, n, np.ones(4000 * n, np.int16))
    assert [r.utterance for r in d.recent] == [1, 2, 3] and d.recording_seconds() == pytest.approx(1.5)
    d.keep_audio = False  # a reload that turns it off: dropped at once, the utterances stay for enroll_recent
    assert [r.utterance for r in d.recent] == [1, 2, 3] and d.recent.maxlen == 3
    assert all(r.recording is None for r in d.recent) and d.recording_seconds() == 0.0
    hear(d, 4, np.ones(4000, np.int16))
    assert d.recent[-1].recording is None
