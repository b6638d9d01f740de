"""The shipped speaker model's float twin, for timing it on a GPU: the same pretrained encoder
and the same NAP projection (read from models/speaker.onnx), exported without the int8 LSTM
layers that onnxruntime runs on the CPU even under CUDA. Not a shipped model: its embeddings
differ slightly from the int8 model's, against which the cohort and calibration were fitted
(`streamd train speaker --no-int8` re-fits them). Needs the [train] extra and Resemblyzer.

    python scripts/float_speaker.py OUT_DIR   # writes OUT_DIR/speaker.float.onnx and its card

The card is the shipped card with the file, sha256 and input entry replaced, so with both files
copied into models/ the daemon runs it: --set models.speaker="speaker.float.card.json".
"""

import json
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from streamd.models.cards import sha256_of
from streamd.train.speaker_encoder import WithBackEnd, export, load_encoder, pretrained_path, window_input

ROOT = Path(__file__).resolve().parent.parent


def shipped_projection() -> np.ndarray:
    graph = onnx.load(str(ROOT / "models" / "speaker.onnx")).graph
    return next(numpy_helper.to_array(t) for t in graph.initializer if t.name == "proj")


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "speaker.float.onnx"
    parity = export(WithBackEnd(load_encoder(pretrained_path()), shipped_projection()).eval(), path)
    card = json.loads((ROOT / "models" / "speaker.card.json").read_text())
    card.update({"name": "speaker-ge2e-float", "file": path.name, "sha256": sha256_of(path),
                 "size_bytes": path.stat().st_size,
                 "input": {**card["input"], **window_input(False), "note": "float layers: windows batch together"},
                 "note": "float twin of models/speaker.onnx for GPU timing (scripts/float_speaker.py); not shipped"})
    card.pop("quantization", None)
    card.pop("heldout_eval", None)
    (out / "speaker.float.card.json").write_text(json.dumps(card, indent=1) + "\n")
    print(f"{path}: largest difference from torch {parity:.2e}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
