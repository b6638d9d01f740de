"""streamd.train.speaker_compare (no torch): segments, pair EER and CPU cost of a speaker model
as the daemon runs it, here the shipped GE2E model on bundled recordings."""

import numpy as np

from streamd.train import speaker_compare as sc
from conftest import DATA, MODELS


def test_segments_of_two_voices_pair_by_voice(tmp_path):
    (tmp_path / "manifest.csv").write_text("path,speaker,duration_s\n"
                                           f"{DATA / 'visitor12.flac'},12,0\n{DATA / 'visitor21.flac'},21,0\n")
    segs = sc.librispeech_segments(tmp_path, seconds=1.5)
    assert all(len(a) == 24000 for _, a in segs)
    who = np.array([s for s, _ in segs])
    assert (who == "12").sum() >= 9 and (who == "21").sum() >= 3
    model = sc.load_speaker_model(MODELS / "speaker.card.json")
    result = sc.pair_eer(np.stack([sc.embed(model, a) for _, a in segs]), who)
    n12, n21 = (who == "12").sum(), (who == "21").sum()
    assert result["target_pairs"] == n12 * (n12 - 1) // 2 + n21 * (n21 - 1) // 2
    assert result["impostor_pairs"] == n12 * n21
    assert result["eer"] <= 0.1  # two held-out voices, 1.5 s each: told apart
    cost = sc.cpu_cost(model, segs[0][1], repeats=2)
    assert cost["utterance_s"] == 1.5 and 0 < cost["model_ms_per_s"] < 1000
