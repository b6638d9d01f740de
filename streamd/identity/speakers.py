"""Who is speaking: the gallery, the speaker model and the open-set decision together.

Enrollment adds rows, never touches a model, and passes quality gates first. A speaker's
enrolled voice is the model's output on all of their enrollment speech as one utterance
(``joined_features``), computed from the stored features, so a new speaker model needs no
re-enrollment. Each enrollment's own embedding is kept too, re-embedded at start-up when the
model changes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from dataclasses import dataclass, replace

import numpy as np

from streamd.identity.clusters import FLUSH_S, ClusterSettings, UnknownClusters, label_of
from streamd.identity.gallery import Gallery, GalleryError, StorageError, validate_name
from streamd.identity.gallery_writer import Inline, Write
from streamd.identity.scoring import UNKNOWN, Utterance
from streamd.identity.scoring import Calibration, Decision, Enrolled, QualityFusion, Scorer, decide, l2_normalize
from streamd.models.cards import ModelError, verified
from streamd.models.inference import OnnxModel, window_starts
from streamd.identity.voice_count import TwoVoiceGate, split_score, window_embeddings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Gates:
    min_seconds: float = 3.0
    max_clipped: float = 0.01
    min_rms_dbfs: float = -50.0
    min_consistency: float = 0.6
    duplicate_score: float = 0.9


def book_settings(identity) -> dict:
    """SpeakerBook's keyword arguments from an [identity] config section."""
    return {"cosine_threshold": identity.threshold, "far": identity.far, "score": identity.score,
            "verify_far": identity.verify_far,
            "gates": gates_from(identity),
            "cluster_settings": ClusterSettings(identity.cluster_unknown, identity.cluster_far,
                                                identity.cluster_min_seconds, identity.cluster_max,
                                                identity.cluster_keep)}


def gates_from(identity) -> Gates:
    """The enrollment gates of an [identity] config section."""
    return Gates(identity.enroll_min_seconds, identity.enroll_max_clipped, identity.enroll_min_dbfs,
                 identity.enroll_min_consistency, identity.enroll_duplicate_score)


def joined_features(utterances: list[np.ndarray]) -> np.ndarray:
    """A speaker's enrollment utterances (each normalised on its own) as one utterance.

    Why not the mean of one embedding per utterance: a short word fills little of the speaker
    model's 1.6 s window, and the mean of such embeddings sits close to every voice. Joined,
    the windows are full of the speaker's speech (docs/measurements.md: phrases named at the
    default threshold 67.6% -> 84%)."""
    if not utterances:
        return np.zeros((0, 0), np.float32)
    return np.concatenate([np.asarray(u, np.float32) for u in utterances])


def feature_key(model: OnnxModel) -> str:
    """Names the features an enrollment was stored with (front end parameters)."""
    return hashlib.sha256(json.dumps(model.params.as_dict(), sort_keys=True).encode()).hexdigest()[:16]


def load_cohort(model: OnnxModel) -> np.ndarray | None:
    """The impostor cohort named by the model card (sha256-checked, no pickle), if any."""
    spec = model.card.data.get("cohort")
    if not spec:
        return None
    path = verified(model.card.path.parent / spec["file"], spec["sha256"], "cohort file")
    return np.load(path, allow_pickle=False).astype(np.float32)  # shipped as float16


def load_calibration(model: OnnxModel) -> Calibration | None:
    """The AS-norm score's thresholds (unknown-voice clusters; decisions without a fusion)."""
    spec = model.card.data.get("calibration")
    return Calibration.from_card(spec) if spec else None


def load_fusion(model: OnnxModel) -> tuple[QualityFusion, Calibration] | None:
    """The card's quality fusion and the fused score's thresholds, when it has them."""
    spec = (model.card.data.get("calibration") or {}).get("quality")
    if not spec:
        return None
    try:
        return QualityFusion.from_card(spec), Calibration.from_card(spec)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{model.card.path}: calibration.quality unusable: {exc}") from None


