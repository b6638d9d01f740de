"""The digit family on the word model's embedding (streamd.train.digits_words): one ONNX file,
the word model then the head, reading the word window front end."""

import numpy as np
import pytest

from streamd.signal.features import word_window_params
from streamd.train import scoring
from conftest import MODELS, DATA
from streamd.audio.sources import read_audio
from streamd.signal.features import word_input


def test_the_family_is_a_fusion_member_by_name():
    assert scoring.parse_member("words") == ("words", 0)
    assert scoring.member_file("words", 0) == "digits-words.onnx"


def test_the_exported_model_is_the_word_model_then_the_head(tmp_path):
    torch = pytest.importorskip("torch")
    from streamd.train.digits_words import DIM, Head, export

    torch.manual_seed(0)
    head = Head().eval()
    windows = [word_input(read_audio(str(DATA / clip)))[0] for clip in ("word.flac", "demo.flac")]
    parity = export(head, MODELS / "words.onnx", tmp_path / "digits-words.onnx", windows)
    assert parity["onnx_vs_word_model_and_torch_head_max_abs_diff"] < 1e-4
    session = scoring.ort_session(tmp_path / "digits-words.onnx")
    (feats,), (logits,) = session.get_inputs(), session.get_outputs()
    assert feats.shape[1:] == [149, 64] and logits.shape[1] == 11
    both = session.run(None, {feats.name: np.stack(windows)})[0]
    alone = np.concatenate([session.run(None, {feats.name: w[None]})[0] for w in windows])
    np.testing.assert_allclose(both, alone, atol=1e-5)  # rows do not see each other
    assert Head().net[0].in_features == DIM == 2048
    assert word_window_params().kind == "wordwin"
