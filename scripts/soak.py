#!/usr/bin/env python3
"""Soak test: replay speech through a running daemon at fast pace for a long stretch of
audio and check that it does not leak memory, file descriptors or threads.

    SOAK_SECONDS=3600 python scripts/soak.py        # make soak

A real ``streamd run --source stdin`` is started with its own state directory (one speaker
enrolled by ``streamd enroll``, so both named and unknown voices, and the cluster store, are
exercised), a subscriber reading every event, and a control client asking ``stats`` now and
then. The bundled recordings are written to its stdin as fast as it reads them.

The daemon process's RSS (VmRSS), open fds (/proc/PID/fd) and threads are sampled after a
warm-up (``SOAK_WARMUP_SECONDS`` of audio, default 5 % of the run, at least 60 s) and at the
end, once every byte written has been processed. Exits 1 if RSS grew more than
``SOAK_MAX_RSS_GROWTH_MB`` (default 10) or fds or threads grew at all; prints one JSON object.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
sys.path.insert(0, str(ROOT))

from streamd import control  # noqa: E402
from streamd.service.events import receive, subscribe  # noqa: E402
from streamd.audio.sources import read_audio  # noqa: E402

RATE = 16000
CLIPS = ("demo.flac", "visitor12.flac", "visitor21.flac", "enroll_asc02.flac", "enroll_asc07.flac")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fd_targets(pid: int) -> list[str]:
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return sorted(out)


def sample(pid: int) -> dict:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {"rss_mb": round(int(fields["VmRSS"].split()[0]) / 1024, 1),
            "fds": len(os.listdir(f"/proc/{pid}/fd")),
            "threads": int(fields["Threads"].strip())}


def main() -> int:
    seconds = float(os.environ.get("SOAK_SECONDS", "3600"))
    warmup = float(os.environ.get("SOAK_WARMUP_SECONDS", max(60.0, 0.05 * seconds)))
    max_growth = float(os.environ.get("SOAK_MAX_RSS_GROWTH_MB", "10"))
    # One loop: each clip then a second of silence, so every utterance ends.
    loop = np.concatenate([np.concatenate((read_audio(str(DATA / c)), np.zeros(RATE, np.int16))) for c in CLIPS])
    loop_bytes = loop.astype("<i2").tobytes()
    total_samples = int(seconds * RATE)

    with tempfile.TemporaryDirectory(prefix="streamd-soak-") as tmp:
        state = Path(tmp) / "state"
        endpoint, ctl = f"tcp://127.0.0.1:{free_port()}", f"ipc://{tmp}/ctl/control.sock"
        sets = [f'state.dir="{state}"', f'events.endpoint="{endpoint}"', 'metrics.listen=""',
                f'control.endpoint="{ctl}"', 'log.level="warning"']
        args = [a for kv in sets for a in ("--set", kv)]
        cmd = [sys.executable, "-m", "streamd"]
        enrolled = subprocess.run([*cmd, "enroll", *args, "theo", str(DATA / "enroll_theo.flac")],
                                  cwd=ROOT, capture_output=True, text=True)
        if enrolled.returncode != 0:
            print(enrolled.stderr, file=sys.stderr)
            return 2
        sub = subscribe(endpoint)
        log = open(Path(tmp) / "daemon.log", "w+")
        proc = subprocess.Popen([*cmd, "run", *args, "--source", "stdin", "--wait-subscriber", "30"], cwd=ROOT,
                                stdin=subprocess.PIPE, stderr=log)
        events = {"n": 0, "speaker": 0, "digit": 0}
        stop = threading.Event()

        def drain() -> None:
            while not stop.is_set():
                ev = receive(sub, 200)
                if ev is not None:
                    events["n"] += 1
                    events[ev["type"]] = events.get(ev["type"], 0) + 1

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        written = 0
        samples: dict[str, dict] = {}
        t0 = time.monotonic()

        def processed_frames() -> int | None:
            reply = control.request(ctl, {"cmd": "stats"}, timeout_s=10)
            return None if reply is None else reply.get("utterances")

        try:
            while written < total_samples:
                n = min(len(loop), total_samples - written)
                proc.stdin.write(loop_bytes[: n * 2])
                written += n
                if "start" not in samples and written >= warmup * RATE:
                    proc.stdin.flush()
                    if processed_frames() is None:
                        raise RuntimeError("the daemon does not answer stats")
                    # Both samples are taken a second after a control request, so that the
                    # daemon has closed that client's connection (an fd) either way.
                    time.sleep(1.0)
                    samples["start"] = {"audio_s": round(written / RATE), **sample(proc.pid)}
                    fds_start = fd_targets(proc.pid)
            proc.stdin.flush()
            # The pipe holds at most 64 KiB (2 s): wait until the utterance count stops moving.
            last, still = None, 0
            while still < 3:
                time.sleep(1.0)
                now = processed_frames()
                still = still + 1 if now == last else 0
                last = now
            time.sleep(1.0)
            samples["end"] = {"audio_s": round(written / RATE), **sample(proc.pid)}
            fds_end = fd_targets(proc.pid)
            wall = time.monotonic() - t0
        finally:
            proc.stdin.close()
            code = proc.wait(60)
            stop.set()
            reader.join(2)
            sub.close(0)
            log.seek(0)
            errors = [line.rstrip() for line in log if "ERROR" in line or "Traceback" in line]
        start, end = samples["start"], samples["end"]
        growth = round(end["rss_mb"] - start["rss_mb"], 1)
        result = {"audio_seconds": round(written / RATE), "wall_seconds": round(wall, 1),
                  "x_realtime": round(written / RATE / wall, 1), "start": start, "end": end,
                  "rss_growth_mb": growth, "events": events, "utterances": last, "exit_code": code,
                  "errors_logged": errors[:5]}
        if fds_end != fds_start:  # what was opened or closed, to tell a leak from a late open
            result["fds_opened"] = sorted(set(fds_end) - set(fds_start))
            result["fds_closed"] = sorted(set(fds_start) - set(fds_end))
        print(json.dumps(result, indent=2))
        failed = []
        if growth > max_growth:
            failed.append(f"RSS grew {growth} MB (> {max_growth} MB)")
        for key in ("fds", "threads"):
            if end[key] > start[key]:
                failed.append(f"{key} grew from {start[key]} to {end[key]}")
        if code != 0:
            failed.append(f"daemon exited {code}")
        if errors:
            failed.append(f"daemon logged errors: {errors[0]}")
        for f in failed:
            print(f"soak: FAIL: {f}", file=sys.stderr)
        if not failed:
            print("soak: OK", file=sys.stderr)
        return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
