"""The shipped models on onnxruntime's CUDA provider, against the CPU provider, through the
daemon's own loading code (streamd.models.inference.load_models):

- which provider each model's session runs on, any fallback, and where onnxruntime placed
  each graph node (from its profiler: the int8 LSTM layers have no CUDA kernel);
- the outputs on the bundled recordings' VAD cuts (tests/data): largest difference, speaker
  embedding cosine, and whether each digit decision and fused log-probability agree;
- per-call latency percentiles of each model at several batch sizes, CPU (models.threads
  = 1) and CUDA, through OnnxModel.infer as the daemon calls it; for the digit models also
  calls at lengths other than the last call's, and cuDNN's three convolution searches.

    python scripts/gpu_check.py [--float-speaker CARD] [--json OUT.json]

--float-speaker: a speaker card whose model is timed beside the shipped one (the float twin
made by scripts/float_speaker.py). Prints a report; exits 1 if CUDA could not run the models.
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from streamd import config

from streamd.models import digits
from streamd.offline.evaluate import Clip, run_models
from streamd.models.cards import load_card
from streamd.models.inference import OnnxModel, load_models
from streamd.models.providers import CPU, CUDA, session_options

ROOT = Path(__file__).resolve().parent.parent
CLIPS = ["word.flac", "parity.flac", "demo.flac", "visitor12.flac", "visitor21.flac", "enroll_theo.flac",
         "enroll_asc02.flac", "enroll_asc07.flac"]
BATCHES = (1, 8, 64)
CALLS = 20


def gpu_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip() or out.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"nvidia-smi: {exc}"


def placement(model: OnnxModel, sample: np.ndarray) -> dict:
    """Graph nodes per provider, and the op types run on the CPU, from onnxruntime's profiler."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = session_options(1)
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "prof")
        sess = ort.InferenceSession(str(model.card.model_path), sess_options=opts,
                                    providers=model.session.get_providers())
        sess.run(None, {model.input_name: sample})
        events = json.loads(Path(sess.end_profiling()).read_text())
    seen: dict[str, tuple[str, str]] = {}
    for e in events:
        args = e.get("args", {})
        if e.get("cat") == "Node" and "provider" in args:
            seen[e["name"].removesuffix("_kernel_time").removesuffix("_fence_before").removesuffix("_fence_after")] = (
                args["provider"], args.get("op_name", "?"))
    per = collections.Counter(p for p, _ in seen.values())
    on_cpu = sorted({op for p, op in seen.values() if p == CPU})
    return {"nodes": dict(per), "cpu_ops": on_cpu}


def timings_at(model: OnnxModel, sample: np.ndarray, batch: int) -> dict:
    """Per-call milliseconds (p50, p99) of model.infer on a batch of rows shaped like sample's."""
    x = (sample + 0.1 * np.random.default_rng(0).standard_normal((batch, *sample.shape[1:]))).astype(np.float32)
    for _ in range(3):
        model.infer(x)  # the first calls plan the shape (and, on CUDA, pick kernels)
    ms = []
    for _ in range(CALLS):
        t = time.perf_counter()
        model.infer(x)
        ms.append((time.perf_counter() - t) * 1000)
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "per_row_ms": round(float(np.percentile(ms, 50)) / batch, 3)}


def timings(model: OnnxModel, sample: np.ndarray) -> dict:
    return {batch: timings_at(model, sample, batch) for batch in BATCHES}


def new_shapes(model: OnnxModel, sample: np.ndarray, count: int = 10) -> dict:
    """Milliseconds of calls at lengths the session has not seen, then at the same lengths again
    in another order: whether a length costs once (planned, then cached) or whenever it differs
    from the last call's (on the H200 the second: BENCHMARKS.md, "CUDA")."""
    def call_ms(extra: int) -> float:
        x = np.concatenate((sample, np.repeat(sample[:, -1:], extra, axis=1)), axis=1)
        t = time.perf_counter()
        model.infer(x)
        return (time.perf_counter() - t) * 1000

    extras = [8 * (i + 1) for i in range(count)]
    first = [call_ms(e) for e in extras]
    again = [call_ms(e) for e in reversed(extras)]
    return {"first_call_p50_ms": round(float(np.percentile(first, 50)), 3), "first_call_max_ms": round(max(first), 3),
            "again_p50_ms": round(float(np.percentile(again, 50)), 3)}


def conv_search(model: OnnxModel, sample: np.ndarray) -> dict:
    """cuDNN's convolution algorithm search, each setting on a session of its own: first calls
    at new lengths and the steady per-call time of a batch of 8."""
    import onnxruntime as ort

    out = {}
    for mode in ("EXHAUSTIVE", "HEURISTIC", "DEFAULT"):
        sess = ort.InferenceSession(str(model.card.model_path), sess_options=session_options(1),
                                    providers=[(CUDA, {"cudnn_conv_algo_search": mode}), CPU])
        saved, model.session = model.session, sess
        try:
            first = new_shapes(model, sample)
            out[mode] = {**first, "batch8": timings_at(model, sample, 8)}
        finally:
            model.session = saved
    return out


