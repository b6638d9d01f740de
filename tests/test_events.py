import json
import time

import zmq

from streamd.service.events import DigitEvent, Publisher, SpeakerEvent, VadStart, receive, subscribe


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


def stalled_subscriber(endpoint: str, topic: str = "") -> zmq.Socket:
    """A subscriber that never reads, with the smallest queues ZeroMQ and the kernel allow."""
    sock = zmq.Context.instance().socket(zmq.SUB)
    sock.setsockopt(zmq.RCVHWM, 1)
    sock.setsockopt(zmq.RCVBUF, 4096)
    sock.setsockopt_string(zmq.SUBSCRIBE, topic)
    sock.connect(endpoint)
    return sock


def drain(sock: zmq.Socket, quiet_ms: int = 500) -> list[int]:
    """The seq of every event a subscriber has been sent, once nothing more comes."""
    seqs = []
    while (event := receive(sock, quiet_ms)) is not None:
        seqs.append(event["seq"])
    return seqs


def speaker(i: int) -> SpeakerEvent:
    return SpeakerEvent("s", i, 0.0, 1.0, speaker="unknown", latency_s=0.0,
                        candidates=[{"name": f"speaker-{k}", "score": 0.1} for k in range(3)])


def test_a_stalled_subscriber_never_blocks_publishing_and_every_event_it_loses_is_counted(tmp_path):
    """One subscriber never reads; another reads all along. Publishing never waits; each event
    is delivered to both or to neither, and those delivered to neither are the ones counted."""
    import threading

    pub = Publisher(f"ipc://{tmp_path}/events", hwm=10)
    stuck = stalled_subscriber(pub.endpoint)
    reader = subscribe(pub.endpoint)
    assert pub.wait_for_subscriber(10, count=2)  # (waiting for 1 could return before the second arrived)
    assert pub.subscribers == 2
    read: list[int] = []
    done = threading.Event()

    def read_all():
        while not done.is_set() or reader.poll(500):
            event = receive(reader, 50)
            if event is not None:
                read.append(event["seq"])

    thread = threading.Thread(target=read_all)
    thread.start()
    t0 = time.monotonic()
    for i in range(20000):
        pub.publish(speaker(i))
    elapsed = time.monotonic() - t0
    done.set()
    thread.join(30)
    got = drain(stuck)
    assert elapsed < 30  # it finished: never waited on the stalled subscriber
    assert pub.seq == 20000
    assert pub.dropped > 0, "the stalled subscriber's losses must be counted"
    assert len(got) + pub.dropped == 20000 and got == sorted(got)  # every loss counted, nothing more
    assert read == got  # the price of counting: the reader lost the same events
    late = subscribe(pub.endpoint)  # a late joiner gets what is published after it joined
    time.sleep(0.3)
    stuck.close(0)  # (else the late joiner's first event may be refused: stuck still holds its queue full)
    time.sleep(0.3)
    pub.publish(VadStart("s", 1, 0.0, 0.1))
    event = receive(late, 5000)
    assert event is not None and event["seq"] == 20000
    reader.close(0)
    late.close(0)
    pub.close(0)


def test_every_drop_calls_on_drop_and_a_drop_on_one_topic_spares_the_others(tmp_path):
    pub = Publisher(f"ipc://{tmp_path}/events", hwm=2)
    calls = []
    pub.on_drop = lambda: calls.append(1)
    stuck = stalled_subscriber(pub.endpoint, "speaker.")
    assert pub.wait_for_subscriber(5)
    for i in range(5000):
        pub.publish(speaker(i))
    assert pub.dropped > 0 and len(calls) == pub.dropped
    dropped = pub.dropped
    for i in range(100):  # no subscriber of vad.* is full: nothing refused
        pub.publish(VadStart("s", i, 0.0, 0.1))
    assert pub.dropped == dropped
    assert len(drain(stuck)) + dropped == 5000
    stuck.close(0)
    pub.close(0)


def test_subscribers_counts_each_subscriber_even_of_the_same_topic(tmp_path):
    pub = Publisher(f"ipc://{tmp_path}/events")

    def settle(want: int) -> int:
        deadline = time.monotonic() + 5
        while pub.subscribers != want and time.monotonic() < deadline:
            pub.wait_for_subscriber(0.05)
            pub.publish(VadStart("s", 0, 0.0, 0.1))  # reads (un)subscriptions too
            time.sleep(0.02)
        return pub.subscribers

    a = subscribe(pub.endpoint, "digit.")
    b = subscribe(pub.endpoint, "digit.")
    assert settle(2) == 2
    c = subscribe(pub.endpoint, "vad.")
    assert settle(3) == 3
    a.close(0)
    assert settle(2) == 2
    b.close(0)
    c.close(0)
    assert settle(0) == 0
    pub.close(0)


def test_listen_text_describes_every_event_type_a_daemon_publishes():
    """`streamd listen --format text` (what `make demo` shows) reads real published events,
    status events included, without stopping on any of them."""
    import subprocess
    import sys

    from streamd.service.events import StatusEvent, VadStart

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
    from streamd.service.events import DigitEvent

    def line(**kw):
        return describe({"stream": "s", **DigitEvent("s", 3, 1.0, 1.5, latency_s=0.01, **kw).payload(), "type": "digit"})

    assert "digit   7 (az) (p 0.62)" in line(digit=7, confidence=0.62, vocabulary="az")
    assert "digit   7 (p 0.90)" in line(digit=7, confidence=0.9, vocabulary="builtin")
    assert "digit   - (p 0.30)" in line(digit=None, confidence=0.3)
