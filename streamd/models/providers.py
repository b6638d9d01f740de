"""Where a model runs: the onnxruntime provider chosen for it (``models.provider``: auto, cpu,
cuda), the session options every session shares, and the report when a model runs on the CPU
although CUDA was asked for."""

from __future__ import annotations

import contextlib
import logging
from typing import Callable

from streamd.models.cards import ModelCard, ModelError

log = logging.getLogger(__name__)

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
# on_fallback(model, sha256, requested, stage, old_provider, new_provider): a model runs on CPU
# although models.provider asked for CUDA ("auto" or "cuda"); stage is "load" (CUDA could not
# start) or "run" (a CUDA session failed while running and was replaced by a CPU one).
FallbackListener = Callable[[str, str, str, str, str, str], None]

# cuDNN's default, an exhaustive timing of every convolution algorithm, runs again for each
# input shape it has not seen, and a stream of utterances of every length and batch size is
# nothing but new shapes: on an H200 it cost 60 ms a call and put the bench 10 s behind
# (BENCHMARKS.md, "CUDA"). Its heuristic choice cut that to 10 ms.
CUDA_OPTIONS = {"cudnn_conv_algo_search": "HEURISTIC"}


def session_options(threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    # Spinning worker threads steal the CPU from capture and VAD in the same process.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def gains_on_cuda(card: ModelCard) -> bool:
    """Whether ``models.provider = "auto"`` runs this model on CUDA: only a model of fixed
    windows whose rows batch together. On an H200 (BENCHMARKS.md, "CUDA") a call whose input
    length differs from the last one cost the digit models 5-10 ms of host time on CUDA
    (0.2-0.9 ms on a CPU core), and the int8 layers of a rows-alone model run on the CPU anyway."""
    return card.window is not None and not card.rows_alone


def wanted_providers(choice: str, card: ModelCard) -> list:
    import onnxruntime as ort

    # onnxruntime-gpu lists CUDA even without a GPU; only a session tells whether it works.
    available = ort.get_available_providers()
    if choice == "cpu" or CUDA not in available or (choice == "auto" and not gains_on_cuda(card)):
        return [CPU]
    return [(CUDA, CUDA_OPTIONS), CPU]


def open_session(card: ModelCard, threads: int, providers: list):
    """An onnxruntime session of the card's model file on ``providers`` (in order of
    preference); a file onnxruntime cannot load is a one-line ModelError."""
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(card.model_path), sess_options=session_options(threads),
                                    providers=providers)
    except Exception as exc:  # onnxruntime raises several unrelated types for a bad file
        raise ModelError(f"{card.model_path}: cannot load model: {str(exc).splitlines()[0]}") from None


def report_fallback(card: ModelCard, requested: str, stage: str, reason: str,
                    on_fallback: FallbackListener | None) -> None:
    """Log (and tell ``on_fallback``) that the card's model runs on the CPU although
    ``requested`` asked for CUDA; ``stage`` is "load" or "run"."""
    # "auto" on a machine without a GPU is expected: info. Anything else is worth a warning.
    level = logging.INFO if requested == "auto" and stage == "load" else logging.WARNING
    log.log(level, "%s: %s; using CPU", card.name, reason)
    if on_fallback is not None:
        with contextlib.suppress(Exception):  # metrics must never break inference
            on_fallback(card.name, card.sha256, requested, stage, CUDA, CPU)
