"""The digit family on the pretrained speech encoder's states (streamd.train.digits_ge2e) and
the daemon's side of it: its own front end, unpadded rows."""

import numpy as np
import pytest

from streamd.config import Config
from streamd.models.inference import load_digits, load_models
from streamd.train import scoring
from helpers import utterance_features


def test_the_family_is_a_fusion_member_by_name():
    assert scoring.parse_member("ge2e") == ("ge2e", 0)
    assert scoring.member_file("ge2e", 0) == "digits-ge2e.onnx"
    assert scoring.member_file("ge2e", 1) == "digits-ge2e-s1.onnx"


def test_its_rows_run_alone_and_unpadded_while_the_mfcc_models_are_bucketed():
    cfg = Config()
    digits = load_digits(cfg, "cpu")
    ge2e, cnn = digits.members["ge2e"], digits.members["cnn"]
    assert ge2e.params == cfg.mel.params() and cnn.params == cfg.features.params()
    assert ge2e.card.rows_alone and not ge2e.card.bucketed and cnn.card.bucketed
    odd = np.random.default_rng(0).random((37, 40)).astype(np.float32)
    assert ge2e.inputs(odd).shape == (1, 37, 40)  # as trained: every frame pooled is speech
    assert cnn.inputs(odd[:, :20]).shape == (1, 40, 20)


def test_the_speaker_model_and_the_ge2e_digit_model_share_one_mel_ring():
    models = load_models(Config(), "cpu")
    # the pipeline keeps one ring per distinct FeatureParams: equal params, one ring
    assert models.speaker.params == models.digits.members["ge2e"].params
    streamed = {p for p in (models.speaker.params, *models.digits.front_ends) if p.streamed}
    assert len(streamed) == 2  # mel and MFCC rings, no more (the word window is cut from the audio)
    feats = utterance_features(models.digits)[0]
    assert set(feats) == set(models.digits.front_ends)


def test_the_frozen_encoder_gives_every_layers_states_of_the_lstm_it_copies():
    torch = pytest.importorskip("torch")
    from streamd.train.digits_ge2e import STRIDE, FrozenEncoder

    torch.manual_seed(0)
    lstm = torch.nn.LSTM(40, 256, 3, batch_first=True).eval()
    enc = FrozenEncoder(lstm).eval()
    x = torch.rand(2, 31, 40)
    with torch.no_grad():
        states = enc(x)
        want_top = lstm(x)[0][:, ::STRIDE]
    assert states.shape == (2, 16, 768)
    assert torch.allclose(states[:, :, 512:], want_top, atol=1e-6)  # the top layer is the LSTM's output
    assert not any(p.requires_grad for p in enc.parameters())


def test_the_head_ignores_padding_so_training_batches_match_the_daemons_unpadded_rows():
    torch = pytest.importorskip("torch")
    from streamd.train.digits_ge2e import Head, pad_states

    torch.manual_seed(0)
    head = Head().eval()
    rng = np.random.default_rng(0)
    states = [rng.standard_normal((n, 768)).astype(np.float16) for n in (12, 30, 7)]
    x, mask = pad_states(states)
    with torch.no_grad():
        batched = head(x, mask)
        alone = torch.cat([head(torch.from_numpy(s.astype(np.float32))[None]) for s in states])
    assert torch.allclose(batched, alone, atol=1e-5)


def test_the_export_holds_encoder_and_head_and_matches_torch(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnx")
    from streamd.train.digits_ge2e import FrozenEncoder, GE2EDigitNet, Head, export

    torch.manual_seed(0)
    net = GE2EDigitNet(FrozenEncoder(torch.nn.LSTM(40, 256, 3, batch_first=True)), Head()).eval()
    rng = np.random.default_rng(1)
    sample = [np.abs(rng.standard_normal((n, 40))).astype(np.float32) * 1e-3 for n in (20, 77, 150)]
    path = tmp_path / "digits-ge2e.onnx"
    parity = export(net, path, sample)
    assert parity["onnx_float_vs_torch_max_abs_diff"] < 1e-4
    assert 0 <= parity["int8_vs_float_same_argmax"] <= 1
    assert path.exists() and not (tmp_path / "digits-ge2e-float.onnx").exists()
    out = scoring.ort_outputs(scoring.ort_session(path), sample)
    assert out.shape == (3, 11)
