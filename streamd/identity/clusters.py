"""Recurring unknown voices: utterances that match nobody enrolled are clustered online, so a
voice that keeps coming back gets the same label (``unknown-3``) across utterances and
restarts; a cluster can be promoted to a named speaker with the utterances already heard.

Clusters are scored like enrolled speakers (AS-norm against the model's cohort) with their
own false-accept rate, ``identity.cluster_far``. Persistence is streamd.identity.cluster_store.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from streamd.identity.cluster_store import ClusterStore
from streamd.identity.gallery import GalleryError
from streamd.identity.scoring import UNKNOWN, Utterance
from streamd.identity.scoring import Enrolled, Scorer, l2_normalize

log = logging.getLogger(__name__)

LABEL = re.compile(rf"^{UNKNOWN}-(\d+)$")


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
    """In-memory centroids of the stored clusters, kept in step with the store."""

    def __init__(self, store: ClusterStore, model_sha: str, feature_key: str, scorer: Scorer,
                 embed: Callable[[np.ndarray], np.ndarray], threshold_for: Callable[[int], float],
                 settings: ClusterSettings = ClusterSettings()):
        self.store = store
        self.sha = model_sha
        self.key = feature_key
        self.scorer = scorer
        self.threshold_for = threshold_for
        self.settings = settings
        self._reembed(embed)
        self._members = store.vectors(model_sha)  # {cluster id: (n, dim)}
        self._rebuild()

    def _reembed(self, embed: Callable[[np.ndarray], np.ndarray]) -> None:
        dropped = self.store.drop_other_features(self.key)
        if dropped:
            log.info("dropped %d unknown-voice utterances made with other speaker features", dropped)
        todo = self.store.missing_embeddings(self.sha)
        if todo:
            log.info("speaker model changed: re-embedding %d unknown-voice utterances", len(todo))
            self.store.store_embeddings(self.sha, [(mid, embed(f)) for mid, f in todo])

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
        if not self._ids:
            return []
        e = l2_normalize(embedding)
        raw = self._index.centroids @ e
        scores = self.scorer.normalise(raw, self.scorer.stats(e)[0], self._index.stats)
        return [self._ids[k] for k in np.flatnonzero(scores >= self.threshold_for(len(self._ids)))]

    def observe(self, embedding: np.ndarray, utt: Utterance) -> str | None:
        """An unknown utterance: join its cluster or start one; returns the label, if any."""
        cid = self.match(embedding)
        if cid is None and utt.seconds < self.settings.min_seconds:
            return None
        if cid is None and len(self._ids) >= self.settings.max_clusters:
            self._forget(self.store.least_recent())
        cid = self.store.add(cid, utt, embedding, self.sha, self.key, self.settings.max_members, time.time())
        self._members[cid] = self.store.vectors(self.sha, cid)[cid]
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
        self.store.merge(into, merged, self.settings.max_members)
        log.info("unknown voices %s are %s: merged", ", ".join(map(label_of, merged)), label_of(into))
        for i in merged:
            self._members.pop(i, None)
        self._members[into] = self.store.vectors(self.sha, into)[into]
        self._rebuild([*merged, into])
        return into

    def _forget(self, cid: int | None) -> None:
        if cid is not None:
            self.store.delete(cid)
            self._members.pop(cid, None)
            self._rebuild([cid])

    def drop_utterances(self, features: list[bytes]) -> list[int]:
        """Forget the stored utterances with these features (an enrolled speaker's, removed);
        returns the clusters that were left empty and are gone."""
        changed, emptied = self.store.drop_utterances(features)
        for cid in changed:
            if cid in emptied:
                self._members.pop(cid, None)
            else:
                self._members[cid] = self.store.vectors(self.sha, cid).get(cid, np.zeros((0, 0), np.float32))
                if not len(self._members[cid]):
                    self._members.pop(cid)
        if changed:
            self._rebuild(sorted(changed))
        return sorted(emptied)

    def members(self, label: str) -> tuple[list[Utterance], np.ndarray]:
        cid = parse_label(label)
        if cid not in self._members:
            raise GalleryError(f"no cluster {label!r}")
        return self.store.members(cid, self.sha)

    def remove(self, label: str) -> None:
        self._forget(parse_label(label))

    def reload(self) -> None:
        """Re-read the store (another process may have changed it)."""
        self._members = self.store.vectors(self.sha)
        self._rebuild()

    def listing(self) -> list[dict]:
        return self.store.listing()
