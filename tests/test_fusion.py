"""Digit models of two families (trained with one or more seeds), one decision: the late-fusion layer, its card, and config's choice."""

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest

from streamd.config import Config
from streamd.models.digits import Fusion, cascaded, log_softmax
from streamd.models.cards import ModelError
from streamd.models.digits import digit_plan
from streamd.models.inference import load_digits
from streamd.train import data
from streamd.train.fusion import Options, fit, member_cards, shift_non_digit
from streamd.train.scoring import operating_points, softmax
from conftest import MODELS
from helpers import utterance_features

FUSION = json.loads((MODELS / "digits.fusion.json").read_text())


def cfg_with(model="auto", models_dir=MODELS, fusion="digits.fusion.json"):
    cfg = Config()
    return replace(cfg, models=replace(cfg.models, dir=str(models_dir), digits_fusion=fusion),
                   digits=replace(cfg.digits, model=model))


def test_fused_logits_are_the_weighted_sum_of_log_probabilities_plus_bias():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(11), rng.standard_normal(11)
    bias = tuple(rng.standard_normal(11))
    got = Fusion((0.5, 2.0), bias)([a, b])
    np.testing.assert_allclose(got, 0.5 * log_softmax(a) + 2.0 * log_softmax(b) + np.array(bias))
    with pytest.raises(ValueError, match="2 models given 1"):
        Fusion((0.5, 2.0), bias)([a])


def test_the_non_digit_bias_moves_to_name_more_digits_within_the_false_accept_budget():
    rng = np.random.default_rng(2)
    labels = np.concatenate((rng.integers(0, 10, 600), np.full(600, 10)))
    z = rng.standard_normal((1200, 11))
    z[np.arange(1200), labels] += 4.0
    z[:600, 10] += 3.5  # many digits look like "not a digit" to this model
    fusion = Fusion((1.0,), tuple([0.0] * 11))

    def at_budget(f):
        points = operating_points(softmax(f([z])), labels, tuple(np.round(np.arange(0, 1, 0.01), 2)))
        return next(p for p in points if p["non_digit_accepted"] <= 0.02)

    shifted, shift = shift_non_digit(fusion, [z], labels, 0.02)
    assert shift < 0 and shifted.bias[10] == pytest.approx(shift) and shifted.bias[:10] == fusion.bias[:10]
    before, after = at_budget(fusion), at_budget(shifted)
    assert after["digit_correct"] > before["digit_correct"] + 0.05
    assert after["non_digit_accepted"] <= 0.02


def test_fit_leans_on_the_family_that_knows_and_beats_each_alone():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 11, size=2000)
    onehot = np.eye(11)[labels]
    good = 2.0 * onehot + rng.standard_normal((2000, 11))  # informative, noisy
    other = 1.0 * onehot + rng.standard_normal((2000, 11))  # less informative, independent noise
    noise = rng.standard_normal((2000, 11))
    fusion = fit([good, other, noise], labels)
    assert fusion.weights[0] > fusion.weights[1] > fusion.weights[2]
    assert fusion.weights[2] < 0.2 * fusion.weights[0]

    def nll(z):
        return -np.mean(log_softmax(z)[np.arange(len(labels)), labels])

    fused = fusion([good, other, noise])
    assert nll(fused) < min(nll(good), nll(other))
    assert np.mean(fused.argmax(1) == labels) > np.mean(good.argmax(1) == labels)


def test_models_trained_with_other_seeds_are_fused_under_their_own_names(tmp_path):
    cards = member_cards(Options(tmp_path, tmp_path, seeds=(0, 1)))
    assert {name: path.name for name, path in cards.items()} == {
        "cnn": "digits.onnx", "rnn": "digits-rnn.onnx", "cnn-s1": "digits-s1.onnx", "rnn-s1": "digits-rnn-s1.onnx"}


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_no_seed_trains_on_a_validation_voice(seed):
    """The fusion is fitted on the validation voices; a model that heard one of them (even at
    another speed or pitch) would get more than its share of the weight."""
    validation = {(v.voice, v.variant) for v in data.validation_voices()}
    training = data.digit_training_voices(seed)
    assert len(training) == data.SYNTH_TRAIN_VOICES == len({v.name for v in training})
    assert not validation & {(v.voice, v.variant) for v in training}
    drawn = data.synth_voices(data.SYNTH_TRAIN_VOICES, seed)
    assert (training == drawn) == (not validation & {(v.voice, v.variant) for v in drawn})
    if seed == 0:  # the shipped models' voices are unchanged
        assert training == drawn


