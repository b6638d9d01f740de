import json
import time

import zmq

from streamd.events import DigitEvent, Publisher, SpeakerEvent, VadStart, receive, subscribe


def test_two_frame_messages_with_topic_and_sequence(tmp_path):
    jsonl = open(tmp_path / "e.jsonl", "w")
    pub = Publisher("tcp://127.0.0.1:*", jsonl=jsonl)
    sub = subscribe(pub.endpoint, "digit.")
    assert pub.wait_for_subscriber(5)
    pub.publish(VadStart("kitchen", 0, 1.0, 1.1))
    pub.publish(DigitEvent("kitchen", 0, 1.0, 1.5, digit=4, confidence=0.9,
                           candidates=[{"digit": 4, "p": 0.9}], latency_s=0.01))
    assert sub.poll(5000)
    topic, body = sub.recv_multipart()
    assert topic == b"digit.kitchen"
    event = json.loads(body)
    assert event["seq"] == 1 and event["v"] == 1 and event["digit"] == 4 and event["stream"] == "kitchen"
    assert not sub.poll(200)  # the vad.start was filtered by topic
    pub.close()
    lines = [json.loads(l) for l in open(tmp_path / "e.jsonl")]
    assert [l["type"] for l in lines] == ["vad.start", "digit"]


def test_a_subscriber_that_never_reads_does_not_block_publishing():
    pub = Publisher("tcp://127.0.0.1:*", hwm=10)
    ctx = zmq.Context.instance()
    stuck = ctx.socket(zmq.SUB)
    stuck.setsockopt(zmq.RCVHWM, 10)
    stuck.setsockopt_string(zmq.SUBSCRIBE, "")
    stuck.connect(pub.endpoint)
    assert pub.wait_for_subscriber(5)
    t0 = time.monotonic()
    for i in range(20000):
        pub.publish(SpeakerEvent("s", i, 0.0, 1.0, speaker="unknown", candidates=[], latency_s=0.0))
    assert time.monotonic() - t0 < 30  # it finished: never waited on the stuck subscriber
    assert pub.seq == 20000
    late = subscribe(pub.endpoint)  # a late joiner gets what is published after it joined
    time.sleep(0.3)
    pub.publish(VadStart("s", 1, 0.0, 0.1))
    event = receive(late, 5000)
    assert event is not None and event["seq"] == 20000
    stuck.close(0)
    late.close(0)
    pub.close(0)


def test_listen_text_describes_every_event_type_a_daemon_publishes():
    """`streamd listen --format text` (what `make demo` shows) reads real published events,
    status events included, without stopping on any of them."""
    import subprocess
    import sys

    from streamd.events import StatusEvent, VadStart

    pub = Publisher("tcp://127.0.0.1:*", hwm=100)
    listener = subprocess.Popen([sys.executable, "-m", "streamd", "listen", "--endpoint", pub.endpoint,
                                 "--format", "text", "--count", "3", "--timeout", "20"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert pub.wait_for_subscriber(20)
        time.sleep(0.3)
        pub.publish(VadStart("kitchen", 0, 1.0, 1.2))
        pub.publish(SpeakerEvent("kitchen", 0, 1.0, 2.0, speaker="unknown", candidates=[], latency_s=0.01))
        pub.publish(StatusEvent("kitchen", "ended", "end of file"))
        out, err = listener.communicate(timeout=30)
    finally:
        listener.kill()
        pub.close(0)
    assert listener.returncode == 0, err
    lines = out.splitlines()
    assert len(lines) == 3 and "speech started" in lines[0] and "speaker unknown" in lines[1]
    assert lines[2] == "[kitchen] status ended (end of file)"


def test_listen_text_says_which_taught_vocabulary_named_a_digit():
    from streamd.cli import describe
    from streamd.events import DigitEvent

    def line(**kw):
        return describe({"stream": "s", **DigitEvent("s", 3, 1.0, 1.5, latency_s=0.01, **kw).payload(), "type": "digit"})

    assert "digit   7 (az) (p 0.62)" in line(digit=7, confidence=0.62, vocabulary="az")
    assert "digit   7 (p 0.90)" in line(digit=7, confidence=0.9, vocabulary="builtin")
    assert "digit   - (p 0.30)" in line(digit=None, confidence=0.3)
