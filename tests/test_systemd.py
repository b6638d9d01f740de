import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

UNIT = ROOT / "systemd" / "streamd.service"


def test_unit_passes_systemd_analyze_verify(tmp_path):
    # verify insists that ExecStart exists: point it at this checkout's installed script,
    # leaving every other line as shipped.
    script = Path(sys.executable).parent / "streamd"
    assert script.exists()
    text = UNIT.read_text()
    assert "ExecStart=/opt/streamd/.venv/bin/streamd " in text
    unit = tmp_path / "streamd.service"
    unit.write_text(text.replace("/opt/streamd/.venv/bin/streamd", str(script)))
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


def test_unit_exposure_is_low():
    r = subprocess.run(["systemd-analyze", "security", "--offline=true", str(UNIT)], capture_output=True, text=True)
    line = [l for l in r.stdout.splitlines() if "Overall exposure level" in l][0]
    level = float(line.split(":")[1].split()[0])
    assert level <= 2.5, line
