"""Cross-stream batching: utterances of many streams that are ready together go through each
model in one session call.

Inputs of one shape batch together: the speaker encoder's fixed windows always do, and the
digit model's utterances are padded to a multiple of ``models.bucket_frames`` (see
``OnnxModel.inputs``), so a batch gives exactly what one call per utterance would.

When the models fall behind, ``LoadShedder`` keeps the final decisions within
``models.max_latency_ms`` by shedding optional work in the order of ``SHED_ORDER``
(docs/operations.md, "What streamd does when the machine is too small").
"""

from __future__ import annotations

import contextlib
import queue
import threading
import logging
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from streamd.models.inference import FeaturesByFrontEnd, Models, run_batched

log = logging.getLogger(__name__)

PARTIALS_PER_BATCH = 4  # partial decisions handed to the models' thread at once when no final waits

# What is shed when the models fall behind, first to last; each level sheds its own work and
# every earlier one's. Partial decisions and early finals are not computed (an utterance's final
# decision is then computed when it closes); "cascade": the digit is decided by the cascade's
# first (cheap) stage alone, even where its gate would run the costly members; "speaker_windows":
# the speaker embedding averages at most SHED_WINDOWS of the utterance's windows. Final decisions
# are never shed; one decided with less work is marked ``degraded`` (docs/events.md).
# An early final is the final decision computed during the hangover: it costs the models more only
# when speech goes on (1-2% of them in the bench) and saves every decision the hangover's wait, so it is
# shed after the cascade (BENCHMARKS.md, "On an AVX2-only machine": shed second, it put p50 at 60-160 ms).
SHED_ORDER = ("partial", "cascade", "early_final", "speaker_windows")
SHED_WINDOWS = 3  # speaker windows an utterance keeps at the last level, spread evenly over it
SHED_ABOVE = 0.5  # of the budget: the projected latency above which one more kind of work is shed
RELAX_BELOW = 0.25  # of the budget: the projected latency below which ...
RELAX_AFTER_S = 10.0  # ... held this long, with the models busy less than RELAX_BUSY, sheds one kind less
RELAX_BUSY = 0.5
DWELL = 0.1  # of the budget: the least time between two steps up

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
    # Capture time (monotonic) of the audio it decides on, from which the latency budget runs;
    # None: no budget (a stream read as fast as the models take it: it waits for them)
    heard_at: float | None = None
    cuts: frozenset[str] = frozenset()  # what its batch may shed computing it (set when handed over)
    level: int = 0  # the LoadShedder's level when it was handed over
    degraded: tuple[str, ...] = ()  # what was shed computing it that changed its result (set by the batch)
    dropped: bool = False  # shed: never computed, never finished
    # Pieces of an utterance for the digit models (streamd.models.digit_strings), each as a clip
    # of its own; ``pieces_cheap``: named by the cascade's first stage alone. Their logits are
    # set in ``piece_logits`` before ``finish`` is called.
    pieces: tuple[FeaturesByFrontEnd, ...] = ()
    pieces_cheap: bool = False
    piece_logits: list[np.ndarray] | None = None

    @property
    def partial(self) -> bool:
        return self.digit_feats is None and not self.pieces

    def supersedes(self, waiting: "Job") -> bool:
        """Whether this job makes ``waiting`` (same stream and utterance) useless: a newer
        partial replaces a partial; a final or newer early final replaces an early final."""
        if (waiting.stream, waiting.utterance) != (self.stream, self.utterance) or self.utterance is None:
            return False
        return waiting.partial if self.partial else waiting.early


