"""Faults caused for real: a read-only or full state directory (a small tmpfs of its own),
CUDA asked for where it cannot run, audio files that cannot be enrolled from."""

import contextlib
import json
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import soundfile as sf

from conftest import DATA, ROOT, streamd
from helpers import LiveDaemon

EX_DATAERR, EX_CANTCREAT = 65, 73


# ---------------------------------------------------------------- a file system of our own

class SmallFs:
    """A tmpfs mounted for one test: it fills up for real, and remounted read-only it is
    read-only for root too (chmod is not)."""

    def __init__(self, path, size="16m"):
        self.path = path
        path.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "streamd-test", str(path)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN): {r.stderr.strip()}")

    def remount(self, mode):
        subprocess.run(["mount", "-o", f"remount,{mode}", str(self.path)], check=True, capture_output=True)

    def fill(self):
        """Write a file until the file system is full (ENOSPC)."""
        filler = self.path / "filler"
        with open(filler, "wb", buffering=0) as fh:
            with contextlib.suppress(OSError):
                while True:
                    fh.write(b"\0" * 4096)
        return filler

    def umount(self):
        subprocess.run(["umount", "-l", str(self.path)], capture_output=True)


@pytest.fixture
def small_fs(tmp_path):
    fs = SmallFs(tmp_path / "small")
    yield fs
    fs.umount()


def integrity(db_path) -> str:
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        return db.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        db.close()


def speakers_in(db_path) -> dict[str, int]:
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        return dict(db.execute("SELECT s.name, COUNT(e.id) FROM speakers s LEFT JOIN enrollments e "
                               "ON e.speaker_id = s.id GROUP BY s.id"))
    finally:
        db.close()


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


# ---------------------------------------------------------------- read-only state directory

def test_cli_enroll_into_a_read_only_state_dir_is_refused_in_one_line(small_fs):
    state = small_fs.path / "state"
    sets = ["--set", f'state.dir="{state}"']
    assert streamd("enroll", *sets, "theo", str(DATA / "enroll_theo.flac")).returncode == 0
    small_fs.remount("ro")
    r = streamd("enroll", *sets, "asc02", str(DATA / "enroll_asc02.flac"))
    assert r.returncode == EX_CANTCREAT
    line = one_line(r.stderr)
    assert "read-only" in line and "gallery" in line, line
    # The gallery is still read: the earlier speaker is listed, the file is whole.
    listed = streamd("speakers", *sets, "--set", 'control.endpoint="ipc:///nonexistent/ctl.sock"', "list")
    assert listed.returncode == 0 and "theo\t10 utterances" in listed.stdout, listed.stderr
    small_fs.remount("rw")
    assert integrity(state / "gallery.sqlite3") == "ok"
    assert speakers_in(state / "gallery.sqlite3") == {"theo": 10}


def test_cli_enroll_with_no_gallery_and_a_read_only_dir(small_fs):
    small_fs.remount("ro")
    r = streamd("enroll", "--set", f'state.dir="{small_fs.path / "state"}"', "theo", str(DATA / "enroll_theo.flac"))
    assert r.returncode == EX_CANTCREAT
    assert "cannot create the gallery" in one_line(r.stderr) and "read-only" in r.stderr


def test_daemon_on_a_read_only_state_dir_names_speakers_and_refuses_enrollment(
        iso, notify, tmp_path, enrolled_state, small_fs):
    state = small_fs.path / "state"
    shutil.copytree(enrolled_state, state)
    before = speakers_in(state / "gallery.sqlite3")
    small_fs.remount("ro")
    d = LiveDaemon(iso, notify, tmp_path, f'state.dir="{state}"', "identity.enroll_min_seconds=1.0")
    try:
        d.speak()
        events = d.speakers(10)
        assert "theo" in {e["speaker"] for e in events}  # enrolled speakers are still recognised
        for request in ({"cmd": "enroll_recent", "name": "newbie", "utterances": [0, 1, 2]},
                        {"cmd": "remove", "name": "theo"},
                        {"cmd": "promote", "cluster": "unknown-1", "name": "x"}):
            reply = d.ask(request)
            assert reply["ok"] is False and "read-only" in reply["error"] and "\n" not in reply["error"], reply
        listed = {s["name"]: s["utterances"] for s in d.ask({"cmd": "list"})["speakers"]}
        assert listed == before
        d.speak("word.flac")
        assert len(d.speakers(1)) == 1  # recognition goes on
        assert d.close() == 0
    finally:
        if d.proc.poll() is None:
            d.proc.kill()
    err = d.proc.stderr.read()
    assert "is read-only" in err and "enrolled speakers are recognised" in err
    small_fs.remount("rw")
    assert integrity(state / "gallery.sqlite3") == "ok"
    assert speakers_in(state / "gallery.sqlite3") == before


