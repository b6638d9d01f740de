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


# ---------------------------------------------------------------- item 1: removal erases every trace

CHUNK = 48


def traces_of(db_path: Path, name: str) -> dict[str, list[bytes]]:
    """What the gallery holds of ``name``: the name, its enrollments' features and embeddings,
    and the utterances (features, embeddings) of the clusters their voice formed, read
    before the removal. The connection is closed again: a reader would hold the log back."""
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        sid = db.execute("SELECT id FROM speakers WHERE name = ?", (name,)).fetchone()[0]
        features = [r[0] for r in db.execute("SELECT features FROM enrollments WHERE speaker_id = ?", (sid,))]
        vectors = [r[0] for r in db.execute("SELECT m.vector FROM embeddings m JOIN enrollments e "
                                            "ON e.id = m.enrollment_id WHERE e.speaker_id = ?", (sid,))]
    finally:
        db.close()
    assert features and vectors
    return {"name": [name.encode()], "features": features, "embeddings": vectors}


def cluster_traces(db_path: Path, label: str) -> dict[str, list[bytes]]:
    cid = int(label.split("-")[1])
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        feats = [r[0] for r in db.execute("SELECT features FROM cluster_members WHERE cluster_id = ?", (cid,))]
        vecs = [r[0] for r in db.execute("SELECT e.vector FROM cluster_embeddings e JOIN cluster_members m "
                                         "ON m.id = e.member_id WHERE m.cluster_id = ?", (cid,))]
    finally:
        db.close()
    assert feats and vecs
    return {"cluster features": feats, "cluster embeddings": vecs}


def scan(state: Path, traces: dict[str, list[bytes]]) -> dict[str, int]:
    """Hits of each kind of trace in every file of the state directory: the name anywhere,
    and any 48-byte piece of a blob (a blob partly overwritten is still found)."""
    files = {p: p.read_bytes() for p in state.rglob("*") if p.is_file()}
    assert files
    hits: dict[str, int] = {}
    for kind, blobs in traces.items():
        if kind == "name":
            hits[kind] = sum(data.count(blobs[0]) for data in files.values())
            continue
        pieces = {b[i:i + CHUNK] for b in blobs for i in range(0, len(b) - CHUNK + 1, CHUNK)}
        pieces.discard(bytes(CHUNK))
        n = 0
        for data in files.values():
            n += sum(data[i:i + CHUNK] in pieces for i in range(len(data) - CHUNK + 1))
        hits[kind] = n
    return hits


def all_files(state: Path) -> list[str]:
    return sorted(p.name for p in state.rglob("*") if p.is_file())


def test_offline_removal_leaves_nothing_in_any_file(iso, tmp_path):
    state = iso.state
    sets = ["--set", f'state.dir="{state}"', "--set", f'control.endpoint="ipc://{tmp_path}/none.sock"']
    # The stranger is heard first by a daemon (a cluster of their voice), then enrolled by file.
    r = streamd("run", *iso.sets('metrics.listen=""', f'control.endpoint="ipc://{tmp_path}/none.sock"'),
                "--source", f"file:{DATA / 'visitor12.flac'}", "--pace", "fast")
    assert r.returncode == 0, r.stderr
    gallery = state / "gallery.sqlite3"
    db = sqlite3.connect(gallery)
    labels = [f"unknown-{r[0]}" for r in db.execute("SELECT id FROM clusters")]
    db.close()
    assert len(labels) == 1, labels
    clustered = cluster_traces(gallery, labels[0])  # read now: enrolling the voice drops its cluster
    for name, clip in (("zoe-secret-4711", "visitor12.flac"), ("asc02", "enroll_asc02.flac")):
        r = streamd("enroll", *sets, name, str(DATA / clip))
        assert r.returncode == 0, r.stderr
    db = sqlite3.connect(gallery)
    assert db.execute("SELECT COUNT(*) FROM clusters").fetchone()[0] == 0
    db.close()
    traces = {**traces_of(gallery, "zoe-secret-4711"), **clustered}
    kept = traces_of(gallery, "asc02")
    assert scan(state, traces)["features"] > 0  # the scan finds what is there
    r = streamd("speakers", *sets, "remove", "zoe-secret-4711")
    assert r.returncode == 0, r.stderr
    assert scan(state, traces) == dict.fromkeys(traces, 0), all_files(state)
    assert r.stdout.startswith("removed 'zoe-secret-4711'"), r.stdout
    assert scan(state, kept)["features"] > 0  # the other speaker is untouched
    db = sqlite3.connect(gallery)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert [r[0] for r in db.execute("SELECT name FROM speakers")] == ["asc02"]
    assert db.execute("SELECT COUNT(*) FROM clusters").fetchone()[0] == 0
    db.close()


