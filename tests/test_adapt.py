"""`streamd train digits --adapt`: a few examples re-train the head, the rest of the network
stays exactly as shipped (runs without torch)."""

import json
import os

import numpy as np
import onnx
from onnx import numpy_helper

from streamd.train.adapt import HEAD
from conftest import MODELS, streamd
from helpers import make_digit_corpus


def initializers(path):
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def test_adapting_retrains_the_head_only_and_reports_before_and_after(tmp_path):
    data = tmp_path / "data"
    make_digit_corpus(data)  # FSDD theo's digits (no split column: usable) + held-out ASC words
    out = tmp_path / "out"
    r = streamd("train", "digits", "--adapt", str(data / "fsdd"), "--from", str(MODELS / "digits.onnx"),
                "--out", str(out), "--data", str(data), "--adapt-speakers", "1", "--adapt-reps", "3",
                env={**os.environ, "STREAMD_TRAIN_WORK": str(tmp_path / "work")})
    assert r.returncode == 0, r.stdout + r.stderr
    adapted = out / "digits-adapted.onnx"
    base, new = initializers(MODELS / "digits.onnx"), initializers(adapted)
    assert base.keys() == new.keys()
    for name in base:
        if name in HEAD:
            assert not np.array_equal(base[name], new[name]), name
        else:
            np.testing.assert_array_equal(base[name], new[name], err_msg=name)  # the trunk is kept
    card = json.loads((out / "digits-adapted.card.json").read_text())
    assert card["adapted"]["speakers"] == ["theo"] and card["adapted"]["clips"] > 0
    assert card["sha256"] != json.loads((MODELS / "digits.card.json").read_text())["sha256"]
    m = card["metrics"]
    assert m["adaptation_loss"]["last_10_steps"] < m["adaptation_loss"]["first_step"]
    before, after = m["before"]["english_fsdd_heldout"], m["after"]["english_fsdd_heldout"]
    assert before["n_clips"] == after["n_clips"] > 0
    # theo's own words were the adaptation examples: the adapted head knows them at least as well
    assert after["digit_accuracy_11_class"] >= before["digit_accuracy_11_class"]


def test_adapting_needs_usable_clips(tmp_path):
    corpus = tmp_path / "empty"
    corpus.mkdir()
    (corpus / "manifest.csv").write_text("path,speaker,digit\n")
    data = tmp_path / "data"
    make_digit_corpus(data)
    r = streamd("train", "digits", "--adapt", str(corpus), "--from", str(MODELS / "digits.onnx"),
                "--out", str(tmp_path / "out"), "--data", str(data),
                env={**os.environ, "STREAMD_TRAIN_WORK": str(tmp_path / "work")})
    assert r.returncode == 2 and "no usable clips" in r.stdout
