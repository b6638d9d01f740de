"""Templates and the match (streamd.models.words): pure, on vectors and real audio features."""

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from streamd.signal.features import FILTERS, FRAMES, WINDOW, centred, word_input
from streamd.models.words import MatchRule, TemplateIndex

DATA = Path(__file__).parent / "data"


def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v)).astype(np.float32)


def near(base: np.ndarray, cos: float, rng: np.random.Generator) -> np.ndarray:
    """A unit vector at cosine ``cos`` from unit ``base``."""
    other = rng.standard_normal(base.shape)
    other = unit(other - (other @ base) * base)
    return unit(cos * base + np.sqrt(1 - cos**2) * other)


@pytest.fixture
def digits():
    rng = np.random.default_rng(0)
    centres = [unit(rng.standard_normal(64)) for _ in range(10)]
    templates = [("az", d, near(centres[d], 0.9, rng)) for d in range(10) for _ in range(5)]
    return centres, TemplateIndex(templates), rng


def test_a_word_near_one_digits_templates_is_named_with_its_vocabulary(digits):
    centres, index, rng = digits
    m = index.match(near(centres[4], 0.95, rng), MatchRule(0.7, 0.05))
    assert m is not None and (m.vocabulary, m.digit) == ("az", 4)
    assert m.score > 0.7 and m.margin > 0.05
    assert m.candidates[0] == {"vocabulary": "az", "digit": 4, "score": pytest.approx(m.score, abs=1e-4)}


def test_a_word_far_from_every_template_is_not_named(digits):
    _, index, rng = digits
    assert index.match(unit(rng.standard_normal(64)), MatchRule(0.7, 0.05)) is None


def test_a_word_between_two_digits_is_not_named():
    rng = np.random.default_rng(1)
    a = unit(rng.standard_normal(64))
    b = near(a, 0.95, rng)  # two digits whose templates nearly coincide
    index = TemplateIndex([("az", 1, a), ("az", 2, b)])
    probe = unit(a + b)
    assert index.match(probe, MatchRule(0.7, 0.0)) is not None
    assert index.match(probe, MatchRule(0.7, 0.05)) is None  # too close to call


def test_the_same_digit_in_two_vocabularies_is_no_rival():
    rng = np.random.default_rng(2)
    a = unit(rng.standard_normal(64))
    index = TemplateIndex([("az", 3, a), ("tr", 3, near(a, 0.99, rng)), ("az", 5, unit(rng.standard_normal(64)))])
    m = index.match(near(a, 0.97, rng), MatchRule(0.7, 0.05))
    assert m is not None and m.digit == 3 and m.margin > 0.5


def test_an_empty_index_names_nothing():
    assert TemplateIndex([]).match(unit(np.ones(8)), MatchRule()) is None


def test_the_word_input_is_the_centred_window_of_any_utterance():
    audio, rate = sf.read(DATA / "word.flac", dtype="int16")
    assert rate == 16000
    x = word_input(audio)
    assert x.shape == (1, FRAMES, FILTERS) and x.dtype == np.float32
    long = np.concatenate([np.zeros(WINDOW, np.int16), audio, np.zeros(WINDOW, np.int16)])
    assert len(centred(long)) == WINDOW
    assert np.array_equal(word_input(centred(long)), word_input(long))  # what the daemon keeps is enough
    assert np.array_equal(word_input(centred(audio)), x)


def test_many_utterances_at_once_are_named_as_one_at_a_time(digits):
    from streamd.offline.eval_words import named

    centres, index, rng = digits
    probes = np.stack([near(centres[d % 10], c, rng) for d, c in enumerate(np.linspace(0.5, 0.99, 60))])
    rule = MatchRule(0.7, 0.03)
    one_by_one = [m.digit if (m := index.match(v, rule)) else -1 for v in probes]
    assert list(named(index, probes, rule)) == one_by_one
    assert 0 < sum(d >= 0 for d in one_by_one) < len(probes)  # both outcomes occur


def test_the_word_window_is_a_digit_front_end_computed_from_the_utterance_not_a_ring():
    from streamd.config import Config
    from streamd.signal.features import FeatureParams, mel_params, word_window_params, features_of_audio
    from streamd.models.cards import front_end

    audio, _ = sf.read(DATA / "word.flac", dtype="int16")
    params = word_window_params()
    assert front_end(Config(), "wordwin") == params
    assert not params.streamed and FeatureParams().streamed and mel_params().streamed
    got = features_of_audio(audio, params)
    assert got.shape == (FRAMES, FILTERS) and got.dtype == np.float32
    np.testing.assert_array_equal(got, word_input(audio)[0])  # what the word model reads for templates
