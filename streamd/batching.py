"""Cross-stream batching: utterances of many streams that are ready together go through each
model in one session call.

Inputs of one shape batch together: the speaker encoder's fixed windows always do, and the
digit model's utterances are padded to a multiple of ``models.bucket_frames`` (see
``OnnxModel.inputs``), so a batch gives exactly what one call per utterance would.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from streamd.inference import Models, OnnxModel

Finish = Callable[[np.ndarray, "np.ndarray | None"], None]


@dataclass
class Job:
    """One utterance (or the part heard so far) waiting for the models."""

    stream: str
    speaker_feats: np.ndarray
    digit_feats: np.ndarray | None  # None: speaker only (a partial decision)
    finish: Finish  # called with the embedding and the digit logits (or None)
    ready_at: float = field(default_factory=time.monotonic)


def run_batched(model: OnnxModel, utterances: list[np.ndarray], max_batch: int) -> list[np.ndarray]:
    """The model's output for each utterance, with one session call per input shape and
    ``max_batch`` rows."""
    inputs = [model.inputs(f) for f in utterances]
    by_shape: dict[tuple, list[int]] = defaultdict(list)
    for i, rows in enumerate(inputs):
        by_shape[rows.shape[1:]].append(i)
    results: list[np.ndarray | None] = [None] * len(inputs)
    for members in by_shape.values():
        rows = np.concatenate([inputs[i] for i in members])
        out = np.concatenate([model.infer(rows[k : k + max_batch]) for k in range(0, len(rows), max_batch)])
        start = 0
        for i in members:
            n = len(inputs[i])
            results[i] = model.combine(out[start : start + n])
            start += n
    return results  # type: ignore[return-value]


class Batcher:
    """Collects jobs; ``run()`` runs them all, ``due()`` says when the oldest has waited
    ``wait_s`` (the bound on the delay batching adds)."""

    def __init__(self, models: Models, max_batch: int = 64, wait_s: float = 0.002,
                 observe: Callable[[list[Job], float], None] | None = None):
        self.models = models
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.observe = observe  # told each batch and how long the models took
        self.jobs: list[Job] = []

    def __len__(self) -> int:
        return len(self.jobs)

    def submit(self, job: Job) -> None:
        self.jobs.append(job)

    def due(self, now: float | None = None) -> bool:
        return bool(self.jobs) and (now or time.monotonic()) - self.jobs[0].ready_at >= self.wait_s

    def wait_left(self, now: float | None = None) -> float:
        """Seconds until the oldest job is due (0 when due, inf when nothing waits)."""
        if not self.jobs:
            return float("inf")
        return max(0.0, self.jobs[0].ready_at + self.wait_s - (now or time.monotonic()))

    def run(self) -> int:
        jobs, self.jobs = self.jobs, []
        if not jobs:
            return 0
        start = time.perf_counter()
        embeddings = run_batched(self.models.speaker, [j.speaker_feats for j in jobs], self.max_batch)
        with_digits = [i for i, j in enumerate(jobs) if j.digit_feats is not None]
        logits = run_batched(self.models.digits, [jobs[i].digit_feats for i in with_digits], self.max_batch)
        by_job = dict(zip(with_digits, logits))
        if self.observe is not None:
            self.observe(jobs, time.perf_counter() - start)
        for i, job in enumerate(jobs):
            job.finish(embeddings[i], by_job.get(i))
        return len(jobs)
