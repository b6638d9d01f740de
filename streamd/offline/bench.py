"""``streamd bench``: N concurrent streams through the whole pipeline in one process, measured.

Each stream replays speech recordings with their pauses (the bundled held-out clips, each
stream starting at another place), or near-silence with ``--silent``. Frames are delivered
as a microphone would (``--pace realtime``: every 20 ms, all streams) or as fast as the
pipeline takes them. ``--naive`` runs the straightforward per-utterance pipeline instead
(features computed offline from the utterance's audio, one model call per utterance, no
ring buffer, no batching) on the same audio, for comparison.

``--network`` sends the same audio over real ZeroMQ sockets instead (issue 31): N senders in
a process of their own (``bench_senders``: one ``streamd send`` sender per stream, each its
own socket and TCP connection) to the daemon's network receiver on a loopback TCP endpoint,
whose frames the daemon's loop takes from its queue. The frames then carry the sender's
capture time, so ``latency_s`` includes the network path; the ``network`` block adds frames
sent, dropped by the senders and received, and the receive latency (sender's send to receipt).

Latency percentiles come from the events themselves (``latency_s``); stage percentiles from
the same Prometheus histograms the daemon exports. Every run reports the machine it ran on
(``machine``: CPU, instruction sets, cores, onnxruntime and providers).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import queue
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from streamd.models import digits
from streamd.config import Config
from streamd.service.engine import Engine
from streamd.identity.enrollment import file_utterances
from streamd.service.events import DigitEvent, Publisher, SpeakerEvent, SpeakerPartial, VadEnd
from streamd.signal.features import features_of_audio
from streamd.audio.frames import SAMPLE_RATE, Frame
from streamd.identity.store import open_gallery
from streamd.identity.scoring import Utterance
from streamd.signal.vad import audio_level
from streamd.models.inference import load_models
from streamd.service.metrics import STAGES, Metrics
from streamd.identity.speakers import SpeakerBook, book_settings
from streamd.audio.sources import read_audio
from streamd.audio.netaudio import NetworkReceiver, StreamIdle
from streamd.offline import machine
from streamd.signal.vad import Segmenter, SpeechAudio, SpeechEnd, SpeechStart

DATA = Path(__file__).resolve().parents[2] / "tests" / "data"
LATE_S = 0.5  # a frame handled later than this after its capture would have overrun a capture buffer


class RecordingPublisher(Publisher):
    """Keeps each final decision's latency. Decisions published once the streams have ended
    go to ``end_latencies``: every stream's open utterance is closed at the same moment there,
    a burst no set of microphones makes, which would otherwise set the p99."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.latencies: list[float] = []
        self.end_latencies: list[float] = []
        self.ended = False

    def publish(self, event):
        body = super().publish(event)
        # The final decisions: a one-word digits event repeats its digit event's decision.
        if "latency_s" in body and body["type"] in ("speaker", "digit"):
            (self.end_latencies if self.ended else self.latencies).append(body["latency_s"])
        return body


