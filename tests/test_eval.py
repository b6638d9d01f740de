"""streamd eval speakers on a small corpus cut from the bundled clips (no ../shared needed)."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from streamd.offline.evaluate import Clip, digit_report

from streamd.audio.frames import SAMPLE_RATE
from conftest import DATA, MODELS, streamd
from helpers import make_digit_corpus, words

DEMO_SPEAKER = {"theo": "theo", "00000002": "asc02", "00000007": "asc07"}


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


def point_threshold(figures):
    return figures["at_1pct_strangers_named"]["threshold"]


def test_eval_speakers_reports_and_draws_a_det_curve(tmp_path):
    make_corpus(tmp_path / "data")
    png = tmp_path / "det.png"
    models = copy_models(tmp_path)
    r = streamd("eval", "speakers", "--data", str(tmp_path / "data"), "--json", "--plot", str(png), "--card",
                "--set", f'models.dir="{models}"')
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert json.loads((models / "speaker.card.json").read_text())["heldout_eval"]["figures"] == report
    assert report["speakers"] == 3 and report["calibrated"] is True
    single = report["single"]
    assert single["probes"] == 9
    for key in ("eer", "open_set_identified", "open_set_strangers_named", "closed_set_top1"):
        assert 0.0 <= single[key] <= 1.0
    assert single["closed_set_top1"] >= 2 / 3
    assert report["score"] == "AS-norm fused with quality measures"
    alone = single["as_norm_alone"]  # the AS-norm score alone, on the same trials
    assert set(alone) >= {"eer", "closed_set_top1", "open_set_identified", "open_set_strangers_named"}
    assert alone["eer"] != single["eer"] or alone["open_set_identified"] != single["open_set_identified"] \
        or alone["at_1pct_strangers_named"]["threshold"] != point_threshold(single)
    point = single["at_1pct_strangers_named"]
    assert point["strangers_named"] <= 0.01 and 0.0 <= point["identified"] <= 1.0
    assert list(report["noisy_probes"]) == ["snr_10db", "snr_0db"]
    noisy = [report["noisy_probes"][k]["single"] for k in ("snr_10db", "snr_0db")]
    assert all(n["probes"] == 9 and "_scores" not in n for n in noisy)
    # noise can only blur the same voices: at 0 dB the speakers are no easier to tell apart
    assert noisy[1]["eer"] >= single["eer"] - 1e-9 or noisy[1]["closed_set_top1"] <= single["closed_set_top1"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_speakers_joins_as_many_clips_per_phrase_as_asked(tmp_path):
    make_corpus(tmp_path / "data")
    r = streamd("eval", "speakers", "--data", str(tmp_path / "data"), "--phrase-clips", "2",
                "--plot", str(tmp_path / "det.png"))
    assert r.returncode == 0, r.stderr
    assert "2-clip phrases" in r.stdout
    bad = streamd("eval", "speakers", "--phrase-clips", "0")
    assert bad.returncode == 2 and "'0' is not a number of clips from 1 to 50" in bad.stderr


def test_operating_point_is_the_lowest_threshold_within_the_stranger_rate():
    import numpy as np

    from streamd.offline.eval_speakers import operating_point
    from streamd.offline.evaluate import open_set_rates

    rng = np.random.default_rng(0)
    truth = np.repeat(np.arange(4), 50)
    scores = rng.normal(0, 1, (200, 4))
    scores[np.arange(200), truth] += 2.5
    point = operating_point(scores, truth, 0.05)
    assert point["strangers_named"] <= 0.05
    lower = np.max(scores[scores < point["threshold"]])  # one step lower names too many strangers
    assert open_set_rates(scores, truth, lambda n: lower)[1] > 0.05


HAND_SCORES = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])
HAND_SAME = np.array([True, False, False, True, False, False, True, False])


def test_eer_on_a_hand_counted_case():
    """Targets 0.9 0.6 0.3, impostors 0.8 0.7 0.5 0.4 0.2; accepted when score >= threshold.
    At 0.6 two of five impostors pass (FAR 0.4) and one of three targets fails (FRR 1/3): the
    closest the two rates come, so the EER is their mean 11/30 at threshold 0.6 (with ">" the
    point would move to 0.5; the lower or higher rate alone would be 1/3 or 0.4). Only 0.9
    keeps false accepts within 1%, where two of three targets are missed."""
    from streamd.offline.evaluate import eer

    for order in (np.arange(8), np.arange(8)[::-1]):
        rate, threshold, at1 = eer(HAND_SCORES[order], HAND_SAME[order])
        assert rate == pytest.approx(11 / 30) and threshold == 0.6 and at1 == 0.9


def test_training_s_eer_summary_wraps_the_same_computation():
    """The speaker training's summary (a torch module: skipped where torch is not installed, as
    in CI) reports the hand-counted case's figures from the one EER function."""
    pytest.importorskip("torch")
    from streamd.train.speaker import eer_summary

    summary = eer_summary(HAND_SCORES, HAND_SAME)
    assert summary["eer"] == pytest.approx(11 / 30) and summary["threshold_at_eer"] == 0.6
    assert (summary["threshold_at_far_1pct"], summary["far_at_far_1pct_threshold"]) == (0.9, 0.0)
    assert summary["frr_at_far_1pct"] == pytest.approx(2 / 3)
    assert (summary["n_target_pairs"], summary["n_nontarget_pairs"], summary["n_pairs"]) == (3, 5, 8)


