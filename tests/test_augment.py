"""Training-time augmentation (streamd.train.data): each effect does what its name says, and
babble is made of training speakers only."""

from pathlib import Path

import numpy as np
import soundfile as sf

from streamd.signal.features import FeatureParams, features_of_audio
from streamd.train import data
from helpers import make_digit_corpus

RATE = 16000


def band_energy(x: np.ndarray, lo: float, hi: float) -> float:
    spec = np.abs(np.fft.rfft(x)) ** 2
    f = np.fft.rfftfreq(len(x), 1 / RATE)
    return float(spec[(f >= lo) & (f < hi)].sum())


def f0(x: np.ndarray) -> float:
    """The strongest frequency between 100 and 200 Hz (the fundamental of ``harmonics()``)."""
    middle = x[len(x) // 8 : -len(x) // 8]
    spec = np.abs(np.fft.rfft(middle))
    f = np.fft.rfftfreq(len(middle), 1 / RATE)
    band = (f >= 100) & (f <= 200)
    return float(f[band][np.argmax(spec[band])])


def harmonics(f0: float = 150.0, seconds: float = 1.0) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 20)) * 3000


def test_vtlp_moves_the_spectrum_and_keeps_the_duration():
    x = harmonics()
    assert np.allclose(data.vtlp(x, 1.0), x, atol=1e-6)
    for alpha in (0.9, 1.1):
        y = data.vtlp(x, alpha)
        assert len(y) == len(x)
        assert abs(f0(y) - 150 * alpha) < 3, (alpha, f0(y))  # the partials move, coherently


def test_telephone_keeps_300_to_3400_hz_only():
    x = np.random.default_rng(0).standard_normal(RATE) * 3000
    y = data.telephone(x)
    assert len(y) == len(x)
    kept = band_energy(y, 500, 3000) / band_energy(x, 500, 3000)
    assert kept > 0.5
    assert band_energy(y, 20, 150) / band_energy(x, 20, 150) < 0.05 * kept
    assert band_energy(y, 4200, 8000) / band_energy(x, 4200, 8000) < 0.01 * kept


def test_peaking_eq_lifts_its_own_band_by_its_gain():
    from scipy import signal

    x = np.random.default_rng(0).standard_normal(RATE * 4)
    y = signal.lfilter(*data.peaking_eq(1000, 9.0, 1.0), x)
    gain = lambda lo, hi: 10 * np.log10(band_energy(y, lo, hi) / band_energy(x, lo, hi))
    assert abs(gain(950, 1050) - 9.0) < 1.0
    assert abs(gain(5000, 7000)) < 1.0


def test_random_channels_keep_the_speech_and_its_power_but_colour_it_each_their_own_way():
    x = np.clip(harmonics(), -32768, 32767).astype(np.int16)
    a = data.random_channel(x, np.random.default_rng(1))
    b = data.random_channel(x, np.random.default_rng(2))
    assert a.dtype == np.int16 and len(a) == len(b) == len(x)
    assert np.array_equal(a, data.random_channel(x, np.random.default_rng(1)))  # the seed picks the channel
    power = lambda v: data.speech_power(v.astype(np.float64))
    assert abs(10 * np.log10(power(a) / power(x))) < 0.5
    bands = [(lo, lo * 2) for lo in (150, 300, 600, 1200, 2400)]
    tilt = lambda v: np.array([10 * np.log10(band_energy(v.astype(np.float64), lo, hi) / band_energy(x, lo, hi))
                               for lo, hi in bands])
    assert np.abs(tilt(a) - tilt(b)).max() > 3  # two channels differ by more than a few dB somewhere
    assert abs(f0(a) - 150) < 3  # the voice's pitch stays


def test_noise_is_babble_three_times_in_ten_else_unit_hum_fan_or_coloured_noise():
    rng = np.random.default_rng(1)
    babble = np.full(5 * RATE, 7.0)  # recognisable: a constant
    picked = [data.noise(RATE, rng, babble) for _ in range(200)]
    share = np.mean([np.all(p == 7.0) for p in picked])
    assert 0.2 < share < 0.4  # babble p=0.3, otherwise hum, a fan or coloured noise
    assert all(abs(p.std() - 1) < 0.2 for p in picked if not np.all(p == 7.0))


def test_babble_comes_from_training_speakers_only(tmp_path, monkeypatch):
    root = tmp_path / "data"
    make_digit_corpus(root)  # theo (held out) + ASC words marked held out
    train = root / "fsdd" / "jackson"
    train.mkdir()
    rows = (root / "fsdd" / "manifest.csv").read_text().splitlines()
    tone = (np.sin(np.arange(RATE) * 2 * np.pi * 440 / RATE) * 8000).astype(np.int16)
    sf.write(train / "a.flac", tone, RATE)
    (root / "fsdd" / "manifest.csv").write_text("\n".join(rows + ["jackson/a.flac,jackson,3,0,1.0"]) + "\n")
    monkeypatch.setattr(data, "WORK_DIR", tmp_path / "work")
    data.build_babble(root, seed=0)
    bank = np.load(data.babble_path(0), allow_pickle=False)
    assert len(bank) == data.BABBLE_SECONDS * RATE and abs(bank.std() - 1) < 1e-3
    # the only training clip is a 440 Hz tone: held-out voices (theo, ASC val) are not in it
    assert band_energy(bank, 430, 450) > 0.95 * band_energy(bank, 20, 8000)


