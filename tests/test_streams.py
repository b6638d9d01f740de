"""Several streams in one daemon: shared models, batched across streams, per-stream state."""

import json

import numpy as np
import pytest

from streamd.batching import Batcher, Job
from streamd.config import Config
from streamd.enroll import file_utterances
from streamd.features import mfcc, normalize
from streamd.inference import load_models, run_batched
from streamd.sources import read_audio
from streamd.vad import segment_clip
from conftest import DATA, MODELS, streamd
from test_daemon import by_type


@pytest.fixture(scope="module")
def models():
    return load_models(Config(), "cpu")


def utterance_features(model, clip="demo.flac"):
    audio = read_audio(str(DATA / clip))
    cfg = Config()
    out = []
    for end in segment_clip(audio, cfg.vad):
        a, b = (int(round(t * 16000)) for t in end.model_span(cfg.vad))
        out.append(normalize(mfcc(audio[a:b], model.params), model.params))
    return out


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
    from streamd.batching import PARTIALS_PER_BATCH

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
        batcher.submit(Job("s", np.zeros((0, 3), np.float32), None, lambda e, l: None))  # models refuse it
        batcher.pump(force=True)
        with pytest.raises(Exception):
            batcher.drain()  # the models' error comes out here, not lost on their thread
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