def histogram_quantile(metrics: Metrics, stage: str, q: float) -> float:
    """Like PromQL's histogram_quantile over one stage's buckets, all streams together."""
    buckets: dict[float, float] = {}
    for m in metrics.stage.collect():
        for s in m.samples:
            if s.name.endswith("_bucket") and s.labels["stage"] == stage:
                le = float(s.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + s.value
    ordered = sorted(buckets.items())
    total = ordered[-1][1] if ordered else 0
    if total == 0:
        return 0.0
    rank, prev_le, prev_n = q * total, 0.0, 0.0
    for le, n in ordered:
        if n >= rank:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * (rank - prev_n) / max(n - prev_n, 1e-12)
        prev_le, prev_n = le, n
    return prev_le


def speech_audio(seconds: float, offset_s: float = 0.0) -> np.ndarray:
    """The bundled recordings (words and phrases with their pauses), looped, from ``offset_s``."""
    loop = np.concatenate([read_audio(str(DATA / f)) for f in ("demo.flac", "visitor12.flac", "visitor21.flac")])
    start = int(offset_s * SAMPLE_RATE) % len(loop)
    n = int(seconds * SAMPLE_RATE)
    reps = int(np.ceil((start + n) / len(loop)))
    return np.tile(loop, reps)[start : start + n]


def quiet_audio(seconds: float, seed: int) -> np.ndarray:
    """Room noise at about -70 dBFS: what a microphone hears when nobody speaks."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(int(seconds * SAMPLE_RATE)) * 10).astype(np.int16)


def stream_names(streams: int) -> list[str]:
    return [f"s{i:03d}" for i in range(streams)]


def stream_audio(seconds: float, i: int, silent: bool) -> np.ndarray:
    """Stream i's audio: the recordings from 7.3 s further into the loop than stream i-1's, or noise."""
    return quiet_audio(seconds, i) if silent else speech_audio(seconds, 7.3 * i)


class NaivePipeline:
    """The straightforward way, for comparison: keep the utterance's audio, and when it ends
    compute its features from scratch and run each model once on it."""

    def __init__(self, stream: str, cfg: Config, models, book: SpeakerBook, publisher: Publisher):
        self.stream, self.cfg, self.models, self.book, self.publisher = stream, cfg, models, book, publisher
        self.min_digit_confidence = models.digits.min_confidence(cfg.digits.min_confidence)
        self.segmenter = Segmenter(cfg.vad)
        self.audio: list[np.ndarray] = []
        self.start: SpeechStart | None = None
        self.next_partial = 0.0

    def push(self, frame: Frame) -> None:
        outputs = self.segmenter.push(frame)
        for out in outputs:
            if isinstance(out, SpeechStart):
                self.audio, self.start, self.next_partial = [out.audio], out, self.cfg.identity.partial_every_s
            elif isinstance(out, SpeechAudio):
                self.audio.append(out.audio)
                if len(outputs) == 1:
                    self._partial(frame)
            elif isinstance(out, SpeechEnd):
                self._end(out)

    def _partial(self, frame: Frame) -> None:
        every = self.cfg.identity.partial_every_s
        if every <= 0 or self.segmenter.last_voiced_end != frame.t_end:
            return
        if frame.t_end - self.start.t_start < self.next_partial:
            return
        self.next_partial += every
        sp = self.models.speaker
        feats = features_of_audio(np.concatenate(self.audio), sp.params)
        who = self.book.decide(sp.run(feats), self.book.seconds_of(feats))
        self.publisher.publish(SpeakerPartial(self.stream, self.start.utterance, self.start.t_start, frame.t_end,
                                              speaker=who.speaker, score=who.score,
                                              latency_s=time.monotonic() - frame.captured_at))

    def _end(self, end: SpeechEnd) -> None:
        self.publisher.publish(VadEnd(self.stream, end.utterance, end.t_start, end.t_end, reason=end.reason))
        if not end.usable:
            return
        a, b = end.model_span(self.segmenter.params)
        audio = np.concatenate(self.audio)[: int(round((b - a) * SAMPLE_RATE))]
        sp, dg = self.models.speaker, self.models.digits
        embedding = sp.run(features_of_audio(audio, sp.params))  # features computed twice, as such code does
        logits = dg.run(dg.features_of(audio))
        utt = Utterance(features_of_audio(audio, sp.params), end.t_end - end.t_start, *audio_level(audio))
        who, digit = self.book.identify(embedding, utt), digits.decide(logits, self.min_digit_confidence)
        base = (self.stream, end.utterance, end.t_start, end.t_end)
        self.publisher.publish(SpeakerEvent(*base, speaker=who.speaker, score=who.score,
                                            latency_s=time.monotonic() - end.closed_at))
        self.publisher.publish(DigitEvent(*base, digit=digit.digit, confidence=digit.confidence,
                                          latency_s=time.monotonic() - end.closed_at))

    def flush(self) -> None:
        for out in self.segmenter.flush():
            if isinstance(out, SpeechEnd):
                self._end(out)


def run(cfg: Config, seconds: float = 60.0, pace: str = "fast", streams: int = 1, silent: bool = False,
        naive: bool = False, network: bool = False) -> dict:
    metrics = Metrics()
    models = load_models(cfg, on_fallback=metrics.provider_fallback)
    with tempfile.TemporaryDirectory() as tmp:
        gallery = open_gallery(cfg.state.gallery, Path(tmp))  # state.gallery: the nodes' shared one
        book = SpeakerBook(gallery, models.speaker, **book_settings(cfg.identity))
        for name in ("theo", "asc02", "asc07"):
            if gallery.speaker_id(name) is None:  # another node of a --nodes run may have enrolled them
                book.enroll(name, file_utterances(str(DATA / f"enroll_{name}.flac"), cfg, models.speaker), "bench")
        publisher = RecordingPublisher("tcp://127.0.0.1:*", cfg.events.hwm)
        nats = _nats_out(cfg, publisher)
        engine = Engine(cfg, models, book, publisher, metrics)
        names = stream_names(streams)
        pipes = {n: NaivePipeline(n, cfg, models, book, publisher) for n in names} if naive else \
            {n: engine.add_stream(n, realtime=pace == "realtime") for n in names}
        if network:
            result = _feed_network(cfg, engine, pipes, seconds, pace, silent, publisher, metrics)
            audio_s = streams * int(seconds * SAMPLE_RATE) / SAMPLE_RATE
        else:
            audio = [stream_audio(seconds, i, silent) for i in range(streams)]
            result = _feed(cfg, engine, pipes, audio, pace, publisher)
            audio_s = sum(len(a) for a in audio) / SAMPLE_RATE
        if nats is not None:
            nats.close()
        publisher.close(0)
        book.close()
        gallery.close()
    lat = np.array(publisher.latencies)
    providers = {m.card.name: m.provider for m in models.all()}  # "auto" may place each apart
    return {
        "streams": streams, "pace": pace, "mode": "naive" if naive else "streamd", "silent": silent,
        "audio_s": round(audio_s, 3),
        "overruns": result["overruns"],
        "dropped_events": publisher.dropped,
        "events": publisher.seq,
        "latency_s_p50": float(np.percentile(lat, 50)) if len(lat) else None,
        "latency_s_p99": float(np.percentile(lat, 99)) if len(lat) else None,
        "end_of_streams": {"decisions": len(publisher.end_latencies),
                           "latency_s_max": max(publisher.end_latencies, default=None)},
        "stage_s_p99": {s: histogram_quantile(metrics, s, 0.99) for s in STAGES},
        "batch_mean": _mean_batch(metrics),
        "jobs_superseded": 0 if naive else engine.batcher.superseded,
        "early_finals": _early_finals(metrics),
        "shed": _shed(metrics),
        "cpu_per_audio_s": result["cpu"] / audio_s,
        "model_cpu_ms_per_audio_s": {} if naive else
            {m: round(1000 * s / audio_s, 3) for m, s in sorted(engine.batcher.model_cpu_s.items())},
        "cpu_cores": result["cpu"] / result["wall"],
        "realtime_factor": (audio_s / streams) / result["wall"],
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "provider": models.speaker.provider,
        "providers": providers,
        "network": result.get("network"),  # None: the streams were fed in-process
        "nats": None if nats is None else {"published": nats.published, "dropped": nats.dropped},
        "gallery": "shared" if cfg.state.gallery else "sqlite",
        "machine": machine.describe(providers_used=providers),
    }


def _nats_out(cfg: Config, publisher: Publisher):
    """events.nats: every event also to NATS, as the daemon does (its cost is then measured)."""
    if not cfg.events.nats:
        return None
    from streamd.service.nats_out import NatsOut, NatsSettings

    e = cfg.events
    out = NatsOut(NatsSettings.of(e.nats, e.nats_jetstream, e.nats_buffer, cfg.node.id or "bench"))
    publisher.forward = out.put
    out.start()
    return out


def run_nodes(argv: list[str], nodes: int) -> dict:
    """``--nodes K``: K benches at once, each a process of its own (a node) pinned to one core
    (round robin over the cores this process may use), each with the streams asked for, and
    with whatever shared gallery and NATS the configuration names. ``--nodes 1`` is one node
    on one core: the baseline that K nodes on K cores are compared with."""
    cores = sorted(os.sched_getaffinity(0))
    procs = []
    for i in range(nodes):
        core = cores[i % len(cores)]
        cmd = [sys.executable, "-m", "streamd", *argv, "--json", "--set", f'node.id="bench-{i}"']
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True,
                                      preexec_fn=lambda c=core: os.sched_setaffinity(0, {c})))
    results = []
    for i, proc in enumerate(procs):
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"bench node {i} failed with exit code {proc.returncode}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    p99 = [r["latency_s_p99"] for r in results if r["latency_s_p99"] is not None]
    return {
        "nodes": nodes, "cores": [cores[i % len(cores)] for i in range(nodes)],
        "streams_per_node": results[0]["streams"], "streams": sum(r["streams"] for r in results),
        "overruns": sum(r["overruns"] for r in results),
        "latency_s_p99_worst_node": max(p99, default=None),
        "cpu_cores_per_node": [round(r["cpu_cores"], 3) for r in results],
        "realtime_factor_worst_node": min(r["realtime_factor"] for r in results),
        "per_node": results,
    }


def _feed(cfg: Config, engine: Engine, pipes: dict, audio: list[np.ndarray], pace: str,
          publisher: RecordingPublisher) -> dict:
    """Deliver frame i of every stream at once, as N microphones would; between frames,
    hand due utterances to the models' thread and publish its results as they come."""
    step, frame_s = cfg.vad.frame_samples, cfg.vad.frame_ms / 1000
    names = list(pipes)
    ticks = min(len(a) for a in audio) // step
    overruns = 0
    results = threading.Event()
    engine.on_results(results.set)
    cpu0, wall0 = time.process_time(), time.monotonic()
    for i in range(ticks):
        due = wall0 + (i + 1) * frame_s
        if pace == "realtime":
            _serve_until(engine, results, due)
        captured = due if pace == "realtime" else time.monotonic()
        if pace == "realtime" and time.monotonic() - due > LATE_S:
            overruns += len(names)  # a capture buffer would have overflowed: these frames are lost
            continue
        frames = [Frame(name, i, samples[i * step : (i + 1) * step], i * frame_s, captured)
                  for name, samples in zip(names, audio)]
        _push(engine, pipes, frames)
        engine.pump(force=pace != "realtime")
        while pace != "realtime" and engine.backlogged():  # as the daemon holds a fast file back
            engine.pump(force=True, wait_s=0.05)
    _end_streams(engine, pipes, publisher)
    return {"overruns": overruns, "cpu": time.process_time() - cpu0, "wall": time.monotonic() - wall0}


def _push(engine: Engine, pipes: dict, frames: list[Frame]) -> None:
    """Frames that arrived together: to the engine at once, as the daemon's loop hands over
    the frames waiting on its queue (the naive pipelines take them one by one)."""
    if frames and isinstance(pipes[frames[0].stream], NaivePipeline):
        for frame in frames:
            pipes[frame.stream].push(frame)
    else:
        engine.push_many(frames)


def _end_streams(engine: Engine, pipes: dict, publisher) -> None:
    """What the audio itself closed is decided, then the streams end (their open utterances
    are cut and decided apart: end_of_streams)."""
    engine.batcher.drain()
    publisher.ended = True
    for pipe in pipes.values():
        pipe.flush()
    engine.batcher.drain()
    engine.close()


WAKE = "results ready"  # put on the frame queue by the models' thread, as the daemon's loop is woken
IDLE_S = 3600.0  # the receiver's idle close: never within a run (every sender sends to the end), so
# its streams end as the in-process ones do, by the flush after the last frame


class _BenchReceiver(NetworkReceiver):
    """The daemon's network receiver, its frames stamped with the sender's capture time (same
    host, same clock): ``latency_s`` then runs from the capture at the sender, through the
    network, to the decision. Also keeps each frame's receive latency."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.delays: list[float] = []
        self.out = _Stamped(self.out, self)
        self.captured = time.monotonic()

    def _frame(self, header: dict, samples: np.ndarray) -> None:
        sent = header.get("sent")
        delay = max(0.0, time.time() - sent) if isinstance(sent, (int, float)) else 0.0
        self.captured = time.monotonic() - delay
        super()._frame(header, samples)
        self.delays.append(delay)  # after the frame is queued: counted means on the queue


class _Stamped:
    def __init__(self, out: queue.Queue, receiver: _BenchReceiver):
        self._out, self._receiver = out, receiver

    def put(self, item) -> None:
        if isinstance(item, Frame):
            item = dataclasses.replace(item, captured_at=self._receiver.captured)
        self._out.put(item)


def _feed_network(cfg: Config, engine: Engine, pipes: dict, seconds: float, pace: str, silent: bool,
                  publisher: RecordingPublisher, metrics: Metrics) -> dict:
    """The daemon's network path: senders in another process, real sockets, the receiver's
    thread, the bounded frame queue and the daemon's loop over it (``Daemon._loop``)."""
    frames: queue.Queue = queue.Queue(maxsize=1024)
    receiver = _BenchReceiver("tcp://127.0.0.1:*", frames, cfg.vad.frame_samples, metrics,
                              cfg.network.gap_fill_ms / 1000, idle_s=IDLE_S,
                              close_s=(cfg.vad.hangover_ms + cfg.vad.frame_ms) / 1000)

    def wake() -> None:
        with contextlib.suppress(queue.Full):
            frames.put_nowait(WAKE)

    engine.on_results(wake)
    receiver.start()
    cmd = [sys.executable, "-m", "streamd.offline.bench_senders", receiver.endpoint, "--streams", str(len(pipes)),
           "--seconds", repr(seconds), "--pace", pace, "--frame-samples", str(cfg.vad.frame_samples)]
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd + (["--silent"] if silent else []), stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            if proc.stdout.readline().strip() != "ready":
                proc.wait(30)
                err.seek(0)
                raise RuntimeError(f"bench senders did not start: {err.read()[-2000:]}")
            cpu0, wall0 = time.process_time(), time.monotonic()
            late, report, quiet_since = 0, None, None
            while True:
                if engine.backlogged():
                    engine.pump(force=True, wait_s=0.05)
                    continue
                try:
                    item = frames.get(timeout=min(0.05, engine.wait_left()))
                except queue.Empty:
                    engine.pump()
                    if report is None and proc.poll() is not None:
                        report = json.loads(proc.stdout.read().strip().splitlines()[-1])
                        quiet_since = time.monotonic()
                    if report is not None and frames.empty():
                        expected = sum(report["sent"].values())
                        # Everything sent is here, or nothing more came for 3 s (lost on the way).
                        if len(receiver.delays) >= expected or time.monotonic() - quiet_since > 3:
                            break
                    continue
                batch: list[Frame] = []  # handed over together, as the daemon's loop does
                for _ in range(1024):  # everything that is waiting, then the models once
                    if isinstance(item, Frame):
                        late += time.monotonic() - item.captured_at > LATE_S
                        batch.append(item)
                    else:
                        _push(engine, pipes, batch)
                        batch = []
                    if isinstance(item, StreamIdle):
                        pipes[item.stream].flush()
                    try:
                        item = frames.get_nowait()
                    except queue.Empty:
                        break
                _push(engine, pipes, batch)
                if report is not None:
                    quiet_since = time.monotonic()
                engine.pump()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            receiver.stop()
            receiver.join(2)
    _end_streams(engine, pipes, publisher)
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    sent, dropped = sum(report["sent"].values()), sum(report["dropped"].values())
    received = len(receiver.delays)
    delays = np.array(receiver.delays) if receiver.delays else np.zeros(1)
    return {
        # A frame lost on the way (a sender's queue full, a gap) or handled more than LATE_S
        # after its capture: what an overrun is in-process.
        "overruns": late + (sent + dropped - received), "cpu": cpu, "wall": wall,
        "network": {
            "endpoint": receiver.endpoint, "senders": "one process, a socket per stream",
            "frames_sent": sent, "frames_dropped_by_senders": dropped, "frames_received": received,
            "frames_lost_in_transit": int(_total(metrics.network_lost)),
            "frames_handled_late": late,
            "receive_latency_s_p50": float(np.percentile(delays, 50)),
            "receive_latency_s_p99": float(np.percentile(delays, 99)),
            "receive_latency_s_max": float(delays.max()),
            "sender_late_ticks": report["late_ticks"], "sender_cpu_s": round(report["cpu_s"], 3),
        },
    }


def _total(counter) -> float:
    return sum(s.value for m in counter.collect() for s in m.samples if s.name.endswith("_total"))


def _serve_until(engine: Engine, results: threading.Event, until: float) -> None:
    """The daemon's loop between frames: publish results as they come back, hand over
    utterances when due."""
    while True:
        results.clear()  # before pump: a batch finishing after it sets it again
        engine.pump()
        left = until - time.monotonic()
        if left <= 0:
            return
        results.wait(min(left, engine.wait_left()))


def _mean_batch(metrics: Metrics) -> float | None:
    samples = {s.name: s.value for m in metrics.batch_size.collect() for s in m.samples}
    count = samples.get("streamd_batch_size_count", 0)
    return samples["streamd_batch_size_sum"] / count if count else None


def _shed(metrics: Metrics) -> dict[str, int]:
    """Work shed to keep decisions within models.max_latency_ms, by kind (streamd_shed_total)."""
    return {s.labels["what"]: int(s.value) for m in metrics.shed.collect() for s in m.samples
            if s.name == "streamd_shed_total"}


def _early_finals(metrics: Metrics) -> dict[str, int]:
    """Final decisions computed before their utterance closed: used, or wasted (speech went on)."""
    out = {"used": 0, "wasted": 0}
    for m in metrics.early_finals.collect():
        for s in m.samples:
            if s.name == "streamd_early_finals_total":
                out[s.labels["outcome"]] += int(s.value)
    return out
