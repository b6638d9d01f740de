"""The speaker decision's quality fusion (streamd.identity.scoring.QualityFusion), fitted on the
calibration's own trials: training speakers only, every pair left out in turn.

A logistic regression over the trials' quality measures (AS-norm score, cosine, each side's
cohort statistics, length), target against impostor trials weighted equally, and single words
against phrases weighted equally. Its thresholds come from *cross-fitted* scores: each pair's
trials are scored by a fusion fitted without either speaker, so the false-accept rates the
daemon is promised are measured on voices the fusion never saw.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize

from streamd.identity.scoring import LOG_WINDOWS, QUALITY_MEASURES

L2 = 1e-3  # on standardised measures


def longest(x: np.ndarray) -> int:
    """The most windows of any trial's utterance (the range the length weight is fitted on)."""
    return int(round(float(np.exp(x[:, LOG_WINDOWS].max()))))


def trial_weights(same: np.ndarray, kind: np.ndarray) -> np.ndarray:
    """Weights making targets and impostors, and each kind of probe, count the same in total."""
    w = np.ones(len(same))
    for k in np.unique(kind):
        for s in (False, True):
            part = (kind == k) & (same == s)
            if part.any():
                w[part] = 1.0 / part.sum()
    return w * len(w) / w.sum()


def fit(x: np.ndarray, same: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, float]:
    """Weights (in the measures' own units) and bias of the weighted logistic regression."""
    mu, sd = x.mean(axis=0), x.std(axis=0) + 1e-9
    z = (x - mu) / sd
    y = same.astype(np.float64)

    def loss(w: np.ndarray) -> tuple[float, np.ndarray]:
        logit = z @ w[1:] + w[0]
        p = 1.0 / (1.0 + np.exp(-np.clip(logit, -30, 30)))
        nll = -np.mean(weight * (y * np.log(p + 1e-12) + (1 - y) * np.log(1 - p + 1e-12)))
        r = weight * (p - y) / len(y)
        return nll + L2 * float(w[1:] @ w[1:]), np.concatenate([[r.sum()], z.T @ r + 2 * L2 * w[1:]])

    w = minimize(loss, np.zeros(x.shape[1] + 1), jac=True, method="L-BFGS-B").x
    return w[1:] / sd, float(w[0] - (w[1:] * mu / sd).sum())


def cross_fitted(x: np.ndarray, same: np.ndarray, weight: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Each trial's fused score from a fusion fitted on the trials of the pairs that share no
    speaker with its own pair (``pairs``: "a|b" per trial)."""
    out = np.empty(len(x))
    names = {p: set(p.split("|")) for p in np.unique(pairs)}
    for pair, speakers in names.items():
        others = [q for q, s in names.items() if not s & speakers]
        keep = np.isin(pairs, others)
        w, b = fit(x[keep], same[keep], weight[keep])
        mine = pairs == pair
        out[mine] = x[mine] @ w + b
    return out


def card_entry(w: np.ndarray, b: float, max_windows: int) -> dict:
    return {"measures": list(QUALITY_MEASURES), "weights": [round(float(v), 6) for v in w], "bias": round(b, 6),
            "max_windows": max_windows,
            "rule": "score = bias + sum(weights * measures) (streamd.identity.scoring.QualityFusion), log_windows "
                    "being the log of the number of 1.6 s windows the utterance filled, at most "
                    "`max_windows` (the longest trials it was fitted on; longer utterances are scored as that long)",
            "fit": "a logistic regression (L2 1e-3 on standardised measures) on the calibration's trials, targets "
                   "and impostors weighted equally, single words and phrases weighted equally "
                   "(streamd.train.speaker_quality)",
            "thresholds_from": "cross-fitted scores: each pair's trials scored by a fusion fitted on the pairs "
                               "sharing no speaker with it"}
