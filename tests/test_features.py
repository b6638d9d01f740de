import numpy as np
import pytest
import soundfile as sf

from streamd.signal.features import FeatureParams, StreamingFeatures, feature_frames, normalize
from conftest import DATA


def stream_features(audio: np.ndarray, params: FeatureParams, chunks, chunk_samples: int = 0) -> np.ndarray:
    s = StreamingFeatures(params, capacity_frames=100_000, chunk_samples=chunk_samples)
    pos = 0
    for size in chunks:
        s.push(audio[pos : pos + size])
        pos += size
    s.push(audio[pos:])
    return s.frames(0)


@pytest.mark.parametrize("clip", ["parity.flac", "demo.flac"])
@pytest.mark.parametrize("chunk", [160, 320, 480, 37])
@pytest.mark.parametrize("chunk_samples", [0, 3200])  # computed per push, or per 0.2 s as the daemon does
def test_streaming_features_equal_offline_on_real_speech(clip, chunk, chunk_samples):
    audio, rate = sf.read(DATA / clip, dtype="int16")
    assert rate == 16000
    params = FeatureParams()
    offline = feature_frames(audio, params)
    streamed = stream_features(audio, params, [chunk] * (len(audio) // chunk), chunk_samples)
    assert streamed.shape == offline.shape
    assert offline.shape[0] == params.frames_in(len(audio))
    np.testing.assert_allclose(streamed, offline, rtol=0, atol=1e-5)
    np.testing.assert_allclose(normalize(streamed), normalize(offline), rtol=0, atol=1e-5)


def test_random_chunking_equals_offline():
    audio, _ = sf.read(DATA / "demo.flac", dtype="int16", frames=48000)
    rng = np.random.default_rng(0)
    chunks = list(rng.integers(1, 900, size=200))
    params = FeatureParams()
    np.testing.assert_allclose(stream_features(audio, params, chunks), feature_frames(audio, params), atol=1e-5)


def test_each_frame_is_computed_once():
    audio, _ = sf.read(DATA / "demo.flac", dtype="int16", frames=16000)
    s = StreamingFeatures(FeatureParams(), 1000)
    new = [s.push(audio[i : i + 320]) for i in range(0, 16000, 320)]
    assert sum(new) == s.num_frames == FeatureParams().frames_in(16000)


@pytest.mark.parametrize("chunk_samples", [0, 3200])
def test_ring_buffer_keeps_the_latest_frames(chunk_samples):
    audio, _ = sf.read(DATA / "demo.flac", dtype="int16", frames=32000)
    params = FeatureParams()
    s = StreamingFeatures(params, capacity_frames=50, chunk_samples=chunk_samples)
    for i in range(0, len(audio), 320):
        s.push(audio[i : i + 320])
    offline = feature_frames(audio, params)
    assert s.num_frames == len(offline)
    np.testing.assert_allclose(s.frames(s.oldest_frame), offline[-50:], atol=1e-5)
    with pytest.raises(IndexError):
        s.frames(0)


def test_reset_starts_a_new_utterance():
    audio, _ = sf.read(DATA / "parity.flac", dtype="int16")
    s = StreamingFeatures(FeatureParams(), 1000)
    s.push(audio[:1000])
    s.reset()
    s.push(audio)
    np.testing.assert_allclose(s.frames(0), feature_frames(audio, FeatureParams()), atol=1e-5)


def test_silence_log_energy_is_floored_not_log_eps():
    """An all-zero frame's log-energy would be log(eps) = -36 (python_speech_features puts eps
    in for zero energy, so it is finite either way): streamd floors it at LOG_ENERGY_FLOOR, so
    a pause inside an utterance does not swamp its normalisation. Offline and streamed alike."""
    from streamd.signal.features import LOG_ENERGY_FLOOR

    params = FeatureParams()
    feats = feature_frames(np.zeros(16000, np.int16), params)
    assert np.all(np.isfinite(feats))
    assert np.all(feats[:, 0] == LOG_ENERGY_FLOOR) and LOG_ENERGY_FLOOR > np.log(np.finfo(float).eps) + 1
    speech, _ = sf.read(DATA / "word.flac", dtype="int16")
    paused = np.concatenate([speech, np.zeros(8000, np.int16), speech])
    offline = feature_frames(paused, params)
    # The pause's frames (0.5 s: about 48 wholly inside it) sit on the floor, none below it.
    assert offline[:, 0].min() == LOG_ENERGY_FLOOR and np.sum(offline[:, 0] == LOG_ENERGY_FLOOR) >= 45
    np.testing.assert_allclose(stream_features(paused, params, [320] * (len(paused) // 320)), offline, atol=1e-5)
    assert np.all(np.isfinite(normalize(offline)))


@pytest.mark.parametrize("chunk", [160, 333])
@pytest.mark.parametrize("chunk_samples", [0, 3200])
def test_mel_front_end_streams_like_offline(chunk, chunk_samples):
    from streamd.signal.features import mel_params

    audio, _ = sf.read(DATA / "demo.flac", dtype="int16")
    params = mel_params()
    offline = feature_frames(audio, params)
    streamed = stream_features(audio, params, [chunk] * (len(audio) // chunk), chunk_samples)
    assert offline.shape == (params.frames_in(len(audio)), params.nfilt + 1)
    np.testing.assert_allclose(streamed, offline, rtol=1e-9, atol=1e-12)


def test_mel_filterbank_is_slaney_and_normalisation_only_raises_gain():
    from streamd.signal.features import mel_params, slaney_filterbank, features_of_audio

    fb = slaney_filterbank(16000, 400, 40, 0.0, 8000.0)
    assert fb.shape == (40, 201) and np.all(fb >= 0)
    peaks = np.argmax(fb, axis=1)
    assert np.all(np.diff(peaks) >= 0)  # bands rise in frequency
    # Area normalisation: wide high bands have lower peaks than narrow low ones.
    assert fb[0].max() > fb[-1].max()
    params = mel_params()
    audio, _ = sf.read(DATA / "word.flac", dtype="int16")
    # word.flac is at about -25 dBFS: a quarter and a sixteenth of it are both brought up to -30 dBFS.
    quieter = features_of_audio((audio / 4).astype(np.int16), params)
    quietest = features_of_audio((audio / 16).astype(np.int16), params)
    np.testing.assert_allclose(quietest.sum(), quieter.sum(), rtol=0.02)
    as_is = features_of_audio(audio, params)
    assert as_is.sum() > 2 * quieter.sum()  # louder than the target: never turned down


def test_mfcc_equals_python_speech_features_bit_for_bit():
    """streamd.signal.features computes python_speech_features' MFCC step by step (its filterbank
    built once, not per call): the numbers must not move at all."""
    import python_speech_features as psf

    from streamd import config
    from streamd.signal.features import LOG_ENERGY_FLOOR, _window, features_of_emphasised

    p = config.load(None).feature_params("mfcc")
    rng = np.random.default_rng(3)
    for signal in (rng.standard_normal(16000) * 3000, np.zeros(4000), np.r_[np.zeros(800), rng.standard_normal(1700)]):
        n = p.frames_in(len(signal))
        used = p.frame_len + (n - 1) * p.frame_step
        want = psf.mfcc(signal[:used], samplerate=p.sample_rate, winlen=p.winlen, winstep=p.winstep,
                        numcep=p.numcep, nfilt=p.nfilt, nfft=p.nfft, lowfreq=p.lowfreq, highfreq=p.highfreq,
                        preemph=0.0, ceplifter=p.ceplifter, appendEnergy=True, winfunc=_window(p))
        want[:, 0] = np.maximum(want[:, 0], LOG_ENERGY_FLOOR)
        got = features_of_emphasised(signal, p)
        assert got.shape == want.shape and np.array_equal(got, want)
