"""The Kaldi log mel filterbank front end (CAM++'s): equal to a reference Kaldi implementation
on real speech, and streamed exactly as computed offline."""

import numpy as np
import pytest
import soundfile as sf

from streamd.signal.features import KALDI_ENERGY_FLOOR, FeatureParams, StreamingFeatures, kaldi_fbank_params, kaldi_mel_banks, feature_frames, normalize, features_of_audio
from conftest import DATA

CLIPS = ["parity.flac", "word.flac", "demo.flac", "visitor12.flac", "enroll_asc02.flac"]


def kaldi_reference(audio: np.ndarray) -> np.ndarray:
    """k2-fsa's kaldi-native-fbank (a port of Kaldi's compute-fbank-feats) set as 3D-Speaker
    sets torchaudio's Kaldi fbank for CAM++: 80 bins, no dither, otherwise Kaldi's defaults,
    samples in [-1, 1]."""
    knf = pytest.importorskip("kaldi_native_fbank")
    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0.0
    opts.frame_opts.samp_freq = 16000
    opts.mel_opts.num_bins = 80
    opts.mel_opts.low_freq = 20.0
    opts.mel_opts.high_freq = 0.0  # Nyquist
    fbank = knf.OnlineFbank(opts)
    fbank.accept_waveform(16000, audio.astype(np.float32) / 32768)  # as torchaudio.load gives it
    fbank.input_finished()
    return np.stack([np.asarray(fbank.get_frame(i)) for i in range(fbank.num_frames_ready)])


@pytest.mark.parametrize("clip", CLIPS)
def test_equals_kaldi_on_real_speech(clip):
    audio, rate = sf.read(DATA / clip, dtype="int16")
    assert rate == 16000
    ours, ref = feature_frames(audio, kaldi_fbank_params()), kaldi_reference(audio)
    assert ours.shape == ref.shape == (kaldi_fbank_params().frames_in(len(audio)), 80)
    # The reference computes in float32: a band 60 dB below its frame's strongest carries the
    # FFT's rounding of the strong ones (up to 0.006 in the log on visitor12); we use float64.
    strong = ours >= ours.max(axis=1, keepdims=True) - np.log(1e6)
    assert strong.mean() > 0.9
    np.testing.assert_allclose(ours[strong], ref[strong], rtol=0, atol=5e-4)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-2)


def test_frame_is_preemphasised_on_its_own_after_removing_dc():
    """A constant offset (DC) must not change Kaldi features: each frame loses its mean before
    pre-emphasis. Pre-emphasising the continuous signal (as the MFCC does) would keep it."""
    audio, _ = sf.read(DATA / "parity.flac", dtype="int16")
    p = kaldi_fbank_params()
    shifted = np.clip(audio.astype(np.int32) + 1000, -32768, 32767).astype(np.int16)
    assert np.array_equal(shifted.astype(np.int32) - audio, np.full(len(audio), 1000))
    np.testing.assert_allclose(feature_frames(shifted, p), feature_frames(audio, p), rtol=0, atol=1e-6)


@pytest.mark.parametrize("clip", ["demo.flac", "visitor21.flac"])
@pytest.mark.parametrize("chunk_samples", [0, 3200])  # per push, or per 0.2 s as the daemon does
def test_streaming_20ms_frames_equals_offline(clip, chunk_samples):
    audio, _ = sf.read(DATA / clip, dtype="int16")
    p = kaldi_fbank_params()
    ring = StreamingFeatures(p, capacity_frames=100_000, chunk_samples=chunk_samples)
    for i in range(0, len(audio), 320):
        ring.push(audio[i : i + 320])
    offline = feature_frames(audio, p)
    streamed = ring.frames(0)
    assert streamed.shape == offline.shape == (p.frames_in(len(audio)), p.stored_dims)
    # the same samples per frame; only float rounding of batched FFTs may differ
    np.testing.assert_allclose(streamed, offline, rtol=0, atol=1e-9)
    np.testing.assert_allclose(normalize(streamed, p), normalize(offline, p), rtol=0, atol=1e-5)


def test_normalisation_subtracts_the_mean_only():
    audio, _ = sf.read(DATA / "word.flac", dtype="int16")
    p = kaldi_fbank_params()
    feats = feature_frames(audio, p)
    out = normalize(feats, p)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(out.std(axis=0), feats.std(axis=0), rtol=1e-5)
    # a gain is a constant in the log: normalised features do not see it (save in bands that
    # FSDD's 8 kHz recording leaves empty, held at the energy floor)
    assert np.abs(audio).max() < 32768 // 3
    louder = features_of_audio(audio * 3, p)
    live = (feats > np.log(KALDI_ENERGY_FLOOR) + 1).all(axis=0)
    assert live.sum() >= 40
    np.testing.assert_allclose(louder[:, live], out[:, live], atol=1e-4)


def test_mel_banks_are_kaldis():
    fb = kaldi_mel_banks(16000, 512, 80, 20.0, 8000.0)
    assert fb.shape == (80, 257)
    assert fb[:, -1].max() == 0 and fb[:, 0].max() == 0  # nothing at DC (below 20 Hz) nor Nyquist
    assert np.all(fb <= 1.0) and np.all(fb >= 0.0)
    assert np.all(fb.max(axis=1) > 0.4)  # every bin has FFT bins near its peak (the low ones are narrow)
    centres = np.argmax(fb, axis=1)
    assert np.all(np.diff(centres) >= 0)


def test_existing_front_ends_are_unchanged_by_the_new_kind():
    """MFCC still pre-emphasises the continuous signal; the Kaldi kind does not."""
    assert FeatureParams().signal_preemph == FeatureParams().preemph == 0.97
    assert kaldi_fbank_params().signal_preemph == 0.0
    assert kaldi_fbank_params().stored_dims == 80


def test_daemon_reads_the_fixed_kaldi_front_end_for_a_card_that_names_it(tmp_path):
    """A speaker card on kaldifbank gets CAM++'s parameters whatever the config's [features]
    and [mel] say; a card on other parameters is refused, naming the first that differs."""
    import json

    from streamd.config import Config
    from streamd.models.cards import ModelError, front_end, load_card, verify

    cfg = Config()
    assert front_end(cfg, "kaldifbank") == kaldi_fbank_params()
    assert front_end(cfg, "mfcc") == cfg.features.params() and front_end(cfg, "melpower") == cfg.mel.params()
    model = tmp_path / "m.onnx"
    model.write_bytes(b"not a model")
    from streamd.models.cards import sha256_of

    card = {"kind": "speaker", "file": model.name, "sha256": sha256_of(model), "input": {}, "output": {},
            "features": {**kaldi_fbank_params().as_dict(), "nfilt": 64}}
    (tmp_path / "m.card.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="trained on features.nfilt=64 but config has kaldifbank"):
        verify(load_card(tmp_path / "m.card.json", "speaker"), front_end(cfg, "kaldifbank"))
    card["features"]["nfilt"] = 80
    (tmp_path / "m.card.json").write_text(json.dumps(card))
    verify(load_card(tmp_path / "m.card.json", "speaker"), front_end(cfg, "kaldifbank"))
