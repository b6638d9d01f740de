"""`streamd bench`: the whole pipeline, many streams in one process, real models and sockets.
Only what the run produced is checked here; its speed figures belong in BENCHMARKS.md."""

import json
import os
from pathlib import Path

import pytest

from conftest import MODELS, streamd
from natsd import nats_server  # noqa: F401 - the fixture

KEYS = {"streams", "audio_s", "overruns", "dropped_events", "latency_s_p50", "latency_s_p99", "stage_s_p99",
        "cpu_per_audio_s", "rss_mb", "events", "jobs_superseded", "early_finals", "model_cpu_ms_per_audio_s", "provider", "providers", "end_of_streams",
        "network", "machine", "shed"}


def bench(*args: str) -> dict:
    done = streamd("bench", "--seconds", "8", "--pace", "fast", "--json", *args,
                   capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def speech():
    return bench("--streams", "3", "--set", 'models.provider="cpu"')


def test_bench_runs_every_stream_through_the_models(speech):
    assert KEYS <= set(speech)
    assert speech["audio_s"] == pytest.approx(24.0)  # 3 streams of 8 s each were fed
    assert speech["overruns"] == 0 and speech["dropped_events"] == 0
    # 8 s of the bundled words and phrases hold several utterances per stream, each giving
    # vad.start, vad.end, speaker and digit events.
    assert speech["events"] >= 3 * 3 * 4
    assert 0 < speech["latency_s_p50"] <= speech["latency_s_p99"]
    # The end of the streams cuts utterances (the bundled audio is deterministic): their
    # decisions, a speaker and a digit each, are counted apart from the rest.
    ended = speech["end_of_streams"]["decisions"]
    assert ended > 0 and ended % 2 == 0 and speech["end_of_streams"]["latency_s_max"] > 0
    assert speech["events"] - 2 * speech["end_of_streams"]["decisions"] >= 3 * 3 * 4
    assert speech["stage_s_p99"]["inference"] > 0 and speech["cpu_per_audio_s"] > 0
    # Utterances that closed on their own had their final decision computed in the hangover.
    assert speech["early_finals"]["used"] > 0
    # Read as fast as the models go (pace fast), the streams have no latency budget: nothing shed.
    from streamd.models.batching import SHED_ORDER

    assert speech["shed"] == dict.fromkeys(SHED_ORDER, 0)
    cost = speech["model_cpu_ms_per_audio_s"]
    assert set(cost) == {"speaker", "digits"} and all(v > 0 for v in cost.values())
    assert sum(cost.values()) / 1000 < speech["cpu_per_audio_s"]  # a part of the whole


def test_silent_streams_do_almost_no_model_work(speech):
    silent = bench("--streams", "3", "--silent")
    assert silent["overruns"] == 0 and silent["audio_s"] == pytest.approx(24.0)
    assert silent["events"] < speech["events"] / 4
    assert sum(silent["model_cpu_ms_per_audio_s"].values()) < sum(speech["model_cpu_ms_per_audio_s"].values()) / 4


def test_bench_names_the_provider_of_every_model(speech):
    """Every model loaded (the speaker model and each member of the digit fusion, by the names
    on their cards) is listed with the provider it runs on: the CPU, as the run asked."""
    speaker = json.loads((MODELS / "speaker.card.json").read_text())["name"]
    members = json.loads((MODELS / "digits.fusion.json").read_text())["members"]
    names = {speaker} | {json.loads((MODELS / m["card"]).read_text())["name"] for m in members}
    assert len(names) == 1 + len(members)
    assert speech["providers"] == dict.fromkeys(names, "CPUExecutionProvider")
    assert speech["provider"] == "CPUExecutionProvider"


def test_bench_names_the_machine_it_ran_on(speech):
    """The CPU and the instruction sets /proc/cpuinfo lists (read here on its own), the cores
    this process may use, onnxruntime and the providers the models ran on."""
    m = speech["machine"]
    cpuinfo = Path("/proc/cpuinfo").read_text()
    flags = next(line for line in cpuinfo.splitlines() if line.startswith("flags")).split(":")[1].split()
    name = next(line for line in cpuinfo.splitlines() if line.startswith("model name")).split(":", 1)[1].strip()
    assert m["cpu"] == name
    assert m["isa"] == [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile") if f in flags]
    assert "avx2" in m["isa"]  # every x86 machine this project runs on
    assert m["cores"] == len(os.sched_getaffinity(0))
    import onnxruntime

    assert m["onnxruntime"] == onnxruntime.__version__ and "CPUExecutionProvider" in m["providers_available"]
    assert m["providers_used"] == speech["providers"]
    assert speech["network"] is None


def test_network_bench_sends_every_frame_over_zeromq():
    """--network: three senders in another process, real sockets, the daemon's receiver; every
    frame sent arrives (300 frames of 20 ms per stream), none is dropped, late or lost."""
    run = bench("--streams", "3", "--network", "--set", 'models.provider="cpu"')
    net = run["network"]
    assert net["endpoint"].startswith("tcp://127.0.0.1:")
    assert net["frames_sent"] == net["frames_received"] == 3 * 400
    assert net["frames_dropped_by_senders"] == net["frames_lost_in_transit"] == net["frames_handled_late"] == 0
    assert run["overruns"] == 0 and run["audio_s"] == pytest.approx(24.0)
    assert 0 < net["receive_latency_s_p50"] <= net["receive_latency_s_p99"] <= net["receive_latency_s_max"]
    assert net["sender_cpu_s"] > 0
    assert run["events"] >= 3 * 3 * 4 and run["machine"]["cores"] >= 1


def decisions_of(naive: bool, network: bool = False) -> dict:
    """The speaker and digit decisions of one in-process bench run, by (stream, utterance, type)."""
    from streamd.offline import bench as bench_mod
    from streamd.config import load

    published: list[dict] = []

    class Keeping(bench_mod.RecordingPublisher):
        def publish(self, event):
            body = super().publish(event)
            published.append(body)
            return body

    mp = pytest.MonkeyPatch()
    mp.setattr(bench_mod, "RecordingPublisher", Keeping)
    try:
        bench_mod.run(load(None), seconds=8, pace="fast", streams=2, naive=naive, network=network)
    finally:
        mp.undo()
    return {(e["stream"], e["utterance"], e["type"]): e for e in published if e["type"] in ("speaker", "digit")}


def test_the_naive_pipeline_decides_as_streamd_does_on_the_same_audio():
    """The naive pipeline (features from the utterance's audio, one model call each) and
    streamd's (streamed features, batches, early finals) hear the same utterances and decide
    the same speaker and digit for each, with the same scores."""
    streamed, naive = decisions_of(False), decisions_of(True)
    assert set(naive) == set(streamed)
    assert len(streamed) >= 2 * 3 * 2  # several utterances per stream, a speaker and a digit each
    # Not a run of nothing but "unknown" and no digit: both have something to agree on.
    assert len({e["speaker"] for e in streamed.values() if e["type"] == "speaker"} - {"unknown"}) >= 2
    assert len({e["digit"] for e in streamed.values() if e["type"] == "digit"} - {None}) >= 2
    for key, ours in streamed.items():
        theirs = naive[key]
        assert (theirs["t_start"], theirs["t_end"]) == (ours["t_start"], ours["t_end"]), key
        if key[2] == "speaker":
            assert theirs["speaker"] == ours["speaker"], (key, theirs, ours)
            assert theirs["score"] == pytest.approx(ours["score"], abs=1e-3), key
        else:
            assert theirs["digit"] == ours["digit"], (key, theirs, ours)
            assert theirs["confidence"] == pytest.approx(ours["confidence"], abs=1e-3), key


def test_over_the_network_the_same_utterances_are_decided_the_same():
    """The same audio sent over ZeroMQ (sender process, socket, receiver thread, frame queue)
    gives the in-process run's utterances, at the same times, with the same decisions: no frame
    lost, repeated or reordered on the way."""
    local, remote = decisions_of(False), decisions_of(False, network=True)
    assert len(remote) == len(local) >= 2 * 3 * 2
    assert set(remote) == set(local)
    for key, ours in local.items():
        theirs = remote[key]
        assert theirs["t_start"] == pytest.approx(ours["t_start"], abs=1e-6), key
        assert theirs["t_end"] == pytest.approx(ours["t_end"], abs=1e-6), key
        assert (theirs.get("speaker"), theirs.get("digit")) == (ours.get("speaker"), ours.get("digit")), key


@pytest.mark.server  # starts PostgreSQL and nats-server
def test_nodes_share_one_gallery_and_one_nats(pg_url, nats_server):
    """--nodes 2: two benches at once, each a process pinned to a core of its own, both on the
    shared PostgreSQL gallery and publishing every event to NATS (JetStream), none dropped."""
    run = bench("--streams", "2", "--nodes", "2", "--set", 'models.provider="cpu"',
                "--set", f'state.gallery="{pg_url}"', "--set", f'events.nats="{nats_server.url}"',
                "--set", 'events.nats_jetstream="streamd"')
    assert run["nodes"] == 2 and run["streams"] == 4 and len(run["per_node"]) == 2
    if len(os.sched_getaffinity(0)) >= 2:
        assert len(set(run["cores"])) == 2
    for node in run["per_node"]:
        assert node["machine"]["cores"] == 1 and node["gallery"] == "shared" and node["overruns"] == 0
        assert node["nats"] == {"published": node["events"], "dropped": 0}
    stream = nats_server.monitor("jsz?streams=true")
    assert stream["messages"] == sum(n["events"] for n in run["per_node"])


def test_repeat_runs_the_bench_again_and_gives_each_figures_spread():
    """--repeat 2: two whole runs, each as a single run reports it, and each figure's min,
    median and max over them; the figures every run shares by construction are left out."""
    out = bench("--streams", "1", "--repeat", "2", "--silent", "--seconds", "2")
    assert out["repeat"] == 2 and len(out["runs"]) == 2
    assert all(KEYS <= set(run) and run["audio_s"] == pytest.approx(2.0) for run in out["runs"])
    cores = [run["cpu_cores"] for run in out["runs"]]
    assert out["spread"]["cpu_cores"] == {"min": min(cores), "median": pytest.approx(sum(cores) / 2),
                                          "max": max(cores)}
    assert "audio_s" not in out["spread"] and "machine" not in out["spread"]
    assert out["machine"] == out["runs"][0]["machine"]


def test_spread_flattens_nested_figures_and_keeps_only_those_of_every_run():
    from streamd.offline.bench_runs import spread

    runs = [{"overruns": 0, "latency_s_p99": 0.2, "shed": {"partial": 4}, "machine": {"cores": 2}, "x": None},
            {"overruns": 30, "latency_s_p99": 0.1, "shed": {"partial": 2}, "machine": {"cores": 2}},
            {"overruns": 10, "latency_s_p99": 0.6, "shed": {"partial": 0}, "machine": {"cores": 2}, "only": 1.0}]
    got = spread(runs)
    assert set(got) == {"overruns", "latency_s_p99", "shed.partial"}
    assert got["overruns"] == {"min": 0.0, "median": 10.0, "max": 30.0}
    assert got["latency_s_p99"] == {"min": 0.1, "median": 0.2, "max": 0.6}
    assert got["shed.partial"]["median"] == 2.0