def test_the_shipped_fusion_card_names_the_shipped_models_and_its_choice():
    names = [m["name"] for m in FUSION["members"]]
    seeds = sorted({0} | {int(n.split("-s")[1]) for n in names if "-s" in n})
    extra = tuple(n for n in names if n.partition("-s")[0] not in ("cnn", "rnn"))
    assert extra == ("ge2e", "words")  # the families on pretrained encoders, fused by `--with ge2e words`
    assert names == list(member_cards(Options(MODELS, MODELS, tuple(seeds), extra=extra)))  # both MFCC families, each seed
    assert all((MODELS / m["card"]).exists() for m in FUSION["members"])
    assert len(FUSION["weights"]) == len(names) and len(FUSION["bias"]) == 11
    assert FUSION["choice"] in (*names, "fused")
    best = max(FUSION["decisions"], key=lambda n: FUSION["decisions"][n]["validation"]["digit_correct"])
    assert FUSION["choice"] == best  # "auto" takes what was best on the validation speakers
    for name in (*names, "fused"):
        assert 0 <= FUSION["min_confidence"][name] < 1
        assert FUSION["decisions"][name]["validation"]["non_digit_accepted"] <= 0.02
        v = FUSION["decisions"][name]["validation"]
        # the real speakers' and the synthetic voices' shares bracket the pooled one
        assert min(v["asc_digits_right"], v["synth_digits_right"]) <= v["digit_correct"] \
            <= max(v["asc_digits_right"], v["synth_digits_right"])


@pytest.mark.parametrize("choice", ["auto", "fused", "cnn", "rnn", "cnn-s1", "rnn-s1", "ge2e", "words"])
def test_config_chooses_the_decision_and_each_runs_on_the_daemons_features(choice):
    digits = load_digits(cfg_with(choice), "cpu")
    expected = FUSION["choice"] if choice == "auto" else choice
    assert digits.choice == expected
    assert list(digits.members) == ([m["name"] for m in FUSION["members"]] if expected == "fused" else [expected])
    assert digits.min_confidence(-1.0) == FUSION["min_confidence"][expected]
    assert digits.min_confidence(0.3) == 0.3  # an explicit setting wins
    every = load_digits(cfg_with("fused"), "cpu")
    for feats in utterance_features(every)[:4]:
        outputs = [m.run(feats[m.params]) for m in every.members.values()]
        want = every.combine(outputs) if expected == "fused" else outputs[list(every.members).index(expected)]
        np.testing.assert_allclose(digits.run(feats), want, rtol=1e-6, atol=1e-6)


def test_the_lighter_fusion_card_runs_the_seed_0_pair_alone():
    full = load_digits(cfg_with("fused"), "cpu")
    pair = load_digits(cfg_with("fused", fusion="digits.fusion-pair.json"), "cpu")
    assert list(pair.members) == ["cnn", "rnn"] and len(full.members) > 2
    for feats in utterance_features(full)[:3]:
        outputs = [m.run(feats[m.params]) for m in pair.members.values()]
        np.testing.assert_allclose(pair.run(feats), pair.fusion(outputs), rtol=1e-6, atol=1e-6)
        assert not np.allclose(pair.run(feats), full.run(feats))


def cfg_no_cascade(**kw):
    cfg = cfg_with(**kw)
    return replace(cfg, digits=replace(cfg.digits, cascade=False))


def test_the_cascade_runs_each_costly_member_only_where_the_stages_before_it_are_unsure():
    cascaded_models = load_digits(cfg_with("fused"), "cpu")
    full = load_digits(cfg_no_cascade(model="fused"), "cpu")
    assert len(cascaded_models.cascade) == 2 and full.cascade == ()
    card = FUSION["cascade"]
    assert card["then"] == ["ge2e", "words"] and card["validation"]["decisions_differing"] == 0
    names = list(cascaded_models.members)
    assert [[names[k] for k in st.first] for st in cascaded_models.cascade] == [
        ["cnn", "rnn", "cnn-s1", "rnn-s1"], ["cnn", "rnn", "cnn-s1", "rnn-s1", "ge2e"]]
    ran = {"ge2e": [], "words": []}
    for name, rows in ran.items():
        member = cascaded_models.members[name]
        member.infer = (lambda infer, rows: lambda batch: rows.append(len(batch)) or infer(batch))(member.infer, rows)
    feats = utterance_features(cascaded_models) + utterance_features(cascaded_models, "visitor12.flac")
    got = cascaded_models.run_many(feats, 7)
    settled = [0, 0]
    for f, z in zip(feats, got):
        outputs = [m.run(f[m.params]) for m in full.members.values()]
        np.testing.assert_allclose(z, cascaded(cascaded_models.cascade, outputs, full.fusion), atol=1e-6)
        stage = next((k for k, st in enumerate(cascaded_models.cascade)
                      if st.settles([outputs[i] for i in st.first]) is not None), None)
        if stage is not None:
            settled[stage] += 1
        # where a stage settles, its members name what all six would (the gates' promise)
        assert np.argmax(z) == np.argmax(full.run(f)) or stage is None
    assert sum(ran["ge2e"]) == len(feats) - settled[0]  # once per utterance the MFCC models leave open
    assert sum(ran["words"]) == len(feats) - sum(settled)  # once per utterance both stages leave open
    assert 0 < settled[0] < len(feats)


