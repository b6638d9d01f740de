"""streamd eval speakers on a small corpus cut from the bundled clips (no ../shared needed)."""

import csv
import json

import soundfile as sf

from streamd.frames import SAMPLE_RATE
from streamd.sources import read_audio
from streamd.vad import VadParams, segment_clip
from conftest import DATA, streamd

DEMO_SPEAKER = {"theo": "theo", "00000002": "asc02", "00000007": "asc07"}


def words(clip: str) -> list:
    audio = read_audio(str(DATA / clip))
    out = []
    for e in segment_clip(audio, VadParams()):
        if e.usable:
            a, b = int(max(0.0, e.audio_t - 0.2) * SAMPLE_RATE), int((e.t_end + 0.3) * SAMPLE_RATE)
            out.append(audio[a:b])
    return out


def make_corpus(root):
    clips = {name: words(f"enroll_{name}.flac") for name in ("theo", "asc02", "asc07")}
    with open(DATA / "demo.csv") as fh:
        truth = list(csv.DictReader(fh))
    for t, w in zip(truth, words("demo.flac")):
        if t["speaker"] in DEMO_SPEAKER:
            clips[DEMO_SPEAKER[t["speaker"]]].append(w)
    fsdd, asc = root / "fsdd", root / "arabic-speech-commands"
    for corpus, header in ((fsdd, "path,speaker,digit,rep,duration_s"),
                           (asc, "path,speaker,label,duration_s,rep,split,digit,source_file")):
        (corpus).mkdir(parents=True)
        (corpus / "manifest.csv").write_text(header + "\n")
    for name, ws in clips.items():
        corpus = fsdd if name == "theo" else asc
        (corpus / name).mkdir()
        with open(corpus / "manifest.csv", "a") as fh:
            for i, w in enumerate(ws):
                rel = f"{name}/{i}.flac"
                sf.write(corpus / rel, w, SAMPLE_RATE)
                if name == "theo":
                    fh.write(f"{rel},theo,0,{i},{len(w) / SAMPLE_RATE}\n")
                else:
                    fh.write(f"{rel},{name},word,{len(w) / SAMPLE_RATE},{i},val,,x\n")


def test_eval_speakers_reports_and_draws_a_det_curve(tmp_path):
    make_corpus(tmp_path / "data")
    png = tmp_path / "det.png"
    r = streamd("eval", "speakers", "--data", str(tmp_path / "data"), "--json", "--plot", str(png))
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["speakers"] == 3 and report["calibrated"] is True
    single = report["single"]
    assert single["probes"] == 9
    for key in ("eer", "open_set_identified", "open_set_strangers_named", "closed_set_top1"):
        assert 0.0 <= single[key] <= 1.0
    assert single["closed_set_top1"] >= 2 / 3
    point = single["at_1pct_strangers_named"]
    assert point["strangers_named"] <= 0.01 and 0.0 <= point["identified"] <= 1.0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_operating_point_is_the_lowest_threshold_within_the_stranger_rate():
    import numpy as np

    from streamd.eval_speakers import operating_point
    from streamd.evaluate import open_set_rates

    rng = np.random.default_rng(0)
    truth = np.repeat(np.arange(4), 50)
    scores = rng.normal(0, 1, (200, 4))
    scores[np.arange(200), truth] += 2.5
    point = operating_point(scores, truth, 0.05)
    assert point["strangers_named"] <= 0.05
    lower = np.max(scores[scores < point["threshold"]])  # one step lower names too many strangers
    assert open_set_rates(scores, truth, lambda n: lower)[1] > 0.05
