"""``streamd bench --network``'s devices: N ``streamd send`` senders in one process of their own.

``python -m streamd.offline.bench_senders ENDPOINT --streams N --seconds S --pace realtime|fast
[--silent]`` sends stream i's audio (the bench's: ``bench.stream_audio``) as ``streamd send``
does, one ``netaudio.Sender`` per stream (its own ZeroMQ context, socket and TCP connection),
frame k of every stream at once every 20 ms (``realtime``; a frame that finds its sender's
queue full is dropped and counted, as a live capture's is) or as fast as the daemon takes them
(``fast``: it waits). Prints ``ready`` once every sender is connected, then, at the end, one
JSON line: frames sent and dropped per stream, ticks sent late, the process's CPU seconds.

A process of their own, not threads in the bench: the devices are other machines, so their
encoding and sending must neither hold the daemon's GIL nor count in its CPU time. One process
for all N, not N processes: 50 Python interpreters would measure their own start-up and
scheduling on a 2-core machine more than the daemon's network path.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from streamd.audio.frames import SAMPLE_RATE, Frame
from streamd.audio.netaudio import Sender

LATE_S = 0.5  # a tick sent this much after its capture: the sending side fell behind


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m streamd.offline.bench_senders")
    ap.add_argument("endpoint")
    ap.add_argument("--streams", type=int, required=True)
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--pace", choices=("realtime", "fast"), required=True)
    ap.add_argument("--frame-samples", type=int, default=320)
    ap.add_argument("--silent", action="store_true")
    args = ap.parse_args(argv)

    from streamd.offline.bench import stream_audio, stream_names

    names = stream_names(args.streams)
    audio = [stream_audio(args.seconds, i, args.silent) for i in range(args.streams)]
    step, frame_s = args.frame_samples, args.frame_samples / SAMPLE_RATE
    ticks = min(len(a) for a in audio) // step
    senders = [Sender(args.endpoint, name, wait_s=30.0) for name in names]
    try:
        deadline = time.monotonic() + 30
        while not all(s.wait_connected(0.1) for s in senders):
            if time.monotonic() > deadline:
                print("bench senders: not connected within 30 s", file=sys.stderr)
                return 1
        print("ready", flush=True)
        late = 0
        block = args.pace == "fast"
        wall0 = time.monotonic()
        for k in range(ticks):
            if args.pace == "realtime":
                due = wall0 + (k + 1) * frame_s  # frame k is captured whole then
                left = due - time.monotonic()
                if left > 0:
                    time.sleep(left)
                elif -left > LATE_S:
                    late += 1
            for sender, samples in zip(senders, audio):
                sender.send(Frame(sender.stream, k, samples[k * step : (k + 1) * step], k * frame_s,
                                  time.monotonic()), block=block)
        for sender in senders:
            sender.finish()
    finally:
        for sender in senders:
            sender.close()  # lingers while the daemon takes what is queued
    print(json.dumps({"ticks": ticks, "sent": {s.stream: s.seq - s.dropped for s in senders},
                      "dropped": {s.stream: s.dropped for s in senders}, "late_ticks": late,
                      "cpu_s": time.process_time()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
