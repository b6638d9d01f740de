"""What publishing to NATS costs (docs/operations.md, "Events to NATS"): a throw-away nats-server
with JetStream on a free loopback port, N events of a typical size through the daemon's NatsOut:
the audio thread's cost per event (put) and how many events per second reach JetStream
(acknowledged, one at a time, in order). Prints one JSON line with the CPU."""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import tempfile
import time

from streamd.offline.machine import describe
from streamd.service.events import SpeakerEvent, encode, envelope
from streamd.service.nats_out import NatsOut, NatsSettings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=20000)
    ap.add_argument("--jetstream", default="BENCH", help='"" = core NATS')
    args = ap.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as store:
        server = subprocess.Popen(["nats-server", "-p", str(port), "-a", "127.0.0.1", "-js", "-sd", store],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(1.0)
            out = NatsOut(NatsSettings((f"nats://127.0.0.1:{port}",), args.jetstream, args.events + 1, "bench"))
            out.start()
            event = SpeakerEvent("kitchen", 3, 1.2, 2.4, speaker="alice", score=3.1,
                                 candidates=[{"name": "alice", "score": 3.1}, {"name": "bob", "score": 0.4}])
            while out.connected is not True:
                time.sleep(0.01)
            start = time.perf_counter()
            put_s = 0.0
            for seq in range(args.events):
                data = encode(envelope(event, seq, time.time()))
                t0 = time.perf_counter()
                out.put("speaker.kitchen", data, seq)
                put_s += time.perf_counter() - t0
            while out.published < args.events:
                time.sleep(0.005)
            elapsed = time.perf_counter() - start
            out.close()
        finally:
            server.terminate()
            server.wait(10)
    machine = describe()
    print(json.dumps({"events": args.events, "jetstream": args.jetstream or None, "bytes": len(data) + 16,
                      "put_us": round(put_s / args.events * 1e6, 1), "events_per_s": round(args.events / elapsed),
                      "cpu": machine["cpu"], "cores": machine["cores"]}))


if __name__ == "__main__":
    main()
