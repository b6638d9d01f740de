"""Challenge-response verification (docs/control.md, ``challenge``): a random code for a claimed
speaker on a stream; the next utterance there answers it, once, and passes only when the
digits heard are the code and the voice is the claimed speaker's at ``identity.verify_far``.

A code is never the same twice, so a recording of an earlier answer fails; a live synthesis of
the claimed voice saying the new code is not something this can tell apart."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

MAX_LENGTH = 12
MAX_TTL_S = 600.0


@dataclass
class Challenge:
    id: str
    speaker: str
    digits: str
    expires: float  # Unix time
    deadline: float  # monotonic
    first_utterance: int  # the first utterance that may answer it (one that starts after it was issued)
    answering: int | None = None  # the utterance that answers it (it started before the expiry)


@dataclass(frozen=True)
class Verdict:
    result: str  # pass | fail
    digits_heard: str | None
    digits_ok: bool
    voice_score: float | None
    voice_ok: bool
    reason: str | None


def new_challenge(speaker: str, length: int, ttl_s: float, first_utterance: int) -> Challenge:
    """A code of ``length`` digits from the operating system's secure generator."""
    digits = "".join(secrets.choice("0123456789") for _ in range(length))
    return Challenge(secrets.token_urlsafe(12), speaker, digits, time.time() + ttl_s, time.monotonic() + ttl_s,
                     first_utterance)


def verdict(challenge: Challenge, heard: str | None, heard_reason: str | None, voice_score: float | None,
            voice_ok: bool) -> Verdict:
    """Pass only with the code's digits in the claimed speaker's voice."""
    digits_ok = heard is not None and secrets.compare_digest(heard, challenge.digits)
    reasons = []
    if not digits_ok:
        reasons.append("wrong_digits" if heard is not None else f"no_digits:{heard_reason or 'none'}")
    if not voice_ok:
        reasons.append("voice" if voice_score is not None else "not_enrolled")
    return Verdict("pass" if not reasons else "fail", heard, digits_ok, voice_score, voice_ok,
                   ",".join(reasons) or None)


def expired(challenge: Challenge) -> Verdict:
    return Verdict("fail", None, False, None, False, "expired")
