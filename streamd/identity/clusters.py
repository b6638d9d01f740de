"""Recurring unknown voices: utterances that match nobody enrolled are clustered online, so a
voice that keeps coming back gets the same label (``unknown-3``) across utterances and
restarts; a cluster can be promoted to a named speaker with the utterances already heard.

Clusters are scored like enrolled speakers (AS-norm against the model's cohort) with their
own false-accept rate, ``identity.cluster_far``. Persistence is streamd.identity.cluster_store
(pg_clusters for a shared gallery); decisions read memory only, and changes are written through
streamd.identity.gallery_writer: at once, or by the daemon's writer thread for a shared gallery.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable

import numpy as np

from streamd.identity.cluster_store import ClusterStore
from streamd.identity.gallery import GalleryError
from streamd.identity.gallery_writer import Inline, Write
from streamd.identity.scoring import UNKNOWN, Utterance
from streamd.identity.scoring import Enrolled, Scorer, l2_normalize

log = logging.getLogger(__name__)

LABEL = re.compile(rf"^{UNKNOWN}-(\d+)$")
FLUSH_S = 2.0  # a command that reads the stored clusters waits this long for the writes before it
REREAD_S = 1.0  # other nodes' cluster changes are read at most this often


@dataclass(frozen=True)
class ClusterSettings:
    enabled: bool = True
    far: float = 0.01
    min_seconds: float = 1.3  # shorter unknown utterances (single words) may join a cluster, never start one
    max_clusters: int = 200
    max_members: int = 20  # utterances kept per cluster (the most recent), for promotion


def label_of(cluster_id: int) -> str:
    return f"{UNKNOWN}-{cluster_id}"


def parse_label(label: object) -> int:
    m = LABEL.match(label) if isinstance(label, str) else None
    if m is None:
        raise GalleryError(f"not a cluster label: {label!r} (expected like '{UNKNOWN}-3')")
    return int(m.group(1))


class UnknownClusters:
    """In-memory centroids of the stored clusters: what decisions read. A change is made here
    first and handed to ``writes`` (Inline by default: stored at once). ``loaded`` stays False
    while the store cannot be read (a shared gallery away at start-up): no voice is clustered
    until ``refresh()`` reads it."""

    def __init__(self, store: ClusterStore, model_sha: str, feature_key: str, scorer: Scorer,
                 embed: Callable[[np.ndarray], np.ndarray], threshold_for: Callable[[int], float],
                 settings: ClusterSettings = ClusterSettings(), writes=None, load: bool = True):
        self.store = store
        self.sha = model_sha
        self.key = feature_key
        self.scorer = scorer
        self.threshold_for = threshold_for
        self.settings = settings
        self.writes = writes if writes is not None else Inline()
        self.loaded = False
        self.unlabelled = 0  # new voices left without a cluster: no reserved id while the database was away
        self._embed = embed
        self._lock = threading.RLock()  # decisions on the audio thread, re-reads on the writer's
        self._members: dict[int, np.ndarray] = {}  # {cluster id: (n, dim)}
        self._updated: dict[int, float] = {}
        self._touched: set[int] | None = None  # changed here while a re-read runs
        self._read_at = 0.0
        self._rebuild()
        if load:
            self.refresh()

    def refresh(self) -> None:
        """Read the store again (first: re-embed what another model made). StorageError when it cannot."""
        if not self.loaded:
            self._reembed(self._embed)
        self._reread()
        self.loaded = True

    def _reembed(self, embed: Callable[[np.ndarray], np.ndarray]) -> None:
        dropped = self.store.drop_other_features(self.key)
        if dropped:
            log.info("dropped %d unknown-voice utterances made with other speaker features", dropped)
        todo = self.store.missing_embeddings(self.sha)
        if todo:
            log.info("speaker model changed: re-embedding %d unknown-voice utterances", len(todo))
            self.store.store_embeddings(self.sha, [(mid, embed(f)) for mid, f in todo])

    def _reread(self) -> None:
        """Memory from the store; what was changed here meanwhile (its writes still queued) stays."""
        with self._lock:
            self._touched = set()
        self._read_at = time.monotonic()
        try:
            members = self.store.vectors(self.sha)
            updated = self.store.updated_times()
        finally:
            with self._lock:
                touched, self._touched = self._touched, None
        with self._lock:
            for cid in touched:
                if cid in self._members:
                    members[cid], updated[cid] = self._members[cid], self._updated.get(cid, 0.0)
                else:
                    members.pop(cid, None)
            self._members = members
            self._updated = {cid: updated.get(cid, 0.0) for cid in members}
            self._rebuild()

    def poll(self) -> None:
        """The writer's idle work: reserve cluster ids, re-read clusters other nodes changed."""
        if not self.loaded:
            return
        self.store.refill()
        if self.store.changed_elsewhere() and time.monotonic() - self._read_at >= REREAD_S:
            self._reread()

    def _touch(self, cid: int) -> None:
        if self._touched is not None:
            self._touched.add(cid)

    def _rebuild(self, changed: list[int] | None = None) -> None:
        """Refresh the centroids (and their cohort statistics) of ``changed`` clusters, or all."""
        if changed is None:
            self._centroid, self._stats = {}, {}
            changed = list(self._members)
        for cid in changed:
            if cid in self._members:
                self._centroid[cid] = l2_normalize(l2_normalize(self._members[cid]).mean(axis=0))
                self._stats[cid] = self.scorer.stats(self._centroid[cid])[0]
            else:
                self._centroid.pop(cid, None)
                self._stats.pop(cid, None)
        self._ids = sorted(self._members)
        names = [label_of(i) for i in self._ids]
        if not names:
            self._index = Enrolled()
            return
        self._index = Enrolled(names, np.stack([self._centroid[i] for i in self._ids]),
                               np.stack([self._stats[i] for i in self._ids]))

    def __len__(self) -> int:
        return len(self._ids)

    def match(self, embedding: np.ndarray) -> int | None:
        """The cluster this voice belongs to, if any (no change)."""
        with self._lock:
            if not self._ids:
                return None
            e = l2_normalize(embedding)
            raw = self._index.centroids @ e
            scores = self.scorer.normalise(raw, self.scorer.stats(e)[0], self._index.stats)
            best = int(np.argmax(scores))
            if scores[best] < self.threshold_for(len(self._ids)):
                return None
            return parse_label(self._index.names[best])

    def of_voice(self, embedding: np.ndarray) -> list[int]:
        """Every cluster this voice would be given (not only the best): the clusters of an
        enrolled voice, to drop with it."""
        with self._lock:
            if not self._ids:
                return []
            e = l2_normalize(embedding)
            raw = self._index.centroids @ e
            scores = self.scorer.normalise(raw, self.scorer.stats(e)[0], self._index.stats)
            return [self._ids[k] for k in np.flatnonzero(scores >= self.threshold_for(len(self._ids)))]

    def observe(self, embedding: np.ndarray, utt: Utterance) -> str | None:
        """An unknown utterance: join its cluster or start one; returns the label, if any.
        Memory only, but for a new cluster of the SQLite store (its row, at once)."""
        with self._lock:
            if not self.loaded:
                return None
            cid = self.match(embedding)
            if cid is None and utt.seconds < self.settings.min_seconds:
                return None
            new, now = cid is None, time.time()
            if new:
                if len(self._ids) >= self.settings.max_clusters:
                    self._forget(min(self._ids, key=lambda i: (self._updated.get(i, 0.0), i)))
                cid = self.store.new_cluster(now)
                if cid is None:
                    self.unlabelled += 1
                    return None
            vector = np.asarray(embedding, np.float32).reshape(1, -1)
            kept = self._members.get(cid)
            self._members[cid] = (vector if kept is None else np.vstack([kept, vector]))[-self.settings.max_members:]
            self._updated[cid] = now
            self._touch(cid)
            self.writes.submit(Write("store an unknown voice", partial(
                self.store.add, cid, utt, vector[0], self.sha, self.key, self.settings.max_members, now, new)))
            self._rebuild([cid])
            return label_of(self._merge(cid))

    def _merge(self, cid: int) -> int:
        """Clusters that turn out to be one voice become one, under the oldest label."""
        others = [i for i in self._ids if i != cid]
        if not others:
            return cid
        mine = self._ids.index(cid)
        e = self._index.centroids[mine]
        rest = [self._ids.index(i) for i in others]
        raw = self._index.centroids[rest] @ e
        scores = self.scorer.normalise(raw, self._index.stats[mine], self._index.stats[rest])
        same = [others[k] for k in np.flatnonzero(scores >= self.threshold_for(len(self._ids)))]
        if not same:
            return cid
        into = min(same + [cid])
        merged = [i for i in same + [cid] if i != into]
        self.writes.submit(Write("merge clusters", partial(self.store.merge, into, merged, self.settings.max_members)))
        log.info("unknown voices %s are %s: merged", ", ".join(map(label_of, merged)), label_of(into))
        together = sorted([into, *merged])  # the store keeps the newest members: older clusters' first
        self._members[into] = np.vstack([self._members[i] for i in together])[-self.settings.max_members:]
        self._updated[into] = max(self._updated.get(i, 0.0) for i in together)
        for i in merged:
            self._members.pop(i, None)
            self._updated.pop(i, None)
        for i in together:
            self._touch(i)
        self._rebuild([*merged, into])
        return into

    def _forget(self, cid: int | None) -> None:
        if cid is not None:
            self.writes.submit(Write("delete a cluster", partial(self.store.delete, cid)))
            self.discard([cid])

    def discard(self, ids: list[int]) -> None:
        """Forget clusters in memory only (their rows are gone already)."""
        with self._lock:
            for cid in ids:
                self._members.pop(cid, None)
                self._updated.pop(cid, None)
                self._touch(cid)
            self._rebuild(list(ids))

    def drop_utterances(self, features: list[bytes]) -> list[int]:
        """Forget the stored utterances with these features (an enrolled speaker's, removed);
        returns the clusters that were left empty and are gone."""
        self.writes.flush(FLUSH_S)
        changed, emptied = self.store.drop_utterances(features)
        with self._lock:
            for cid in changed:
                if cid in emptied:
                    self._members.pop(cid, None)
                else:
                    self._members[cid] = self.store.vectors(self.sha, cid).get(cid, np.zeros((0, 0), np.float32))
                    if not len(self._members[cid]):
                        self._members.pop(cid)
                self._touch(cid)
            if changed:
                self._rebuild(sorted(changed))
        return sorted(emptied)

    def members(self, label: str) -> tuple[list[Utterance], np.ndarray]:
        """A cluster's stored utterances (once the writes queued before are done)."""
        cid = parse_label(label)
        with self._lock:
            if cid not in self._members:
                raise GalleryError(f"no cluster {label!r}")
        self.writes.flush(FLUSH_S)
        return self.store.members(cid, self.sha)

    def remove(self, label: str) -> None:
        self._forget(parse_label(label))

    def reload(self) -> None:
        """Re-read the store (another process may have changed it): at once inline, else after
        the writes queued before."""
        self.writes.submit(Write("read the clusters", self.refresh))

    def listing(self) -> list[dict]:
        self.writes.flush(FLUSH_S)
        return self.store.listing()
