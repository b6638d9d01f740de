"""`streamd bench`: the whole pipeline, many streams in one process, real models and sockets.
Only what the run produced is checked here; its speed figures belong in BENCHMARKS.md."""

import json

import pytest

from conftest import streamd

KEYS = {"streams", "audio_s", "overruns", "dropped_events", "latency_s_p50", "latency_s_p99", "stage_s_p99",
        "cpu_per_audio_s", "rss_mb", "events", "jobs_superseded", "early_finals", "model_cpu_ms_per_audio_s", "provider", "providers", "end_of_streams"}


def bench(*args: str) -> dict:
    done = streamd("bench", "--seconds", "8", "--pace", "fast", "--json", *args,
                   capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def speech():
    return bench("--streams", "3")


def test_bench_runs_every_stream_through_the_models(speech):
    assert KEYS <= set(speech)
    assert speech["streams"] == 3 and speech["audio_s"] == pytest.approx(24.0)
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
    cost = speech["model_cpu_ms_per_audio_s"]
    assert set(cost) == {"speaker", "digits"} and all(v > 0 for v in cost.values())
    assert sum(cost.values()) / 1000 < speech["cpu_per_audio_s"]  # a part of the whole


def test_silent_streams_do_almost_no_model_work(speech):
    silent = bench("--streams", "3", "--silent")
    assert silent["silent"] and silent["overruns"] == 0
    assert silent["events"] < speech["events"] / 4


def test_the_naive_pipeline_runs_the_same_audio():
    naive = bench("--streams", "2", "--naive")
    assert naive["mode"] == "naive" and naive["events"] >= 2 * 3 * 4
    assert 0 < naive["latency_s_p50"] <= naive["latency_s_p99"]


def test_bench_names_the_provider_of_every_model(speech):
    from conftest import MODELS

    members = json.loads((MODELS / "digits.fusion.json").read_text())["members"]
    assert len(speech["providers"]) == 1 + len(members)
    assert set(speech["providers"].values()) <= {"CPUExecutionProvider", "CUDAExecutionProvider"}
    assert speech["providers"]["speaker-ge2e"] == speech["provider"]
