"""Signal: the VAD that cuts utterances and the features computed from them (streaming and offline alike)."""