# ---------------------------------------------------------------- full state directory

def test_disk_full_while_running_refuses_enrollment_and_recognition_goes_on(
        iso, notify, tmp_path, enrolled_state, small_fs):
    state = small_fs.path / "state"
    shutil.copytree(enrolled_state, state)
    before = speakers_in(state / "gallery.sqlite3")
    d = LiveDaemon(iso, notify, tmp_path, f'state.dir="{state}"', "identity.enroll_min_seconds=1.0")
    try:
        filler = small_fs.fill()
        d.speak("visitor12.flac")  # unknown voices: their cluster cannot be stored either
        heard = d.speakers(5)
        assert len(heard) == 5
        reply = d.ask({"cmd": "enroll_recent", "name": "visitor", "utterances": [e["utterance"] for e in heard]})
        assert reply["ok"] is False and "disk is full" in reply["error"] and "\n" not in reply["error"], reply
        assert d.ask({"cmd": "stats"})["ok"] is True
        d.speak()
        assert len(d.speakers(10)) == 10  # events keep coming
        listed = {s["name"]: s["utterances"] for s in d.ask({"cmd": "list"})["speakers"]}
        assert listed == before
        # Space again: the same request now succeeds, nothing was left half-written.
        filler.unlink()
        reply = d.ask({"cmd": "enroll_recent", "name": "visitor", "utterances": [e["utterance"] for e in heard]})
        assert reply["ok"] is True and reply["utterances"] == 5, reply
        assert d.close() == 0
    finally:
        if d.proc.poll() is None:
            d.proc.kill()
    err = d.proc.stderr.read()
    assert "could not store an unknown voice" in err
    assert integrity(state / "gallery.sqlite3") == "ok"
    assert speakers_in(state / "gallery.sqlite3") == {**before, "visitor": 5}


def test_sqlite_full_maps_to_a_one_line_gallery_error(tmp_path):
    """SQLITE_FULL for real, without a file system: the database may not grow past its pages."""
    from streamd.identity.gallery import Gallery, StorageError
    from streamd.identity.scoring import Utterance

    g = Gallery(tmp_path / "g.sqlite3")
    utt = Utterance(np.zeros((100, 40), np.float32), 1.0)
    g.add_enrollments("a", [utt], np.zeros((1, 256), np.float32), "sha", "key", "test")
    (pages,) = g.db.execute("PRAGMA page_count").fetchone()
    g.db.execute(f"PRAGMA max_page_count={pages}")
    with pytest.raises(StorageError) as err:
        g.add_enrollments("b", [utt] * 20, np.zeros((20, 256), np.float32), "sha", "key", "test")
    assert "disk is full" in str(err.value) and "'b'" in str(err.value) and "\n" not in str(err.value)
    assert isinstance(err.value, OSError)  # the daemon's "state dir unusable" path catches it
    assert [s.name for s in g.speakers()] == ["a"] and not g.db.in_transaction
    assert g.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


@pytest.mark.parametrize("name,message,expect", [
    ("SQLITE_FULL", "database or disk is full", "the disk is full"),
    ("SQLITE_READONLY", "attempt to write a readonly database", "the state directory is read-only"),
    ("SQLITE_IOERR_WRITE", "disk I/O error", "disk I/O error"),
])
def test_sqlite_error_names_map_to_reasons(name, message, expect):
    from streamd.identity.gallery import storage_error

    exc = sqlite3.OperationalError(message)
    exc.sqlite_errorname = name
    text = str(storage_error("/x/gallery.sqlite3", "enroll 'a'", exc))
    assert text == f"gallery /x/gallery.sqlite3: cannot enroll 'a': {expect} ({message})"


# ---------------------------------------------------------------- onnxruntime provider

def cuda_works() -> bool:
    import onnxruntime as ort

    from conftest import MODELS

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    try:
        s = ort.InferenceSession(str(MODELS / "digits.onnx"), providers=["CUDAExecutionProvider"])
    except Exception:
        return False
    return s.get_providers()[0] == "CUDAExecutionProvider"


def scrape(url) -> dict[str, float]:
    body = urllib.request.urlopen(url, timeout=5).read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in body.splitlines()
            if line and not line.startswith("#")}