class LoadShedder:
    """How much optional work is shed (``level``: the first ``level`` kinds of ``SHED_ORDER``)
    so that final decisions come within ``budget_s`` of their audio's capture.

    The projected latency is the age of the oldest final decision waiting for the models plus
    what the finals waiting will take them: their number times the model seconds a final cost
    in the batches taken at this level (at the nearest lower level, until one has run here).
    Above ``SHED_ABOVE`` of the budget one more kind is shed, every ``DWELL`` of the budget
    while it stays above (work already in flight cannot be helped: a level may be reached that
    turns out more than needed). Below ``RELAX_BELOW`` of the budget for ``RELAX_AFTER_S``, one
    kind less, if the models would then be busy less than ``RELAX_BUSY`` of the time (their busy
    time now, scaled by what a final cost at the lower level), so a level that is needed is not
    left and taken again. ``budget_s`` 0: nothing is ever shed."""

    def __init__(self, budget_s: float, workers: int = 1):
        self.budget_s = budget_s
        self.workers = max(1, workers)
        self.level = 0
        self.cost: list[float | None] = [None] * (len(SHED_ORDER) + 1)  # model seconds per final, by level
        self._changed_at = float("-inf")
        self._calm_since: float | None = None
        self._busy: deque[tuple[float, float]] = deque()  # (end, seconds) of recent batches

    def sheds(self, what: str) -> bool:
        return what in SHED_ORDER[: self.level]

    def batch_done(self, seconds: float, finals: int, level: int, now: float) -> None:
        """A batch taken at ``level`` took the models ``seconds`` for its ``finals`` final decisions."""
        if finals:
            per = seconds / finals
            old = self.cost[level]
            self.cost[level] = per if old is None else 0.7 * old + 0.3 * per
        self._busy.append((now, seconds))
        while self._busy and self._busy[0][0] < now - RELAX_AFTER_S:
            self._busy.popleft()

    def busy(self, now: float) -> float:
        """The models' busy fraction over the last RELAX_AFTER_S."""
        return sum(s for end, s in self._busy if end >= now - RELAX_AFTER_S) / (RELAX_AFTER_S * self.workers)

    def projected(self, age: float | None, finals: int) -> float:
        """The latency the oldest final waiting is heading for: its ``age`` (None: none waits)
        plus the model time of the ``finals`` waiting at the current level."""
        if age is None:
            return 0.0
        known = [c for c in self.cost[: self.level + 1] if c is not None]
        return age + finals * (known[-1] if known else 0.0)

    def update(self, age: float | None, finals: int, now: float) -> None:
        """``age``: how long ago the audio of the oldest final decision waiting was captured
        (None: none waits); ``finals``: how many wait."""
        if self.budget_s <= 0:
            return
        projected = self.projected(age, finals)
        if projected > SHED_ABOVE * self.budget_s:
            self._calm_since = None
            if self.level < len(SHED_ORDER) and now - self._changed_at >= DWELL * self.budget_s:
                self._set(self.level + 1, projected, now)
        elif projected < RELAX_BELOW * self.budget_s and self.level:
            if self._calm_since is None:
                self._calm_since = now
            elif now - self._calm_since >= RELAX_AFTER_S and self._busy_below(now) < RELAX_BUSY:
                self._set(self.level - 1, projected, now)
                self._calm_since = now
        else:
            self._calm_since = None

    def _busy_below(self, now: float) -> float:
        """How busy the models would be one level lower."""
        here, below = self.cost[self.level], self.cost[self.level - 1]
        return self.busy(now) * (below / here if here and below else 1.0)

    def _set(self, level: int, projected: float, now: float) -> None:
        was, self.level = self.level, level
        self._changed_at = now
        shed = ", ".join(SHED_ORDER[:level]) or "nothing"
        if was == 0:
            log.warning("models behind: decisions projected %.0f ms after their audio (models.max_latency_ms %.0f); "
                        "shedding %s (streamd_shed_total)", projected * 1000, self.budget_s * 1000, shed)
        elif level == 0:
            log.info("models caught up: shedding nothing")
        else:
            log.info("models %s: shedding %s", "behind" if level > was else "catching up", shed)


