"""The VAD of many streams at once (VadBank, Engine.push_many, issue 31): each stream is gated
as it would be alone, the bank's arithmetic is the scalar classes', and quiet frames skip
webrtcvad."""

from dataclasses import replace

import numpy as np
import pytest

from conftest import DATA
from streamd.audio.frames import Frame
from streamd.audio.sources import read_audio
from streamd.signal.levels import levels
from streamd.signal.vad import (InputGain, NoiseFloor, PauseNoise, Segmenter, SpeechAudio, VadParams, frame_levels,
                                segment_clip)
from streamd.signal.vad_bank import VadBank

STEP = 320


def frames_of(name: str, audio: np.ndarray) -> list[Frame]:
    return [Frame(name, i, audio[i * STEP : (i + 1) * STEP], i * 0.02, float(i)) for i in range(len(audio) // STEP)]


def streams() -> dict[str, np.ndarray]:
    """Speech in noise of several levels, speech in digital silence, noise alone, a stream that
    starts late (its rows out of step with the others')."""
    rng = np.random.default_rng(7)
    demo = read_audio(str(DATA / "demo.flac"))
    out = {"clean": demo}
    for k, sigma in enumerate((3.0, 12.0, 40.0)):
        noise = rng.standard_normal(len(demo) + 48000) * sigma
        noise[24000 : 24000 + len(demo)] += demo
        out[f"noisy{k}"] = np.clip(noise, -32768, 32767).astype(np.int16)
    out["noise"] = (rng.standard_normal(16000 * 8) * 10).astype(np.int16)
    out["late"] = out["noisy1"][: 16000 * 12]
    return out


def outputs(events) -> list[tuple]:
    return [(type(e).__name__, getattr(e, "utterance", None), getattr(e, "t_start", None),
             getattr(e, "t_end", None), getattr(e, "reason", None),
             len(e.audio) if hasattr(e, "audio") else None) for e in events]


def test_streams_ticked_together_are_segmented_as_each_alone():
    audio = streams()
    frames = {name: frames_of(name, a) for name, a in audio.items()}
    frames["late"] = frames["late"][40:]  # joins after 0.8 s: its rows' rings are out of step with the others'
    alone = {}
    for name, fs in frames.items():
        seg = Segmenter(VadParams())
        alone[name] = outputs([e for f in fs for e in seg.push(f)] + seg.flush())
    bank = VadBank(VadParams())
    segs = {name: Segmenter(VadParams(), bank) for name in audio}
    got = {name: [] for name in audio}
    for i in range(max(f[-1].index for f in frames.values()) + 1):
        tick = [f for fs in frames.values() for f in fs[i - fs[0].index : i - fs[0].index + 1] if f.index == i]
        rows = np.array([segs[f.stream].row for f in tick])
        t = bank.tick(rows, np.stack([f.samples for f in tick]), np.array([f.t for f in tick]))
        for j, f in enumerate(tick):
            if not t.quiet[j]:
                got[f.stream] += segs[f.stream].push_ticked(f, float(t.level[j]), float(t.gain_db[j]))
    for name, seg in segs.items():
        got[name] += seg.flush()
    for name in audio:
        assert outputs(got[name]) == alone[name], name
    assert any(o[0] == "SpeechEnd" for o in alone["noisy1"])


def test_a_bank_row_holds_what_the_scalar_classes_hold():
    """Frame by frame: InputGain's gain, NoiseFloor's value and noisy, PauseNoise's gate (fed
    while it is not ready, as Segmenter._observe feeds it), bit for bit."""
    params = VadParams()
    audio = streams()["noisy0"][: 16000 * 6]
    audio[16000:24000] = 0  # digital silence in the middle
    bank = VadBank(params)
    rows = np.array([bank.add(), bank.add()])
    gain, floor, pauses = InputGain(params), NoiseFloor(params.frame_ms, params.min_snr_db), PauseNoise(params.frame_ms)
    quiet = np.zeros(STEP, np.int16)
    for f in frames_of("x", audio):
        dbfs, level = frame_levels(f.samples)
        tick = bank.tick(rows, np.stack((f.samples, quiet)), np.array([f.t, f.t]), machine=False)
        assert tick.gain_db[0] == gain.gain_db(f.samples, dbfs) and tick.level[0] == level
        floor.push(level)
        if not pauses.ready:
            pauses.push(level)
        assert (bank.floor_value[0], bank.floor_noisy[0], bank.pause_gate[0]) == (floor.value, floor.noisy, pauses.gate)
    assert floor.noisy and pauses.ready


def test_levels_of_a_frame_do_not_depend_on_its_neighbours():
    rng = np.random.default_rng(1)
    block = (rng.standard_normal((64, STEP)) * rng.uniform(1, 3000, (64, 1))).astype(np.int16)
    block[3] = 0
    dbfs, ac = levels(block)
    for i in range(len(block)):
        assert (dbfs[i], ac[i]) == frame_levels(block[i])


def test_quiet_frames_skip_webrtcvad_and_speech_does_not():
    """Noise under the gate is quiet once the noise floor is known; the speech in it is not."""
    audio = streams()["noisy1"]
    seg = Segmenter(VadParams())
    quiet = []
    for f in frames_of("x", audio):
        before = int(seg.bank.skipped[seg.row])
        seg.push(f)
        quiet.append(int(seg.bank.skipped[seg.row]) > before)
    assert sum(quiet[50:75]) == 25  # the noise before the speech (it starts at 1.5 s)
    assert sum(quiet) > 0.3 * len(quiet)
    ends = [e for e in segment_clip(audio, VadParams()) if e.usable]
    for e in ends:  # no frame inside an utterance was quiet
        assert not any(quiet[round(e.t_start / 0.02) : round(e.t_end / 0.02)])


def test_skipping_webrtcvad_changes_no_decision():
    """webrtcvad keeps state that a skipped frame leaves as it was; the skipped frames are
    replayed into it before it runs again (up to REPLAY_FRAMES), so that it decides as if it
    had heard them all: on the bundled recordings, in noise, and after 6 s of noise."""
    rng = np.random.default_rng(3)
    demo = read_audio(str(DATA / "demo.flac"))
    long_quiet = np.concatenate(((rng.standard_normal(16000 * 6) * 20).astype(np.int16), streams()["noisy1"]))
    clips = [read_audio(str(path)) for path in sorted(DATA.glob("*.flac"))[:4]]
    for audio in [*clips, demo, *streams().values(), long_quiet]:
        skipping = segment_clip(audio, VadParams())
        VadBank.SKIP_QUIET = False
        try:
            every = segment_clip(audio, VadParams())
        finally:
            VadBank.SKIP_QUIET = True
        assert skipping == every


@pytest.mark.parametrize("params", [VadParams(min_snr_db=0.0), VadParams(max_gain_db=0.0), VadParams(frame_ms=30)])
def test_other_settings_tick_together_as_alone(params):
    audio = streams()["noisy2"][: 16000 * 10]
    step = params.frame_samples
    frames = [Frame("x", i, audio[i * step : (i + 1) * step], i * params.frame_ms / 1000, 0.0)
              for i in range(len(audio) // step)]
    seg = Segmenter(params)
    alone = outputs([e for f in frames for e in seg.push(f)] + seg.flush())
    bank = VadBank(params)
    a, b = Segmenter(params, bank), Segmenter(params, bank)
    got = []
    for f in frames:
        t = bank.tick(np.array([a.row, b.row]), np.stack((f.samples, f.samples)), np.array([f.t, f.t]))
        if not t.quiet[0]:
            got += a.push_ticked(f, float(t.level[0]), float(t.gain_db[0]))
        if not t.quiet[1]:
            b.push_ticked(f, float(t.level[1]), float(t.gain_db[1]))
    assert outputs(got + a.flush()) == alone
    assert [e for e in got if isinstance(e, SpeechAudio)]


def test_a_segmenter_needs_its_banks_params():
    with pytest.raises(ValueError):
        Segmenter(VadParams(), VadBank(replace(VadParams(), hangover_ms=400)))


def engine_events(frames_by_tick: list[list[Frame]], together: bool) -> tuple[dict, dict]:
    """Each stream's events (times and decisions, not latencies) and frame counts from an Engine
    fed tick by tick, with push_many or one push per frame."""
    import io
    import json

    from conftest import MODELS
    from streamd.config import load
    from streamd.models.inference import load_models
    from streamd.service.engine import Engine
    from streamd.service.events import Publisher
    from streamd.service.metrics import Metrics

    cfg = load(None, [f'models.dir="{MODELS}"'])
    out = io.StringIO()
    publisher = Publisher("tcp://127.0.0.1:*", jsonl=out)
    engine = Engine(cfg, load_models(cfg, "cpu"), None, publisher, Metrics())
    try:
        for tick in frames_by_tick:
            for f in tick:
                engine.add_stream(f.stream)
            if together:
                engine.push_many(tick)
            else:
                for f in tick:
                    engine.push(f)
            engine.batcher.drain()  # the same batches both ways
        engine.flush()
        lines = out.getvalue().splitlines()
    finally:
        engine.close()
        publisher.close(0)
    events: dict[str, list] = {}
    for line in lines:
        e = json.loads(line)
        events.setdefault(e["stream"], []).append({k: v for k, v in e.items()
                                                  if k not in ("latency_s", "time", "seq", "t_now")})
    counts = {name: (p.audio.counts.frames, p.audio.counts.audio_samples, p.audio.counts.speech_samples)
              for name, p in engine.pipelines.items()}
    return events, counts


def test_the_engine_gives_the_same_events_for_frames_pushed_together_or_one_by_one():
    audio = {name: a[: 16000 * 10] for name, a in streams().items() if name != "late"}
    frames = {name: frames_of(name, a) for name, a in audio.items()}
    ticks = [[fs[i] for fs in frames.values() if i < len(fs)] for i in range(max(map(len, frames.values())))]
    ticks[10] = ticks[10] + ticks[11][:1]  # a stream's second frame in one call starts another tick
    ticks[11] = ticks[11][1:]
    alone, alone_counts = engine_events(ticks, together=False)
    together, together_counts = engine_events(ticks, together=True)
    assert together == alone and together_counts == alone_counts
    assert sum(e["type"] == "vad.end" for e in together["noisy1"]) >= 3
    assert sum(e["type"] == "digit" for e in together["noisy1"]) >= 3
