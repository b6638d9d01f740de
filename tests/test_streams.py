"""Several streams in one daemon: shared models, batched across streams, per-stream state."""

import json

import numpy as np
import pytest

from streamd.models.batching import Batcher, Job
from streamd.config import Config
from streamd.models.inference import load_models, run_batched
from streamd.audio.sources import read_audio
from streamd.signal.vad import segment_clip
from conftest import DATA, MODELS, streamd
from helpers import by_type, utterance_features


@pytest.fixture(scope="module")
def models():
    return load_models(Config(), "cpu")


@pytest.mark.parametrize("kind", ["speaker", "digits"])
def test_a_batch_gives_what_one_call_per_utterance_gives(models, kind):
    model = getattr(models, kind)
    feats = utterance_features(model) + utterance_features(model, "visitor12.flac")
    alone = np.stack([model.run(f) for f in feats])
    # several calls, shapes mixed; digits: every family batched, then fused
    together = np.stack(model.run_many(feats, 7) if kind == "digits" else run_batched(model, feats, max_batch=7))
    np.testing.assert_allclose(together, alone, atol=2e-5)


def test_batcher_waits_a_bounded_time_then_runs_every_job(models):
    feats = utterance_features(models.speaker)
    digit_feats = utterance_features(models.digits)
    got = []
    batcher = Batcher(models, max_batch=64, wait_s=0.05)
    for i, (s, d) in enumerate(zip(feats, digit_feats)):
        batcher.submit(Job(f"s{i % 3}", s, d if i % 2 else None, lambda e, l, i=i: got.append((i, e, l))))
    assert not batcher.due() and 0 < batcher.wait_left() <= 0.05
    assert batcher.run() == len(feats) and len(batcher) == 0
    assert [i for i, _, _ in got] == list(range(len(feats)))  # in submission order
    assert all((l is None) == (i % 2 == 0) for i, _, l in got)


def test_a_waiting_partial_is_dropped_for_a_newer_partial_of_its_utterance(models):
    s = utterance_features(models.speaker)[0]
    d = utterance_features(models.digits)[0]
    got = []
    batcher = Batcher(models, max_batch=64, wait_s=10.0)
    batcher.submit(Job("a", s, None, lambda e, l: got.append("a1 partial"), utterance=1))
    first_ready = batcher.jobs[0].ready_at
    batcher.submit(Job("b", s, None, lambda e, l: got.append("b1 partial"), utterance=1))
    batcher.submit(Job("a", s, None, lambda e, l: got.append("a1 partial 2"), utterance=1))
    batcher.submit(Job("a", s, None, lambda e, l: got.append("a1 partial 3"), utterance=1))
    batcher.submit(Job("a", s, d, lambda e, l: got.append("a1 final"), utterance=1))
    batcher.submit(Job("a", s, None, lambda e, l: got.append("a2 partial"), utterance=2))
    assert batcher.superseded == 2 and len(batcher) == 4
    assert batcher.jobs[0].ready_at == first_ready  # the batch does not wait longer for it
    batcher.run()
    assert got == ["a1 partial 3", "b1 partial", "a1 final", "a2 partial"]


def test_final_decisions_go_to_the_models_before_waiting_partials(models):
    from streamd.models.batching import PARTIALS_PER_BATCH

    s = utterance_features(models.speaker)[0]
    d = utterance_features(models.digits)[0]
    batcher = Batcher(models, max_batch=64, wait_s=0.0)
    for i in range(PARTIALS_PER_BATCH + 2):
        batcher.submit(Job(f"p{i}", s, None, lambda e, l: None, utterance=1))
    batcher.submit(Job("c", s, None, lambda e, l: None, utterance=7))
    batcher.submit(Job("c", s, d, lambda e, l: None, utterance=7))
    first = batcher._take()
    assert [(j.stream, j.partial) for j in first] == [("c", True), ("c", False)]  # its partial first
    second = batcher._take()
    assert [j.stream for j in second] == [f"p{i}" for i in range(PARTIALS_PER_BATCH)]
    assert [j.stream for j in batcher.jobs] == [f"p{i}" for i in range(PARTIALS_PER_BATCH, PARTIALS_PER_BATCH + 2)]