def test_eer_puts_tied_scores_on_the_same_side():
    """A target and an impostor both at 0.5 are accepted together: at 0.5 FAR 1/2, FRR 0, so
    the EER is 1/4 whichever comes first in the input; no threshold among the scores keeps
    false accepts within 1%, so that threshold lies above them all."""
    from streamd.offline.evaluate import eer

    for scores, same in (([0.5, 0.5, 0.1], [False, True, False]), ([0.5, 0.5, 0.1], [True, False, False])):
        rate, threshold, at1 = eer(np.array(scores), np.array(same))
        assert (rate, threshold) == (0.25, 0.5) and at1 > 0.5


def copy_models(tmp_path):
    models = tmp_path / "models"
    shutil.copytree(MODELS, models)
    return models


def test_eval_digits_reports_each_condition_and_draws_confusion_matrices(tmp_path):
    truth = make_digit_corpus(tmp_path / "data")
    png = tmp_path / "confusion.png"
    models = copy_models(tmp_path)
    r = streamd("eval", "digits", "--data", str(tmp_path / "data"), "--json", "--plot", str(png), "--card",
                "--set", f'models.dir="{models}"')
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    kept = json.loads((models / "digits.fusion.json").read_text())
    assert kept["heldout_eval"]["figures"]["variants"]["fused"]["conditions"]["clean"]["fsdd"] == {
        k: v for k, v in report["variants"]["fused"]["conditions"]["clean"]["fsdd"].items()
        if k != "confusion_with_rejection"}
    shipped = json.loads((MODELS / "digits.fusion.json").read_text())
    assert kept["heldout_eval"] != shipped.get("heldout_eval")  # this corpus's figures replaced the shipped ones
    assert {k: v for k, v in kept.items() if k != "heldout_eval"} == {k: v for k, v in shipped.items() if k != "heldout_eval"}
    assert list(report["conditions"]) == ["clean", "snr_10db", "snr_0db"]
    # each family alone and fused, on the same clips; the daemon's choice is the main report
    members = [m["name"] for m in json.loads((MODELS / "digits.fusion.json").read_text())["members"]]
    assert set(report["variants"]) == {*members, "fused"} and {"cnn", "rnn"} <= set(members)
    assert report["conditions"] == report["variants"][report["in_use"]]["conditions"]
    english = [t for t in truth if t["corpus"] == "fsdd"]
    arabic = [t for t in truth if t["corpus"] != "fsdd" and t["digit"] != ""]
    for condition in report["conditions"].values():
        assert condition["fsdd"]["clips"] == len(english) and condition["asc"]["clips"] == len(arabic)
        for corpus, clips in (("fsdd", english), ("asc", arabic)):
            matrix = condition[corpus]["confusion_with_rejection"]
            assert [sum(row) for row in matrix] == [sum(int(t["digit"]) == d for t in clips) for d in range(10)]
        assert condition["non_digit_called_digit"]["clips"] == 1
    clean = report["conditions"]["clean"]
    assert clean["fsdd"]["accuracy"] >= 0.75 and clean["asc"]["accuracy"] >= 0.75  # held-out voices, real models
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_card_that_cannot_be_written_is_one_line_and_left_as_it_was(tmp_path):
    make_digit_corpus(tmp_path / "data")
    models = copy_models(tmp_path)
    before = (models / "digits.fusion.json").read_bytes()
    (models / "digits.fusion.json.tmp").mkdir()  # where the new card would be written
    r = streamd("eval", "digits", "--data", str(tmp_path / "data"), "--plot", str(tmp_path / "c.png"), "--card",
                "--set", f'models.dir="{models}"')
    assert r.returncode == 73
    assert r.stderr.strip().splitlines()[-1].startswith(f"streamd: cannot keep the figures in {models}")
    assert (models / "digits.fusion.json").read_bytes() == before


