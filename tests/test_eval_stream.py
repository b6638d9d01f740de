"""``streamd eval stream`` on bundled audio: streams built from clips, run through the daemon's
engine, scored against where the words really are."""

import csv
import json

import numpy as np
import pytest
import soundfile as sf

from streamd.offline import eval_stream as es
from streamd.audio import stream_audio as sa
from streamd.cli import main
from conftest import DATA

RATE = 16000


def cut_words(path) -> list[np.ndarray]:
    """The bundled recordings are words separated by exact zeros."""
    audio, _ = sf.read(path, dtype="int16")
    loud = np.flatnonzero(np.abs(audio.astype(np.int32)) > 0)
    breaks = np.flatnonzero(np.diff(loud) > int(0.3 * RATE))
    starts = np.concatenate(([loud[0]], loud[breaks + 1]))
    ends = np.concatenate((loud[breaks] + 1, [loud[-1] + 1]))
    return [audio[a:b] for a, b in zip(starts, ends)]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """A corpora folder laid out like ../shared/datasets from the bundled clips: the demo's
    words to stream, the enrollment recordings to enroll from (FSDD repetitions 0-1; ASC
    other words of repetition 1)."""
    root = tmp_path_factory.mktemp("corpora")
    fsdd, asc = [], []

    def put(folder: str, name: str, audio: np.ndarray) -> str:
        (root / folder / name.split("/")[0]).mkdir(parents=True, exist_ok=True)
        sf.write(root / folder / name, audio, RATE)
        return name

    for i, w in enumerate(cut_words(DATA / "enroll_theo.flac")):
        fsdd.append({"path": put("fsdd", f"theo/0_theo_{i % 2}.flac".replace("0_", f"{i}_", 1), w),
                     "speaker": "theo", "digit": 0, "rep": i % 2, "duration_s": len(w) / RATE})
    for spk, short in (("00000002", "asc02"), ("00000007", "asc07")):
        for i, w in enumerate(cut_words(DATA / f"enroll_{short}.flac")):
            asc.append({"path": put("arabic-speech-commands", f"{spk}/word{i}_{spk}_01.flac", w), "speaker": spk,
                        "label": f"word{i}", "duration_s": len(w) / RATE, "rep": 1, "split": "val", "digit": "",
                        "source_file": ""})
    with open(DATA / "demo.csv") as fh:
        truth = list(csv.DictReader(fh))
    for i, (row, w) in enumerate(zip(truth, cut_words(DATA / "demo.flac"))):
        if row["corpus"] == "fsdd":
            fsdd.append({"path": put("fsdd", f"theo/{row['digit']}_theo_{10 + i}.flac", w), "speaker": "theo",
                         "digit": row["digit"], "rep": 10 + i, "duration_s": len(w) / RATE})
        else:
            spk = row["speaker"]
            asc.append({"path": put("arabic-speech-commands", f"{spk}/w{i}_{spk}_{10 + i}.flac", w), "speaker": spk,
                        "label": f"w{i}", "duration_s": len(w) / RATE, "rep": 10 + i, "split": "val",
                        "digit": row["digit"], "source_file": ""})
    for folder, rows in (("fsdd", fsdd), ("arabic-speech-commands", asc)):
        with open(root / folder / "manifest.csv", "w", newline="") as fh:
            out = csv.DictWriter(fh, fieldnames=list(rows[0]))
            out.writeheader()
            out.writerows(rows)
    return root


def test_held_out_words_and_enrollment_never_overlap(corpora):
    held = es.load_held_out(corpora)
    assert sorted(held.enroll) == ["00000002", "00000007", "theo"]  # 00000008 is a stranger
    assert len(held.words) == 10
    assert {w.speaker for w in held.words} >= {"theo", "00000008"}
    enrolled = {a.tobytes() for clips in held.enroll.values() for a in clips}
    assert not any(w.audio.tobytes() in enrolled for w in held.words)