def test_models_on_their_own_thread_give_the_same_results_on_the_callers_thread(models):
    import threading

    feats = utterance_features(models.speaker)
    digit_feats = utterance_features(models.digits)
    want = [(models.speaker.run(s), models.digits.run(d)) for s, d in zip(feats, digit_feats)]
    got, threads, woken = [], set(), threading.Event()
    batcher = Batcher(models, max_batch=64, wait_s=0.0)
    batcher.wake = woken.set
    batcher.start()
    try:
        for i, (s, d) in enumerate(zip(feats, digit_feats)):
            batcher.submit(Job("s", s, d, lambda e, l, i=i: (got.append((i, e, l)), threads.add(threading.get_ident()))))
            batcher.pump()  # the first goes alone; the rest wait for the models to be free
        assert woken.wait(10)
        batcher.drain()
        assert len(batcher) == 0 and [i for i, _, _ in got] == list(range(len(feats)))
        assert threads == {threading.get_ident()}  # finish() runs on the caller's thread
        for (_, e, l), (we, wl) in zip(got, want):
            np.testing.assert_allclose(e, we, atol=2e-5)
            np.testing.assert_allclose(l, wl, atol=2e-5)
        bad = np.zeros((0, 3), np.float32)  # features of the wrong width: the models refuse them
        with pytest.raises(Exception) as direct:
            models.speaker.run(bad)
        batcher.submit(Job("s", bad, None, lambda e, l: got.append("bad")))
        batcher.pump(force=True)
        # The models' own error comes out here, on the caller's thread, not lost on theirs
        # (nor turned into another error on the way), and the job is not finished.
        with pytest.raises(type(direct.value), match="Got invalid dimensions for input"):
            batcher.drain()
        assert "bad" not in got
    finally:
        batcher.close()


def test_two_streams_in_one_daemon_and_a_failing_one_does_not_stop_them(tmp_path, iso):
    conf = tmp_path / "streams.toml"
    conf.write_text(
        f'[models]\ndir = "{MODELS}"\n'
        '[[streams]]\nid = "kitchen"\nsource = "file:%s"\npace = "fast"\n'
        '[[streams]]\nid = "hall"\nsource = "file:%s"\npace = "fast"\n'
        '[[streams]]\nid = "attic"\nsource = "file:%s"\n'
        % (DATA / "demo.flac", DATA / "visitor12.flac", tmp_path / "missing.flac"))
    out = tmp_path / "events.jsonl"
    r = streamd("run", "--config", str(conf), *iso.sets('metrics.listen=""'), "--events-jsonl", str(out))
    assert r.returncode == 0, r.stderr
    assert "attic" in r.stderr and "missing.flac" in r.stderr
    events = [json.loads(line) for line in out.read_text().splitlines()]
    per_stream = {s: [e for e in events if e["stream"] == s] for s in ("kitchen", "hall", "attic")}
    assert len(by_type(per_stream["kitchen"], "digit")) == 10
    assert len(by_type(per_stream["hall"], "speaker")) == 5
    assert [e["utterance"] for e in by_type(per_stream["hall"], "speaker")] == list(range(5))  # per-stream count
    (attic,) = per_stream["attic"]
    assert attic["type"] == "status" and attic["state"] == "ended" and "missing.flac" in attic["reason"]
    assert [e["seq"] for e in events] == list(range(len(events)))


