"""Helpers shared by several test modules (test modules import from here and from conftest,
never from each other: importing one test module into another collects nothing twice, but
ties their fixtures and edits together)."""

from __future__ import annotations

import csv
import re
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import soundfile as sf

from streamd import keys

from streamd.service import control
from streamd.service.events import receive, subscribe
from streamd.audio.frames import SAMPLE_RATE
from streamd.audio.sources import read_audio
from streamd.signal.vad import VadParams, segment_clip
from conftest import DATA, start_streamd

# ---------------------------------------------------------------- events of a running daemon


def demo_truth() -> list[dict]:
    with open(DATA / "demo.csv") as fh:
        return list(csv.DictReader(fh))


def collect(sock, proc=None, until=None, timeout=60.0) -> list[dict]:
    """Events until ``until(events)`` is true, or the process has exited and nothing more comes."""
    events: list[dict] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ev = receive(sock, 200)
        if ev is not None:
            events.append(ev)
            if until is not None and until(events):
                break
        elif proc is not None and proc.poll() is not None:
            break
    return events


def by_type(events, kind):
    return [e for e in events if e["type"] == kind]


class LiveDaemon:
    """A daemon reading stdin, with its control socket and a subscriber to its events."""

    def __init__(self, iso, notify, tmp_path, *extra):
        self.endpoint = f"ipc://{tmp_path}/ctl/control.sock"
        self.sub = subscribe(iso.endpoint)
        self.proc = start_streamd("run", *iso.sets(f'control.endpoint="{self.endpoint}"', *extra), "--source", "stdin",
                                  "--wait-subscriber", "20", env={"NOTIFY_SOCKET": notify.path}, stdin=subprocess.PIPE)
        assert notify.wait_for("READY=1", 60), self.proc.stderr.read() if self.proc.poll() is not None else ""

    def ask(self, message, timeout_s=10.0):
        return control.request(self.endpoint, message, timeout_s)

    def speak(self, clip="demo.flac"):
        """Play a clip into the daemon, then a second of silence so its last word ends."""
        audio = np.concatenate((read_audio(str(DATA / clip)), np.zeros(16000, np.int16)))
        self.proc.stdin.buffer.write(audio.astype("<i2").tobytes())
        self.proc.stdin.buffer.flush()

    def speakers(self, n):
        events = collect(self.sub, until=lambda ev: len(by_type(ev, "speaker")) >= n, timeout=60)
        return by_type(events, "speaker")

    def close(self):
        self.proc.stdin.close()
        code = self.proc.wait(30)
        self.sub.close(0)
        return code


# ---------------------------------------------------------------- metrics


def frames_seen(url: str) -> float:
    try:
        body = urllib.request.urlopen(url, timeout=2).read().decode()
    except OSError:
        return 0.0
    m = re.search(r'^streamd_frames_total\{stream="default"\} (\S+)$', body, re.M)
    return float(m.group(1)) if m else 0.0


def metric(url: str, name: str, stream: str | None = None) -> float:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    want = f'{name}{{stream="{stream}"}}' if stream else name
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(want + " "))


# ---------------------------------------------------------------- CurveZMQ keys (the conftest ``curve`` fixture)


def server_sets(d: Path) -> list[str]:
    return [f'control.curve_secret_key="{d}/server/server.key_secret"', f'control.curve_clients="{d}/clients"']


def client_curve(d: Path, who: str = "client", server: str = "server/server.key") -> control.ClientCurve:
    return control.ClientCurve(keys.load_secret(d / who / f"{who}.key_secret"), keys.load_public(d / server))


# ---------------------------------------------------------------- clips and corpora


def utterance_features(model, clip="demo.flac"):
    """The model's input for each utterance the VAD finds in a bundled clip."""
    from streamd.config import Config
    from streamd.signal.features import features_of_audio
    from streamd.models.inference import DigitModels

    audio = read_audio(str(DATA / clip))
    cfg = Config()
    out = []
    for end in segment_clip(audio, cfg.vad):
        a, b = (int(round(t * 16000)) for t in end.model_span(cfg.vad))
        cut = audio[a:b]
        out.append(model.features_of(cut) if isinstance(model, DigitModels) else features_of_audio(cut, model.params))
    return out


def words(clip: str) -> list:
    audio = read_audio(str(DATA / clip))
    out = []
    for e in segment_clip(audio, VadParams()):
        if e.usable:
            a, b = int(max(0.0, e.audio_t - 0.2) * SAMPLE_RATE), int((e.t_end + 0.3) * SAMPLE_RATE)
            out.append(audio[a:b])
    return out


def make_digit_corpus(root):
    """The demo's words, with demo.csv's labels: FSDD theo's digits, ASC digits and one
    other ASC word, as manifests like the real corpora's."""
    truth = demo_truth()
    fsdd, asc = root / "fsdd", root / "arabic-speech-commands"
    fsdd.mkdir(parents=True)
    asc.mkdir(parents=True)
    rows = {fsdd: ["path,speaker,digit,rep,duration_s"], asc: ["path,speaker,label,duration_s,rep,split,digit,source_file"]}
    for i, (t, w) in enumerate(zip(truth, words("demo.flac"))):
        corpus = fsdd if t["corpus"] == "fsdd" else asc
        (corpus / t["speaker"]).mkdir(exist_ok=True)
        rel = f"{t['speaker']}/{i}.flac"
        sf.write(corpus / rel, w, SAMPLE_RATE)
        seconds = len(w) / SAMPLE_RATE
        rows[corpus].append(f"{rel},{t['speaker']},{t['digit']},{i},{seconds}" if corpus == fsdd else
                            f"{rel},{t['speaker']},{t['digit'] or 'open'},{seconds},{i},val,{t['digit']},x")
    for corpus, lines in rows.items():
        (corpus / "manifest.csv").write_text("\n".join(lines) + "\n")
    return truth
