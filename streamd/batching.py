"""Cross-stream batching: utterances of many streams that are ready together go through each
model in one session call.

Inputs of one shape batch together: the speaker encoder's fixed windows always do, and the
digit model's utterances are padded to a multiple of ``models.bucket_frames`` (see
``OnnxModel.inputs``), so a batch gives exactly what one call per utterance would.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from streamd.inference import Models, run_batched

PARTIALS_PER_BATCH = 4  # partial decisions handed to the models' thread at once when no final waits

Finish = Callable[[np.ndarray, "np.ndarray | None"], None]


@dataclass
class Job:
    """One utterance (or the part heard so far) waiting for the models."""

    stream: str
    speaker_feats: np.ndarray
    digit_feats: np.ndarray | None  # None: speaker only (a partial decision)
    finish: Finish  # called with the embedding and the digit logits (or None)
    ready_at: float = field(default_factory=time.monotonic)
    utterance: int | None = None  # with stream: which utterance (partials superseded, finals first)

    @property
    def partial(self) -> bool:
        return self.digit_feats is None


class Batcher:
    """Collects jobs and runs them through the models in batches.

    ``run()`` runs every waiting job at once on the calling thread. After ``start()`` the
    models run on a thread of their own instead (onnxruntime releases the GIL, so model work
    uses another core while the calling thread goes on with capture, VAD and features):
    ``pump()`` hands the waiting jobs over when the oldest has waited ``wait_s`` and the
    thread is free (jobs that arrive meanwhile make the next batch larger), and calls the
    ``finish`` of jobs whose results are back, always on the calling thread, in order.
    ``wake`` is called from the model thread when results are back."""

    def __init__(self, models: Models, max_batch: int = 64, wait_s: float = 0.002,
                 observe: Callable[[list[Job], float], None] | None = None):
        self.models = models
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.observe = observe  # told each batch and how long the models took
        self.jobs: list[Job] = []
        self.wake: Callable[[], None] = lambda: None
        self._thread: threading.Thread | None = None
        self._todo: queue.Queue = queue.Queue(maxsize=1)
        self._done: queue.Queue = queue.Queue()
        self._in_flight = 0
        self.superseded = 0  # partial decisions dropped for a newer partial of their utterance

    def __len__(self) -> int:
        return len(self.jobs)

    def submit(self, job: Job) -> None:
        """Queue a job. A partial decision still waiting for the models when a newer partial of
        the same utterance arrives is dropped: under load it would only delay the rest. (The
        final decision does not drop it: each long utterance keeps its partial.)"""
        key = (job.stream, job.utterance)
        stale = [i for i, j in enumerate(self.jobs) if j.partial and (j.stream, j.utterance) == key] \
            if job.partial and job.utterance is not None else []
        if not stale:
            self.jobs.append(job)
            return
        # The new job takes the first stale one's place and wait, so the batch is not held back.
        job.ready_at = min(job.ready_at, self.jobs[stale[0]].ready_at)
        self.jobs[stale[0]] = job
        for i in reversed(stale[1:]):
            del self.jobs[i]
        self.superseded += len(stale)

    def due(self, now: float | None = None) -> bool:
        return bool(self.jobs) and (now or time.monotonic()) - self.jobs[0].ready_at >= self.wait_s

    def wait_left(self, now: float | None = None) -> float:
        """Seconds until the oldest job can be handed over (0 when due; inf when nothing
        waits or the model thread is busy: ``wake`` says when it is free)."""
        if not self.jobs or self._in_flight:
            return float("inf")
        return max(0.0, self.jobs[0].ready_at + self.wait_s - (now or time.monotonic()))

    def run(self) -> int:
        """Run every waiting job now, on this thread."""
        jobs, self.jobs = self.jobs, []
        if jobs:
            self._finish(jobs, *self._compute(jobs))
        return len(jobs)

    def _compute(self, jobs: list[Job]) -> tuple[list[np.ndarray], dict[int, np.ndarray], float]:
        start = time.perf_counter()
        embeddings = run_batched(self.models.speaker, [j.speaker_feats for j in jobs], self.max_batch)
        with_digits = [i for i, j in enumerate(jobs) if j.digit_feats is not None]
        logits = self.models.digits.run_many([jobs[i].digit_feats for i in with_digits], self.max_batch)
        return embeddings, dict(zip(with_digits, logits)), time.perf_counter() - start

    def _finish(self, jobs: list[Job], embeddings: list[np.ndarray], logits: dict[int, np.ndarray],
                seconds: float) -> None:
        if self.observe is not None:
            self.observe(jobs, seconds)
        for i, job in enumerate(jobs):
            job.finish(embeddings[i], logits.get(i))

    def _take(self) -> list[Job]:
        """The next batch for the models' thread: every final decision waiting (with the
        partials of the same utterances, so a partial never comes after its final), else a
        few partials. A final then waits for at most a small batch of partials, and partials
        left waiting are superseded by newer ones rather than piling up."""
        finals = {(j.stream, j.utterance) for j in self.jobs if not j.partial}
        if finals:
            take = [j for j in self.jobs if (j.stream, j.utterance) in finals]
        else:
            take = self.jobs[:PARTIALS_PER_BATCH]
        taken = {id(j) for j in take}
        self.jobs = [j for j in self.jobs if id(j) not in taken]
        return take

    # ---- models on their own thread

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name="streamd-models", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while (jobs := self._todo.get()) is not None:
            try:
                self._done.put((jobs, self._compute(jobs)))
            except BaseException as exc:  # handed back: pump() raises it on the calling thread
                self._done.put((jobs, exc))
            self.wake()

    def pump(self, force: bool = False, wait_s: float = 0.0) -> int:
        """Finish the jobs whose results are back (waiting up to ``wait_s`` for a batch in
        flight), then hand over the waiting jobs when they are due (or ``force``) and the
        models are free. Returns the jobs finished."""
        if self._thread is None:
            return self.run() if self.jobs and (force or self.due()) else 0
        finished = 0
        with contextlib.suppress(queue.Empty):
            while True:
                jobs, result = self._done.get(timeout=wait_s) if self._in_flight and wait_s else self._done.get_nowait()
                self._in_flight -= 1
                if isinstance(result, BaseException):
                    raise result
                self._finish(jobs, *result)
                finished += len(jobs)
        if self.jobs and not self._in_flight and (force or self.due()):
            jobs = self._take()
            self._in_flight += 1
            self._todo.put(jobs)
        return finished

    def drain(self, timeout: float = 30.0) -> None:
        """Run and finish everything submitted so far (the end of a run)."""
        deadline = time.monotonic() + timeout
        self.pump(force=True)
        while (self.jobs or self._in_flight) and time.monotonic() < deadline:
            self.pump(force=True, wait_s=max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        if self._thread is not None:
            self._todo.put(None)
            self._thread.join(5)
            self._thread = None