class SpeakerBook:
    """With a calibrated model (cohort + calibration in its card) scores are AS-normalised,
    fused with the trial's quality measures when the card has a quality fusion, and the
    threshold follows from ``far``, the share of a stranger's utterances that may be given an
    enrolled name, whatever the number of enrolled speakers. Unknown-voice clusters use the
    AS-norm score and its tables. Without a calibration, scores are cosines and
    ``cosine_threshold`` applies."""

    def __init__(self, gallery: Gallery | None, model: OnnxModel, cosine_threshold: float,
                 gates: Gates = Gates(), far: float = 0.01,
                 cluster_settings: ClusterSettings = ClusterSettings(), score: str = "auto",
                 verify_far: float = 0.001, writes=None):
        """``writes``: where cluster changes are written (streamd.identity.gallery_writer; the
        daemon's writer thread for a shared gallery); at once when None."""
        self.gallery = gallery
        self.writes = writes if writes is not None else Inline()
        self.model = model
        self.cosine_threshold = cosine_threshold
        self.far = far
        self.verify_far = verify_far  # challenge-response: one claimed speaker, its own false-accept rate
        self.gates = gates
        self.cluster_calibration = load_calibration(model)
        self._fusion = load_fusion(model) if self.cluster_calibration else None
        self.scorer = Scorer(load_cohort(model) if self.cluster_calibration else None)
        self.score = score
        self._enrolled = Enrolled()
        self._enrolled_lock = threading.RLock()  # the audio thread, and the writer's catching up
        self._voices: dict[str, tuple[tuple[int, ...], np.ndarray]] = {}  # name: (enrollment ids, voice)
        self.key = feature_key(model)
        self._gate: tuple[TwoVoiceGate, Scorer] | None = None
        self.clusters: UnknownClusters | None = None
        if gallery is not None and gallery.readonly:
            log.warning("gallery %s is read-only (%s): enrolled speakers are recognised; enrollment, changes and "
                        "clusters of unknown voices are not available", gallery.path, gallery.readonly)
        if gallery is not None:
            try:
                self.reembed()
            except StorageError as exc:  # read-only or full: those embeddings wait for a writable disk
                log.warning("%s; enrolled speakers are still recognised (from their stored features)", exc)
            self.enrolled()  # the enrolled voices worked out now, not during the first utterance
            self.clusters = None if gallery.readonly else self._open_clusters(gallery, cluster_settings)
        self._cluster_settings = cluster_settings
        self.drop_clusters_of_enrolled()  # of voices enrolled while this daemon was not running

    @property
    def score(self) -> str:
        return self._score

    @score.setter
    def score(self, choice: str) -> None:
        """"auto": decisions on enrolled speakers threshold the card's fused score when it has
        a quality fusion; "as-norm": the AS-norm score and its tables (clusters always do)."""
        fusion = self._fusion if choice == "auto" else None
        self.scorer.fusion = fusion[0] if fusion else None
        self.calibration = fusion[1] if fusion else self.cluster_calibration
        self._score = choice

    def _open_clusters(self, gallery: Gallery, settings: ClusterSettings) -> UnknownClusters | None:
        """The clusters; a shared gallery away now gives them empty, read when it returns (catch_up)."""
        store = clusters = None
        try:
            store = gallery.cluster_store()
            clusters = UnknownClusters(store, self.sha, self.key, self.scorer, self.model.run,
                                       self._cluster_threshold, settings, self.writes, load=False)
            self.writes.on_idle(clusters.poll)
            clusters.refresh()
            return clusters
        except StorageError as exc:  # recognition of enrolled speakers goes on without them
            if gallery.down and clusters is not None:
                log.warning("unknown-voice clusters are read when the gallery returns: %s", exc)
                return clusters
            log.warning("unknown-voice clusters unavailable: %s", exc)
            if store is not None:
                store.close()
            return None

    def catch_up(self) -> None:
        """A shared gallery came back: what start-up does with it (re-embedding for this model,
        the clusters, those of voices enrolled meanwhile). On the gallery writer's thread."""
        try:
            self.reembed()
        except StorageError as exc:
            log.warning("%s; enrolled speakers are still recognised (from their stored features)", exc)
        if self.clusters is not None:
            self.clusters.refresh()
        self.drop_clusters_of_enrolled()

    @property
    def cluster_settings(self) -> ClusterSettings:
        return self._cluster_settings

    @cluster_settings.setter
    def cluster_settings(self, settings: ClusterSettings) -> None:
        self._cluster_settings = settings
        if self.clusters is not None:
            self.clusters.settings = settings

    def close(self) -> None:
        if self.clusters is not None:
            self.clusters.store.close()

    @property
    def sha(self) -> str:
        return self.model.card.sha256

    def reembed(self) -> int:
        """Embed every stored enrollment that has no embedding for the current model."""
        assert self.gallery is not None
        todo = self.gallery.missing_embeddings(self.sha, self.key)
        if todo:
            log.info("speaker model changed: re-embedding %d enrollments", len(todo))
            self.gallery.store_embeddings(self.sha, [(eid, self.model.run(f)) for eid, f in todo])
        stale = self.gallery.stale_enrollments(self.key)
        if stale:
            log.warning("%d enrollments were made with other speaker features and are not used", stale)
        return len(todo)

    def enrolled(self) -> Enrolled:
        with self._enrolled_lock:
            if self.gallery is not None and self.gallery.changed():
                self._enrolled = Enrolled.build(self._enrolled_voices(), self.scorer)
            return self._enrolled

    def voice_of(self, features: list[np.ndarray]) -> np.ndarray:
        """The embedding of several utterances' speech joined, as an enrolled voice is formed."""
        return self.model.run(joined_features(features))

    def _enrolled_voices(self) -> dict[str, np.ndarray]:
        """Each enrolled speaker's voice, {name: (1, dim)}; recomputed only for speakers whose
        enrollments changed."""
        assert self.gallery is not None
        voices = {}
        for name, ids in self.gallery.enrollment_ids(self.key).items():
            known = self._voices.get(name)
            if known is None or known[0] != ids:
                known = (ids, self.voice_of(self.gallery.enrollment_features(ids)))
            voices[name] = known
        self._voices = voices
        return {name: voice[None] for name, (_, voice) in voices.items()}

    @property
    def threshold(self) -> float:
        return self.threshold_for(len(self.enrolled().names))

    def threshold_for(self, enrolled: int, far: float | None = None, seconds=None):
        """The score threshold with ``enrolled`` speakers to compare with, for an utterance of
        ``seconds`` (as the model saw it; a number or an array) when given."""
        return self.threshold_in(self.calibration, enrolled, far, seconds)

    def threshold_in(self, table: Calibration | None, compared: int, far: float | None = None, seconds=None):
        """The threshold ``table`` gives with ``compared`` speakers (or clusters) to compare with."""
        if table is None:
            return self.cosine_threshold
        # A stranger is compared with every enrolled speaker: split the allowed rate among them.
        return table.threshold_for((self.far if far is None else far) / max(1, compared), seconds)

    def seconds_of(self, feats: np.ndarray) -> float:
        """How long an utterance is, as the speaker model sees it (its feature frames)."""
        return len(feats) * self.model.params.winstep

    def windows_in(self, seconds: float | None) -> int:
        """How many windows the speaker model runs on an utterance of ``seconds`` (of unknown
        length: as many as the shortest utterance the calibration's phrase table serves)."""
        window = self.model.card.window
        if window is None:
            return 1
        if seconds is None:
            seconds = self.calibration.long_seconds if self.calibration is not None else 0.0
        return len(window_starts(int(round(seconds / self.model.params.winstep)), *window))

    def _cluster_threshold(self, clusters: int) -> float:
        return self.threshold_in(self.cluster_calibration, clusters, self._cluster_settings.far)

    def _against_enrolled(self, embedding: np.ndarray, seconds: float | None) -> Decision:
        enrolled = self.enrolled()  # one look at the gallery per decision
        threshold = self.threshold_for(len(enrolled.names), seconds=seconds)
        return decide(embedding, enrolled, self.scorer, threshold, windows=self.windows_in(seconds))

    def verify(self, name: str, embedding: np.ndarray, seconds: float | None) -> tuple[float | None, bool]:
        """Whether an utterance is the claimed speaker's: its score against that one voice, and
        whether it reaches the threshold at ``verify_far`` (one speaker compared, this length).
        (None, False) when nobody of that name is enrolled."""
        enrolled = self.enrolled()
        if name not in enrolled.names:
            return None, False
        e = l2_normalize(embedding)
        raw = enrolled.centroids @ e
        scores = self.scorer.score(raw, self.scorer.stats(e)[0], enrolled.stats, self.windows_in(seconds))
        score = float(scores[enrolled.names.index(name)])
        return score, score >= self.threshold_for(1, self.verify_far, seconds)

    def is_enrolled(self, name: str) -> bool:
        return name in self.enrolled().names

    def decide(self, embedding: np.ndarray, seconds: float | None = None) -> Decision:
        """The decision so far (partial utterances) on ``seconds`` of speech: no cluster is changed."""
        who = self._against_enrolled(embedding, seconds)
        if who.speaker != UNKNOWN or not self._clustering():
            return who
        cid = self.clusters.match(embedding)
        return who if cid is None else replace(who, cluster=label_of(cid))

    def identify(self, embedding: np.ndarray, utt: Utterance) -> Decision:
        """The final decision on an utterance; an unknown voice joins (or starts) a cluster."""
        who = self._against_enrolled(embedding, self.seconds_of(utt.features))
        if who.speaker != UNKNOWN or not self._clustering():
            return who
        try:
            return replace(who, cluster=self.clusters.observe(embedding, utt))
        except StorageError as exc:  # a full or read-only disk: recognition goes on
            log.warning("could not store an unknown voice: %s", exc)
            return who

    def drop_clusters_of_enrolled(self, names: list[str] | None = None) -> list[str]:
        """Drop the unknown-voice clusters of enrolled voices (``names``, or everyone's): a
        voice with a name never keeps a cluster label. Returns the labels dropped."""
        if self.clusters is None:
            return []
        self.enrolled()
        found = {cid for name, (_, voice) in self._voices.items() if names is None or name in names
                 for cid in self.clusters.of_voice(voice)}
        for cid in sorted(found):  # from memory now; a store that fails logs it, recognition goes on
            self.clusters.remove(label_of(cid))
        if found:
            log.info("unknown-voice clusters of enrolled voices dropped: %s", ", ".join(label_of(c) for c in sorted(found)))
        return [label_of(c) for c in sorted(found)]

    def reload_clusters(self) -> None:
        """Re-read the clusters (another process may have changed them and the gallery): at
        once, or on the writer's thread for a shared gallery."""
        if self.clusters is not None:
            self.writes.submit(Write("read the clusters", self._reread_clusters))

    def _reread_clusters(self) -> None:
        self.clusters.refresh()
        self.drop_clusters_of_enrolled()

    def _clustering(self) -> bool:
        return self.clusters is not None and self._cluster_settings.enabled

    def promote(self, label: str, name: str, who: str = "local") -> dict:
        """Enroll ``name`` from the utterances a cluster of unknown voice has gathered."""
        if self.clusters is None:
            raise GalleryError(self.unavailable())
        utts, vectors = self.clusters.members(label)
        result = self.enroll(name, utts, f"cluster:{label}", vectors, who=who)
        try:
            self.clusters.remove(label)
        except StorageError as exc:  # the enrollment is stored: the cluster stays, harmless
            log.warning("promoted %s to %r but could not delete the cluster: %s", label, name, exc)
        return {**result, "promoted": label}

    def remove(self, name: str, who: str = "local") -> dict:
        """Forget a speaker entirely: the enrollments and embeddings, the clusters their voice
        formed while it was unknown (else the same voice would be labelled by its old
        cluster again), then the old pages in the write-ahead log. Raises GalleryError."""
        if self.gallery is None:
            raise GalleryError(self.unavailable())
        self.gallery.check_writable(f"remove {name!r}")
        self.enrolled()
        known = self._voices.get(name)
        features = tuple(self.gallery.feature_blobs(name))
        ids = tuple(self.clusters.of_voice(known[1])) if known is not None and self.clusters is not None else ()
        # One transaction: the speaker, the utterances of theirs kept in clusters while they
        # were unknown (enroll_recent of utterances that had formed a cluster), and the
        # clusters of the same voice (else it would be labelled by its old cluster again).
        gone = self.gallery.remove_speaker(name, who, ids, features)
        if gone is None:
            raise GalleryError(f"no enrolled speaker named {name!r}")
        self.enrolled()
        if self.clusters is not None:
            self.clusters.discard(gone)  # deleted: not given to anyone from now on
            self.clusters.reload()  # and those that lost utterances of theirs
        dropped = [label_of(cid) for cid in gone]
        erased = self.gallery.erase()  # done by remove_speaker; again: the answer says whether it could
        if dropped:
            # No name in the log: the journal outlives the removal.
            log.info("removed a speaker with the unknown-voice clusters of the same voice: %s", ", ".join(dropped))
        return {"removed": name, "clusters": dropped, "erased": erased}

    def export(self, name: str) -> dict:
        """What is stored about a speaker (Gallery.export), with the unknown-voice clusters
        their voice matches: what a removal would drop with them."""
        if self.gallery is None:
            raise GalleryError(self.unavailable())
        out = self.gallery.export(name)
        self.enrolled()
        known = self._voices.get(name)
        out["clusters"] = []
        if known is not None and self.clusters is not None:
            self.writes.flush(FLUSH_S)
            for cid in self.clusters.of_voice(known[1]):
                out["clusters"].append(self.clusters.store.export(cid, label_of(cid)))
        return out

    def unavailable(self) -> str:
        """Why enrollment and cluster commands cannot be served."""
        if self.gallery is not None and self.gallery.readonly:
            return f"the gallery is read-only: {self.gallery.readonly}"
        if self.gallery is not None and self.gallery.down:
            return f"gallery unavailable: {self.gallery.down}"
        if self.gallery is not None:
            return "unknown-voice clusters are not available (see the daemon's log)"
        return "the gallery is not available (state directory unusable)"

    def enroll(self, name: str, utterances: list[Utterance], source: str,
               vectors: np.ndarray | None = None, who: str = "local") -> dict:
        """Check the quality gates, then store; returns a summary. Raises GalleryError."""
        name = validate_name(name)
        if self.gallery is None:
            raise GalleryError(self.unavailable())
        self.gallery.check_writable(f"enroll {name!r}")  # refused before any work when read-only
        if vectors is None:
            vectors = np.stack([self.model.run(u.features) for u in utterances]) if utterances else np.zeros((0, 0))
        self._check(name, utterances, vectors)
        self.gallery.add_enrollments(name, utterances, vectors, self.sha, self.key, source, who)
        self.enrolled()  # the new voice worked out here, not during the next utterance
        self.drop_clusters_of_enrolled([name])
        seconds = sum(u.seconds for u in utterances)
        return {"name": name, "utterances": len(utterances), "seconds": round(seconds, 2)}

    def _check(self, name: str, utts: list[Utterance], vectors: np.ndarray) -> None:
        g = self.gates
        seconds = sum(u.seconds for u in utts)
        if seconds < g.min_seconds:
            raise GalleryError(f"too little speech to enroll {name!r}: {seconds:.1f} s, {g.min_seconds:.1f} s needed")
        clipped = max(u.clipped for u in utts)
        if clipped > g.max_clipped:
            raise GalleryError(f"enrollment audio is clipped ({clipped:.1%} of samples at full scale)")
        level = max(u.rms_dbfs for u in utts)
        if level < g.min_rms_dbfs:
            raise GalleryError(f"enrollment audio is too quiet ({level:.0f} dBFS, at least {g.min_rms_dbfs:.0f} needed)")
        self._check_one_voice(name, utts, vectors)
        self._check_not_enrolled(name, utts)

    def _check_one_voice(self, name: str, utts: list[Utterance], vectors: np.ndarray) -> None:
        """Refuse two voices: with the card's fitted gate (streamd.identity.voice_count), over the
        speaker's stored enrollments and the new ones, else the mean cosine between the new
        enrollment's utterances."""
        gate = self._two_voice_gate()
        if gate is not None:
            ids = self.gallery.enrollment_ids(self.key).get(name, ()) if self.gallery is not None else ()
            stored = self.gallery.enrollment_features(ids) if ids else []
            split = split_score(window_embeddings(self.model, [*stored, *(u.features for u in utts)]), gate[1])
            if split is not None and split.score < gate[0].threshold:
                raise GalleryError(f"two voices were heard in the enrollment audio (the voice changes after "
                                   f"{split.windows[0]} of {sum(split.windows)} windows of 1.6 s: score "
                                   f"{split.score:.2f}, one voice scores at least {gate[0].threshold:.2f}): "
                                   "enroll one person at a time")
            return
        e = l2_normalize(vectors)
        if len(e) > 1:
            sims = (e @ e.T)[np.triu_indices(len(e), k=1)]
            if float(np.mean(sims)) < self.gates.min_consistency:
                raise GalleryError(f"two voices were heard, or noise: the enrollment clips disagree with each "
                                   f"other (mean similarity {np.mean(sims):.2f}, at least "
                                   f"{self.gates.min_consistency:.2f} needed)")

    def _two_voice_gate(self) -> tuple[TwoVoiceGate, Scorer] | None:
        """The card's two-voice gate and the fused scorer it was fitted with, when it has both."""
        spec = self.model.card.data.get("enroll_gate")
        if not spec or self._fusion is None or not self.scorer.normalised:
            return None
        if self._gate is None:
            self._gate = (TwoVoiceGate.from_card(spec), Scorer(self.scorer.cohort, fusion=self._fusion[0]))
        return self._gate

    def _check_not_enrolled(self, name: str, utts: list[Utterance]) -> None:
        """Refuse a voice already enrolled under another name: identified as that speaker by
        the daemon's own decision, or closer than ``duplicate_score`` in cosine."""
        enrolled = self.enrolled()
        if not enrolled.names:
            return
        feats = [u.features for u in utts]
        voice = self.voice_of(feats)
        who = self._against_enrolled(voice, self.seconds_of(joined_features(feats)))
        if who.speaker not in (UNKNOWN, name):
            raise GalleryError(f"this voice is already enrolled as {who.speaker!r} (identified with score "
                               f"{who.score:.2f}): add to {who.speaker!r} or remove it first")
        scores = enrolled.centroids @ l2_normalize(voice)
        for i in np.argsort(-scores):
            other = enrolled.names[i]
            if other != name and scores[i] >= self.gates.duplicate_score:
                raise GalleryError(f"this voice is already enrolled as {other!r} "
                                   f"(cosine {scores[i]:.2f}): add to {other!r} or remove it first")
