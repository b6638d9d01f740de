"""Events to NATS (issue 34, item 2): real daemons as nodes publish every event to a real
nats-server with JetStream; `streamd listen --nats` sees every node, replays what it missed,
and an outage of NATS never stops the ZeroMQ events."""

from __future__ import annotations

import signal
import time

import pytest

from conftest import start_streamd, streamd
from helpers import by_type, collect, metric
from natsd import nats_server  # noqa: F401 - the fixture
from nodes import Node, json_lines

pytestmark = [pytest.mark.server, pytest.mark.slow]

STREAM = "EVENTS"


def nats_sets(server, *extra: str) -> list[str]:
    return [f'events.nats="{server.url}"', f'events.nats_jetstream="{STREAM}"', *extra]


def replay(server, *extra: str) -> list[dict]:
    r = streamd("listen", "--nats", server.url, "--replay", "--jetstream", STREAM, "--timeout", "3", *extra,
                timeout=60)
    assert r.returncode == 0, r.stderr
    return json_lines(r.stdout)


def until_digits(node: Node, n: int = 1) -> list[dict]:
    """The node's ZeroMQ events until ``n`` ``digits`` events (an utterance's last) have come."""
    events = collect(node.sub, until=lambda ev: len(by_type(ev, "digits")) >= n, timeout=60)
    assert len(by_type(events, "digits")) >= n, events
    return events


def seqs(events: list[dict], node: str) -> list[int]:
    return sorted(e["seq"] for e in events if e["node"] == node)


def nats_status(events: list[dict], state: str) -> list[dict]:
    return [e for e in by_type(events, "status") if e["stream"] == "daemon" and e["state"] == state
            and e["reason"].startswith("events.nats")]


def test_two_nodes_publish_to_one_nats_a_subscriber_sees_both_and_a_replay_gets_what_it_missed(
        tmp_path, nats_server):
    nodes = [Node(tmp_path, "a", *nats_sets(nats_server)), Node(tmp_path, "b", *nats_sets(nats_server))]
    live = start_streamd("listen", "--nats", nats_server.url, "--subject", "streamd.digit.>", "--count", "2",
                         "--timeout", "60")
    try:
        deadline = time.monotonic() + 30
        while not nats_server.subscribed("streamd.digit.>"):
            assert time.monotonic() < deadline and live.poll() is None, live.stderr.read() if live.poll() else ""
            time.sleep(0.1)
        for node, stream in zip(nodes, ("kitchen", "hall")):
            node.send(stream)
        out, err = live.communicate(timeout=60)
        assert live.returncode == 0, err
        digits = json_lines(out)
        assert sorted((d["node"], d["stream"], d["type"], d["digit"]) for d in digits) == [
            ("a", "kitchen", "digit", 7), ("b", "hall", "digit", 7)]
        zmq_events = {node.name: until_digits(node) for node in nodes}

        # A durable consumer: everything so far, each node's events whole and in order...
        first = replay(nats_server, "--durable", "audit")
        for node in nodes:
            mine = [e for e in first if e["node"] == node.name]
            assert [e["seq"] for e in mine] == list(range(len(mine)))  # JetStream lost nothing while up
            assert [{k: v for k, v in e.items() if k != "node"} for e in mine] == zmq_events[node.name][:len(mine)]
        # ...and on its next run only what it missed while away.
        nodes[0].send("kitchen")
        missed_zmq = until_digits(nodes[0])
        again = replay(nats_server, "--durable", "audit")
        assert {e["node"] for e in again} == {"a"}
        assert seqs(again, "a") == [e["seq"] for e in missed_zmq]
        assert min(seqs(again, "a")) == max(seqs(first, "a")) + 1
        assert [e["type"] for e in again if e["type"] in ("digit", "digits")] == ["digit", "digits"]
        assert metric(nodes[0].iso.metrics_url, "streamd_nats_connected") == 1
        assert metric(nodes[0].iso.metrics_url, "streamd_nats_dropped_total") == 0
    finally:
        if live.poll() is None:
            live.kill()
        for node in nodes:
            assert node.stop() == 0


def test_a_nats_outage_never_stops_zeromq_and_buffered_events_arrive_after_it_or_are_counted(
        tmp_path, nats_server):
    """Node a buffers every event of the outage; node b, with room for 3, drops the oldest and
    counts them. Both publish on ZeroMQ throughout, without a gap."""
    a = Node(tmp_path, "a", *nats_sets(nats_server))
    b = Node(tmp_path, "b", *nats_sets(nats_server, "events.nats_buffer=3"))
    seen = {"a": [], "b": []}
    try:
        for node in (a, b):
            node.send("room")
            seen[node.name] += until_digits(node)
        nats_server.stop(signal.SIGKILL)
        for node in (a, b):
            seen[node.name] += collect(node.sub, until=lambda ev: nats_status(ev, "down"), timeout=15)
            assert nats_status(seen[node.name], "down")
            assert metric(node.iso.metrics_url, "streamd_nats_connected") == 0
            for _ in range(2):
                node.send("room")
                seen[node.name] += until_digits(node)
        assert metric(a.iso.metrics_url, "streamd_nats_buffered") >= 10
        dropped = metric(b.iso.metrics_url, "streamd_nats_dropped_total")
        assert dropped > 0
        nats_server.start()
        for node in (a, b):
            back = collect(node.sub, until=lambda ev: nats_status(ev, "up"), timeout=30)
            assert nats_status(back, "up")
            seen[node.name] += back
            assert [e["seq"] for e in seen[node.name]] == list(range(len(seen[node.name])))  # ZeroMQ: no gap
        time.sleep(1.0)  # the buffers empty
        stored = replay(nats_server)
        assert seqs(stored, "a") == [e["seq"] for e in seen["a"]]  # every event of the outage arrived after it
        missing = set(e["seq"] for e in seen["b"]) - set(seqs(stored, "b"))
        dropped = metric(b.iso.metrics_url, "streamd_nats_dropped_total")
        assert 0 < len(missing) <= dropped, (sorted(missing), [(e["seq"], e["type"]) for e in seen["b"]])
        assert metric(a.iso.metrics_url, "streamd_nats_dropped_total") == 0
        assert metric(a.iso.metrics_url, "streamd_nats_buffered") == 0
    finally:
        for node in (a, b):
            assert node.stop() == 0
