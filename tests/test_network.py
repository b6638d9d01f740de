"""Audio from remote devices: `streamd send` to a daemon's network source over real ZeroMQ."""

import time

import numpy as np
import pytest
import zmq

from streamd.audio.frames import Frame
from streamd.audio.netaudio import Sender, SendError, encode, peer_mechanism
from streamd.audio.sources import read_audio
from conftest import DATA, MODELS, free_port, start_streamd, stop, streamd
from helpers import by_type, client_curve, collect, metric, server_sets
from streamd.service.events import subscribe


def test_two_devices_send_audio_and_gaps_restarts_and_garbage_are_survived(iso, tmp_path):
    listen = f"tcp://127.0.0.1:{free_port()}"
    sub = subscribe(iso.endpoint)
    daemon = start_streamd("run", *iso.sets(f'network.listen="{listen}"'), "--source", "none")
    try:
        time.sleep(0.5)
        senders = [start_streamd("send", "--source", f"file:{DATA / clip}", "--to", listen, "--stream", name,
                                 "--pace", "fast", *extra)
                   for name, clip, extra in (("kitchen", "demo.flac", ()), ("hall", "visitor12.flac", ("--vad",)))]
        for s in senders:
            assert s.wait(60) == 0, s.stderr.read()
        events = collect(sub, until=lambda ev: len(by_type(ev, "digit")) >= 15, timeout=60)
        digits = by_type(events, "digit")
        assert sorted({e["stream"] for e in digits}) == ["hall", "kitchen"]
        assert len([e for e in digits if e["stream"] == "kitchen"]) == 10
        assert len([e for e in digits if e["stream"] == "hall"]) == 5  # --vad: only speech crossed the wire
        assert {e["stream"] for e in by_type(events, "status")} >= {"kitchen", "hall"}

        # A device of our own: a gap, a restart, garbage; the daemon counts them and goes on.
        ctx = zmq.Context.instance()
        push = ctx.socket(zmq.PUSH)
        push.connect(listen)
        word = read_audio(str(DATA / "word.flac"))
        frames = np.concatenate((np.zeros(16000, np.int16), word, np.zeros(16000, np.int16)))
        blocks = [frames[i : i + 320] for i in range(0, len(frames) - 319, 320)]
        for seq, block in enumerate(blocks):
            if seq not in (10, 11, 12):  # three frames lost on the way
                push.send_multipart(encode("porch", seq, seq * 0.02, block))
        for junk in ([b"not json", b""], [b'{"v": 1, "stream": "../x", "seq": 0, "t": 0}', b"\0\0"], [b"x"]):
            push.send_multipart(junk)
        for seq, block in enumerate(blocks):  # the device restarted: seq from 0 again
            push.send_multipart(encode("porch", seq, seq * 0.02, block))
        more = collect(sub, until=lambda ev: len([e for e in by_type(ev, "digit") if e["stream"] == "porch"]) >= 2,
                       timeout=30)
        assert len([e for e in by_type(more, "digit") if e["stream"] == "porch"]) == 2
        push.close(0)
        assert metric(iso.metrics_url, "streamd_network_lost_frames_total", "porch") == 3
        assert metric(iso.metrics_url, "streamd_network_gaps_total", "porch") == 1
        assert metric(iso.metrics_url, "streamd_network_reconnects_total", "porch") == 1
        assert metric(iso.metrics_url, "streamd_network_bad_messages_total") == 3
        assert daemon.poll() is None
    finally:
        assert stop(daemon) == 0
        sub.close(0)


