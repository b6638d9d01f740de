import io

import numpy as np
import pytest
import soundfile as sf

from streamd.audio.sources import FileSource, SourceError, StdinSource, iter_audio, read_audio, open_source
from conftest import DATA


def test_file_at_other_rate_and_channels_is_converted(tmp_path):
    mono, _ = sf.read(DATA / "word.flac", dtype="float64")
    from scipy.signal import resample_poly

    at44 = resample_poly(mono, 441, 160)
    stereo = np.stack((at44, at44), axis=1)
    path = tmp_path / "w44.wav"
    sf.write(path, stereo, 44100, subtype="FLOAT")
    back = read_audio(str(path))
    ref = read_audio(str(DATA / "word.flac"))
    n = min(len(back), len(ref))
    assert abs(len(back) - len(ref)) <= 2
    corr = np.corrcoef(back[:n].astype(float), ref[:n].astype(float))[0, 1]
    assert corr > 0.99


@pytest.mark.parametrize("rate,channels", [(44100, 2), (48000, 1), (8000, 1), (16000, 2)])
def test_block_by_block_conversion_equals_whole_file_conversion(tmp_path, rate, channels):
    from math import gcd
    from scipy.signal import resample_poly

    noise = np.random.default_rng(rate).standard_normal((int(rate * 2.7), channels)).astype(np.float32) * 0.2
    path = tmp_path / "n.wav"
    sf.write(path, noise, rate, subtype="FLOAT")
    g = gcd(rate, 16000)
    whole = resample_poly(noise.astype(np.float64).mean(axis=1), 16000 // g, rate // g)
    whole = np.clip(np.round(whole * 32767), -32768, 32767).astype(np.int16)
    for block_seconds in (0.25, 1.0):
        np.testing.assert_array_equal(np.concatenate(list(iter_audio(str(path), block_seconds))), whole)


def test_a_long_file_is_streamed_not_loaded(tmp_path):
    """A file source decodes a block at a time: reading the start of a 2-minute 48 kHz stereo
    file (92 MB as float64) allocates a small fraction of that."""
    import tracemalloc

    path = tmp_path / "long.wav"
    tone = (np.sin(np.arange(48000 * 120) * 0.05) * 8000).astype(np.int16)
    sf.write(path, np.stack((tone, tone), axis=1), 48000, subtype="PCM_16")
    tracemalloc.start()
    try:
        frames = FileSource(str(path), "s", 320, pace="fast").frames()
        first = [next(frames) for _ in range(1000)]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(first) == 1000 and peak < 20e6, f"peak {peak / 1e6:.0f} MB"


@pytest.mark.parametrize("make,expect", [
    (lambda p: p.write_bytes(b""), "cannot read audio"),
    (lambda p: p.write_bytes(b"this is not audio at all" * 100), "cannot read audio"),
    (lambda p: sf.write(p, np.zeros((0,)), 16000), "empty"),
    (lambda p: sf.write(p, np.array([0.1, np.nan, 0.2] * 100), 16000, subtype="FLOAT"), "NaN"),
])
def test_bad_audio_files_are_one_line_errors(tmp_path, make, expect):
    path = tmp_path / "bad.wav"
    make(path)
    with pytest.raises(SourceError) as err:
        read_audio(str(path))
    assert expect in str(err.value) and "\n" not in str(err.value)
    assert str(path) in str(err.value)


def test_truncated_flac_is_refused_or_read_short(tmp_path):
    data = (DATA / "demo.flac").read_bytes()
    path = tmp_path / "cut.flac"
    path.write_bytes(data[: len(data) // 3])
    try:
        audio = read_audio(str(path))
    except SourceError as err:
        assert "cut.flac" in str(err)
    else:
        assert 0 < len(audio) < len(read_audio(str(DATA / "demo.flac")))


def test_missing_file_cli_error(tmp_path):
    from conftest import streamd

    r = streamd("run", "--source", f"file:{tmp_path}/nope.wav", "--set", 'metrics.listen=""',
                "--set", 'events.endpoint="tcp://127.0.0.1:0"')
    assert r.returncode == 65
    assert r.stderr.strip().count("\n") == 0 and "nope.wav" in r.stderr


def test_file_frames_cover_the_file_in_fixed_blocks():
    src = FileSource(str(DATA / "word.flac"), "s", 320, pace="fast")
    frames = list(src.frames())
    assert all(len(f.samples) == 320 for f in frames)
    assert [f.index for f in frames] == list(range(len(frames)))
    audio = read_audio(str(DATA / "word.flac"))
    assert len(frames) == -(-len(audio) // 320)
    np.testing.assert_array_equal(np.concatenate([f.samples for f in frames])[: len(audio)], audio)
    assert frames[1].t == pytest.approx(0.02)


def test_realtime_pace_takes_real_time():
    import time

    src = FileSource(str(DATA / "word.flac"), "s", 320, pace="realtime")
    t0 = time.monotonic()
    n = sum(1 for _ in src.frames())
    assert time.monotonic() - t0 >= 0.9 * n * 0.02


def test_stdin_source_reads_raw_s16le_in_pieces():
    audio = read_audio(str(DATA / "word.flac"))
    src = StdinSource("s", 320, io.BufferedReader(io.BytesIO(audio.astype("<i2").tobytes()), buffer_size=100))
    frames = list(src.frames())
    np.testing.assert_array_equal(np.concatenate([f.samples for f in frames])[: len(audio)], audio)


def test_unknown_source_spec():
    with pytest.raises(SourceError, match="unknown source"):
        open_source("tape:1", "s", 320)