@pytest.mark.slow  # about 65 s on a 2-core machine
def test_removal_on_a_running_daemon_survives_sigkill_and_leaves_no_cluster_of_the_voice(iso, notify, tmp_path):
    from helpers import LiveDaemon

    state = tmp_path / "state"
    gallery = state / "gallery.sqlite3"
    old_umask = os.umask(0o022)  # as a shell usually has it: the daemon makes its files private itself
    try:
        d = LiveDaemon(iso, notify, tmp_path, "identity.enroll_min_seconds=1.0")
    finally:
        os.umask(old_umask)
    try:
        # A stranger is heard: a cluster of their voice forms; then they are enrolled from it.
        d.speak("visitor12.flac")
        first = d.speakers(5)
        labels = {e["cluster"] for e in first}
        assert len(labels) == 1 and None not in labels, first
        label = labels.pop()
        clustered = cluster_traces(gallery, label)
        assert scan(state, clustered)["cluster features"] > 0  # the scan finds what is there
        reply = d.ask({"cmd": "enroll_recent", "name": "zoe-secret-4711", "utterances": [0, 1, 2, 3, 4]})
        assert reply["ok"], reply
        assert d.ask({"cmd": "clusters"})["clusters"] == []  # an enrolled voice keeps no cluster
        d.speak("visitor12.flac")
        assert [e["speaker"] for e in d.speakers(5)] == ["zoe-secret-4711"] * 5
        traces = {**traces_of(gallery, "zoe-secret-4711"), **clustered}
        reply = d.ask({"cmd": "remove", "name": "zoe-secret-4711"})
        assert reply["ok"] and reply["erased"] is True, reply
        # Acknowledged: already gone from every file, and from the utterances kept in memory.
        assert scan(state, traces) == dict.fromkeys(traces, 0), all_files(state)
        assert "not heard recently" in d.ask({"cmd": "enroll_recent", "name": "again",
                                              "utterances": [0, 9]})["error"]
        assert d.ask({"cmd": "clusters"})["clusters"] == []
        # The same voice again: a stranger with a new label, not the old cluster.
        d.speak("visitor12.flac")
        again = d.speakers(5)
        assert all(e["speaker"] == "unknown" for e in again) and label not in {e["cluster"] for e in again}

        # A second speaker, removed, and the daemon killed the moment it acknowledges.
        d.speak("enroll_asc07.flac")
        heard = d.speakers(16)
        numbers = [e["utterance"] for e in heard if e["utterance"] >= 15]
        reply = d.ask({"cmd": "enroll_recent", "name": "asc07-secret", "utterances": numbers})
        assert reply["ok"], reply
        traces = traces_of(gallery, "asc07-secret")
        reply = d.ask({"cmd": "remove", "name": "asc07-secret"})
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait(10)
        assert reply["ok"], reply
    finally:
        stop(d.proc)
    assert all_files(state) == ["gallery.sqlite3", "gallery.sqlite3-shm", "gallery.sqlite3-wal"]  # killed
    assert modes(state) == {".": 0o700, "gallery.sqlite3": 0o600, "gallery.sqlite3-shm": 0o600,
                            "gallery.sqlite3-wal": 0o600}
    assert scan(state, traces) == {"name": 0, "features": 0, "embeddings": 0}, all_files(state)
    db = sqlite3.connect(gallery)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert db.execute("SELECT COUNT(*) FROM speakers").fetchone()[0] == 0
    db.close()


