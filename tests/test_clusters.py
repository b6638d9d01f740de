"""Recurring unknown voices: online clusters in a real SQLite file, scored with the real
speaker model on real recordings of speakers nobody enrolled; promotion to a named speaker."""

import sqlite3
from dataclasses import replace

import numpy as np
import pytest

from streamd.identity.cluster_store import ClusterStore
from streamd.identity.clusters import ClusterSettings, UnknownClusters, parse_label
from streamd.config import Config
from streamd.identity.enrollment import file_utterances
from streamd.identity.gallery import Gallery, GalleryError
from streamd.models.inference import load_model
from streamd.identity.scoring import Scorer
from streamd.identity.speakers import SpeakerBook, feature_key
from conftest import DATA, ROOT


@pytest.fixture(scope="module")
def model():
    return load_model(replace(Config(), models=replace(Config().models, dir=str(ROOT / "models"))), "speaker", "cpu")


@pytest.fixture(scope="module")
def voices(model):
    """Each visitor's phrases (2-3 s each) as (Utterance, embedding) pairs."""
    cfg = Config()
    out = {}
    for name in ("visitor12", "visitor21"):
        utts = file_utterances(str(DATA / f"{name}.flac"), cfg, model)
        out[name] = [(u, model.run(u.features)) for u in utts]
    assert [len(v) for v in out.values()] == [5, 2]
    return out


def book_on(path, model, **settings):
    return SpeakerBook(Gallery(path), model, cosine_threshold=0.8,
                       cluster_settings=ClusterSettings(**settings))


def test_a_returning_voice_keeps_its_label_across_restarts(tmp_path, model, voices):
    path = tmp_path / "gallery.sqlite3"
    book = book_on(path, model)
    first = [book.identify(e, u) for u, e in voices["visitor12"][:3]]
    other = [book.identify(e, u) for u, e in voices["visitor21"]]
    assert all(d.speaker == "unknown" for d in first + other)
    assert len({d.cluster for d in first}) == 1 and first[0].cluster.startswith("unknown-")
    assert {d.cluster for d in other} == {other[0].cluster} != {first[0].cluster}
    book.close()
    book.gallery.close()

    again = book_on(path, model)  # a restart: everything comes back from the file
    later = [again.identify(e, u) for u, e in voices["visitor12"][3:]]
    assert {d.cluster for d in later} == {first[0].cluster}
    assert again.decide(voices["visitor21"][0][1]).cluster == other[0].cluster  # partials: read-only
    listing = {c["cluster"]: c for c in again.clusters.listing()}
    assert listing[first[0].cluster]["heard"] == 5 and listing[other[0].cluster]["heard"] == 2
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_promote_enrolls_the_cluster_and_the_voice_is_named(tmp_path, model, voices):
    book = book_on(tmp_path / "g.sqlite3", model)
    for u, e in voices["visitor12"][:4]:
        label = book.identify(e, u).cluster
    result = book.promote(label, "Nadia")
    assert result["name"] == "Nadia" and result["utterances"] == 4 and result["promoted"] == label
    assert book.identify(voices["visitor12"][4][1], voices["visitor12"][4][0]).speaker == "Nadia"
    assert label not in {c["cluster"] for c in book.clusters.listing()}
    with pytest.raises(GalleryError, match="no cluster"):
        book.promote(label, "Again")
    fresh = book.identify(voices["visitor21"][0][1], voices["visitor21"][0][0]).cluster
    assert parse_label(fresh) > parse_label(label)  # labels are never reused


def test_promotion_passes_the_enrollment_gates(tmp_path, model, voices):
    book = book_on(tmp_path / "g.sqlite3", model)
    u, e = voices["visitor21"][0]
    label = book.identify(e, u).cluster
    with pytest.raises(GalleryError, match="too little speech"):
        book.promote(label, "Omar")
    with pytest.raises(GalleryError, match="reserved"):
        book.promote(label, "unknown-9")
    with pytest.raises(GalleryError, match="not a cluster label"):
        book.promote("../etc", "Omar")
    assert label in {c["cluster"] for c in book.clusters.listing()}  # refused: nothing lost


def test_clusters_of_one_voice_merge_under_the_oldest_label(tmp_path, model, voices):
    book = book_on(tmp_path / "g.sqlite3", model)
    phrases = voices["visitor12"]
    strict = book.clusters.threshold_for
    book.clusters.threshold_for = lambda n: 1e9  # nothing matches: every phrase starts a cluster
    labels = [book.identify(e, u).cluster for u, e in phrases[:3]]
    assert len(set(labels)) == 3
    book.clusters.threshold_for = strict
    merged = book.identify(phrases[3][1], phrases[3][0]).cluster
    assert merged == labels[0]
    listing = book.clusters.listing()
    assert [c["cluster"] for c in listing] == [labels[0]] and listing[0]["heard"] == 4


