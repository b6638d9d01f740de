"""Fine-tuning the speaker encoder's top layers (scripts/experiments/speaker_finetune.py, measured
and not shipped; its probe relies on these): the split
encoder is the encoder, the loss rewards separated speakers, and a fine-tune learns from the
given speakers without touching the encoder it started from."""

import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from streamd.train.speaker_encoder import VoiceEncoder  # noqa: E402
from conftest import ROOT  # noqa: E402

sys.path.insert(0, str(ROOT / "scripts" / "experiments"))
import speaker_finetune as ft  # noqa: E402


def encoder() -> VoiceEncoder:
    torch.manual_seed(0)
    return VoiceEncoder().eval()


def test_the_two_parts_compute_what_the_encoder_computes():
    enc = encoder()
    low, rest = ft.split(enc)
    x = torch.randn(3, 40, 40)
    with torch.no_grad():
        assert torch.allclose(rest(low(x)[0]), enc(x), atol=1e-6)
        assert torch.allclose(ft.join(low, rest)(x), enc(x), atol=1e-6)


def test_the_loss_is_lower_when_each_speakers_windows_agree():
    torch.manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(4, 1, 16), dim=2)
    tight = torch.nn.functional.normalize(centres + 0.05 * torch.randn(4, 5, 16), dim=2)
    mixed = tight.reshape(20, 16)[torch.randperm(20)].reshape(4, 5, 16)
    w, b = torch.tensor(10.0), torch.tensor(-5.0)
    assert ft.ge2e_loss(tight, w, b) < 0.5 * ft.ge2e_loss(mixed, w, b)


def test_windows_are_full_and_made_of_one_speakers_clips():
    clips = [np.full((50, 40), k, np.float32) for k in (1.0, 2.0)]
    w = ft.speaker_windows(clips, 5, np.random.default_rng(0))
    assert w.shape == (5, ft.FRAMES, 40) and set(np.unique(w)) <= {1.0, 2.0}


def speakers(n: int = 3, clips: int = 6) -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(1)
    return {f"s{k}": [(rng.standard_normal((60, 40)) * 0.1 + k).astype(np.float32) for _ in range(clips)]
            for k in range(n)}


def test_a_fine_tune_moves_a_copy_and_leaves_the_encoder_as_it_was():
    enc = encoder()
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    x = torch.randn(2, ft.FRAMES, 40)
    tuned = ft.fine_tune(enc, speakers(), steps=5, lr=1e-3, seed=0, log=lambda line: None)
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())
    with torch.no_grad():
        assert not torch.allclose(tuned(x), enc(x), atol=1e-4)
    tuned_sd, enc_sd = tuned.state_dict(), enc.state_dict()
    assert all(torch.equal(tuned_sd[k], enc_sd[k]) for k in enc_sd if k.endswith(("l0", "l1")))  # layers 1-2 frozen


def test_no_steps_no_change():
    enc = encoder()
    x = torch.randn(2, ft.FRAMES, 40)
    with torch.no_grad():
        assert torch.allclose(ft.fine_tune(enc, speakers(), 0, 1e-3, 0, log=lambda line: None)(x), enc(x), atol=1e-6)
