from dataclasses import replace

import numpy as np
import pytest
import soundfile as sf

from streamd.audio.frames import Frame
from streamd.signal.vad import (InputGain, NoiseFloor, Segmenter, SpeechAudio, SpeechEnd, SpeechStart, VadParams, frame_dbfs,
                         heard_utterance, segment_clip, utterance_audio)
from conftest import DATA

RATE = 16000


def word() -> np.ndarray:
    audio, _ = sf.read(DATA / "word.flac", dtype="int16")
    return audio


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * RATE), np.int16)


def frames_of(audio: np.ndarray, step: int = 320) -> list[Frame]:
    return [Frame("t", i, audio[i * step : (i + 1) * step], i * step / RATE, 0.0) for i in range(len(audio) // step)]


def run(audio: np.ndarray, params: VadParams) -> list:
    seg = Segmenter(params)
    step = params.frame_samples
    out = []
    for i in range(len(audio) // step):
        out += seg.push(Frame("t", i, audio[i * step : (i + 1) * step], i * step / RATE, float(i)))
    return out + seg.flush()


def test_one_word_gives_one_utterance_with_preroll_and_hangover():
    w = word()
    params = VadParams()
    out = run(np.concatenate((silence(1.0), w, silence(1.0))), params)
    starts = [o for o in out if isinstance(o, SpeechStart)]
    ends = [o for o in out if isinstance(o, SpeechEnd)]
    assert len(starts) == len(ends) == 1
    start, end = starts[0], ends[0]
    assert 0.98 <= start.t_start <= 1.15
    assert 1.0 + len(w) / RATE - 0.15 <= end.t_end <= 1.0 + len(w) / RATE + 0.05
    assert end.reason == "silence" and end.usable
    # Pre-roll: the audio handed on starts before the onset.
    assert start.audio_t <= start.t_start - params.preroll_ms / 1000 + 1e-9
    # The utterance is closed by the frame that completes the hangover.
    frames_after = round((end.closed_at + 1) * params.frame_ms / 1000 - end.t_end, 3)
    assert frames_after == pytest.approx(params.hangover_ms / 1000, abs=params.frame_ms / 1000)
    # Every sample from the pre-roll start to the closing frame is passed on, in order.
    audio_len = len(start.audio) + sum(len(o.audio) for o in out if isinstance(o, SpeechAudio))
    assert audio_len / RATE == pytest.approx((end.closed_at + 1) * 0.02 - start.audio_t, abs=1e-9)


@pytest.mark.parametrize("gap,expected", [(0.15, 1), (0.6, 2)])
def test_hangover_decides_whether_a_pause_splits(gap, expected):
    w = word()
    audio = np.concatenate((silence(0.5), w, silence(gap), w, silence(1.0)))
    ends = [e for e in segment_clip(audio, VadParams(hangover_ms=300)) if e.usable]
    assert len(ends) == expected


def test_long_speech_is_cut_at_max_length():
    w = word()
    audio = np.concatenate((silence(0.5), *([w] * 12), silence(1.0)))
    params = VadParams(max_utterance_ms=1000, hangover_ms=500)
    ends = segment_clip(audio, params)
    assert len(ends) >= 3
    assert any(e.reason == "max_length" for e in ends)
    for e in ends:
        assert e.t_end - e.t_start <= 1.0 + params.frame_ms / 1000 + 1e-9


def test_too_short_is_announced_but_not_usable():
    audio = np.concatenate((silence(0.5), word(), silence(1.0)))
    ends = segment_clip(audio, VadParams(min_utterance_ms=2000, max_utterance_ms=5000))
    assert [e.reason for e in ends] == ["too_short"]
    assert not ends[0].usable


def test_flush_closes_speech_at_end_of_stream():
    ends = segment_clip(np.concatenate((silence(0.5), word())), VadParams())
    assert [e.reason for e in ends] == ["end_of_stream"]


def test_demo_recording_has_ten_utterances():
    audio, _ = sf.read(DATA / "demo.flac", dtype="int16")
    ends = [e for e in segment_clip(audio, VadParams()) if e.usable]
    assert len(ends) == 10


def test_reset_forgets_an_utterance_in_progress():
    params = VadParams()
    seg = Segmenter(params)
    audio = np.concatenate((silence(0.2), word()))
    for i in range(len(audio) // 320):
        seg.push(Frame("t", i, audio[i * 320 : (i + 1) * 320], i * 0.02, 0.0))
    assert seg.in_speech
    seg.reset()
    assert not seg.in_speech and seg.flush() == []


@pytest.mark.parametrize("frame_ms", [10, 20, 30])
def test_all_webrtcvad_frame_sizes_work(frame_ms):
    audio = np.concatenate((silence(0.5), word(), silence(1.0)))
    assert len([e for e in segment_clip(audio, VadParams(frame_ms=frame_ms)) if e.usable]) == 1


def test_utterance_audio_cuts_what_the_daemon_would():
    w = word()
    cut = utterance_audio(w, VadParams())
    assert len(w) < len(cut) < len(w) + 0.6 * RATE


def quieter(audio: np.ndarray, db: float) -> np.ndarray:
    return np.round(audio * 10 ** (db / 20)).astype(np.int16)


def test_input_gain_hears_a_word_webrtcvad_alone_calls_silence():
    quiet = quieter(word(), -40.0)
    assert not heard_utterance(quiet, replace(VadParams(), max_gain_db=0.0))[1]
    assert heard_utterance(quiet, replace(VadParams(), max_gain_db=24.0))[1]


def test_models_get_the_audio_as_captured_not_the_gained_copy():
    quiet = np.concatenate((silence(0.5), quieter(word(), -30.0), silence(1.0)))
    params = replace(VadParams(), max_gain_db=24.0)
    start = next(o for o in run(quiet, params) if isinstance(o, SpeechStart))
    a = int(round(start.audio_t * RATE))
    assert np.array_equal(start.audio, quiet[a : a + len(start.audio)])


def feed(gain: InputGain, audio: np.ndarray) -> list[float]:
    step = gain.params.frame_samples
    return [gain.gain_db(audio[i : i + step]) for i in range(0, len(audio) - step + 1, step)]


@pytest.mark.parametrize("noise_dbfs", [-75.0, -60.0, -45.0])
def test_input_gain_keeps_steady_noise_below_the_ceiling(noise_dbfs):
    params = replace(VadParams(), max_gain_db=30.0)
    noise = np.random.default_rng(0).standard_normal(4 * RATE) * 32768 * 10 ** (noise_dbfs / 20)
    gains = feed(InputGain(params), noise.astype(np.int16))
    settled = gains[int(InputGain.FLOOR_WINDOW_S * 1000 / params.frame_ms):]
    # the floor is the quietest frame of the window, a dB or two below the noise's mean level
    assert noise_dbfs + max(settled) <= max(noise_dbfs, params.noise_ceiling_dbfs + 2.5)
    assert min(settled) >= max(0.0, min(params.max_gain_db, params.noise_ceiling_dbfs - noise_dbfs) - 3.0)


def test_input_gain_lifts_quiet_speech_toward_the_target_and_never_attenuates():
    params = replace(VadParams(), max_gain_db=24.0)
    loud, quiet = word(), quieter(word(), -30.0)
    assert max(feed(InputGain(params), np.concatenate((silence(0.3), loud)))[20:]) == 0.0
    gain = InputGain(params)
    gains = feed(gain, np.concatenate((silence(0.3), quiet)))
    peak = max(frame_dbfs(quiet[i : i + 320]) for i in range(0, len(quiet) - 319, 320))
    assert abs(min(gains[15:]) - min(params.target_dbfs - peak, params.max_gain_db)) < 1.0
    gain.reset()
    assert feed(gain, loud[:320]) == [0.0]


def test_input_gain_off_passes_frames_through():
    frame = quieter(word()[:320], -40.0)
    assert InputGain(VadParams(max_gain_db=0.0))(frame) is frame


def levels_into(floor: NoiseFloor, levels) -> float:
    for level in levels:
        floor.push(level)
    return floor.value


def test_noise_floor_ignores_dips_of_digital_silence():
    # The gain's floor (the quietest frame of 2 s) drops to -120 dBFS on a dip of zeros and
    # lifts ordinary noise by 24 dB into "speech": the gate's floor must not.
    rng = np.random.default_rng(0)
    noise = list(-60.0 + rng.normal(0, 0.5, 150))
    floor = NoiseFloor(20)
    levels_into(floor, noise)
    assert abs(levels_into(floor, [-120.0] * 15 + noise[:10]) - -60.6) < 0.5
    assert floor.noisy


def test_words_between_zeros_are_not_noisy():
    floor = NoiseFloor(20)
    levels_into(floor, ([-120.0] * 40 + [-45.0, -35.0, -25.0, -30.0, -40.0] * 6) * 3)
    assert floor.value == -45.0 and not floor.noisy


def test_noise_floor_is_a_low_percentile_not_the_minimum():
    floor = NoiseFloor(20)
    assert levels_into(floor, [-60.0] * 140 + [-90.0] * 2 + [-30.0] * 8) == -60.0


def test_clips_padded_with_digital_silence_are_cut_as_without_the_gate():
    """The models were trained on clips cut by webrtcvad alone (heard_utterance pads them with
    zeros): the gate must leave those cuts as they were."""
    for name in ("word.flac", "parity.flac"):
        clip, _ = sf.read(DATA / name, dtype="int16")
        noisy = clip + np.round(np.random.default_rng(0).standard_normal(len(clip)) * 30).astype(np.int16)
        for audio in (clip, noisy, quieter(noisy, -20.0)):
            gated = heard_utterance(audio, VadParams())
            plain = heard_utterance(audio, replace(VadParams(), min_snr_db=0.0))
            assert gated[1] == plain[1] and np.array_equal(gated[0], plain[0])


def test_a_stream_with_a_noise_floor_is_gated_from_its_first_frame():
    rng = np.random.default_rng(1)
    noise = np.round(rng.standard_normal(3 * RATE) * 32768 * 10 ** (-60 / 20)).astype(np.int16)
    seg = Segmenter(VadParams())
    voiced = [seg.is_speech(f) for f in frames_of(noise)]
    ungated = Segmenter(replace(VadParams(), min_snr_db=0.0))
    assert any(ungated.is_speech(f) for f in frames_of(noise))  # webrtcvad alone fires on it
    assert not any(voiced)


def test_pause_noise_gate_sits_above_noise_that_rises_and_falls():
    from streamd.signal.vad import PauseNoise

    rng = np.random.default_rng(0)
    steady, babble = PauseNoise(20), PauseNoise(20)
    for _ in range(250):
        steady.push(-50.0 + rng.normal(0, 0.3))
        babble.push(-50.0 + rng.normal(0, 3.0))
    assert steady.gate < -48.0  # the floor's own gate (3 dB over its 10th percentile) decides
    assert -45.0 < babble.gate < -40.0  # most talking-in-the-background frames stay below it
    assert not PauseNoise(20).ready


def test_a_quiet_pause_ends_an_utterance_before_the_hangover():
    """Ten words 0.3 s apart over a -60 dBFS floor: ten utterances. Each next word's onset is
    kept out of the pauses' noise estimate (it would raise the gate over the words)."""
    rng = np.random.default_rng(0)
    w = word().astype(np.float64)
    audio = np.concatenate([silence(1.0)] + [np.concatenate((w, silence(0.3))) for _ in range(10)] + [silence(1.0)])
    audio = np.round(audio + rng.standard_normal(len(audio)) * 32768 * 10 ** (-60 / 20)).astype(np.int16)
    assert len([e for e in segment_clip(audio, VadParams()) if e.usable]) == 10
    assert len([e for e in segment_clip(audio, VadParams(quiet_end_ms=0)) if e.usable]) <= 2  # merged