def pitch(x: np.ndarray) -> float:
    """Median autocorrelation pitch (60-300 Hz) of the loudest 30 ms frames."""
    frames = np.lib.stride_tricks.sliding_window_view(x, 480)[::160]
    loud = frames[np.argsort((frames ** 2).sum(1))[-len(frames) // 3:]]
    lags = np.arange(RATE // 300, RATE // 60)
    picks = [lags[np.argmax([np.dot(f[:-lag], f[lag:]) for lag in lags])] for f in loud - loud.mean(1, keepdims=True)]
    return RATE / float(np.median(picks))


def test_flite_voices_are_stored_as_16_khz_speech_with_their_duration_and_pitch(tmp_path):
    clips = {}
    for name, voice in {"slow": data.FliteVoice("kal", 1.3, 100), "fast": data.FliteVoice("kal", 0.8, 100),
                        "high": data.FliteVoice("kal", 0.8, 140), "slt": data.FliteVoice("slt", 1.0, 170)}.items():
        data.synthesize(voice, "seven", tmp_path / f"{name}.flac")
        clips[name], rate = sf.read(tmp_path / f"{name}.flac", dtype="int16")
        assert rate == RATE and 0.3 < len(clips[name]) / RATE < 2.0
        assert np.abs(clips[name]).max() > 3000  # speech, not silence
    assert len(clips["slow"]) > 1.3 * len(clips["fast"])
    assert pitch(clips["high"].astype(float)) > 1.2 * pitch(clips["fast"].astype(float))
    voices = data.flite_voices(seed=0)
    assert {v.voice for v in voices} == set(data.FLITE_VOICES) and len({v.name for v in voices}) == len(voices)


def test_a_clips_augmentation_does_not_depend_on_where_the_corpora_lie(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "babble_bank", lambda seed: None)
    make_digit_corpus(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    here = data.real_clips(tmp_path / "data")[0]
    relative = data.real_clips(tmp_path / ".." / tmp_path.name / "data")[0]
    assert here.path != relative.path
    noisy = data.TRAIN_VARIANTS[1]
    a = data.variant_audio(here, noisy, seed=0)
    assert np.array_equal(a, data.variant_audio(relative, noisy, seed=0))
    assert not np.array_equal(a, data.variant_audio(here, noisy, seed=1))


def word_audio() -> np.ndarray:
    audio, rate = sf.read(Path(__file__).parent / "data" / "word.flac", dtype="int16")
    assert rate == RATE
    return audio.astype(np.float64)


def dbfs(x: np.ndarray) -> float:
    return 10 * np.log10(np.mean(np.asarray(x, np.float64) ** 2) / 32768.0**2 + 1e-20)


def test_a_word_in_a_stream_has_context_around_it_and_a_floor_under_the_speech():
    word = word_audio()
    for seed in range(20):
        rng = np.random.default_rng(seed)
        x = data.streamed(word, rng)
        extra = (len(x) - len(word)) / RATE
        assert 1.0 <= extra <= 2.5  # 0.6-1.5 s before, 0.4-1.0 s after
        context = x[: int(0.5 * RATE)]
        below = dbfs(word) - dbfs(context[context != 0])
        assert 15 < below < 75, below  # a floor 20-70 dB under the speech (dBFS of all the clip)
        assert np.count_nonzero(x[: int(0.5 * RATE)] == 0) < 0.5 * RATE  # not digital silence


def test_digital_silence_dips_fall_in_the_context_before_the_word_only():
    word, dipped = word_audio(), 0
    for seed in range(60):
        lead, _ = data.context(np.random.default_rng(seed))  # streamed() draws the context first
        x = data.streamed(word, np.random.default_rng(seed))
        zeros = np.flatnonzero(x == 0)
        if len(zeros) > 0.05 * RATE:
            dipped += 1
            assert zeros.max() < lead - 0.1 * RATE  # 0.1 s of floor at least before the word
            assert 0.1 * RATE <= len(zeros) <= 0.4 * RATE
    assert 3 <= dipped <= 20  # p = 0.15 of 60


def test_streamed_versions_are_cut_as_live_audio_and_clean_ones_as_clips():
    word = word_audio()
    x = data.to_int16(data.streamed(word, np.random.default_rng(3)))
    live, heard = data.heard_utterance(x, data.VadParams(), pad_s=0.0)
    assert heard
    assert np.array_equal(data.clip_features(x, stream=True),
                          features_of_audio(live, FeatureParams()))
    # As a clip, the same audio is padded with digital silence, which ungates the segmenter:
    # another cut, so other features.
    assert data.clip_features(x).shape != data.clip_features(x, stream=True).shape or not np.array_equal(
        data.clip_features(x), data.clip_features(x, stream=True))
    assert all(v.stream for v in data.TRAIN_VARIANTS[1:] + data.SYNTH_VARIANTS[1:])
    assert not data.CLEAN.stream
    assert data.VALIDATION_VARIANTS == (data.CLEAN, data.STREAMED)