@pytest.mark.parametrize("damage", [
    lambda c: c["cascade"]["stages"][0].update(members=["cnn", "nope"]),
    lambda c: c["cascade"]["stages"][1].update(gate=1.5),
    lambda c: c["cascade"]["stages"][0].pop("weights"),
    lambda c: c["cascade"].pop("stages"),
])
def test_a_broken_cascade_entry_is_refused_in_one_line(tmp_path, damage):
    models = tmp_path / "models"
    shutil.copytree(MODELS, models)
    card = json.loads((models / "digits.fusion.json").read_text())
    damage(card)
    (models / "digits.fusion.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="cascade") as err:
        digit_plan(cfg_with("fused", models))
    assert "\n" not in str(err.value)
    assert digit_plan(cfg_no_cascade(model="fused", models_dir=models)).cascade == ()  # switched off: not read


def test_the_mfcc_fusion_card_leaves_the_pretrained_encoder_out_for_machines_short_of_cpu():
    mfcc = load_digits(cfg_with("fused", fusion="digits.fusion-mfcc.json"), "cpu")
    assert list(mfcc.members) == ["cnn", "rnn", "cnn-s1", "rnn-s1"]
    assert [p.kind for p in mfcc.front_ends] == ["mfcc"]  # no mel features computed for digits
    card = json.loads((MODELS / "digits.fusion-mfcc.json").read_text())
    assert card["decisions"]["fused"]["validation"]["non_digit_accepted"] <= 0.02


def test_a_model_the_fusion_card_does_not_list_is_refused_by_name():
    with pytest.raises(ModelError, match=r"digits.model = 'kd': .*digits.fusion.json offers cnn, rnn, cnn-s1, rnn-s1, ge2e, words and fused"):
        digit_plan(cfg_with("kd"))


def test_without_a_fusion_card_the_single_model_is_used(tmp_path):
    digits = load_digits(cfg_with("auto", fusion="absent.json"), "cpu")
    assert list(digits.members) == ["cnn"] and digits.fusion is None and digits.choice == "single"
    with pytest.raises(ModelError, match="digits.model = 'fused' needs a fusion card"):
        load_digits(cfg_with("fused", fusion=""), "cpu")


@pytest.mark.parametrize("damage, message", [
    (lambda card: card["members"][1].update(sha256="0" * 64), "run `streamd train fusion`"),
    (lambda card: card.pop("bias"), "fusion card lacks 'bias'"),
    (lambda card: card.update(weights=[1.0]), "one weight per member"),
    (lambda card: card.update(bias=[0.0] * 10), "10 biases for models with \\[11\\] classes"),
    (lambda card: card["members"][1].update(card="gone.card.json"), "gone.card.json: cannot read model card"),
])
def test_a_stale_or_broken_fusion_card_is_refused_in_one_line(tmp_path, damage, message):
    models = tmp_path / "models"
    shutil.copytree(MODELS, models)
    card = json.loads((models / "digits.fusion.json").read_text())
    damage(card)
    (models / "digits.fusion.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match=message) as err:
        digit_plan(cfg_with("auto", models))
    assert "\n" not in str(err.value)


def test_the_word_window_is_computed_only_for_the_utterances_that_reach_the_word_model():
    models = load_digits(cfg_with("fused"), "cpu")
    window = next(p for p in models.front_ends if not p.streamed)
    feats = utterance_features(models) + utterance_features(models, "visitor12.flac")
    calls = []
    lazy = [{**f, window: (lambda w: lambda: calls.append(1) or w)(f[window])} for f in feats]
    np.testing.assert_allclose(np.stack(models.run_many(lazy, 7)), np.stack(models.run_many(feats, 7)), atol=1e-6)
    ran = []
    words = models.members["words"]
    words.infer = (lambda infer: lambda batch: ran.append(len(batch)) or infer(batch))(words.infer)
    calls.clear()
    models.run_many(lazy, 7)
    assert 0 < len(calls) == sum(ran) < len(feats)  # one window per utterance the word model saw, no more