def test_noise_is_added_at_the_asked_snr_against_the_speech():
    import numpy as np

    from streamd.offline.eval_digits import add_noise

    rng = np.random.default_rng(0)
    audio = np.zeros(32000, np.int16)
    audio[8000:16000] = (np.sin(np.arange(8000) * 0.1) * 5000).astype(np.int16)
    speech = audio[8000:16000]
    for snr in (10.0, 0.0):
        noisy = add_noise(audio, speech, snr, rng).astype(np.float64)
        noise = noisy - audio
        measured = 10 * np.log10(np.mean(speech.astype(np.float64) ** 2) / np.mean(noise**2))
        assert abs(measured - snr) < 0.1


def test_a_clip_the_vad_does_not_hear_counts_as_said_nothing():
    clips = [Clip(Path(f"{i}.flac"), "fsdd", "theo", 3) for i in range(2)] + [Clip(Path("w.flac"), "asc", "x", None)]
    logits = np.full((3, 11), -5.0)
    logits[:, 3] = 5.0  # the model names "3" in all three
    r = digit_report(clips, logits, 0.5, heard=np.array([True, False, False]))
    assert r["fsdd"]["accuracy"] == 1.0  # the model's choice is still scored on the clip whole
    assert r["fsdd"]["accuracy_with_rejection"] == 0.5 and r["fsdd"]["rejected"] == 0.5
    assert r["fsdd"]["not_heard"] == 0.5 and r["fsdd"]["confusion_with_rejection"][3][10] == 1
    assert r["fsdd"]["per_speaker"] == {"theo": 1.0} and r["fsdd"]["per_speaker_with_rejection"] == {"theo": 0.5}
    assert r["non_digit_called_digit"]["rate"] == 0.0
    assert digit_report(clips, logits, 0.5)["non_digit_called_digit"]["rate"] == 1.0


def test_the_report_names_each_speakers_figures_choice_and_named():
    from streamd.offline.evaluate import digit_lines

    clips = [Clip(Path(f"{s}{i}.flac"), "asc", s, 3) for s in ("a", "b") for i in range(2)]
    logits = np.full((4, 11), -5.0)
    logits[:, 3] = 5.0
    logits[3, 10] = 6.0  # b's second "3": "not a digit" wins, the choice among 0-9 is still 3
    lines = digit_lines(digit_report(clips, logits, 0.5), "")
    assert "per speaker (choice / right): a 100%/100%, b 100%/50%" in "\n".join(lines)


def test_eval_digits_writes_each_clips_answer(tmp_path):
    """--clips: one row per clip and condition, the daemon's answer as the report counts it."""
    truth = make_digit_corpus(tmp_path / "data")
    out = tmp_path / "clips.csv"
    r = streamd("eval", "digits", "--data", str(tmp_path / "data"), "--json", "--plot", str(tmp_path / "c.png"),
                "--clips", str(out))
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3 * len(truth) and {row["condition"] for row in rows} == set(report["conditions"])
    for name, condition in report["conditions"].items():
        mine = [row for row in rows if row["condition"] == name]
        for corpus in ("fsdd", "asc"):
            digits = [row for row in mine if row["corpus"] == corpus and row["said"] != ""]
            right = sum(row["answer"] == row["said"] for row in digits) / len(digits)
            assert right == pytest.approx(condition[corpus]["accuracy_with_rejection"])
        words = [row for row in mine if row["said"] == ""]
        assert sum(row["answer"] != "" for row in words) / len(words) == condition["non_digit_called_digit"]["rate"]
    assert all(0 <= float(row["p_not_digit"]) <= 1 and row["choice"] in {str(c) for c in range(11)} for row in rows)


def test_eval_digits_refuses_an_unwritable_clips_file_before_evaluating(tmp_path):
    make_digit_corpus(tmp_path / "data")
    r = streamd("eval", "digits", "--data", str(tmp_path / "data"), "--clips", str(tmp_path / "no" / "clips.csv"))
    assert r.returncode == 73 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "cannot write --clips" in r.stderr and "clips:" not in r.stderr