class Batcher:
    """Collects jobs and runs them through the models in batches.

    ``run()`` runs every waiting job at once on the calling thread. After ``start()`` the
    models run on ``workers`` threads of their own instead (onnxruntime releases the GIL, so
    model work uses other cores while the calling thread goes on with capture, VAD and
    features): ``pump()`` hands the waiting jobs over when the oldest has waited ``wait_s``
    and a worker is free (jobs that arrive meanwhile make the next batch larger), and calls
    the ``finish`` of jobs whose results are back, always on the calling thread. A stream has
    at most one batch in flight, so each stream's results are finished in the order its jobs
    were submitted. ``wake`` is called from a worker when results are back.

    ``max_latency_s`` (above 0) is the latency budget a ``LoadShedder`` keeps by shedding work;
    ``on_shed(what, n)`` is told of each job or decision shed (``shed`` counts them too)."""

    def __init__(self, models: Models, max_batch: int = 64, wait_s: float = 0.002,
                 observe: Callable[[list[Job], float], None] | None = None, workers: int = 1,
                 word_model=None, max_latency_s: float = 0.0, on_shed: Callable[[str, int], None] | None = None):
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
        self.shedder = LoadShedder(max_latency_s, self.workers)
        self.shed: Counter[str] = Counter()  # work shed, by SHED_ORDER's names
        self.on_shed = on_shed
        self._flying: list[list[Job]] = []  # batches in flight

    def __len__(self) -> int:
        return len(self.jobs)

    @property
    def backlog(self) -> int:
        """Jobs waiting or in flight."""
        return len(self.jobs) + sum(self._busy.values())

    def pending(self, stream: str) -> bool:
        """Whether a job of ``stream`` waits or is in flight (its results are still to come)."""
        return stream in self._busy or any(j.stream == stream for j in self.jobs)

    def lag(self, now: float | None = None) -> float | None:
        """How long ago the audio of the oldest final decision waiting or in flight was
        captured (None when none is): how far the models are behind real time. Jobs of
        streams that are not real-time (``heard_at`` None) do not count."""
        heard = [j.heard_at for j in self.jobs if not j.partial and j.heard_at is not None]
        heard += [j.heard_at for jobs in self._flying for j in jobs if not j.partial and j.heard_at is not None]
        return (now or time.monotonic()) - min(heard) if heard else None

    def _sheds(self, job: Job) -> str | None:
        """What ``job`` is, if that is shed now."""
        what = "partial" if job.partial else "early_final" if job.early else None
        return what if what is not None and self.shedder.sheds(what) else None

    def skip(self, what: str) -> bool:
        """Whether work of this kind (``partial``, ``early_final``) is shed now; counted as
        shed if so (its caller then does not prepare it)."""
        if not self.shedder.sheds(what):
            return False
        self._count_shed(what)
        return True

    def _count_shed(self, what: str, n: int = 1) -> None:
        self.shed[what] += n
        if self.on_shed is not None:
            self.on_shed(what, n)

    def submit(self, job: Job) -> None:
        """Queue a job. A partial decision still waiting for the models when a newer partial of
        the same utterance arrives is dropped: under load it would only delay the rest. (The
        final decision does not drop it: each long utterance keeps its partial.) So is an
        early final when the utterance went on and a newer one (or the final) arrives.
        A partial or early final is not queued at all (``dropped``) while such work is shed."""
        stale = [i for i, j in enumerate(self.jobs) if job.supersedes(j)]
        shed = self._sheds(job)
        if shed is not None:
            job.dropped = True
            self._count_shed(shed)
        self.superseded += len(stale)
        if shed is None and not stale:
            self.jobs.append(job)
            return
        if shed is None:  # the new job takes the first stale one's place and wait: the batch is not held back
            job.ready_at = min(job.ready_at, self.jobs[stale[0]].ready_at)
            self.jobs[stale.pop(0)] = job
        for i in reversed(stale):
            del self.jobs[i]

    def balance(self, now: float | None = None) -> None:
        """Shed more or less as the models keep up or not; drop the waiting jobs now shed."""
        now = now or time.monotonic()
        waiting = [j.heard_at for j in self.jobs if not j.partial and j.heard_at is not None]
        self.shedder.update(now - min(waiting) if waiting else None, len(waiting), now)
        if self.shedder.level and self.jobs:
            keep = []
            for job in self.jobs:
                if (what := self._sheds(job)) is not None:
                    job.dropped = True
                    self._count_shed(what)
                else:
                    keep.append(job)
            self.jobs = keep

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
        self.balance()
        jobs, self.jobs = self._handed(self.jobs), []
        if jobs:
            self._finish(jobs, *self._compute(jobs))
        return len(jobs)

    def _handed(self, jobs: list[Job]) -> list[Job]:
        """``jobs``, told what their batch may shed."""
        cuts = frozenset(w for w in ("cascade", "speaker_windows") if self.shedder.sheds(w))
        for job in jobs:
            job.cuts, job.level = cuts, self.shedder.level
        return jobs

    def _compute(self, jobs: list[Job]) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray], dict[int, np.ndarray],
                                                 float, dict[str, float]]:
        """The models' outputs (speaker, digits, words), the seconds the batch took, and each
        model's CPU seconds."""
        start, cpu0 = time.perf_counter(), time.thread_time()
        cuts = jobs[0].cuts if jobs else frozenset()
        max_rows = SHED_WINDOWS if "speaker_windows" in cuts else None
        speaker = self.models.speaker
        with_speaker = [i for i, j in enumerate(jobs) if j.speaker_feats is not None]
        embeddings = dict(zip(with_speaker, run_batched(speaker, [jobs[i].speaker_feats for i in with_speaker],
                                                        self.max_batch, max_rows)))
        if max_rows is not None:
            for job in jobs:
                if not job.partial and job.speaker_feats is not None \
                        and speaker.row_count(len(job.speaker_feats)) > max_rows:
                    job.degraded += ("speaker_windows",)
        cpu1 = time.thread_time()
        with_digits = [i for i, j in enumerate(jobs) if j.digit_feats is not None]
        logits, cut = self.models.digits.run_shed([jobs[i].digit_feats for i in with_digits], self.max_batch,
                                                  cheap_only="cascade" in cuts)
        for i, was_cut in zip(with_digits, cut):
            if was_cut:
                jobs[i].degraded += ("cascade",)
        self._run_pieces(jobs, "cascade" in cuts)
        cpu2 = time.thread_time()
        with_words = [i for i, j in enumerate(jobs) if j.word_input is not None] if self.word_model else []
        vectors = self.word_model.embed_many([jobs[i].word_input for i in with_words]) if with_words else []
        cpu = {"speaker": cpu1 - cpu0, "digits": cpu2 - cpu1}
        if with_words:  # only while vocabularies are taught: the benchmark's cost lists the models that ran
            cpu["words"] = time.thread_time() - cpu2
        return embeddings, dict(zip(with_digits, logits)), dict(zip(with_words, vectors)), time.perf_counter() - start, cpu

    def _run_pieces(self, jobs: list[Job], cheap_only: bool) -> None:
        """Each job's pieces through the digit models, in one batch per kind (cheap or full)."""
        for cheap in (True, False):
            owners = [j for j in jobs if j.pieces and j.pieces_cheap == cheap]
            flat = [p for j in owners for p in j.pieces]
            if not flat:
                continue
            out = self.models.digits.run_shed(flat, self.max_batch, cheap_only=cheap or cheap_only)[0]
            start = 0
            for job in owners:
                job.piece_logits = out[start : start + len(job.pieces)]
                start += len(job.pieces)

    def _finish(self, jobs: list[Job], embeddings: dict[int, np.ndarray], logits: dict[int, np.ndarray],
                words: dict[int, np.ndarray], seconds: float, cpu: dict[str, float]) -> None:
        self.model_cpu_s.update(cpu)
        if jobs:
            self.shedder.batch_done(seconds, sum(not j.partial for j in jobs), jobs[0].level, time.monotonic())
        if self.observe is not None:
            self.observe(jobs, seconds)
        for what in ("cascade", "speaker_windows"):
            if n := sum(what in j.degraded for j in jobs):
                self._count_shed(what, n)
        for i, job in enumerate(jobs):
            if i in words:
                job.finish(embeddings.get(i), logits.get(i), words[i])
            else:
                job.finish(embeddings.get(i), logits.get(i))

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
        return self._handed(take)

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
                self._flying = [b for b in self._flying if b is not jobs]
                self._busy -= Counter(j.stream for j in jobs)  # streams at 0 leave the Counter
                if isinstance(result, BaseException):
                    raise result
                self._finish(jobs, *result)
                finished += len(jobs)
        self.balance()
        while self._in_flight < self.workers and (force or self.due()) and (jobs := self._take()):
            self._in_flight += 1
            self._flying.append(jobs)
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
