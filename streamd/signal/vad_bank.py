"""The per-frame state of many streams' VADs as arrays, a row per stream (issue 31).

What a ``Segmenter`` does to every frame before webrtcvad is arithmetic on the frame's level:
the input gain's peak follower and floor (``InputGain``), the noise floor (``NoiseFloor``), the
noise of the pauses (``PauseNoise``), whether the stream is gated. ``VadBank.tick`` does it for
the frames of every stream that arrive together in a few numpy calls, and then, for each stream
that is idle and whose frame lies under its gate (``Segmenter.is_speech`` would call it silence
whatever webrtcvad said), the idle state machine's step too (pre-roll, onset votes): those
frames ("quiet") never reach Python per stream, nor webrtcvad. The other frames go on to their
``Segmenter``, which reads and writes its row here.

The scalar classes in ``streamd.signal.vad`` are the definition; tests/test_vad_bank.py checks
that a row here holds what they hold, frame by frame.

webrtcvad keeps state of its own (a filter, adaptive noise and speech models, its own
hangover), which a skipped frame does not update; before it runs again on a stream, the last
``REPLAY_FRAMES`` of the frames it skipped (kept with their gain) are replayed into it, so that
its state is what it would have been. BENCHMARKS.md ("Per-frame path
batched across streams") measures what skipping changes on real audio.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streamd.signal.levels import DIGITAL_SILENCE_DBFS, SILENT_DBFS, levels

INF = np.inf


@dataclass(frozen=True, slots=True)
class Tick:
    """What ``VadBank.tick`` found for its frames, in their order."""

    dbfs: np.ndarray  # level with DC (InputGain's)
    level: np.ndarray  # level without DC (the noise estimates' and the gate's)
    gain_db: np.ndarray  # webrtcvad's input gain
    quiet: np.ndarray  # bool: idle and under the gate, handled here entirely


class VadBank:
    """Rows of VAD state for streams that share one ``VadParams``. ``add()`` gives a row;
    arrays grow as rows are added. Rows passed to one ``tick`` must be distinct."""

    # Measured (BENCHMARKS.md): replaying 15 frames left 16 of 196 utterance boundaries moved
    # in noise, 50 frames 2, 100 frames none. webrtcvad's slowest state (the minimum of each
    # band's energy) looks back 100 frames.
    REPLAY_FRAMES = 100
    SKIP_QUIET = True  # False: every frame goes to webrtcvad (for measuring what skipping changes)

    def __init__(self, params, capacity: int = 4):
        from streamd.signal.vad import CLIP_MS, InputGain, NoiseFloor, PauseNoise  # the definitions

        p = self.params = params
        self._release = InputGain.RELEASE_DB_PER_S * p.frame_ms / 1000
        self._gain_n = max(1, round(InputGain.FLOOR_WINDOW_S * 1000 / p.frame_ms))
        self._floor_n = max(1, round(NoiseFloor.WINDOW_S * 1000 / p.frame_ms))
        self._floor_pct, self._floor_every = NoiseFloor.PERCENTILE, NoiseFloor.EVERY
        self._pause_n = max(1, round(PauseNoise.WINDOW_S * 1000 / p.frame_ms))
        self._pause_min = max(1, round(PauseNoise.MIN_S * 1000 / p.frame_ms))
        self._pause_spread, self._pause_every = PauseNoise.SPREAD, PauseNoise.EVERY
        self._clip_frames = p.frames(CLIP_MS)
        self.onset_n = p.frames(p.onset_ms)
        self.hist_n = p.frames(p.preroll_ms) + self.onset_n
        self._votes_mask = (1 << self.onset_n) - 1
        self.rows = 0
        self._capacity = 0
        self._grow(capacity)

    # Each array: (name, shape after the row axis, dtype, value of a fresh row).
    def _fields(self):
        s = self.params.frame_samples
        return (
            ("peak", (), np.float64, SILENT_DBFS), ("gain_levels", (self._gain_n,), np.float64, INF),
            ("gain_count", (), np.int64, 0),
            ("floor_levels", (self._floor_n,), np.float64, 0.0), ("floor_count", (), np.int64, 0),
            ("floor_value", (), np.float64, SILENT_DBFS), ("floor_noisy", (), bool, False),
            ("pause_levels", (self._pause_n,), np.float64, 0.0), ("pause_count", (), np.int64, 0),
            ("pause_gate", (), np.float64, SILENT_DBFS),
            ("sound_run", (), np.int64, 0), ("gated", (), np.int8, -1),  # -1: not decided yet
            ("hist_samples", (self.hist_n, s), np.int16, 0), ("hist_t", (self.hist_n,), np.float64, 0.0),
            ("hist_voiced", (self.hist_n,), bool, False), ("hist_level", (self.hist_n,), np.float64, 0.0),
            ("hist_gain", (self.hist_n,), np.float64, 0.0),
            ("hist_head", (), np.int64, 0), ("hist_len", (), np.int64, 0),
            ("votes_bits", (), np.int64, 0),  # the onset votes, newest in bit 0
            ("votes_len", (), np.int64, 0), ("votes_count", (), np.int64, 0),
            ("idle", (), bool, True), ("skipped", (), np.int64, 0),
            # The frames webrtcvad skipped, for replaying (slot: skipped % REPLAY_FRAMES).
            ("skip_samples", (self.REPLAY_FRAMES, s), np.int16, 0), ("skip_gain", (self.REPLAY_FRAMES,), np.float64, 0.0),
        )

    def _grow(self, capacity: int) -> None:
        for name, shape, dtype, fresh in self._fields():
            arr = np.full((capacity, *shape), fresh, dtype)
            if self._capacity:
                arr[: self.rows] = getattr(self, name)[: self.rows]
            setattr(self, name, arr)
        self._capacity = capacity

    def add(self) -> int:
        if self.rows == self._capacity:
            self._grow(2 * self._capacity)
        self.rows += 1
        self.reset_row(self.rows - 1)
        return self.rows - 1

    def reset_row(self, r: int) -> None:
        for name, _, _, fresh in self._fields():
            getattr(self, name)[r] = fresh

    # --- the batched step -------------------------------------------------------------------

    def tick(self, rows: np.ndarray, samples: np.ndarray, t: np.ndarray, machine: bool = True) -> Tick:
        """Take in one frame per row (``samples``: frames x samples, int16; ``t``: their audio
        times). ``machine``: quiet frames also take the idle state machine's step (False: only
        the levels and noise estimates move, as ``Segmenter.is_speech`` alone does)."""
        sel = _rows(rows)
        dbfs, level = levels(samples)
        gain = self._gain(sel, dbfs)
        p = self.params
        if p.min_snr_db <= 0:  # no gate: every frame goes to webrtcvad (and nothing is observed)
            return Tick(dbfs, level, gain, np.zeros(len(rows), bool))
        self._observe(sel, level)
        if not self.SKIP_QUIET:
            return Tick(dbfs, level, gain, np.zeros(len(rows), bool))
        quiet = (self.idle[sel] & (self.gated[sel] == 1) & self.floor_noisy[sel]
                 & (level < np.maximum(self.floor_value[sel] + p.min_snr_db, self.pause_gate[sel])))
        if machine and quiet.all():
            self._idle_quiet(sel, samples, t, level, gain)
        elif machine and quiet.any():
            self._idle_quiet(rows[quiet], samples[quiet], t[quiet], level[quiet], gain[quiet])
        return Tick(dbfs, level, gain, quiet)

    def _gain(self, sel, dbfs: np.ndarray) -> np.ndarray:
        """InputGain.gain_db for each row."""
        p = self.params
        peak = np.maximum(self.peak[sel] - self._release, dbfs)
        self.peak[sel] = peak
        count = self.gain_count[sel]
        self.gain_levels[_at(sel, count % self._gain_n)] = dbfs
        self.gain_count[sel] = count + 1
        floor = self.gain_levels[sel].min(axis=1)
        return np.maximum(0.0, np.minimum(np.minimum(p.target_dbfs - peak, p.noise_ceiling_dbfs - floor),
                                          p.max_gain_db))

    def _observe(self, sel, level: np.ndarray) -> None:
        """Segmenter._observe for each row."""
        count = self.floor_count[sel]
        self.floor_levels[_at(sel, count % self._floor_n)] = level
        count = count + 1
        self.floor_count[sel] = count
        due = (count <= self._floor_every) | (count % self._floor_every == 0)
        if due.all():
            self._floor_estimate(sel)
        elif due.any():
            self._floor_estimate(_subset(sel, due))
        fresh = self.pause_count[sel] < self._pause_min
        if fresh.any():
            self.push_pauses(_subset(sel, fresh), level[fresh])
        run = np.where(level > DIGITAL_SILENCE_DBFS, self.sound_run[sel] + 1, 0)
        self.sound_run[sel] = run
        gated = self.gated[sel]
        if (gated == 1).all():
            return  # the usual case: decided long ago
        self.gated[sel] = np.where(gated == -1, run > 0, np.where((gated == 0) & (run >= self._clip_frames), 1, gated))

    def _floor_estimate(self, sel) -> None:
        """NoiseFloor's percentile of the heard levels and its ``noisy``, for each row."""
        n = np.minimum(self.floor_count[sel], self._floor_n)
        arr = self.floor_levels[sel]
        heard = (np.arange(self._floor_n) < n[:, None]) & (arr > DIGITAL_SILENCE_DBFS)
        h = heard.sum(axis=1)
        arr = np.where(heard, arr, INF)
        k = h * self._floor_pct // 100
        arr = _kth_rows(arr, k)
        value = arr[np.arange(len(arr)), np.minimum(k, self._floor_n - 1)]
        noisy = (arr < (value + self.params.min_snr_db)[:, None]).sum(axis=1) > n - h
        none = h == 0
        self.floor_value[sel] = np.where(none, SILENT_DBFS, value)
        self.floor_noisy[sel] = noisy & ~none

    def push_pauses(self, sel, level: np.ndarray) -> None:
        """PauseNoise.push for each row (one level each; digital silence is left out)."""
        keep = level > DIGITAL_SILENCE_DBFS
        if not keep.all():
            sel, level = _subset(sel, keep), level[keep]
            if not len(level):
                return
        count = self.pause_count[sel]
        self.pause_levels[_at(sel, count % self._pause_n)] = level
        count = count + 1
        self.pause_count[sel] = count
        due = (count >= self._pause_min) & (count % self._pause_every == 0)
        if due.all():
            self._pause_estimate(sel)
        elif due.any():
            self._pause_estimate(_subset(sel, due))

    def push_pause(self, r: int, level: float) -> None:
        """One row's push_pauses (the Python path)."""
        if level <= DIGITAL_SILENCE_DBFS:
            return
        count = int(self.pause_count[r])
        self.pause_levels[r, count % self._pause_n] = level
        self.pause_count[r] = count + 1
        if count + 1 >= self._pause_min and (count + 1) % self._pause_every == 0:
            self._pause_estimate(np.array([r]))

    def _pause_estimate(self, sel) -> None:
        n = np.minimum(self.pause_count[sel], self._pause_n)
        arr = self.pause_levels[sel]
        if not (n == self._pause_n).all():
            arr = np.where(np.arange(self._pause_n) < n[:, None], arr, INF)
        k10, k50 = n // 10, n // 2
        arr = _kth_rows(arr, k10, k50)
        i = np.arange(len(arr))
        p10, p50 = arr[i, k10], arr[i, k50]
        self.pause_gate[sel] = p50 + self._pause_spread * (p50 - p10) + 1.0

    def pauses_ready(self, r: int) -> bool:
        return bool(self.pause_count[r] >= self._pause_min)

    def _idle_quiet(self, sel, samples, t, level, gain) -> None:
        """Segmenter._idle for frames that are silence (not voiced): the pause noise takes the
        frame leaving the pre-roll, the pre-roll and the onset votes take this one."""
        head, n = self.hist_head[sel], self.hist_len[sel]
        full = n == self.hist_n
        leaving = full & (self.pause_count[sel] >= self._pause_min)
        if leaving.any():
            self.push_pauses(_subset(sel, leaving), self.hist_level[_at(sel, head)][leaving])
        at = _at(sel, np.where(full, head, (head + n) % self.hist_n))
        self.hist_samples[at] = samples
        self.hist_t[at], self.hist_voiced[at], self.hist_level[at], self.hist_gain[at] = t, False, level, gain
        self.hist_head[sel] = np.where(full, (head + 1) % self.hist_n, head)
        self.hist_len[sel] = np.minimum(n + 1, self.hist_n)
        bits = self.votes_bits[sel]  # a silent vote: the oldest (when held) drops out
        self.votes_count[sel] = self.votes_count[sel] - ((bits >> (self.onset_n - 1)) & 1)
        self.votes_bits[sel] = (bits << 1) & self._votes_mask
        self.votes_len[sel] = np.minimum(self.votes_len[sel] + 1, self.onset_n)
        skipped = self.skipped[sel]
        at = _at(sel, skipped % self.REPLAY_FRAMES)
        self.skip_samples[at], self.skip_gain[at] = samples, gain
        self.skipped[sel] = skipped + 1

    # --- one row, for its Segmenter (frames near or in speech) ----------------------------

    def append_history(self, r: int, samples: np.ndarray, t: float, voiced: bool, level: float, gain: float) -> None:
        head, n = int(self.hist_head[r]), int(self.hist_len[r])
        pos = head if n == self.hist_n else (head + n) % self.hist_n
        self.hist_samples[r, pos] = samples
        self.hist_t[r, pos], self.hist_voiced[r, pos] = t, voiced
        self.hist_level[r, pos], self.hist_gain[r, pos] = level, gain
        if n == self.hist_n:
            self.hist_head[r] = (head + 1) % self.hist_n
        else:
            self.hist_len[r] = n + 1

    def history_full(self, r: int) -> bool:
        return bool(self.hist_len[r] == self.hist_n)

    def oldest_level(self, r: int) -> float:
        return float(self.hist_level[r, self.hist_head[r]])

    def history(self, r: int) -> np.ndarray:
        """The row's pre-roll slots, oldest first (index hist_* with it)."""
        return (int(self.hist_head[r]) + np.arange(int(self.hist_len[r]))) % self.hist_n

    def clear_history(self, r: int) -> None:
        self.hist_head[r] = self.hist_len[r] = 0

    def vote(self, r: int, voiced: bool) -> tuple[int, int]:
        """Add a vote; (votes held, voiced among them)."""
        bits, count = int(self.votes_bits[r]), int(self.votes_count[r])
        count += voiced - ((bits >> (self.onset_n - 1)) & 1)
        self.votes_bits[r] = ((bits << 1) | voiced) & self._votes_mask
        n = min(int(self.votes_len[r]) + 1, self.onset_n)
        self.votes_len[r], self.votes_count[r] = n, count
        return n, count

    def clear_votes(self, r: int) -> None:
        self.votes_bits[r] = self.votes_len[r] = self.votes_count[r] = 0

    def take_skipped(self, r: int) -> list[tuple[np.ndarray, float]]:
        """The frames (samples, gain), oldest first, whose webrtcvad call was skipped since it
        last ran on this row, the newest REPLAY_FRAMES of them; the count starts over."""
        skipped = int(self.skipped[r])
        if not skipped:
            return []
        self.skipped[r] = 0
        return [(self.skip_samples[r, j % self.REPLAY_FRAMES], float(self.skip_gain[r, j % self.REPLAY_FRAMES]))
                for j in range(max(0, skipped - self.REPLAY_FRAMES), skipped)]

