"""Issue 29: a removed speaker leaves no trace in the state directory, the state directory is
private, one control socket serves one daemon, the CLI never invents a gallery, and the
end-of-stream status comes after the stream's last results."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import stat
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA, Isolated, start_streamd, stop, streamd


def test_status_ended_is_the_streams_last_event(iso, tmp_path):
    jsonl = tmp_path / "events.jsonl"
    r = streamd("run", *iso.sets('metrics.listen=""', 'identity.far=0.2'), "--source",
                f"file:{DATA / 'demo.flac'}", "--pace", "fast", "--events-jsonl", str(jsonl))
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in jsonl.read_text().splitlines()]
    ended = [i for i, e in enumerate(events) if e["type"] == "status" and e.get("state") == "ended"]
    assert len(ended) == 1, ended
    assert sum(e["type"] == "speaker" for e in events) >= 5 and sum(e["type"] == "digit" for e in events) >= 5
    assert ended[0] == len(events) - 1, [e["type"] for e in events[ended[0]:]]