def test_cuda_requested_where_it_cannot_run_falls_back_to_cpu(iso, notify, tmp_path):
    """Real onnxruntime-gpu on this machine: CUDA is listed but cannot start without a GPU."""
    gpu = cuda_works()
    d = LiveDaemon(iso, notify, tmp_path, 'models.provider="cuda"')
    try:
        d.speak("word.flac")
        assert len(d.speakers(1)) == 1
        metric = scrape(iso.metrics_url)
        assert d.close() == 0
    finally:
        if d.proc.poll() is None:
            d.proc.kill()
    err = d.proc.stderr.read()
    info = [k for k in metric if k.startswith("streamd_model_info{")]
    fallbacks = {k: v for k, v in metric.items() if k.startswith("streamd_provider_fallbacks_total{")}
    if gpu:
        assert all('provider="CUDAExecutionProvider"' in k for k in info) and not fallbacks
        return
    # the speaker model and every digit model the fusion card lists (the default decision is fused)
    loaded = 1 + len(json.loads((ROOT / "models" / "digits.fusion.json").read_text())["members"])
    assert len(info) == loaded and all('provider="CPUExecutionProvider"' in k for k in info), info
    assert len(fallbacks) == loaded and set(fallbacks.values()) == {1.0}, fallbacks
    assert all('requested="cuda"' in k and 'stage="load"' in k for k in fallbacks)
    warnings = [l for l in err.splitlines() if "WARNING" in l and "using CPU" in l]
    assert len(warnings) == loaded and "CUDA provider not usable here" in warnings[0], err


def test_a_cuda_session_failing_while_running_is_replaced_by_cpu(caplog):
    """The run-time failure is simulated (no GPU to lose here): the session reports CUDA and
    raises what onnxruntime raises; the replacement CPU session is real."""
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail
    from prometheus_client import generate_latest

    from streamd import config
    from streamd.models.inference import load_model
    from streamd.service.metrics import Metrics

    metrics = Metrics()
    model = load_model(config.load(None), "digits", "cpu", on_fallback=metrics.provider_fallback)
    feats = np.random.default_rng(0).standard_normal((80, model.params.numcep)).astype(np.float32)
    want = model.run(feats)

    class LostGpu:
        def run(self, *a, **kw):
            raise Fail("[ONNXRuntimeError] : 1 : FAIL : CUDA failure 999: unknown error ; GPU=0\nmore")

        def get_providers(self):
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    model.session, model.provider, model.requested = LostGpu(), "CUDAExecutionProvider", "auto"
    metrics.model.labels(model=model.card.name, sha256=model.card.sha256, provider="CUDAExecutionProvider").set(1)
    with caplog.at_level("WARNING"):
        got = model.run(feats)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert model.provider == "CPUExecutionProvider"
    assert any("CUDA failed while running" in r.message and "CUDA failure 999" in r.message for r in caplog.records)
    text = generate_latest(metrics.registry).decode()
    assert re.search(r'streamd_provider_fallbacks_total\{model="streamd-digits",requested="auto",stage="run"\} 1\.0',
                     text)
    assert 'provider="CUDAExecutionProvider"' not in text and 'provider="CPUExecutionProvider"' in text


# ---------------------------------------------------------------- bad enrollment audio

