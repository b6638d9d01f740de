"""Fuzz a running daemon: random control messages on its socket and random audio on its
stdin. Whatever comes in, every reply is a JSON object with a bool ``ok`` (and a string
``error`` when false), the daemon stays up and answers ``stats``, and a speaker enrolled
before is still there with the same number of utterances."""

import json
import time

import numpy as np
import pytest
import zmq

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from conftest import DATA, stop, streamd  # noqa: E402
from helpers import LiveDaemon, by_type, collect, demo_truth  # noqa: E402

COMMANDS = ["list", "remove", "rename", "enroll_recent", "enroll_next", "set_threshold", "clusters", "promote",
            "stats", "export", "audit", "recent_audio", "nope", ""]
FIELDS = ["name", "new_name", "utterances", "seconds", "timeout_s", "stream", "far", "threshold", "cluster", "after",
          "utterance"]
NASTY_NAMES = st.sampled_from(["", " ", "unknown", "unknown-1", "a/b", "..\\x", "../../etc/passwd", "\x00",
                               "a\nb", "\x7f", "\u202e", "x" * 65, "theo ", "THEO", "théo"])

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                         st.floats(allow_nan=False), st.text(max_size=40), NASTY_NAMES)
json_values = st.recursive(json_scalars, lambda kids: st.one_of(
    st.lists(kids, max_size=5), st.dictionaries(st.text(max_size=10), kids, max_size=5)), max_leaves=20)
# Fields the handlers read, with values of any type; numbers near the edges of the ranges.
field_values = st.one_of(json_values, st.sampled_from([0, -1, 1e-7, 0.5, 0.51, 121, 1e308, -1e308, [0], [0, 1, 2],
                                                       [-1], [True], ["0"], "unknown-1", "default", "other",
                                                       float("nan"), float("inf"), -float("inf")]))
requests = st.one_of(
    st.fixed_dictionaries({"cmd": st.sampled_from(COMMANDS)},
                          optional={f: field_values for f in FIELDS}).map(json.dumps).map(str.encode),
    json_values.map(json.dumps).map(str.encode),
    st.fixed_dictionaries({"cmd": json_values}).map(json.dumps).map(str.encode),
    st.binary(max_size=300),
    st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
)


def audio_burst(kind: str, seconds: float, level: int, seed: int) -> np.ndarray:
    n = int(seconds * 16000)
    rng = np.random.default_rng(seed)
    if kind == "noise":
        return rng.integers(-level, level + 1, n, dtype=np.int32).astype(np.int16)
    if kind == "square":  # clipped: full scale
        return np.where((np.arange(n) // max(1, level % 200 + 4)) % 2 == 0, 32767, -32768).astype(np.int16)
    return np.zeros(n, np.int16)


audio = st.tuples(st.sampled_from(["noise", "square", "silence"]), st.floats(0.0, 0.6),
                  st.integers(0, 32767), st.integers(0, 2**31))


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    """One daemon for all examples; theo enrolled by the CLI first."""
    from conftest import Isolated, NotifySocket

    tmp = tmp_path_factory.mktemp("fuzz")
    state = tmp / "state"
    assert streamd("enroll", "--set", f'state.dir="{state}"', "theo", str(DATA / "enroll_theo.flac")).returncode == 0
    notify = NotifySocket(tmp / "notify.sock")
    d = LiveDaemon(Isolated(tmp), notify, tmp, f'state.dir="{state}"',
                   "identity.keep_recent_audio=true")  # recent_audio finds audio to hand out
    d.state = state
    yield d
    if d.proc.poll() is None:
        stop(d.proc)
    notify.close()


def check_reply(reply):
    assert isinstance(reply, dict), reply
    assert isinstance(reply.get("ok"), bool), reply
    if not reply["ok"]:
        assert isinstance(reply.get("error"), str) and reply["error"], reply


@pytest.mark.slow  # about 26 s on a 2-core machine
def test_random_control_messages_and_audio_leave_the_daemon_whole(fuzzed):
    d = fuzzed
    ctx = zmq.Context.instance()
    before = {s["name"]: s["utterances"] for s in d.ask({"cmd": "list"})["speakers"]}
    assert before == {"theo": 10}
    seen = {"requests": 0, "errors": 0}
    t0 = time.monotonic()

    @settings(max_examples=200, deadline=5000, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(messages=st.lists(requests, min_size=1, max_size=3), noise=st.lists(audio, max_size=2))
    def one(messages, noise):
        for kind, seconds, level, seed in noise:
            d.proc.stdin.buffer.write(audio_burst(kind, seconds, level, seed).astype("<i2").tobytes())
        d.proc.stdin.buffer.flush()
        for body in messages:
            sock = ctx.socket(zmq.REQ)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(d.endpoint)
            sock.send(body)
            # enroll_next may legitimately wait for speech: anything but a reply in time is
            # only allowed for it (it is answered at its timeout, or when speech comes).
            if sock.poll(300 if b"enroll_next" in body else 3000):
                check_reply(json.loads(sock.recv()))
                seen["requests"] += 1
            else:
                assert b"enroll_next" in body, body[:200]
            sock.close()
        assert d.proc.poll() is None

    one()
    elapsed = time.monotonic() - t0
    assert d.proc.poll() is None
    stats = d.ask({"cmd": "stats"})
    check_reply(stats)
    assert stats["ok"] is True
    # Nothing stored was lost or changed.
    after = {s["name"]: s["utterances"] for s in d.ask({"cmd": "list"})["speakers"]}
    assert after.get("theo") == 10, after
    assert seen["requests"] >= 200, seen
    assert elapsed < 60, elapsed
    # Speech still works after the noise: two seconds of silence close whatever the noise
    # left open, its events are let go, the operating point the fuzz may have moved is set
    # (the demo's looser one), then the demo's words give a digit each, most of them right,
    # and theo is named.
    d.proc.stdin.buffer.write(np.zeros(32000, np.int16).tobytes())
    d.proc.stdin.buffer.flush()
    collect(d.sub, until=lambda ev: False, timeout=2.0)
    assert d.ask({"cmd": "set_threshold", "far": 0.2})["ok"] is True
    d.speak("demo.flac")
    events = collect(d.sub, until=lambda ev: len(by_type(ev, "digit")) >= len(demo_truth()), timeout=30)
    truth = demo_truth()
    got = [e["digit"] for e in by_type(events, "digit")]
    assert len(got) == len(truth), events
    assert sum(str(g) == t["digit"] for t, g in zip(truth, got) if t["digit"]) >= 7, list(zip(truth, got))
    named = [e["speaker"] for e, t in zip(by_type(events, "speaker"), truth) if t["speaker"] == "theo"]
    assert "theo" in named, named
