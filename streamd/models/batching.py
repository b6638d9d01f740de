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
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from streamd.models.inference import FeaturesByFrontEnd, Models, run_batched

PARTIALS_PER_BATCH = 4  # partial decisions handed to the models' thread at once when no final waits

Finish = Callable[[np.ndarray, "np.ndarray | None"], None]


@dataclass
class Job:
    """One utterance (or the part heard so far) waiting for the models."""

    stream: str
    speaker_feats: np.ndarray
    digit_feats: FeaturesByFrontEnd | None  # per digit front end; None: speaker only (a partial decision)
    finish: Finish  # called with the embedding and the digit logits (or None)
    ready_at: float = field(default_factory=time.monotonic)
    utterance: int | None = None  # with stream: which utterance (partials superseded, finals first)
    early: bool = False  # a final decision computed before the utterance closed (it may never be used)
    word_input: np.ndarray | None = None  # the word model's input, while vocabularies are taught: finish
    # is then called with the word embedding as a third argument

    @property
    def partial(self) -> bool:
        return self.digit_feats is None

    def supersedes(self, waiting: "Job") -> bool:
        """Whether this job makes ``waiting`` (same stream and utterance) useless: a newer
        partial replaces a partial; a final or newer early final replaces an early final."""
        if (waiting.stream, waiting.utterance) != (self.stream, self.utterance) or self.utterance is None:
            return False
        return waiting.partial if self.partial else waiting.early