def theo(rate=16000, channels=1):
    audio, sr = sf.read(DATA / "enroll_theo.flac", dtype="float64")
    if rate != sr:
        from scipy.signal import resample_poly
        from math import gcd

        g = gcd(rate, sr)
        audio = resample_poly(audio, rate // g, sr // g)
    return np.stack([audio] * channels, axis=1) if channels > 1 else audio


def _truncated(p):
    sf.write(p, theo(), 16000, subtype="PCM_16")
    p.write_bytes(p.read_bytes()[:44 + 3000])  # the header promises 12 s; 0.1 s is there


BAD_AUDIO = {
    "empty": (lambda p: p.write_bytes(b""), "cannot read audio"),
    "truncated": (_truncated, "too little speech"),
    "not_audio": (lambda p: p.write_bytes(b"RIFF....WAVEfmt " + b"garbage" * 500), "cannot read audio"),
    "nan": (lambda p: sf.write(p, np.where(np.arange(len(theo())) % 1000 == 5, np.nan, theo()), 16000,
                                subtype="FLOAT"), "NaN or infinite"),
    "inf": (lambda p: sf.write(p, np.where(np.arange(len(theo())) == 100, np.inf, theo()), 16000,
                                subtype="DOUBLE"), "NaN or infinite"),
    "huge": (lambda p: sf.write(p, np.zeros(601 * 8000, np.int16), 8000, subtype="PCM_16"), "too long to enroll"),
}


@pytest.mark.parametrize("kind", list(BAD_AUDIO))
def test_bad_enrollment_audio_is_a_one_line_error_and_stores_nothing(tmp_path, kind):
    make, expect = BAD_AUDIO[kind]
    path = tmp_path / f"{kind}.wav"
    make(path)
    state = tmp_path / "state"
    r = streamd("enroll", "--set", f'state.dir="{state}"', "theo", str(path))
    assert r.returncode == EX_DATAERR, r.stderr
    line = one_line(r.stderr)
    assert expect in line, line
    assert kind in line or "too little speech" in line
    assert speakers_in(state / "gallery.sqlite3") == {}


def test_enrollment_audio_at_another_rate_and_channel_count_is_converted(tmp_path):
    """44.1 kHz stereo and 8 kHz mono of the same speech enroll like the 16 kHz original."""
    counts, vec = {}, {}
    for name, rate, channels in (("orig", 16000, 1), ("cd", 44100, 2), ("phone", 8000, 1)):
        path = tmp_path / f"{name}.wav"
        sf.write(path, theo(rate, channels), rate, subtype="PCM_16")
        state = tmp_path / name  # a gallery each: one voice under two names is refused as a duplicate
        r = streamd("enroll", "--set", f'state.dir="{state}"', name, str(path))
        assert r.returncode == 0, r.stderr
        counts.update(speakers_in(state / "gallery.sqlite3"))
        db = sqlite3.connect(state / "gallery.sqlite3")
        vec[name] = np.mean([np.frombuffer(v, "<f4") for (v,) in db.execute("SELECT vector FROM embeddings")], axis=0)
        db.close()
    assert abs(counts["cd"] - counts["orig"]) <= 1 and abs(counts["phone"] - counts["orig"]) <= 2, counts
    # Misread audio (channels interleaved as samples, a wrong rate) would not sound like theo.
    cos = lambda a, b: float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))  # noqa: E731
    assert cos(vec["orig"], vec["cd"]) > 0.95 and cos(vec["orig"], vec["phone"]) > 0.8, \
        (cos(vec["orig"], vec["cd"]), cos(vec["orig"], vec["phone"]))


# ---------------------------------------------------------------- SIGKILL at any moment

WRITER = """
import sys
from pathlib import Path
import numpy as np
from streamd.identity.gallery import Gallery
from streamd.identity.scoring import Utterance

gallery, start = Gallery(Path(sys.argv[1])), int(sys.argv[2])
rng = np.random.default_rng(start)
for i in range(start, start + 99999):
    utts = [Utterance(rng.standard_normal((300, 40)).astype(np.float32), 3.0) for _ in range(4)]
    gallery.add_enrollments(f"spk{i}", utts, rng.standard_normal((4, 256)).astype(np.float32), "m", "f", "test")
    print(i, flush=True)  # acknowledged: the transaction has committed
"""


def test_sigkill_at_random_moments_loses_no_acknowledged_enrollment(tmp_path):
    """A writer enrolls speaker after speaker into a real SQLite gallery and is killed with
    SIGKILL at random moments, mostly in the middle of a transaction: after each kill the
    database passes its integrity check and every acknowledged speaker is there, whole."""
    import random
    import sqlite3

    path = tmp_path / "gallery.sqlite3"
    acked: list[int] = []
    rnd = random.Random(0)
    after_first = 0
    for run in range(6):
        start = run * 100000  # a killed writer may have committed one more than it acknowledged
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(start)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=ROOT)
        first = proc.stdout.readline()  # running, past its start-up
        time.sleep(rnd.uniform(0.05, 0.3))
        proc.kill()
        rest, err = proc.communicate(timeout=10)
        # It was our SIGKILL that stopped it, while it was still enrolling: not an error of its own.
        assert proc.returncode == -signal.SIGKILL, (proc.returncode, err[-2000:])
        assert first.strip() == str(start), (first, err[-2000:])
        acked += [int(line) for line in (first + rest).split()]
        after_first += len(rest.split())
        db = sqlite3.connect(path)
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        counts = dict(db.execute("SELECT s.name, COUNT(*) FROM speakers s JOIN enrollments e "
                                 "ON e.speaker_id = s.id GROUP BY s.name"))
        db.close()
        assert all(counts.get(f"spk{i}") == 4 for i in acked), [i for i in acked if counts.get(f"spk{i}") != 4]
        assert all(n == 4 for n in counts.values())  # an unacknowledged one is whole or absent
        # At most the one transaction in flight at the kill committed unacknowledged.
        assert len(counts) - len(acked) <= run + 1, (len(counts), len(acked))
    # The kills came in the middle of enrolling, not only right after start-up (the one line
    # read before each kill): the writers went on enrolling between start-up and the kill.
    assert after_first >= 6, after_first
