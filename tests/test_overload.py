"""Bounded latency under overload (models.max_latency_ms): when the models fall behind, optional
work is shed in streamd.models.batching.SHED_ORDER's order, every utterance still gets its
final decisions (marked degraded when decided with less), within the budget."""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest

from streamd.audio.frames import Frame
from streamd.audio.sources import read_audio
from streamd.config import Config, load
from streamd.identity.speakers import SpeakerBook, book_settings
from streamd.models.batching import SHED_ORDER, Batcher, Job, LoadShedder
from streamd.models.inference import load_models
from streamd.service.engine import Engine
from streamd.service.events import Publisher
from streamd.service.metrics import Metrics
from conftest import DATA, MODELS
from helpers import by_type, utterance_features

BUDGET_MS = 1000
TOLERANCE_S = 0.25  # the test's own loop: a frame is pushed up to a few ms after its capture time
STREAMS = 6
SPEED = 2.0  # audio seconds per wall second: each stream's audio comes twice as fast as real time


@pytest.fixture(scope="module")
def models():
    return load_models(Config(), "cpu")


class Slowed:
    """An onnxruntime session whose every call takes ``delay_s`` longer (a slower machine)."""

    def __init__(self, session, delay_s: float):
        self.session, self.delay_s = session, delay_s

    def run(self, *args, **kw):
        time.sleep(self.delay_s)
        return self.session.run(*args, **kw)

    def __getattr__(self, name):
        return getattr(self.session, name)


def feed(models, budget_ms: float = BUDGET_MS, streams: int = STREAMS, speed: float = SPEED):
    """``streams`` real-time streams of demo.flac (each starting a little later than the one
    before), fed through the daemon's Engine as a capture loop would: each frame captured at
    its time, the sources held back while the engine is backlogged (the daemon's loop).
    Returns the events, each final's latency (its publication after the capture of the frame
    that closed its utterance) and the metrics' shed counts."""
    cfg = load(None, [f'models.dir="{MODELS}"', f"models.max_latency_ms={budget_ms}", "models.workers=1",
                      "identity.partial_every_s=0.3"])  # the demo's digits are short: partials every 0.3 s
    out, metrics = io.StringIO(), Metrics()
    publisher = Publisher("tcp://127.0.0.1:*", jsonl=out)
    book = SpeakerBook(None, models.speaker, **book_settings(cfg.identity))
    engine = Engine(cfg, models, book, publisher, metrics)
    demo = read_audio(str(DATA / "demo.flac"))
    step, frame_s = cfg.vad.frame_samples, cfg.vad.frame_ms / 1000 / speed
    audio = {f"s{k}": np.concatenate([np.zeros(int(k * 0.37 * 16000), np.int16), demo]) for k in range(streams)}
    pipes = {name: engine.add_stream(name, realtime=True) for name in audio}
    ticks = max(len(a) for a in audio.values()) // step
    backlog = 0.0
    try:
        t0 = time.monotonic()
        for i in range(ticks):
            due = t0 + i * frame_s
            while (now := time.monotonic()) < due:
                engine.pump(wait_s=min(0.002, due - now))
            for name, samples in audio.items():
                if (i + 1) * step <= len(samples):
                    pipes[name].push(Frame(name, i, samples[i * step : (i + 1) * step], i * step / 16000, due))
            engine.pump()
            backlog = max(backlog, metrics.backlog._value.get())
            while engine.backlogged():  # the daemon takes no frames until the models catch up
                engine.pump(force=True, wait_s=0.01)
        engine.flush()
        events = [json.loads(line) for line in out.getvalue().splitlines()]
    finally:
        engine.close()
        publisher.close(0)
    shed = {what: metrics.registry.get_sample_value("streamd_shed_total", {"what": what}) for what in SHED_ORDER}
    return events, shed, backlog


def finals(events: list[dict], kind: str) -> dict[tuple[str, int], dict]:
    return {(e["stream"], e["utterance"]): e for e in by_type(events, kind)}