def test_network_listen_beyond_loopback_needs_curve_keys(tmp_path):
    r = streamd("run", "--set", 'network.listen="tcp://0.0.0.0:5999"', "--source", "stdin")
    assert r.returncode == 78 and "network.listen" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_send_to_a_curve_daemon_needs_its_keys_and_says_in_one_line_why_not(curve, iso):
    listen = f"tcp://127.0.0.1:{free_port()}"
    sub = subscribe(iso.endpoint)
    daemon = start_streamd("run", *iso.sets(f'network.listen="{listen}"', *server_sets(curve)), "--source", "none")

    def send(stream: str, *keys: str):
        return streamd("send", "--source", f"file:{DATA / 'visitor21.flac'}", "--to", listen, "--stream", stream,
                       "--pace", "fast", "--wait", "20", *keys, timeout=60)

    def keys(who: str, server: str = "server/server.key") -> list[str]:
        return ["--set", f'control.curve_client_key="{curve}/{who}/{who}.key_secret"',
                "--set", f'control.curve_server_key="{curve}/{server}"']

    try:
        sent = send("allowed", *keys("client"))
        assert sent.returncode == 0, sent.stderr
        events = collect(sub, until=lambda ev: by_type(ev, "digit"), timeout=30)
        assert {e["stream"] for e in by_type(events, "digit")} == {"allowed"}
        for stream, options, why in (("intruder", keys("intruder"), "refused this sender's key"),
                                     ("mismatch", keys("client", "client/client.key"), "handshake fails"),
                                     ("plain", [], "handshake fails")):
            r = send(stream, *options)
            assert r.returncode == 69 and why in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        # A live source is not left capturing for a daemon that will never take its audio.
        live = Sender(listen, "live", client_curve(curve, "intruder"))
        try:
            with pytest.raises(SendError, match="refused"):
                for _ in range(500):  # 5 s
                    live.send(Frame("live", 0, np.zeros(320, np.int16), 0.0, 0.0))
                    time.sleep(0.01)
        finally:
            live.close()
        assert not [e for e in collect(sub, until=lambda ev: False, timeout=2) if e.get("stream") != "allowed"]
        assert daemon.poll() is None
    finally:
        assert stop(daemon) == 0
        sub.close(0)


def test_send_gives_up_on_an_absent_daemon_after_its_wait():
    nothing = f"tcp://127.0.0.1:{free_port()}"
    r = streamd("send", "--source", f"file:{DATA / 'word.flac'}", "--to", nothing, "--pace", "fast", "--wait", "1",
                timeout=30)
    assert r.returncode == 69 and f"no daemon at {nothing} took the audio within 1 s" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1  # not also "sent N frames"
    full = Sender(nothing, "x", hwm=5, wait_s=0.5)  # a file longer than the queue: the send itself gives up
    try:
        with pytest.raises(SendError, match="took audio for 0.5 s"):
            for seq in range(20):
                full.send(Frame("x", seq, np.zeros(320, np.int16), seq * 0.02, 0.0), block=True)
        assert full.seq >= 5
    finally:
        full.close()


def test_a_live_sender_rides_out_a_daemon_restart(iso):
    listen = f"tcp://127.0.0.1:{free_port()}"
    sub = subscribe(iso.endpoint)
    word = read_audio(str(DATA / "word.flac"))
    audio = np.concatenate((np.zeros(8000, np.int16), word, np.zeros(16000, np.int16)))
    live = Sender(listen, "live")

    def say_a_word() -> list[dict]:
        for k in range(0, len(audio) - 319, 320):
            live.send(Frame("live", 0, audio[k : k + 320], live.seq * 0.02, 0.0))  # never raises here
        return by_type(collect(sub, until=lambda ev: by_type(ev, "digit"), timeout=30), "digit")

    try:
        for _ in range(2):  # the second daemon starts while the sender is queuing for the first
            daemon = start_streamd("run", *iso.sets(f'network.listen="{listen}"'), "--source", "none",
                                   "--wait-subscriber", "10")  # the queued word must not beat sub's reconnect
            try:
                assert [e["stream"] for e in say_a_word()] == ["live"]
                assert live.dropped == 0
            finally:
                assert stop(daemon) == 0
            for _ in range(50):  # 1 s while nobody listens: queued, not lost
                live.send(Frame("live", 0, np.zeros(320, np.int16), live.seq * 0.02, 0.0))
    finally:
        live.close()
        sub.close(0)


# ---------------------------------------------------------------- issue 29 items 7 and 9