def model_inputs(models) -> dict[str, np.ndarray]:
    """A real input row for each model: the speaker's first 1.6 s window of the demo, the
    digit models' first second of it."""
    from streamd.signal.features import features_of_audio
    from streamd.audio.sources import read_audio

    audio = read_audio(str(ROOT / "tests" / "data" / "demo.flac"))
    out = {}
    for model in models.all():
        feats = features_of_audio(audio[: 16000 * 2], model.params)
        out[model.card.name] = model.inputs(feats if model.card.window else feats[:100])[:1]
    return out


def compare(cfg, cpu, gpu) -> dict:
    """Both providers on each bundled recording's VAD cut."""
    min_conf = cpu.digits.min_confidence(cfg.digits.min_confidence)
    rows = []
    for name in CLIPS:
        clip = Clip(ROOT / "tests" / "data" / name, "bundled", "?", None)
        emb_c, log_c, _ = run_models(clip, cfg, cpu)
        emb_g, log_g, _ = run_models(clip, cfg, gpu)
        cos = float(np.dot(emb_c, emb_g) / (np.linalg.norm(emb_c) * np.linalg.norm(emb_g)))
        d_c, d_g = digits.decide(log_c, min_conf), digits.decide(log_g, min_conf)
        rows.append({"clip": name, "embedding_cosine": round(cos, 6),
                     "embedding_max_abs_diff": float(np.abs(emb_c - emb_g).max()),
                     "digit_logprob_max_abs_diff": float(np.abs(log_c - log_g).max()),
                     "digit_cpu": d_c.digit, "digit_cuda": d_g.digit,
                     "confidence_cpu": round(float(d_c.confidence), 4), "confidence_cuda": round(float(d_g.confidence), 4)})
    return {"clips": rows,
            "min_embedding_cosine": min(r["embedding_cosine"] for r in rows),
            "max_digit_logprob_diff": max(r["digit_logprob_max_abs_diff"] for r in rows),
            "digit_decisions_equal": all(r["digit_cpu"] == r["digit_cuda"] for r in rows)}


def time_pair(cpu: OnnxModel, gpu: OnnxModel, sample: np.ndarray, provider: str) -> dict:
    """One model's timings on both providers (printed as they come: they take a while)."""
    out = {"input": list(sample.shape[1:]), "cpu": timings(cpu, sample), "cuda": timings(gpu, sample),
           "cuda_provider": gpu.provider}
    if gpu.card.window is None:
        out["new_lengths"] = {"cpu": new_shapes(cpu, sample), "cuda": new_shapes(gpu, sample)}
        if provider == "cuda":
            out["conv_search"] = conv_search(gpu, sample)
    print(json.dumps({gpu.card.name: out}), flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--float-speaker", type=Path, help="a speaker card to time beside the shipped one")
    ap.add_argument("--json", type=Path, help="write the report here too")
    ap.add_argument("--provider", default="cuda", choices=("cuda", "cpu"),
                    help="cpu: compare the CPU with itself, a dry run of this script where there is no GPU")
    args = ap.parse_args()
    import onnxruntime as ort

    cfg = config.load(ROOT / "config.toml")
    cfg = replace(cfg, digits=replace(cfg.digits, model="fused"))
    report = {"onnxruntime": ort.__version__, "available_providers": ort.get_available_providers(),
              "gpu": gpu_name()}
    fallbacks = []
    t = time.perf_counter()
    gpu = load_models(cfg, args.provider, on_fallback=lambda *a: fallbacks.append(a))
    report["cuda_load_s"] = round(time.perf_counter() - t, 2)
    cpu = load_models(cfg, "cpu")
    report["providers"] = {m.card.name: m.provider for m in gpu.all()}
    report["fallbacks"] = [list(map(str, f)) for f in fallbacks]
    print(json.dumps({k: report[k] for k in ("onnxruntime", "available_providers", "gpu", "cuda_load_s",
                                             "providers", "fallbacks")}, indent=1), flush=True)
    if args.provider == "cuda" and any(p != CUDA for p in report["providers"].values()):
        print("CUDA did not run every model: nothing more to check", file=sys.stderr)
        return 1
    samples = model_inputs(gpu)
    report["placement"] = {m.card.name: placement(m, samples[m.card.name]) for m in gpu.all()}
    print(json.dumps({"placement": report["placement"]}, indent=1), flush=True)
    report["parity"] = compare(cfg, cpu, gpu)
    print(json.dumps({k: v for k, v in report["parity"].items() if k != "clips"}, indent=1), flush=True)
    timed = [(g.card.name, c, g, samples[g.card.name]) for c, g in zip(cpu.all(), gpu.all())]
    if args.float_speaker:
        card = load_card(args.float_speaker, "speaker")
        params = cfg.feature_params(card.feature_kind)
        pair = [OnnxModel(card, params, p, cfg.models.threads, cfg.models.bucket_frames) for p in ("cpu", args.provider)]
        timed.append((card.name, pair[0], pair[1], samples[gpu.speaker.card.name]))
        report["placement"][card.name] = placement(pair[1], samples[gpu.speaker.card.name])
    report["timings"] = {name: time_pair(c, g, sample, args.provider) for name, c, g, sample in timed}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
