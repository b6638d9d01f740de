"""Would the GE2E digit member gain from fine-tuning the encoder's top LSTM layer for digits,
instead of keeping the whole encoder frozen? Measured, not shipped (docs/measurements.md,
section "The cascade", paragraph "Nor does fine-tuning the encoder's top layer").

The head and the encoder's third LSTM layer are trained together, from the pretrained weights
and a new head, on the clips and versions ``streamd train digits --family ge2e`` uses (layers
1-2 stay frozen, so their states are computed once; the top layer learns at a tenth of the
head's rate). The model is exported as the shipped one is (int8 layers 2-3) and kept under
WORK_DIR/ge2e-finetune/epochs-N[-seed-S]. It is then scored alone on the held-out speakers and, as the
GE2E member of the five-model fusion (and beside the shipped head, a sixth member), as
scripts/experiments/crossfit_probe.py scores a member (leave one validation speaker out; fitted on all of
them for the held-out speakers).

    python scripts/experiments/ge2e_finetune_probe.py --data ../shared/datasets [--epochs 12] [--seed 1] [--form matrix]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import streamd  # noqa: F401  (before numpy: sets the thread defaults)
import numpy as np
import torch

from crossfit_probe import print_alone, shipped_members
from streamd.models.digits import log_softmax
from streamd.train import common, data, scoring
from streamd.train import digits_ge2e as G

TOP_LR_SHARE = 0.1  # the top layer's peak learning rate, as a share of the head's


def lower_states(encoder: G.FrozenEncoder, fs: data.FeatureSet, batch: int = 64):
    """Per item: layers 1-2's states every 20 ms (the head's input from them) and layer 2's
    every 10 ms (the top layer's input), float16."""
    lengths = fs.lengths()
    order = np.argsort(lengths)
    kept, inputs = [np.empty(0)] * len(fs), [np.empty(0)] * len(fs)
    with torch.no_grad():
        for start in range(0, len(order), batch):
            items = order[start : start + batch]
            x, _ = common.pad_batch([fs.item(i) for i in items])
            s1, _ = encoder.layers[0](x)
            s2, _ = encoder.layers[1](s1)
            low = torch.cat((s1, s2), dim=2)[:, :: G.STRIDE].numpy().astype(np.float16)
            s2 = s2.numpy().astype(np.float16)
            for row, i in enumerate(items):
                n = int(lengths[i])
                kept[i], inputs[i] = low[row, : -(-n // G.STRIDE)], s2[row, :n]
    return kept, inputs


def train(encoder: G.FrozenEncoder, fs: data.FeatureSet, epochs: int, seed: int = 0) -> G.Head:
    """Head and top layer trained together; the top layer is updated in place."""
    kept, inputs = lower_states(encoder, fs)
    rng = common.seed_everything(seed)
    top, head = encoder.layers[2], G.Head()
    top.requires_grad_(True)
    opt = torch.optim.AdamW([{"params": head.parameters()}, {"params": top.parameters(), "weight_decay": 0.0}],
                            lr=G.PEAK_LR, weight_decay=1e-2)
    steps = epochs * -(-len(fs) // G.BATCH)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, [G.PEAK_LR, G.PEAK_LR * TOP_LR_SHARE], total_steps=steps)
    y = torch.from_numpy(fs.labels())
    for epoch in range(epochs):
        head.train()
        t0, losses, correct = time.time(), [], 0
        order = rng.permutation(len(fs))
        for start in range(0, len(order), G.BATCH):
            items = order[start : start + G.BATCH]
            (low, mask), (s2, _) = G.pad_states([kept[i] for i in items]), G.pad_states([inputs[i] for i in items])
            s3, _ = top(s2)
            loss, right = G.train_step(head(torch.cat((low, s3[:, :: G.STRIDE]), dim=2), mask), y[items], opt, schedule)
            losses.append(loss)
            correct += right
        print(f"fine-tune epoch {epoch + 1}/{epochs} loss {np.mean(losses):.4f} "
              f"train-acc {correct / len(fs):.4f} ({time.time() - t0:.0f}s)", flush=True)
    top.requires_grad_(False)
    return head.eval()


def fine_tuned_model(data_dir: Path, epochs: int, seed: int) -> Path:
    run = f"epochs-{epochs}" + (f"-seed-{seed}" if seed else "")
    path = data.WORK_DIR / "ge2e-finetune" / run / "digits-ge2e.onnx"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    split = data.load_digit_split(data_dir, 0, True, front_end=G.FRONT_END, plan=G.PLAN)
    common.seed_everything(seed)
    encoder = G.FrozenEncoder(G.load_encoder(G.pretrained_path()).lstm)
    head = train(encoder, split.train, epochs, seed)
    sample = [split.test.item(i) for i in range(0, len(split.test), max(1, len(split.test) // 64))]
    print("export", G.export(G.GE2EDigitNet(encoder, head).eval(), path, sample), flush=True)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--form", choices=("weights", "matrix"), default="weights", help="as in fusion_probe.py")
    p.add_argument("--epochs", type=int, default=G.Options.epochs, help="a quick check: 1")
    p.add_argument("--seed", type=int, default=0, help="the head's initialisation and batch order (same clips)")
    args = p.parse_args()
    tuned = fine_tuned_model(args.data, args.epochs, args.seed)
    m = shipped_members(args.data)
    tv, tt = (log_softmax(scoring.onnx_logits(tuned, fs)) for fs in (m.val, m.test))
    print_alone(m.test, {"shipped head": m.lpt[m.ge2e], "fine-tuned": tt})
    rows = {"shipped head": ([m.lp[m.ge2e]], [m.lpt[m.ge2e]]), "fine-tuned": ([tv], [tt]),
            "shipped head and fine-tuned, six members": ([m.lp[m.ge2e], tv], [m.lpt[m.ge2e], tt])}
    for name, (v, t) in rows.items():
        m.report(name, v, t, args.form)


if __name__ == "__main__":
    main()