def test_eval_stream_through_the_cli(corpora, tmp_path, capsys):
    png = tmp_path / "stream.png"
    rc = main(["eval", "stream", str(corpora), "--words", "0", "--noise-minutes", "0.5", "--json", "--plot", str(png),
               "--only", "clean,pause_1,floor_-45,dips,noise_only_floor_-45,noise_only_pink"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cond = report["conditions"]
    assert set(cond) == {"clean", "pause_1", "floor_-45", "dips", "noise_only_floor_-45", "noise_only_pink"}
    assert cond["clean"]["words"] == 10 and cond["clean"]["group"] == "clean"
    for name in ("pause_1", "floor_-45", "dips"):
        seg = cond[name]["segmentation"]
        assert (seg["missed"], seg["merged"], seg["split"], seg["false_utterances"]) == (0, 0, 0, 0), (name, seg)
        assert cond[name]["digits"]["fsdd"]["digits"] == 4 and cond[name]["digits"]["asc"]["digits"] == 5
        assert cond[name]["digits"]["asc"]["right"] >= 0.8
        assert cond[name]["decision_after_speech_s"]["p99"] <= 0.5  # the hangover, and a frame or two
    for name in ("noise_only_floor_-45", "noise_only_pink"):
        assert cond[name]["words"] == 0 and cond[name]["utterances"] == 0
    assert report["headline"]["noise_only_events"] == 0
    assert cond["clean"]["speakers"]["stranger_words"] == 1


def placed(t0: float, t1: float, digit=1) -> sa.Placed:
    return sa.Placed(sa.Word(np.zeros(1, np.int16), "fsdd", "theo", digit), t0, t1)


def events(*utts) -> list[dict]:
    out = []
    for n, (t0, t1, digit) in enumerate(utts):
        common = {"utterance": n, "t_start": t0, "t_end": t1}
        out += [{"type": "vad.end", "reason": "silence", "heard_s": t1 + 0.3, **common},
                {"type": "speaker", "speaker": "theo", **common}, {"type": "digit", "digit": digit, **common}]
    return out


def test_score_counts_merges_splits_misses_and_false_utterances():
    built = sa.Built(np.zeros(20 * RATE, np.int16),
                     [placed(1, 1.5, 1), placed(2, 2.5, 2), placed(4, 4.5, 3), placed(6, 6.5, 4), placed(8, 8.5, 5)])
    r = es.score(built, events((0.9, 2.6, 1),  # words 1 and 2 merged
                               (4.0, 4.2, 3), (4.3, 4.5, None),  # word 3 split, named once
                               (8.0, 8.5, 6),  # word 5 wrong; word 4 missed
                               (12.0, 12.2, 7)),  # over no word
                 {"theo"})
    seg = r["segmentation"]
    assert (seg["merged"], seg["split"], seg["missed"], seg["false_utterances"], seg["false_digits"]) == (2, 1, 1, 1, 1)
    d = r["digits"]["fsdd"]
    assert (d["right"], d["wrong"], d["null"]) == (2 / 5, 1 / 5, 2 / 5)  # 1 and 3 right; 5 wrong; 2 and 4 null
    assert r["decision_after_speech_s"]["p50"] == pytest.approx(0.3)


def test_streams_hold_the_level_snr_and_dips_they_promise():
    rng = np.random.default_rng(0)
    words = [sa.Word(np.round(np.sin(np.arange(8000) / 5) * 3000).astype(np.int16), "asc", "a", 1)] * 6
    cond = sa.Condition("x", "x", level_dbfs=-30.0, pause_s=(0.8, 0.8), floor_dbfs=-200.0, noise="white",
                        snr_db=10.0, effect="dips")
    built = sa.build(cond, words, rng, [])
    x = built.audio.astype(np.float64)
    speech = np.concatenate([x[int(p.t_start * RATE) : int(p.t_end * RATE)] for p in built.words])
    assert 10 * np.log10(np.mean(speech**2) / 32768**2) == pytest.approx(-30.0 + 0.4, abs=0.3)  # speech + noise
    gaps = x[int(built.words[0].t_end * RATE) : int(built.words[1].t_start * RATE)]
    assert (gaps == 0).sum() >= int(0.3 * RATE)  # the dip
    noisy = gaps[gaps != 0]
    assert 10 * np.log10(np.mean(noisy**2) / 32768**2) == pytest.approx(-40.0, abs=0.3)
    assert [round(p.t_start - q.t_end, 2) for q, p in zip(built.words, built.words[1:])] == [0.8] * 5


def test_a_refused_enrollment_is_reported_and_the_rest_go_on(tmp_path):
    """A held-out speaker the two-voice gate refuses used to stop the whole evaluation; now
    the report names them and why, and their words count as a stranger's."""
    from streamd import config
    from streamd.identity.gallery import Gallery
    from streamd.models.inference import load_models
    from conftest import MODELS

    cfg = config.load(None, [f'models.dir="{MODELS}"'])
    models = load_models(cfg)
    theo, asc07 = cut_words(DATA / "enroll_theo.flac"), cut_words(DATA / "enroll_asc07.flac")
    gallery = Gallery(tmp_path / "g.sqlite3")
    book, refused = es.enroll_book(cfg, models, gallery, {"theo": theo, "mixed": asc07 + asc07 + theo})
    try:
        assert book.enrolled().names == ["theo"]
        assert list(refused) == ["mixed"] and "voice" in refused["mixed"]
    finally:
        book.close()
        gallery.close()