def _rows(rows: np.ndarray):
    """The rows as a slice where they are all the first rows in order (the usual tick of a
    bank whose streams all send): numpy then copies blocks instead of gathering."""
    n = len(rows)
    if n and rows[0] == 0 and rows[-1] == n - 1 and (n < 3 or (np.diff(rows) == 1).all()):
        return slice(0, n)
    return rows


def _subset(sel, mask: np.ndarray) -> np.ndarray:
    return (np.arange(sel.start, sel.stop) if isinstance(sel, slice) else sel)[mask]


def _at(sel, pos: np.ndarray):
    """Index of the element ``pos[i]`` of row ``sel[i]``, for each i (one column for all when
    the positions agree, as they do in streams that started together)."""
    if len(pos) and (pos == pos[0]).all():
        return sel, int(pos[0])
    return (np.arange(sel.start, sel.stop) if isinstance(sel, slice) else sel), pos


def _kth_rows(arr: np.ndarray, *ks: np.ndarray) -> np.ndarray:
    """``arr`` with, in each row i, every ``k[i]``-th smallest value in its place (for each k
    in ``ks``): np.partition where the rows share one k (the usual case: windows full), a sort
    otherwise (numpy's partition at several ks costs several times a sort)."""
    first = int(ks[0][0])
    if len(ks) == 1 and (ks[0] == first).all():
        return np.partition(arr, first, axis=1)
    return np.sort(arr, axis=1)
