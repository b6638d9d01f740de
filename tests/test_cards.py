"""The one sha256 check (``streamd.models.cards.verified``): model files, the word model and
the speaker model's cohort are refused with the same one-line message when altered."""

import hashlib
import json
from types import SimpleNamespace

import pytest

from streamd import config
from streamd.identity.speakers import load_cohort
from streamd.identity.vocabulary import load_word_model
from streamd.models.cards import ModelCard, ModelError, load_card, sha256_of, verified, verify


def test_a_card_whose_file_has_another_sha256_is_refused_with_one_message(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"the model the card was written for")
    expected = sha256_of(model)
    assert expected == hashlib.sha256(b"the model the card was written for").hexdigest()
    assert verified(model, expected) == model
    cfg = config.load(None, [f'models.dir="{tmp_path}"', 'models.words="m.card.json"'])
    card = {"kind": "words", "file": model.name, "sha256": expected, "input": {}, "output": {},
            "features": cfg.features.params().as_dict()}
    (tmp_path / "m.card.json").write_text(json.dumps(card))

    model.write_bytes(b"another model")
    refusal = f"{model}: sha256 mismatch: expected {expected}, got {hashlib.sha256(b'another model').hexdigest()}"
    for check in (lambda: verified(model, expected),
                  lambda: verify(load_card(tmp_path / "m.card.json", "words"), cfg.features.params()),
                  lambda: load_word_model(cfg)):
        with pytest.raises(ModelError) as exc:
            check()
        assert str(exc.value) == refusal

    model.unlink()
    with pytest.raises(ModelError) as exc:
        load_word_model(cfg)
    assert str(exc.value) == f"{model}: model file missing (expected sha256 {expected})"


def test_the_cohort_goes_through_the_same_check(tmp_path):
    cohort = tmp_path / "cohort.npy"
    cohort.write_bytes(b"\x93NUMPY tampered")
    expected = "0" * 64
    card = ModelCard(tmp_path / "speaker.card.json", {"cohort": {"file": cohort.name, "sha256": expected}})
    with pytest.raises(ModelError) as exc:
        load_cohort(SimpleNamespace(card=card))
    assert str(exc.value) == f"{cohort}: sha256 mismatch: expected {expected}, got {sha256_of(cohort)}"
    cohort.unlink()
    with pytest.raises(ModelError) as exc:
        load_cohort(SimpleNamespace(card=card))
    assert str(exc.value) == f"{cohort}: cohort file missing (expected sha256 {expected})"
