#!/usr/bin/env python3
"""How the web console keeps up, and what it costs the daemon (issue 33; BENCHMARKS.md).

    python scripts/console_bench.py rate [--per-minute 1000] [--seconds 60] [--browser]
    python scripts/console_bench.py stall [--seconds 20]

``rate``: the daemon's own publisher (streamd.service.events.Publisher) on a loopback port
publishes speaker and digit events at a steady rate into a real ``streamd console`` process;
an SSE client (and with --browser, headless Chromium on the live page) reports the lag from
each event's publication to its arrival: percentiles, events received, skipped, and what the
publisher had to drop (0 unless the console's socket stopped reading).

``stall``: a real daemon captures a PulseAudio null sink's monitor (a microphone that counts
overruns) while paplay plays speech into it; phases with no console, a console with an SSE
client, the console stopped (SIGSTOP) and then killed. For each phase: capture overruns,
events dropped by the daemon, the latency of each decision (its events' latency_s, read by
another subscriber, which also counts gaps in seq) and p50/p99 from the daemon's /metrics
histogram (whose buckets are coarse: 10, 25, 50, 100 ms).

Both print one JSON object (and a line per result on stderr), with the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
sys.path.insert(0, str(ROOT))

from streamd.console.metrics_view import merged, minus, parse, quantile  # noqa: E402
from streamd.offline.machine import describe, summary  # noqa: E402
from streamd.service.events import DigitEvent, Publisher, SpeakerEvent  # noqa: E402

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"n": len(ordered), "p50_ms": round(pick(0.5) * 1000, 1), "p99_ms": round(pick(0.99) * 1000, 1),
            "max_ms": round(ordered[-1] * 1000, 1)}


def start_console(*sets: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    args = [a for kv in sets for a in ("--set", kv)]
    proc = subprocess.Popen([sys.executable, "-m", "streamd", "console", *args, "--listen", f"127.0.0.1:{port}"],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    if not line.startswith("console: "):
        raise SystemExit(f"console did not start: {line}{proc.stderr.read()}")
    return proc, f"http://127.0.0.1:{port}"


@dataclass
class SseClient:
    """Reads the console's /api/events on a thread; the lag of each event published after it connected."""

    url: str
    lags: list[float] = field(default_factory=list)
    skipped: int = 0
    connected: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        threading.Thread(target=self._read, daemon=True).start()
        if not self.connected.wait(10):
            raise SystemExit("the SSE client could not connect")

    def _read(self) -> None:
        host = self.url.split("//")[1]
        conn = http.client.HTTPConnection(host, timeout=3600)
        conn.request("GET", "/api/events")
        reply = conn.getresponse()
        opened = time.time()
        self.connected.set()
        kind = "message"
        with contextlib.suppress(OSError, ValueError):
            for raw in reply:
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    self._take(kind, json.loads(line[6:]), opened)
                elif not line:
                    kind = "message"

    def _take(self, kind: str, body: dict, opened: float) -> None:
        if kind == "skipped":
            self.skipped += body["skipped"]
        elif body.get("time", 0) >= opened:
            self.lags.append(time.time() - body["time"])


def chromium_on(url: str, profile: Path):
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path="/usr/bin/chromedriver"))
    browser.get(url + "/")
    deadline = time.monotonic() + 20
    while browser.find_element("id", "conn").text != "live":
        if time.monotonic() > deadline:
            raise SystemExit("the live page did not connect")
        time.sleep(0.05)
    return browser


def publish_steadily(publisher: Publisher, per_minute: float, seconds: float) -> int:
    """Speaker and digit events, alternately, on four streams, evenly spaced."""
    interval, start, n = 60.0 / per_minute, time.monotonic(), 0
    while n < per_minute * seconds / 60:
        delay = start + n * interval - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        stream, utterance = f"room-{n % 4}", n // 8
        t = utterance * 2.0
        if n % 2 == 0:
            publisher.publish(SpeakerEvent(stream, utterance, t, t + 0.8, speaker=f"person-{n % 7}", score=1.5,
                                           candidates=[{"name": f"person-{n % 7}", "score": 1.5}], latency_s=0.02))
        else:
            publisher.publish(DigitEvent(stream, utterance, t, t + 0.8, digit=n % 10, confidence=0.9,
                                         candidates=[{"digit": n % 10, "p": 0.9}], latency_s=0.02, vocabulary="builtin"))
        n += 1
    return n


def rate(args) -> dict:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    publisher = Publisher(endpoint, hwm=1000)
    tmp = Path(tempfile.mkdtemp(prefix="console-bench-"))
    console, url = start_console(f'events.endpoint="{endpoint}"', f'state.dir="{tmp}/state"',
                                 f'control.endpoint="ipc://{tmp}/ctl.sock"', 'metrics.listen=""')
    browser = None
    try:
        if not publisher.wait_for_subscriber(10):
            raise SystemExit("the console did not subscribe")
        client = SseClient(url)
        client.start()
        browser = chromium_on(url, tmp / "chromium") if args.browser else None
        published = publish_steadily(publisher, args.per_minute, args.seconds)
        time.sleep(2.0)  # the last events' way to the pages
        result = {"per_minute": args.per_minute, "seconds": args.seconds, "published": published,
                  "publisher_dropped": publisher.dropped, "sse": {**percentiles(client.lags), "skipped": client.skipped}}
        if browser is not None:
            page = browser.execute_script("return window.streamdConsole")
            result["browser"] = {**percentiles(page["lags"]), "skipped": page["skipped"]}
        return result
    finally:
        if browser is not None:
            browser.quit()
        console.terminate()
        console.wait(10)
        publisher.close(0)