@pytest.mark.slow  # about 21 s on a 2-core machine
def test_overloaded_models_shed_work_and_keep_every_final_within_the_budget(models):
    """The digit fusion's costly member (ge2e) made slow: past the machine's capacity, partials
    and the cascade's costly members are shed; every utterance still gets its
    speaker and digit events, each within the budget, the digits left to the cheap stage
    marked degraded. Without a budget the same feed's latency grows past it."""
    ge2e = models.digits.members["ge2e"]
    fast = ge2e.session
    ge2e.session = Slowed(fast, 0.15)  # it runs for most digits: ~9 s a 8 s feed
    try:
        events, shed, backlog = feed(models)
        unbounded, unbounded_shed, _ = feed(models, budget_ms=0)
    finally:
        ge2e.session = fast
    ends = {(e["stream"], e["utterance"]) for e in by_type(events, "vad.end")}
    speakers, digits = finals(events, "speaker"), finals(events, "digit")
    assert len(ends) == STREAMS * 10 and set(speakers) == set(digits) == ends  # every utterance decided
    latencies = [e["latency_s"] for e in [*speakers.values(), *digits.values()]]
    late = [e["latency_s"] for e in [*by_type(unbounded, "speaker"), *by_type(unbounded, "digit")]]
    print(f"budget: max latency {max(latencies):.3f} s, shed {shed}, backlog max {backlog:.3f}; "
          f"without: max latency {max(late):.3f} s")
    assert max(late) > BUDGET_MS / 1000 + TOLERANCE_S  # the feed does overload these models
    assert not any(unbounded_shed.values())
    assert max(latencies) <= BUDGET_MS / 1000 + TOLERANCE_S
    assert shed["partial"] > 0 and shed["cascade"] > 0
    degraded = [e for e in digits.values() if e["degraded"]]
    assert len(degraded) == shed["cascade"]
    assert all(e["digit"] is None or 0 <= e["digit"] <= 9 for e in degraded)


def test_models_that_keep_up_shed_nothing(models):
    """The same feed at the models' own speed: nothing shed, no decision degraded, and partial
    decisions and early finals all computed."""
    events, shed, backlog = feed(models, streams=2)
    assert shed == dict.fromkeys(SHED_ORDER, 0.0)
    decided = [*by_type(events, "speaker"), *by_type(events, "digit")]
    assert decided and not any(e["degraded"] for e in decided)
    assert by_type(events, "speaker.partial")
    assert max(e["latency_s"] for e in decided) < BUDGET_MS / 1000 * 0.5
    assert backlog < BUDGET_MS / 1000 * 0.5


def test_the_shedder_steps_up_in_order_and_down_only_when_the_lower_level_would_keep_up():
    shedder = LoadShedder(budget_s=1.0)
    t = 100.0
    shedder.batch_done(0.2, 1, 0, t)  # a final costs 0.2 s at level 0
    shedder.update(0.1, 1, t)
    assert shedder.level == 0  # projected 0.3 s: within half the budget
    steps = []
    for k in range(8):  # 0.3 s old, 2 finals waiting: 0.7 s projected
        shedder.update(0.3, 2, t + 0.06 * k)
        steps.append(shedder.level)
    assert steps == [1, 1, 2, 2, 3, 3, 4, 4]  # one kind more every DWELL (0.1) of the budget
    assert [w for w in SHED_ORDER if shedder.sheds(w)] == list(SHED_ORDER)
    # Calm again, the models 20% busy (a 0.02 s batch every 0.1 s). A final costs at level 4 what
    # it cost at 3 (the speaker windows did not matter); at 3 a tenth of what it cost at 2.
    for level, cost in ((2, 0.2), (3, 0.02), (4, 0.02)):
        shedder.cost[level] = cost
    levels = []
    t0 = t + 1
    for k in range(400):  # 40 s
        shedder.batch_done(0.02, 1, shedder.level, t0 + k / 10)
        shedder.update(None, 0, t0 + k / 10)
        levels.append(shedder.level)
    assert levels[50] == 4  # calm for 5 s only
    assert levels[105] == 3  # calm for 10 s, and level 3 costs what 4 does
    assert set(levels[105:]) == {3}  # at 2 the models would be 200% busy: it stays
    for k in range(400, 1000):  # no more speech: the models idle, a kind less every 10 s
        shedder.update(None, 0, t0 + k / 10)
    assert shedder.level == 0
    assert LoadShedder(0.0).projected(None, 5) == 0.0


