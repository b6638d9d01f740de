"""The models on onnxruntime's CUDA provider, where a GPU is present: every model runs on CUDA,
and its outputs and decisions on real recordings are the CPU provider's.

Skipped where CUDA cannot run (onnxruntime-gpu lists the provider on any machine; only a
session tells whether it starts). STREAMD_REQUIRE_CUDA=1 turns the skip into a failure, for a
GPU machine where skipping would hide a broken CUDA path."""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import pytest

from conftest import DATA, MODELS, ROOT
from streamd import config
from streamd.models import digits
from streamd.offline.evaluate import Clip, run_models
from streamd.models.inference import load_models
from streamd.models.providers import CUDA

CLIPS = ["word.flac", "parity.flac", "demo.flac", "visitor12.flac", "visitor21.flac", "enroll_theo.flac"]


@pytest.fixture(scope="module")
def both():
    cfg = config.load(ROOT / "config.toml")
    cfg = replace(cfg, digits=replace(cfg.digits, model="fused"))
    fallbacks = []
    gpu = load_models(cfg, "cuda", on_fallback=lambda *a: fallbacks.append(a))
    if gpu.speaker.provider != CUDA:  # the first model loaded: CUDA cannot start here at all
        reason = f"CUDA cannot run here: the models run on {gpu.speaker.provider}"
        if os.environ.get("STREAMD_REQUIRE_CUDA") == "1":
            pytest.fail(reason + " (STREAMD_REQUIRE_CUDA=1)")
        pytest.skip(reason)
    return cfg, load_models(cfg, "cpu"), gpu, fallbacks


def test_every_model_runs_on_cuda(both):
    _, cpu, gpu, fallbacks = both
    assert {m.provider for m in gpu.all()} == {CUDA} and not fallbacks
    assert len(gpu.all()) == len(cpu.all()) == 1 + len(gpu.digits.members)


def test_cuda_outputs_and_decisions_are_the_cpus(both):
    cfg, cpu, gpu, _ = both
    min_conf = cpu.digits.min_confidence(cfg.digits.min_confidence)
    for name in CLIPS:
        clip = Clip(DATA / name, "bundled", "?", None)
        (emb_c, log_c, _), (emb_g, log_g, _) = (run_models(clip, cfg, m) for m in (cpu, gpu))
        cosine = float(np.dot(emb_c, emb_g) / (np.linalg.norm(emb_c) * np.linalg.norm(emb_g)))
        assert cosine > 0.999, (name, cosine)
        np.testing.assert_allclose(log_g, log_c, atol=0.02, err_msg=name)
        assert digits.decide(log_g, min_conf).digit == digits.decide(log_c, min_conf).digit, name


def test_a_cuda_batch_is_its_rows(both):
    """Utterances of several streams share one CUDA call: each row's result is its own (to
    float rounding: cuDNN may pick other algorithms for other batch sizes; 1.3e-3 seen on an H200)."""
    _, _, gpu, _ = both
    for model in gpu.digits.members.values():
        x = np.random.default_rng(1).standard_normal((6, 104, model.params.numcep)).astype(np.float32)
        alone = np.concatenate([model.infer(x[i : i + 1]) for i in range(len(x))])
        batched = model.infer(x)
        np.testing.assert_allclose(batched, alone, atol=1e-2)
        assert (batched.argmax(1) == alone.argmax(1)).all()


def test_auto_puts_only_fixed_window_batching_models_on_cuda():
    """models.provider = "auto": CUDA only for a model of fixed windows whose rows batch (a
    float speaker model); the digit models (any length) and the int8 speaker (rows alone)
    stay on the CPU, where the daemon's calls are faster (BENCHMARKS.md, "CUDA")."""
    import onnxruntime as ort

    from streamd.models.cards import ModelCard, load_card
    from streamd.models.providers import CPU, wanted_providers

    shipped = [load_card(MODELS / "speaker.card.json", "speaker"), load_card(MODELS / "digits.card.json", "digits")]
    float_speaker = ModelCard(shipped[0].path, {**shipped[0].data, "input": {**shipped[0].data["input"],
                                                                             "batch_invariant": True}})
    for card in shipped:
        assert wanted_providers("auto", card) == [CPU]
        assert wanted_providers("cpu", card) == [CPU]
    def names(providers: list) -> list[str]:
        return [p if isinstance(p, str) else p[0] for p in providers]

    gpu_listed = [CUDA, CPU] if CUDA in ort.get_available_providers() else [CPU]
    assert names(wanted_providers("auto", float_speaker)) == gpu_listed
    assert names(wanted_providers("cuda", shipped[1])) == gpu_listed  # "cuda" forces even the digit models