# ---------------------------------------------------------------- stall: a real daemon on a microphone


def pactl(*args: str) -> str:
    return subprocess.run(["pactl", *args], check=True, capture_output=True, text=True, timeout=20).stdout


@contextlib.contextmanager
def null_sink():
    started = subprocess.run(["pactl", "info"], capture_output=True).returncode != 0
    if started:
        subprocess.run(["pulseaudio", "--daemon", "--exit-idle-time=-1", "--system=false"], check=True, timeout=30)
        deadline = time.monotonic() + 15
        while subprocess.run(["pactl", "info"], capture_output=True).returncode != 0:
            if time.monotonic() > deadline:
                raise SystemExit("PulseAudio did not start")
            time.sleep(0.2)
    name = f"console_bench_{os.getpid()}"
    module = pactl("load-module", "module-null-sink", f"sink_name={name}", "rate=16000", "channels=1",
                   "format=s16le").strip()
    try:
        yield name
    finally:
        subprocess.run(["pactl", "unload-module", module], capture_output=True)
        if started:
            subprocess.run(["pulseaudio", "--kill"], capture_output=True)


def scrape(url: str):
    with urllib.request.urlopen(url, timeout=5) as reply:
        return parse(reply.read().decode(), time.time())


@dataclass
class LatencyTap:
    """Another subscriber of the daemon: each decision's own latency_s, and gaps in seq."""

    endpoint: str
    seen: list[tuple[float, float]] = field(default_factory=list)  # (arrival, latency_s)
    gaps: int = 0

    def start(self) -> None:
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        from streamd.service.events import receive, subscribe

        sock, last = subscribe(self.endpoint), None
        while True:
            event = receive(sock, 1000)
            if event is None:
                continue
            if last is not None and event["seq"] > last + 1:
                self.gaps += event["seq"] - last - 1
            last = event["seq"]
            if event["type"] in ("speaker", "digit"):
                self.seen.append((time.time(), event["latency_s"]))

    def between(self, start: float, end: float) -> list[float]:
        return [latency for at, latency in self.seen if start <= at < end]


def phase_figures(before, after, latencies: list[float]) -> dict:
    histogram = merged({s: minus(b, before.latency.get(s)) for s, b in after.latency.items()})
    p50, p99 = quantile(histogram, 0.5), quantile(histogram, 0.99)
    return {"decisions": len(latencies), "events": percentiles(latencies),
            "metrics_p50_ms": None if p50 is None else round(p50 * 1000, 1),
            "metrics_p99_ms": None if p99 is None else round(p99 * 1000, 1),
            "overruns": sum(after.overruns.values()) - sum(before.overruns.values()),
            "events_dropped": after.dropped - before.dropped}


def stall(args) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="console-stall-"))
    events, metrics = f"tcp://127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    sets = [f'state.dir="{tmp}/state"', f'events.endpoint="{events}"', f'metrics.listen="{metrics}"',
            f'control.endpoint="ipc://{tmp}/ctl.sock"']
    url = f"http://{metrics}/metrics"
    with null_sink() as sink:
        daemon = subprocess.Popen([sys.executable, "-m", "streamd", "run", *[a for kv in sets for a in ("--set", kv)],
                                   "--source", "mic:pulse"], cwd=ROOT, env={**os.environ, "PULSE_SOURCE": f"{sink}.monitor"},
                                  stderr=subprocess.DEVNULL)
        player = subprocess.Popen(["bash", "-c", f"while true; do paplay --device={sink} {DATA / 'demo.flac'}; done"])
        try:
            wait_for_metrics(url)
            tap = LatencyTap(events)
            tap.start()
            phases, console = {}, None

            def measure(name: str) -> None:
                before, start = scrape(url), time.time()
                time.sleep(args.seconds)
                phases[name] = phase_figures(before, scrape(url), tap.between(start, time.time()))
                print(f"{name:16} {phases[name]}", file=sys.stderr, flush=True)

            measure("no console")
            console, console_url = start_console(*sets)
            SseClient(console_url).start()
            measure("console live")
            console.send_signal(signal.SIGSTOP)
            measure("console stopped")
            console.kill()
            console.wait(10)
            measure("console killed")
            return {"seconds_per_phase": args.seconds, "phases": phases, "gaps_seen_by_another_subscriber": tap.gaps}
        finally:
            player.kill()
            daemon.terminate()
            daemon.wait(20)


def wait_for_metrics(url: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if scrape(url).frames:
                return
        time.sleep(0.5)
    raise SystemExit("the daemon's /metrics did not come up")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    r = sub.add_parser("rate", help="events per minute into a console: the lag to its pages")
    r.add_argument("--per-minute", type=float, default=1000.0)
    r.add_argument("--seconds", type=float, default=60.0)
    r.add_argument("--browser", action="store_true", help="also headless Chromium on the live page")
    s = sub.add_parser("stall", help="a real daemon on a microphone while the console runs, stops, dies")
    s.add_argument("--seconds", type=float, default=20.0, help="per phase")
    args = parser.parse_args()
    result = rate(args) if args.what == "rate" else stall(args)
    result["machine"] = summary(describe())
    print(f"machine: {result['machine']}", file=sys.stderr)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