def test_a_senders_last_utterance_ends_when_its_audio_stops_and_refusals_are_said(tmp_path, iso):
    """A sender that finishes gets its vad.end and decision without any more audio, and the
    next sender on that stream starts a new utterance. Audio of a stream the daemon refuses
    (network.accept_any = false) is logged once; set_threshold says which knob applies."""
    from streamd.service import control

    listen = f"tcp://127.0.0.1:{free_port()}"
    endpoint = f"ipc://{tmp_path}/control.sock"
    conf = tmp_path / "daemon.toml"
    conf.write_text(f'[models]\ndir = "{MODELS}"\n[network]\nlisten = "{listen}"\naccept_any = false\n[control]\nendpoint = "{endpoint}"\n'
                    '[[streams]]\nid = "porch"\nsource = "net"\n')
    sub = subscribe(iso.endpoint)
    daemon = start_streamd("run", "--config", str(conf), *iso.sets('metrics.listen=""'))

    def send(stream: str, *extra: str):
        return streamd("send", "--source", f"file:{DATA / 'word.flac'}", "--to", listen, "--stream", stream,
                       "--pace", "fast", "--wait", "20", *extra, timeout=60)

    try:
        time.sleep(0.5)
        for n, extra in enumerate(((), ("--vad",))):
            r = send("porch", *extra)
            assert r.returncode == 0, r.stderr
            sent = time.monotonic()
            events = collect(sub, until=lambda ev: by_type(ev, "digit"), timeout=15)
            assert time.monotonic() - sent < 10, "the decision waited for more audio"
            ends = by_type(events, "vad.end")
            assert [e["stream"] for e in ends] == ["porch"], events
            assert ends[0]["reason"] in ("silence", "end_of_stream"), ends
            assert [e["utterance"] for e in by_type(events, "digit")] == [n]  # the second sender: a new one
            if n:
                assert by_type(events, "vad.start")[0]["t_start"] > first_end  # nothing of the first joined it
            first_end = ends[0]["t_end"]

        for _ in range(2):
            r = send("stranger")
            assert r.returncode == 0, r.stderr  # PUSH has no way back: the daemon's log says it
        reply = control.request(endpoint, {"cmd": "set_threshold", "threshold": 0.5})
        assert not reply["ok"] and "'far'" in reply["error"] and "calibrated" in reply["error"], reply
        ok = control.request(endpoint, {"cmd": "set_threshold", "far": 0.05})
        assert ok["ok"] and ok["far"] == 0.05, ok
    finally:
        assert stop(daemon) == 0
        sub.close(0)
    log = daemon.stderr.read()
    refused = [line for line in log.splitlines() if "stranger" in line]
    assert len(refused) == 1 and "accept_any" in refused[0], log


def test_the_greeting_probe_tells_a_curve_daemon_from_a_plain_one_and_from_no_zeromq_at_all():
    """A plain sender that a CurveZMQ daemon hangs up on must hear 'the handshake fails', not
    'no daemon': libzmq reports a mechanism mismatch only when the daemon's greeting arrived first."""
    import socket

    ctx = zmq.Context.instance()
    plain, secured = ctx.socket(zmq.PULL), ctx.socket(zmq.PULL)
    secured.curve_server = True
    secured.curve_publickey, secured.curve_secretkey = zmq.curve_keypair()
    ports = [s.bind_to_random_port("tcp://127.0.0.1") for s in (plain, secured)]
    mute = socket.socket()
    mute.bind(("127.0.0.1", 0))
    mute.listen(1)
    try:
        assert peer_mechanism(f"tcp://127.0.0.1:{ports[0]}") == "NULL"
        assert peer_mechanism(f"tcp://127.0.0.1:{ports[1]}") == "CURVE"
        assert peer_mechanism(f"tcp://127.0.0.1:{mute.getsockname()[1]}", timeout_s=0.3) is None
        assert peer_mechanism(f"tcp://127.0.0.1:{free_port()}") is None
        assert peer_mechanism("ipc:///tmp/nothing") is None
    finally:
        plain.close(0), secured.close(0), mute.close()


def test_send_says_when_nothing_there_is_a_streamd_daemon_and_honours_its_wait():
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    port = server.getsockname()[1]

    def refuse():  # something that is not a daemon: accepts, then hangs up
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conn.close()

    threading.Thread(target=refuse, daemon=True).start()
    try:
        r = streamd("send", "--source", f"file:{DATA / 'word.flac'}", "--to", f"tcp://127.0.0.1:{port}",
                    "--pace", "fast", "--wait", "5", timeout=30)
    finally:
        server.close()
    assert r.returncode == 69 and "no streamd daemon listens there" in r.stderr, r.stderr
    assert "CurveZMQ" not in r.stderr and len(r.stderr.strip().splitlines()) == 1

    nothing = f"tcp://127.0.0.1:{free_port()}"
    sender = Sender(nothing, "x", wait_s=1.0)
    start = time.monotonic()
    try:
        sender.send(Frame("x", 0, np.zeros(320, np.int16), 0.0, 0.0), block=True)
        with pytest.raises(SendError, match="within 1 s"):
            sender.finish()
    finally:
        sender.close()
    assert time.monotonic() - start < 1.6  # the wait, not the wait and then a close that lingers