def engine_run(models, audio: np.ndarray, *overrides: str):
    """Feed ``audio`` through the daemon's Engine (models on their threads) as one stream;
    returns each utterance's embedding, the digit events and the early-final counts."""
    import io

    from streamd.offline.bench import _early_finals
    from streamd.config import load
    from streamd.service.engine import Engine
    from streamd.service.events import Publisher
    from streamd.audio.frames import Frame
    from streamd.service.metrics import Metrics

    cfg = load(None, [f'models.dir="{MODELS}"', *overrides])
    out, metrics = io.StringIO(), Metrics()
    publisher = Publisher("tcp://127.0.0.1:*", jsonl=out)
    engine = Engine(cfg, models, None, publisher, metrics)
    try:
        pipe = engine.add_stream("room")
        step = cfg.vad.frame_samples
        for i in range(len(audio) // step):
            pipe.push(Frame("room", i, audio[i * step : (i + 1) * step], i * step / 16000, 0.0))
            engine.pump()
        engine.flush()
        events = [json.loads(line) for line in out.getvalue().splitlines()]
    finally:
        engine.close()
        publisher.close(0)
    return [r.embedding for r in pipe.recent], by_type(events, "digit"), _early_finals(metrics)


def test_early_finals_give_the_decisions_computed_at_the_close(models):
    """The final decision computed when the tail after speech is heard is the one the close
    would compute; when speech comes back inside the hangover it is wasted, not used."""
    cfg = Config()
    demo = read_audio(str(DATA / "demo.flac"))
    words = [demo[int(e.t_start * 16000) : int(e.t_end * 16000)] for e in segment_clip(demo, cfg.vad)][:4]
    # longer than vad.tail_ms plus webrtcvad's own overhang (up to 2 frames of the lifted input), shorter than the hangover
    pause = np.zeros(int(0.26 * 16000), np.int16)
    silence = np.zeros(16000, np.int16)
    audio = np.concatenate([words[0], pause, words[1], silence, words[2], silence, words[3], silence])

    # A pause only the hangover ends: a quiet pause (vad.quiet_end_ms) would close the first
    # utterance at the zeros, before speech comes back.
    hangover_only = "vad.quiet_end_ms=0"
    late_emb, late_digits, late_counts = engine_run(models, audio, "models.early_finals=false", hangover_only)
    emb, got_digits, counts = engine_run(models, audio, hangover_only)
    assert late_counts == {"used": 0, "wasted": 0}
    assert counts["used"] == len(emb) == 3 and counts["wasted"] >= 1  # the pause: speech went on
    assert len(late_emb) == 3
    for a, b in zip(emb, late_emb):
        np.testing.assert_array_equal(a, b)
    assert [(d["digit"], d["confidence"], d["t_end"]) for d in got_digits] == \
        [(d["digit"], d["confidence"], d["t_end"]) for d in late_digits]


def test_an_early_final_waiting_is_dropped_for_the_final_or_a_newer_one(models):
    s = utterance_features(models.speaker)[0]
    d = utterance_features(models.digits)[0]
    got = []
    batcher = Batcher(models, max_batch=64, wait_s=10.0)
    batcher.submit(Job("a", s, d, lambda e, l: got.append("early 1"), utterance=1, early=True))
    batcher.submit(Job("a", s, None, lambda e, l: got.append("partial"), utterance=1))
    batcher.submit(Job("a", s, d, lambda e, l: got.append("early 2"), utterance=1, early=True))
    batcher.submit(Job("b", s, d, lambda e, l: got.append("b early"), utterance=1, early=True))
    batcher.submit(Job("a", s, d, lambda e, l: got.append("final"), utterance=1))
    assert batcher.superseded == 2
    batcher.run()
    assert got == ["final", "partial", "b early"]


def test_two_model_workers_keep_each_streams_results_in_order(models):
    import threading
    import time

    feats = utterance_features(models.speaker)
    digit_feats = utterance_features(models.digits)
    got, threads, overlaps = [], set(), []
    running: list[set[str]] = []  # the streams of each batch the models are computing now
    lock = threading.Lock()
    batcher = Batcher(models, max_batch=64, wait_s=0.0, workers=2)
    compute = batcher._compute

    def spy(jobs):
        mine = {j.stream for j in jobs}
        with lock:
            threads.add(threading.get_ident())
            overlaps.extend(mine & other for other in running if mine & other)
            running.append(mine)
        try:
            # Stream a's batches are slow, so its next jobs arrive while one is in flight.
            time.sleep(0.03 if "a" in mine else 0.002)
            return compute(jobs)
        finally:
            with lock:
                running.remove(mine)

    batcher._compute = spy
    batcher.start()
    try:
        for i in range(24):
            stream = "abc"[i % 3]
            s, d = feats[i % len(feats)], digit_feats[i % len(feats)]
            batcher.submit(Job(stream, s, d if i % 2 else None, lambda e, l, i=i, st=stream: got.append((st, i)),
                               utterance=i))
            batcher.pump()
            time.sleep(0.004)
        batcher.drain()
    finally:
        batcher.close()
    assert overlaps == []  # never two batches of one stream in flight at once
    assert sorted(i for _, i in got) == list(range(24))
    for stream in "abc":
        mine = [i for st, i in got if st == stream]
        assert mine == sorted(mine)  # a stream's results in the order its jobs came
    assert len(threads) == 2


def test_the_engine_holds_the_sources_back_while_too_much_waits_for_the_models(models):
    """A file read faster than the models run must not pile utterances up without bound: the
    daemon takes no frames while the engine is backlogged (scripts/soak.py measures the RSS)."""
    from streamd.config import load
    from streamd.service.engine import MIN_BACKLOG, Engine
    from streamd.service.events import Publisher
    from streamd.service.metrics import Metrics

    cfg = load(None, [f'models.dir="{MODELS}"', "models.batch_wait_ms=100"])
    publisher = Publisher("tcp://127.0.0.1:*")
    engine = Engine(cfg, models, None, publisher, Metrics())
    try:
        engine.add_stream("room")
        s = utterance_features(models.speaker)[0]
        done = []
        for i in range(MIN_BACKLOG):
            assert not engine.backlogged()
            engine.batcher.submit(Job("room", s, None, lambda e, l, i=i: done.append(i), utterance=i))
        assert engine.backlogged()
        while engine.backlogged():
            engine.pump(force=True, wait_s=1.0)
        assert done and done == sorted(done)
    finally:
        engine.close()
        publisher.close(0)


def scrape(url: str) -> dict[str, float]:
    import urllib.request

    body = urllib.request.urlopen(url, timeout=5).read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in body.splitlines()
            if line and not line.startswith("#")}


