import sqlite3

import numpy as np
import pytest

from streamd import digits
from streamd.identity import UNKNOWN, Gallery, GalleryError, decide, l2_normalize
from conftest import DATA, streamd


def unit(v):
    return l2_normalize(np.asarray(v, np.float32))


def test_gallery_is_a_real_sqlite_file_in_wal_mode(tmp_path):
    g = Gallery(tmp_path / "g.sqlite3")
    g.enroll("alice", np.stack([unit([1, 0, 0]), unit([0.9, 0.1, 0])]), 4.0, "sha-a", "test")
    g.close()
    db = sqlite3.connect(tmp_path / "g.sqlite3")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert db.execute("SELECT COUNT(*) FROM embeddings").fetchone()[0] == 2


def test_open_set_decision(tmp_path):
    g = Gallery(tmp_path / "g.sqlite3")
    g.enroll("alice", np.stack([unit([1, 0, 0])]), 3.0, "sha", "t")
    g.enroll("bob", np.stack([unit([0, 1, 0])]), 3.0, "sha", "t")
    names, cents = g.centroids("sha")
    assert names == ["alice", "bob"]
    d = decide(unit([0.95, 0.2, 0.1]), names, cents, threshold=0.6)
    assert d.speaker == "alice" and d.candidates[0]["name"] == "alice"
    assert [c["name"] for c in d.candidates] == ["alice", "bob"]
    stranger = decide(unit([0.1, 0.1, 1.0]), names, cents, threshold=0.6)
    assert stranger.speaker == UNKNOWN and stranger.score < 0.6
    # Embeddings of another model are never scored against this one.
    assert g.centroids("other-model")[0] == []


def test_changes_by_another_process_are_seen(tmp_path):
    path = tmp_path / "g.sqlite3"
    daemon_side = Gallery(path)
    assert daemon_side.centroids("sha")[0] == []
    cli_side = Gallery(path)
    cli_side.enroll("carol", np.stack([unit([0, 0, 1])]), 3.0, "sha", "t")
    assert daemon_side.centroids("sha")[0] == ["carol"]
    cli_side.remove("carol")
    assert daemon_side.centroids("sha")[0] == []


@pytest.mark.parametrize("name", ["", "a/b", "x\ny", "unknown", "unknown-3", "a" * 65])
def test_bad_names_are_refused(tmp_path, name):
    g = Gallery(tmp_path / "g.sqlite3")
    with pytest.raises(GalleryError):
        g.enroll(name, np.stack([unit([1, 0, 0])]), 3.0, "sha", "t")
    assert g.speakers() == []


def test_digit_rule_rejects_non_digits_and_low_confidence():
    logits = np.full(11, -5.0)
    logits[7] = 5.0
    assert digits.decide(logits, 0.6).digit == 7
    logits[10] = 8.0  # "not a digit" wins
    d = digits.decide(logits, 0.6)
    assert d.digit is None and d.candidates[0]["digit"] == 7
    flat = np.zeros(11)
    assert digits.decide(flat, 0.6).digit is None
    assert len(digits.decide(flat, 0.6).candidates) == 3


def test_cli_enroll_list_remove(tmp_path):
    state = f'state.dir="{tmp_path}"'
    r = streamd("enroll", "--set", state, "theo", str(DATA / "enroll_theo.flac"))
    assert r.returncode == 0, r.stderr
    assert "enrolled 'theo'" in r.stdout
    r = streamd("speakers", "--set", state, "list")
    assert r.stdout.startswith("theo\t")
    r = streamd("speakers", "--set", state, "remove", "theo")
    assert r.returncode == 0
    assert streamd("speakers", "--set", state, "list").stdout == ""


def test_enrolling_silence_is_refused(tmp_path):
    import soundfile as sf

    silent = tmp_path / "silence.wav"
    sf.write(silent, np.zeros(16000 * 3, np.int16), 16000)
    r = streamd("enroll", "--set", f'state.dir="{tmp_path}"', "quiet", str(silent))
    assert r.returncode == 65
    assert "too little speech" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_fixed_windows_cover_the_utterance_as_resemblyzer_does():
    from streamd.inference import window_starts

    assert window_starts(50, 160, 77, 0.75) == [0]  # short: one zero-padded window
    assert window_starts(160, 160, 77, 0.75) == [0]
    starts = window_starts(400, 160, 77, 0.75)
    assert starts[0] == 0 and all(b - a == 77 for a, b in zip(starts, starts[1:]))
    assert 400 - starts[-1] >= 0.75 * 160 or len(starts) == 1