# ---------------------------------------------------------------- item 2: private state


def modes(state: Path) -> dict[str, int]:
    out = {".": stat.S_IMODE(state.stat().st_mode)}
    out.update({p.name: stat.S_IMODE(p.stat().st_mode) for p in state.iterdir()})
    return out


def test_state_directory_and_gallery_are_private_whatever_the_umask(tmp_path):
    state = tmp_path / "deep" / "state"
    sets = ["--set", f'state.dir="{state}"', "--set", f'control.endpoint="ipc://{tmp_path}/none.sock"']
    r = streamd("enroll", *sets, "asc02", str(DATA / "enroll_asc02.flac"), preexec_fn=lambda: os.umask(0o002))
    assert r.returncode == 0, r.stderr
    assert modes(state) == {".": 0o700, "gallery.sqlite3": 0o600}
    # A gallery left 0644 (by an older streamd) with its -wal and -shm becomes private when opened.
    for p in (state / "gallery.sqlite3", state / "gallery.sqlite3-wal", state / "gallery.sqlite3-shm"):
        p.touch()
        os.chmod(p, 0o644)
    r = streamd("speakers", *sets, "list")
    assert r.returncode == 0 and r.stdout.startswith("asc02\t"), r.stderr
    assert all(mode == 0o600 for name, mode in modes(state).items() if name != "."), modes(state)


def test_an_old_world_readable_state_directory_of_streamd_becomes_private(tmp_path):
    state = tmp_path / "state"
    sets = ["--set", f'state.dir="{state}"', "--set", f'control.endpoint="ipc://{tmp_path}/none.sock"']
    assert streamd("enroll", *sets, "asc02", str(DATA / "enroll_asc02.flac")).returncode == 0
    os.chmod(state, 0o755)
    os.chmod(state / "gallery.sqlite3", 0o644)
    r = streamd("speakers", *sets, "list")
    assert r.returncode == 0, r.stderr
    assert modes(state) == {".": 0o700, "gallery.sqlite3": 0o600}


