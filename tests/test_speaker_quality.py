"""The speaker decision's quality fusion (streamd.train.speaker_quality): the fit learns which
measures tell targets from impostors, and a pair's cross-fitted scores come from a fusion
that never saw either of its speakers."""

import numpy as np

from streamd.train import speaker_quality as sq


def trials(rng, pairs, n=200):
    """Trials where the cosine separates targets from impostors only once a per-trial offset
    (measure 2) is taken away: a fusion must learn to subtract it."""
    x, same, kind, pair = [], [], [], []
    for p in pairs:
        s = rng.random(n) < 0.5
        offset = rng.normal(0, 1.0, n)
        cos = np.where(s, 1.0, -1.0) + offset + 0.3 * rng.normal(size=n)
        x.append(np.stack([cos, offset, rng.normal(size=n)], axis=1))
        same.append(s)
        kind += list(np.where(rng.random(n) < 0.25, "phrase", "single"))
        pair += [p] * n
    return np.concatenate(x), np.concatenate(same), np.array(kind), np.array(pair)


def test_weights_make_each_kind_and_class_count_the_same():
    same = np.array([True, False, False, False, True, False])
    kind = np.array(["phrase", "phrase", "phrase", "single", "single", "single"])
    w = sq.trial_weights(same, kind)
    for k in ("phrase", "single"):
        for s in (True, False):
            assert np.isclose(w[(kind == k) & (same == s)].sum(), len(w) / 4)


def test_the_fit_learns_to_take_the_offset_away():
    rng = np.random.default_rng(0)
    x, same, kind, _ = trials(rng, ["a|b", "c|d"])
    w, b = sq.fit(x, same, sq.trial_weights(same, kind))
    assert w[0] > 0 and w[1] < -0.5 * w[0] and abs(w[2]) < 0.2 * w[0]
    fused = x @ w + b
    def err(s):
        return np.mean((s > np.median(s)) != same)

    assert err(fused) < 0.5 * err(x[:, 0])  # better than the cosine alone


def test_a_pairs_cross_fitted_scores_come_from_trials_of_other_speakers():
    rng = np.random.default_rng(1)
    pairs = ["a|b", "a|c", "b|c", "c|d", "d|e", "e|f", "a|f"]
    x, same, kind, pair = trials(rng, pairs)
    w = sq.trial_weights(same, kind)
    scores = sq.cross_fitted(x, same, w, pair)
    # Change every trial a pair shares a speaker with: its scores must not move.
    touched = np.isin(pair, ["a|b", "a|c", "b|c", "a|f"])
    flipped = same.copy()
    flipped[touched] = ~flipped[touched]
    again = sq.cross_fitted(x, flipped, w, pair)
    mine = pair == "a|b"
    assert np.allclose(scores[mine], again[mine])
    # ...whereas the trials of the pairs it was fitted on do change "d|e"'s scores.
    assert not np.allclose(scores[pair == "d|e"], again[pair == "d|e"])


def test_the_longest_trial_bounds_the_length_the_fusion_knows():
    x = np.zeros((3, 7))
    x[:, 6] = np.log([1, 4, 5])
    assert sq.longest(x) == 5