def test_short_utterances_do_not_start_clusters_and_the_oldest_is_forgotten(tmp_path, model, voices):
    book = book_on(tmp_path / "g.sqlite3", model, min_seconds=5.0)
    u, e = voices["visitor12"][0]
    assert book.identify(e, u).cluster is None  # under 5 s of speech: no new cluster
    book.cluster_settings = ClusterSettings(max_clusters=1, max_members=2)
    a = book.identify(e, u).cluster
    for u2, e2 in voices["visitor12"][1:]:
        book.identify(e2, u2)
    assert book.clusters.listing()[0]["kept"] == 2  # only the newest utterances are kept
    b = book.identify(voices["visitor21"][0][1], voices["visitor21"][0][0]).cluster
    assert b != a and [c["cluster"] for c in book.clusters.listing()] == [b]
    book.cluster_settings = ClusterSettings(enabled=False)
    assert book.identify(e, u).cluster is None


def test_a_new_speaker_model_re_embeds_the_clusters(tmp_path, model, voices):
    path = tmp_path / "g.sqlite3"
    store = ClusterStore(path)
    clusters = UnknownClusters(store, "old-model", feature_key(model), Scorer(None), model.run,
                               lambda n: 0.0, ClusterSettings())
    u, e = voices["visitor12"][0]
    label = clusters.observe(np.ones_like(e), u)  # stored with the old model's "embedding"
    book = book_on(path, model)  # the current model: members are embedded again from their features
    vectors = book.clusters.store.vectors(book.sha)
    assert list(vectors) == [parse_label(label)]
    np.testing.assert_allclose(vectors[parse_label(label)][0], model.run(u.features), atol=1e-5)
    assert store.db.execute("SELECT COUNT(*) FROM cluster_embeddings WHERE model_sha256 = 'old-model'").fetchone()[0] == 0


def test_utterances_of_other_speaker_features_are_dropped(tmp_path, model, voices):
    path = tmp_path / "g.sqlite3"
    clusters = UnknownClusters(ClusterStore(path), "sha", "other-front-end", Scorer(None), model.run,
                               lambda n: 0.0, ClusterSettings())
    u, e = voices["visitor12"][0]
    clusters.observe(e, u)
    assert book_on(path, model).clusters.listing() == []


def test_single_words_of_a_stranger_start_no_cluster(tmp_path, model):
    """Ten single Arabic digits (0.7-1.1 s as cut) of one unknown voice used to found clusters
    of their own; a word's embedding is too unsure to found a voice."""
    book = book_on(tmp_path / "g.sqlite3", model)
    words = file_utterances(str(DATA / "enroll_asc07.flac"), Config(), model)
    assert len(words) == 10 and max(u.seconds for u in words) < ClusterSettings().min_seconds
    assert [book.identify(model.run(u.features), u).cluster for u in words] == [None] * 10
    assert book.clusters.listing() == []


def test_enrolling_a_voice_drops_its_clusters(tmp_path, model, voices):
    book = book_on(tmp_path / "g.sqlite3", model)
    phrases = voices["visitor12"]
    label = [book.identify(e, u).cluster for u, e in phrases[:3]][-1]
    assert label is not None and len(book.clusters) == 1
    book.enroll("Nadia", [u for u, _ in phrases[3:]], "test")  # other phrases of the same voice
    assert book.clusters.listing() == []
    decision = book.identify(phrases[0][1], phrases[0][0])
    assert decision.speaker == "Nadia" and decision.cluster is None


def test_clusters_of_a_voice_enrolled_meanwhile_are_dropped_at_start_up(tmp_path, model, voices):
    path = tmp_path / "g.sqlite3"
    book = book_on(path, model)
    twelve = [book.identify(e, u).cluster for u, e in voices["visitor12"][:3]][-1]
    other = book.identify(voices["visitor21"][1][1], voices["visitor21"][1][0]).cluster
    assert twelve and other and twelve != other
    book.close()
    book.gallery.close()
    g = Gallery(path)  # enrolled by a streamd of before this rule: the cluster stayed
    utts = [u for u, _ in voices["visitor12"][3:]]
    g.add_enrollments("Nadia", utts, np.stack([e for _, e in voices["visitor12"][3:]]), book.sha, book.key, "test")
    g.close()
    again = book_on(path, model)
    assert [c["cluster"] for c in again.clusters.listing()] == [other]