class Batcher:
    """Collects jobs and runs them through the models in batches.

    ``run()`` runs every waiting job at once on the calling thread. After ``start()`` the
    models run on ``workers`` threads of their own instead (onnxruntime releases the GIL, so
    model work uses other cores while the calling thread goes on with capture, VAD and
    features): ``pump()`` hands the waiting jobs over when the oldest has waited ``wait_s``
    and a worker is free (jobs that arrive meanwhile make the next batch larger), and calls
    the ``finish`` of jobs whose results are back, always on the calling thread. A stream has
    at most one batch in flight, so each stream's results are finished in the order its jobs
    were submitted. ``wake`` is called from a worker when results are back."""

    def __init__(self, models: Models, max_batch: int = 64, wait_s: float = 0.002,
                 observe: Callable[[list[Job], float], None] | None = None, workers: int = 1,
                 word_model=None):
        self.models = models
        self.word_model = word_model  # streamd.identity.vocabulary.WordModel, for jobs with a word_input
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.observe = observe  # told each batch and how long the models took
        self.workers = max(1, workers)
        self.jobs: list[Job] = []
        self.wake: Callable[[], None] = lambda: None
        self._threads: list[threading.Thread] = []
        self._todo: queue.Queue = queue.Queue()
        self._done: queue.Queue = queue.Queue()
        self._in_flight = 0
        self._busy: Counter[str] = Counter()  # streams with a batch in flight
        self.superseded = 0  # jobs dropped for a newer one of their utterance
        self.model_cpu_s: Counter[str] = Counter()  # CPU seconds each model has taken (threads' own time)

    def __len__(self) -> int:
        return len(self.jobs)

    @property
    def backlog(self) -> int:
        """Jobs waiting or in flight."""
        return len(self.jobs) + sum(self._busy.values())

    def pending(self, stream: str) -> bool:
        """Whether a job of ``stream`` waits or is in flight (its results are still to come)."""
        return stream in self._busy or any(j.stream == stream for j in self.jobs)

    def submit(self, job: Job) -> None:
        """Queue a job. A partial decision still waiting for the models when a newer partial of
        the same utterance arrives is dropped: under load it would only delay the rest. (The
        final decision does not drop it: each long utterance keeps its partial.) So is an
        early final when the utterance went on and a newer one (or the final) arrives."""
        stale = [i for i, j in enumerate(self.jobs) if job.supersedes(j)]
        if not stale:
            self.jobs.append(job)
            return
        # The new job takes the first stale one's place and wait, so the batch is not held back.
        job.ready_at = min(job.ready_at, self.jobs[stale[0]].ready_at)
        self.jobs[stale[0]] = job
        for i in reversed(stale[1:]):
            del self.jobs[i]
        self.superseded += len(stale)

    def _ready(self) -> list[Job]:
        """The waiting jobs that can go now: none of a stream whose last batch is in flight."""
        return [j for j in self.jobs if j.stream not in self._busy] if self._busy else self.jobs

    def due(self, now: float | None = None) -> bool:
        ready = self._ready()
        return bool(ready) and (now or time.monotonic()) - ready[0].ready_at >= self.wait_s

    def wait_left(self, now: float | None = None) -> float:
        """Seconds until the oldest job that can go can be handed over (0 when due; inf when
        none waits or every worker is busy: ``wake`` says when one is free)."""
        ready = self._ready() if self._in_flight < self.workers else []
        if not ready:
            return float("inf")
        return max(0.0, ready[0].ready_at + self.wait_s - (now or time.monotonic()))

    def run(self) -> int:
        """Run every waiting job now, on this thread."""
        jobs, self.jobs = self.jobs, []
        if jobs:
            self._finish(jobs, *self._compute(jobs))
        return len(jobs)

    def _compute(self, jobs: list[Job]) -> tuple[list[np.ndarray], dict[int, np.ndarray], dict[int, np.ndarray],
                                                 float, dict[str, float]]:
        """The models' outputs (speaker, digits, words), the seconds the batch took, and each
        model's CPU seconds."""
        start, cpu0 = time.perf_counter(), time.thread_time()
        embeddings = run_batched(self.models.speaker, [j.speaker_feats for j in jobs], self.max_batch)
        cpu1 = time.thread_time()
        with_digits = [i for i, j in enumerate(jobs) if j.digit_feats is not None]
        logits = self.models.digits.run_many([jobs[i].digit_feats for i in with_digits], self.max_batch)
        cpu2 = time.thread_time()
        with_words = [i for i, j in enumerate(jobs) if j.word_input is not None] if self.word_model else []
        vectors = self.word_model.embed_many([jobs[i].word_input for i in with_words]) if with_words else []
        cpu = {"speaker": cpu1 - cpu0, "digits": cpu2 - cpu1}
        if with_words:  # only while vocabularies are taught: the benchmark's cost lists the models that ran
            cpu["words"] = time.thread_time() - cpu2
        return embeddings, dict(zip(with_digits, logits)), dict(zip(with_words, vectors)), time.perf_counter() - start, cpu

    def _finish(self, jobs: list[Job], embeddings: list[np.ndarray], logits: dict[int, np.ndarray],
                words: dict[int, np.ndarray], seconds: float, cpu: dict[str, float]) -> None:
        self.model_cpu_s.update(cpu)
        if self.observe is not None:
            self.observe(jobs, seconds)
        for i, job in enumerate(jobs):
            if i in words:
                job.finish(embeddings[i], logits.get(i), words[i])
            else:
                job.finish(embeddings[i], logits.get(i))

    def _take(self) -> list[Job]:
        """The next batch for the models: every final decision waiting, with the jobs of the
        same streams before them (so a stream's results keep their order: a partial never
        comes after a final), else a few partials. A final then waits for at most a small
        batch of partials, and partials left waiting are superseded by newer ones rather than
        piling up."""
        ready = self._ready()
        with_finals = {j.stream for j in ready if not j.partial}
        take = [j for j in ready if j.stream in with_finals] if with_finals else ready[:PARTIALS_PER_BATCH]
        taken = {id(j) for j in take}
        self.jobs = [j for j in self.jobs if id(j) not in taken]
        return take

    # ---- models on their own threads

    def start(self) -> None:
        self._threads = [threading.Thread(target=self._serve, name=f"streamd-models-{i}", daemon=True)
                         for i in range(self.workers)]
        for thread in self._threads:
            thread.start()

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
        if not self._threads:
            return self.run() if self.jobs and (force or self.due()) else 0
        finished = 0
        with contextlib.suppress(queue.Empty):
            while True:
                jobs, result = self._done.get(timeout=wait_s) if self._in_flight and wait_s else self._done.get_nowait()
                self._in_flight -= 1
                self._busy -= Counter(j.stream for j in jobs)  # streams at 0 leave the Counter
                if isinstance(result, BaseException):
                    raise result
                self._finish(jobs, *result)
                finished += len(jobs)
        while self._in_flight < self.workers and (force or self.due()) and (jobs := self._take()):
            self._in_flight += 1
            self._busy.update(j.stream for j in jobs)
            self._todo.put(jobs)
        return finished

    def drain(self, timeout: float = 30.0) -> None:
        """Run and finish everything submitted so far (the end of a run)."""
        deadline = time.monotonic() + timeout
        self.pump(force=True)
        while (self.jobs or self._in_flight) and time.monotonic() < deadline:
            self.pump(force=True, wait_s=max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        for _ in self._threads:
            self._todo.put(None)
        for thread in self._threads:
            thread.join(5)
        self._threads = []
