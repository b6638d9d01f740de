"""The microphone's audio server goes away mid-stream and comes back: the stream says so
(status events, metrics), retries with backoff, finds the device again by name, and events
resume. Real PulseAudio, real pyaudio; runs after test_mic (it restarts the sound server)."""

import contextlib
import os
import subprocess
import time

import pytest

from streamd.service.events import subscribe
from conftest import DATA, start_streamd, stop
from conftest import pactl
from helpers import by_type, collect, frames_seen, metric


def start_pulse() -> None:
    subprocess.run(["pulseaudio", "--daemon", "--exit-idle-time=-1", "--system=false"], capture_output=True,
                   timeout=30)
    deadline = time.monotonic() + 15
    while subprocess.run(["pactl", "info"], capture_output=True).returncode != 0:
        assert time.monotonic() < deadline, "PulseAudio did not come back"
        time.sleep(0.2)


def unload_sink(sink: str) -> None:
    """Unplug: unload the null sink whose monitor is the microphone (the server stays up)."""
    modules = pactl("list", "short", "modules").splitlines()
    ids = [line.split("\t")[0] for line in modules if f"sink_name={sink}" in line]
    assert ids, modules
    for module in ids:
        pactl("unload-module", module)


def server_restart(sink: str, load: tuple) -> tuple:
    """The audio server goes away (and comes back, with the sink)."""
    def unplug():
        subprocess.run(["pulseaudio", "--kill"], capture_output=True, timeout=20)

    def plug():
        start_pulse()
        pactl(*load)
    return unplug, plug


def sink_unloaded(sink: str, load: tuple) -> tuple:
    """The sink is unloaded while the server runs (PulseAudio moves the capture to its fallback
    source, so only the named source's absence tells), then loaded again under its name."""
    return (lambda: unload_sink(sink)), (lambda: pactl(*load))


@pytest.mark.slow  # about 25 s each on a 2-core machine
@pytest.mark.pulse
@pytest.mark.parametrize("fault", [sink_unloaded, server_restart])
def test_lost_microphone_is_reported_retried_and_found_again_by_name(iso, fault):
    if subprocess.run(["pactl", "info"], capture_output=True).returncode != 0:
        start_pulse()
    sink = f"streamd_unplug_{os.getpid()}"
    load = ("load-module", "module-null-sink", f"sink_name={sink}", "rate=16000", "channels=1", "format=s16le")
    unplug, plug = fault(sink, load)
    pactl(*load)
    sub = subscribe(iso.endpoint)
    proc = start_streamd("run", *iso.sets(), "--source", "mic:pulse", env={"PULSE_SOURCE": f"{sink}.monitor"})
    try:
        deadline = time.monotonic() + 60
        while frames_seen(iso.metrics_url) < 50:
            assert time.monotonic() < deadline and proc.poll() is None, "no audio frames captured"
            time.sleep(0.2)
        unplug()
        down = collect(sub, until=lambda ev: any(e.get("state") == "down" for e in ev), timeout=20)
        assert any(e["type"] == "status" and e["state"] == "down" and e["reason"] for e in down), down
        assert metric(iso.metrics_url, "streamd_stream_up", "default") == 0
        time.sleep(2)
        plug()
        up = collect(sub, until=lambda ev: any(e.get("state") == "up" for e in ev), timeout=40)
        assert any(e["type"] == "status" and e["state"] == "up" for e in up), up
        assert metric(iso.metrics_url, "streamd_stream_up", "default") == 1
        assert metric(iso.metrics_url, "streamd_source_failures_total", "default") >= 1
        subprocess.run(["paplay", f"--device={sink}", str(DATA / "demo.flac")], check=True, timeout=60)
        events = collect(sub, until=lambda ev: len(by_type(ev, "digit")) >= 10, timeout=15)
        assert len(by_type(events, "digit")) == 10
        assert proc.poll() is None
    finally:
        assert stop(proc) == 0
        sub.close(0)
        if subprocess.run(["pactl", "info"], capture_output=True).returncode != 0:
            start_pulse()  # leave a sound server running, as found
        with contextlib.suppress(AssertionError, subprocess.CalledProcessError):
            unload_sink(sink)
