import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from streamd.service.events import subscribe
from conftest import DATA, ROOT, free_port, start_streamd, stop
from helpers import by_type, collect, server_sets

UNIT = ROOT / "systemd" / "streamd.service"
SEND_UNIT = ROOT / "systemd" / "streamd-send.service"
CONSOLE_UNIT = ROOT / "systemd" / "streamd-console.service"
SCRIPT = Path(sys.executable).parent / "streamd"


@pytest.mark.parametrize("shipped", [UNIT, SEND_UNIT, CONSOLE_UNIT], ids=lambda p: p.name)
def test_unit_passes_systemd_analyze_verify(tmp_path, shipped):
    # verify insists that ExecStart exists: point it at this checkout's installed script,
    # leaving every other line as shipped.
    assert SCRIPT.exists()
    text = shipped.read_text()
    assert "ExecStart=/opt/streamd/.venv/bin/streamd " in text
    unit = tmp_path / shipped.name
    unit.write_text(text.replace("/opt/streamd/.venv/bin/streamd", str(SCRIPT)))
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == "", r.stderr


def test_unit_is_notify_unprivileged_and_reloads_with_sighup():
    lines = {l.split("=", 1)[0]: l.split("=", 1)[1] for l in UNIT.read_text().splitlines() if "=" in l and not l.startswith("#")}
    assert lines["Type"] == "notify"
    assert lines["Restart"] == "on-failure"
    assert "WatchdogSec" in lines
    assert lines["DynamicUser"] == "yes" and lines["SupplementaryGroups"] == "audio"
    assert lines["StateDirectory"] == "streamd"
    assert "kill -HUP $MAINPID" in lines["ExecReload"]


@pytest.mark.parametrize("shipped", [UNIT, SEND_UNIT, CONSOLE_UNIT], ids=lambda p: p.name)
def test_unit_exposure_is_low(shipped):
    r = subprocess.run(["systemd-analyze", "security", "--offline=true", str(shipped)], capture_output=True, text=True)
    line = [l for l in r.stdout.splitlines() if "Overall exposure level" in l][0]
    level = float(line.split(":")[1].split()[0])
    assert level <= 2.5, line


def exec_start(unit: Path, values: dict[str, str]) -> list[str]:
    """The unit's ExecStart split into words as systemd splits it, with its specifiers and
    ${VARIABLES} replaced by ``values``."""
    line = next(l for l in unit.read_text().splitlines() if l.startswith("ExecStart=")).split("=", 1)[1]
    for key, value in values.items():
        line = line.replace(key, value)
    return shlex.split(line)


@pytest.mark.slow  # about 19 s on a 2-core machine
@pytest.mark.pulse
def test_the_send_unit_takes_the_microphone_to_a_curve_daemon(curve, iso, null_sink, tmp_path):
    credentials = tmp_path / "credentials"  # what LoadCredential= makes of /etc/streamd/curve
    credentials.mkdir(mode=0o700)
    shutil.copy(curve / "client" / "client.key_secret", credentials / "device.key_secret")
    shutil.copy(curve / "server" / "server.key", credentials / "server.key")
    (credentials / "device.key_secret").chmod(0o400)
    listen = f"tcp://127.0.0.1:{free_port()}"
    sub = subscribe(iso.endpoint)
    daemon = start_streamd("run", *iso.sets(f'network.listen="{listen}"', *server_sets(curve)), "--source", "none",
                           "--wait-subscriber", "10")
    argv = exec_start(SEND_UNIT, {"/opt/streamd/.venv/bin/streamd": str(SCRIPT), "%d": str(credentials),
                                  "/opt/streamd/config.toml": str(ROOT / "config.toml"),
                                  "${STREAMD_TO}": listen, "${STREAMD_STREAM}": "kitchen"})
    sender = subprocess.Popen(argv, env={**os.environ, "PULSE_SOURCE": f"{null_sink}.monitor"},
                              stderr=subprocess.PIPE, text=True)
    said: list[str] = []
    reader = threading.Thread(target=lambda: said.extend(sender.stderr), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 30
        while not any("send: connected to" in line for line in said):
            assert time.monotonic() < deadline and sender.poll() is None, "".join(said)
            time.sleep(0.1)
        subprocess.run(["paplay", f"--device={null_sink}", str(DATA / "demo.flac")], check=True, timeout=60)
        events = collect(sub, until=lambda ev: len(by_type(ev, "digit")) >= 10, timeout=15)
        assert {e["stream"] for e in by_type(events, "digit")} == {"kitchen"}
        assert len(by_type(events, "digit")) >= 8, events  # the mic's VAD cut may merge or miss a word
        assert stop(sender, signal.SIGTERM) == 0, "".join(said)  # as systemctl stop does
        reader.join(10)
        assert "sent" in said[-1] and "frames of stream 'kitchen'" in said[-1]
    finally:
        stop(sender)
        assert stop(daemon) == 0
        sub.close(0)