# ---------------------------------------------------------------- item 5: the CLI invents no gallery


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
def bare_host(tmp_path, monkeypatch):
    """A user with no streamd state and no daemon, on a system root of its own (where the
    service's unit and directories are looked for)."""
    from streamd import config

    home, root = tmp_path / "home", tmp_path / "root"
    home.mkdir()
    root.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run-user"))
    for var in ("XDG_STATE_HOME", "STATE_DIRECTORY", "RUNTIME_DIRECTORY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(config, "SYSTEMD_ROOT", root, raising=False)
    return tmp_path


def cli(capsys, *args):
    from streamd import cli as cli_mod

    code = cli_mod.main([*args, "--config", str(Path(__file__).resolve().parent.parent / "config.toml")])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_reads_without_a_daemon_create_nothing_and_say_there_is_no_gallery(bare_host, capsys):
    before = tree(bare_host)
    gallery = bare_host / "home" / ".local" / "state" / "streamd" / "gallery.sqlite3"
    for action in ("list", "clusters"):
        code, out, err = cli(capsys, "speakers", action)
        assert (code, out) == (0, ""), err
        assert err.strip() == f"streamd: no gallery at {gallery}: nothing enrolled"
    code, out, err = cli(capsys, "speakers", "remove", "theo")
    assert code == 1 and err.strip() == f"streamd: no gallery at {gallery}: nothing enrolled"
    assert tree(bare_host) == before  # not a folder, not a file


def test_the_services_state_directory_is_found_as_the_unit_defines_it(bare_host, capsys):
    root = bare_host / "root"
    unit = root / "etc" / "systemd" / "system" / "streamd.service"
    unit.parent.mkdir(parents=True)
    unit.write_text("[Service]\nExecStart=/opt/streamd/.venv/bin/streamd run\nStateDirectory=voices\n"
                    "RuntimeDirectory=voices-run\n")
    service = root / "var" / "lib" / "voices"
    r = streamd("enroll", "--set", f'state.dir="{service}"', "asc02", str(DATA / "enroll_asc02.flac"))
    assert r.returncode == 0, r.stderr
    code, out, err = cli(capsys, "speakers", "list")
    assert code == 0 and out.startswith("asc02\t"), err
    assert f"gallery: {service / 'gallery.sqlite3'}" in err.splitlines()
    assert not (bare_host / "home" / ".local").exists()


# ---------------------------------------------------------------- item 4: one control socket, one daemon


def test_two_daemons_one_control_socket(bare_host, iso, notify, capsys):
    from helpers import LiveDaemon

    root = bare_host / "root"
    unit = root / "etc" / "systemd" / "system" / "streamd.service"
    unit.parent.mkdir(parents=True)
    unit.write_text("[Service]\nStateDirectory=streamd\nRuntimeDirectory=ctl\n")
    state = root / "var" / "lib" / "streamd"
    d = LiveDaemon(iso, notify, root / "run", f'state.dir="{state}"')  # control socket: root/run/ctl/control.sock
    try:
        assert d.ask({"cmd": "list"})["state_dir"] == str(state)
        assert d.ask({"cmd": "stats"})["state_dir"] == str(state)
        # A second daemon on the same control socket refuses to start, in one line.
        other = Isolated(bare_host / "b")
        r = streamd("run", *other.sets(f'control.endpoint="{d.endpoint}"', 'metrics.listen=""'),
                    "--source", f"file:{DATA / 'word.flac'}", "--pace", "fast", timeout=60)
        assert r.returncode == 69, r.stderr
        assert r.stderr.strip().splitlines() == [
            f"streamd: control.endpoint {d.endpoint}: another streamd daemon is serving it "
            "(stop that one, or give this one its own control.endpoint)"]
        assert d.ask({"cmd": "stats"})["ok"]  # the first one is unharmed
        # The CLI finds the service's socket and gallery as the unit defines them.
        code, out, err = cli(capsys, "speakers", "list")
        assert (code, out) == (0, ""), err
        assert err.strip() == f"gallery: {state / 'gallery.sqlite3'} (daemon at {d.endpoint})"
        # Asked about another state directory, that daemon's answer is refused.
        code, out, err = cli(capsys, "speakers", "list", "--set", f'state.dir="{other.state}"')
        assert code == 69 and out == "" and len(err.strip().splitlines()) == 1, err
        assert f"serves the state directory {state}, not {other.state}" in err
        code, out, err = cli(capsys, "speakers", "remove", "asc02", "--set", f'state.dir="{other.state}"')
        assert code == 69 and "serves the state directory" in err
        assert not other.state.exists()
    finally:
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait(10)
    # Killed, its socket file is left behind with nobody behind it: a new daemon takes it over.
    assert Path(d.endpoint[len("ipc://"):]).exists()
    r = streamd("run", *other.sets(f'control.endpoint="{d.endpoint}"', 'metrics.listen=""'),
                "--source", f"file:{DATA / 'word.flac'}", "--pace", "fast", timeout=60)
    assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------- item 6: export and audit trail

def test_export_and_an_audit_trail_without_biometric_content_or_the_removed_name(curve, iso, notify, tmp_path):
    """What is stored about a person comes out as JSON (through the daemon and on the
    database); every change is in the audit trail and published as a `gallery` event naming
    the client (the CurveZMQ key's name); the removal keeps only the person's subject."""
    import base64

    from streamd.service import control
    from streamd.service.events import subscribe
    from helpers import client_curve, collect, server_sets

    ctl = f"tcp://127.0.0.1:{free_port_here()}"
    sets = iso.sets(f'control.endpoint="{ctl}"', *server_sets(curve))
    keys = ["--client-key", f"{curve}/client/client.key_secret", "--server-key", f"{curve}/server/server.key"]
    who = client_curve(curve)
    offline = streamd("enroll", *iso.sets(), "asc02", str(DATA / "enroll_asc02.flac"))  # before the daemon
    assert offline.returncode == 0, offline.stderr
    sub = subscribe(iso.endpoint, "gallery.")
    proc = start_streamd("run", *sets, "--source", "stdin", env={"NOTIFY_SOCKET": notify.path}, stdin=subprocess.PIPE)
    try:
        assert notify.wait_for("READY=1", 60), proc.stderr.read() if proc.poll() is not None else ""
        time.sleep(0.5)  # the subscriber's connection
        enrolled = streamd("enroll", *sets, "theo", str(DATA / "enroll_theo.flac"))  # on the database, daemon running
        assert enrolled.returncode == 0, enrolled.stderr
        model = control.request(ctl, {"cmd": "stats"}, 5, curve=who)["speaker_model"]

        reply = control.request(ctl, {"cmd": "export", "name": "theo"}, 10, curve=who)
        assert reply["ok"], reply
        person = reply["speaker"]
        assert person["name"] == "theo" and person["created"] <= person["updated"] and len(person["subject"]) == 12
        assert len(person["enrollments"]) == 10 and person["clusters"] == []
        for e in person["enrollments"]:
            assert e["source"].startswith("files:") and e["seconds"] > 0 and e["created"] > 0
            f = e["features"]
            data = np.frombuffer(base64.b64decode(f["base64"]), "<f4")
            assert f["dtype"] == "float32" and data.size == f["shape"][0] * f["shape"][1] > 0
            assert [m["model_sha256"] for m in e["embeddings"]] == [model] and len(e["embeddings"][0]["vector"]) > 16
        assert [a["action"] for a in person["audit"]] == ["enroll"] and person["audit"][0]["who"] == "cli"

        out = tmp_path / "theo.json"
        cli = streamd("speakers", *sets, "export", "theo", "--out", str(out), *keys)
        assert cli.returncode == 0, cli.stderr
        assert stat.S_IMODE(out.stat().st_mode) == 0o600 and json.loads(out.read_text()) == person
        missing = control.request(ctl, {"cmd": "export", "name": "nobody"}, 5, curve=who)
        assert not missing["ok"] and "nobody" in missing["error"]

        assert control.request(ctl, {"cmd": "rename", "name": "theo", "new_name": "theodore"}, 5, curve=who)["ok"]
        removed = streamd("speakers", *sets, "remove", "theodore", *keys)
        assert removed.returncode == 0, removed.stderr
        events = collect(sub, until=lambda ev: any(e.get("action") == "remove" for e in ev), timeout=15)
    finally:
        proc.stdin.close()
        code = proc.wait(30)
        sub.close(0)
    assert code == 0, proc.stderr.read()[-3000:]

    assert [(e["type"], e["stream"], e["action"], e["who"], e["name"]) for e in events] == [
        ("gallery", "daemon", "enroll", "cli", "theo"),
        ("gallery", "daemon", "rename", "control:client", "theodore"),
        ("gallery", "daemon", "remove", "control:client", None)], events
    assert len({e["subject"] for e in events}) == 1 and events[1]["from"] == "theo"
    assert events[0]["utterances"] == 10 and events[0]["source"] == "files" and "enroll_theo" not in json.dumps(events)
    for e in events:  # no biometric content: counts, names, times, never features or embeddings
        assert set(e) <= {"v", "type", "stream", "seq", "time", "audit", "at", "who", "action", "subject", "name",
                          "from", "source", "utterances", "seconds", "files", "cluster", "enrollments"}, e

    trail = streamd("speakers", *iso.sets(), "audit")  # no daemon now: on the database
    assert trail.returncode == 0, trail.stderr
    lines = trail.stdout.strip().splitlines()
    assert [line.split("\t")[2] for line in lines] == ["enroll", "enroll", "rename", "remove"], lines
    assert lines[0].split("\t")[3] == "asc02" and "theo" not in trail.stdout
    assert all(events[0]["subject"] in line for line in lines[1:])
    hits = sum(p.read_bytes().count(b"theo") for p in iso.state.rglob("*") if p.is_file())
    assert hits == 0  # the removed name is in no file of the state directory, the audit trail included


def free_port_here() -> int:
    from conftest import free_port

    return free_port()