def test_shed_work_is_dropped_and_counted_but_a_final_never(models):
    s = utterance_features(models.speaker)[0]
    d = utterance_features(models.digits)[0]
    got, counted = [], []
    batcher = Batcher(models, wait_s=10.0, max_latency_s=1.0, on_shed=lambda what, n: counted.append((what, n)))
    batcher.submit(Job("a", s, None, lambda e, l: got.append("partial"), utterance=1))
    early = Job("a", s, d, lambda e, l: got.append("early"), utterance=1, early=True)
    used = Job("b", s, d, lambda e, l: got.append("used early"), utterance=1, early=True)
    batcher.submit(early)
    batcher.submit(used)
    used.early = False  # its utterance closed on it (PendingWork.use_early): the final decision now
    batcher.shedder.level = SHED_ORDER.index("early_final") + 1  # (no job has a latency budget here: the level stays)
    batcher.submit(Job("c", s, None, lambda e, l: got.append("late partial"), utterance=1))
    batcher.submit(Job("c", s, d, lambda e, l: got.append("final"), utterance=1))
    batcher.run()
    assert got == ["used early", "final"]
    assert early.dropped and not used.dropped
    # (the cascade, shed before early finals, may cut the finals' digits too: counted apart)
    assert sorted(c for c in counted if c[0] != "cascade") == [("early_final", 1), ("partial", 1), ("partial", 1)]
    assert {k: n for k, n in batcher.shed.items() if k != "cascade"} == {"partial": 2, "early_final": 1}


def test_the_cheap_stage_decides_what_it_settles_as_the_full_cascade_does(models):
    digits = models.digits
    feats = utterance_features(digits)
    full = digits.run_many(feats, 64)
    cheap, cut = digits.run_shed(feats, 64, cheap_only=True)
    assert any(cut)  # the demo's digits: most need more than the first stage's gate
    first = digits.cascade[0]
    for f, a, b, was_cut in zip(feats, full, cheap, cut):
        if was_cut:
            outputs = [digits.members[name].run(f[digits.members[name].params])
                       for name in [list(digits.members)[k] for k in first.first]]
            np.testing.assert_allclose(b, first.fusion(outputs), atol=1e-4)
        else:
            np.testing.assert_array_equal(a, b)


def test_speaker_windows_shed_keep_at_most_a_few_spread_over_the_utterance(models):
    from streamd.models.batching import SHED_WINDOWS
    from streamd.models.inference import run_batched

    speaker = models.speaker
    feats = utterance_features(speaker, "enroll_theo.flac")
    long = np.concatenate(feats)  # 12 s of speech
    many = speaker.row_count(len(long))
    assert many > SHED_WINDOWS and speaker.row_count(10) == 1
    rows = speaker.inputs(long)
    keep = np.linspace(0, many - 1, SHED_WINDOWS).round().astype(int)
    (got,) = run_batched(speaker, [long], 64, SHED_WINDOWS)
    np.testing.assert_allclose(got, speaker.combine(speaker.infer(rows[keep])), atol=1e-5)
    short = min(feats, key=len)
    np.testing.assert_array_equal(run_batched(speaker, [short], 64, SHED_WINDOWS)[0], run_batched(speaker, [short], 64)[0])