def test_metrics_scraped_over_http_are_the_frames_and_utterances_fed(models):
    """/metrics reads each stream's counts when it is scraped: exactly the frames, audio and
    speech fed so far (none waits to be added in a batch), each stream its own; the series
    are those a prometheus_client Counter of the same name would export."""
    import io

    from prometheus_client import CollectorRegistry, Counter

    from streamd.audio.frames import Frame
    from streamd.config import load
    from streamd.service.engine import Engine
    from streamd.service.events import Publisher
    from streamd.service.metrics import Metrics
    from streamd.signal.vad import Segmenter, SpeechEnd
    from conftest import free_port

    cfg = load(None, [f'models.dir="{MODELS}"'])
    metrics, port = Metrics(), free_port()
    server = metrics.serve(f"127.0.0.1:{port}")
    publisher = Publisher("tcp://127.0.0.1:*", jsonl=io.StringIO())
    engine = Engine(cfg, models, None, publisher, metrics)
    demo, step = read_audio(str(DATA / "demo.flac")), cfg.vad.frame_samples
    # Unequal lengths (not whole frames either) and unequal speech: any count read from the
    # wrong stream or the wrong counter differs.
    feeds = {"front": demo[: 16000 * 7 + 123], "back": demo[16000 * 3 : 16000 * 8]}
    want = {}
    try:
        for name, audio in feeds.items():
            pipe, vad = engine.add_stream(name), Segmenter(cfg.vad)  # the same VAD, counted apart
            speech_frames = ends = 0
            for i in range(len(audio) // step):
                frame = Frame(name, i, audio[i * step : (i + 1) * step], i * step / 16000, 0.0)
                pipe.push(frame)
                engine.pump()
                ends += sum(isinstance(out, SpeechEnd) for out in vad.push(frame))
                speech_frames += vad.in_speech
            want[name] = {"frames": len(audio) // step, "speech": speech_frames, "utterances": ends}
        got = scrape(f"http://127.0.0.1:{port}/metrics")
    finally:
        engine.close()
        publisher.close(0)
        server.shutdown()

    frame_s = step / 16000
    for name, w in want.items():
        assert 0 < w["speech"] < w["frames"] and w["utterances"] > 0, w
        assert got[f'streamd_frames_total{{stream="{name}"}}'] == w["frames"]
        assert got[f'streamd_audio_seconds_total{{stream="{name}"}}'] == pytest.approx(w["frames"] * frame_s, abs=1e-9)
        assert got[f'streamd_speech_seconds_total{{stream="{name}"}}'] == pytest.approx(w["speech"] * frame_s, abs=1e-9)
        assert sum(v for k, v in got.items() if k.startswith("streamd_utterances_total{")
                   and f'stream="{name}"' in k) == w["utterances"]
    assert want["front"] != want["back"]

    # The same series (names, labels, _created) as the Counters they replace.
    reference = CollectorRegistry()
    for metric, help_text in (("streamd_frames_total", "Audio frames processed."),
                              ("streamd_audio_seconds_total", "Audio processed."),
                              ("streamd_speech_seconds_total", "Audio inside utterances.")):
        Counter(metric, help_text, ["stream"], registry=reference).labels(stream="front").inc()
    families = {f.name: f for f in metrics.registry.collect()}
    for family in reference.collect():
        ours = families[family.name]
        assert (ours.type, ours.documentation) == (family.type, family.documentation)
        assert {s.name for s in ours.samples} == {s.name for s in family.samples}
        assert {tuple(s.labels) for s in ours.samples} == {tuple(s.labels) for s in family.samples}
