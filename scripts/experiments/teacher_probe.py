"""What the distilled digit models' teacher (streamd.train.teacher) costs and knows, before any
student is trained: its size and time per 1.5 s window on one CPU thread, and a linear probe
on its embeddings of the clean training clips (10 digits + "not a digit"), scored like the
digit models: validation digits right at <= 2% other words, alone and fused with the seed-0
pair (streamd train fusion's rule), and the probe's choice on the test speakers' digits.

Needs the [train] extra and EfficientWord-Net (pip install --no-deps EfficientWord-Net==1.0.5).
Run from the repo root: python scripts/experiments/teacher_probe.py --data ../shared/datasets  (~5 min the
first time: the training clips' clean features and every teacher embedding get cached)"""

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from streamd.train import data, fusion, scoring, teacher
from streamd.train.scoring import confidence_threshold, softmax


def window_ms(t: teacher.Teacher, calls: int = 20) -> float:
    x = np.random.default_rng(0).standard_normal((1, 1, 149, 64)).astype(np.float32)
    t.session.run(None, {"input": x})
    start = time.perf_counter()
    for _ in range(calls):
        t.session.run(None, {"input": x})
    return (time.perf_counter() - start) / calls * 1000


def probe(train_x: np.ndarray, train_y: np.ndarray) -> torch.nn.Linear:
    """Softmax regression on the unit-length embeddings (scaled by 20), full batch."""
    torch.manual_seed(0)
    head = torch.nn.Linear(teacher.DIM, len(data.CLASSES))
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    x, y = torch.from_numpy(20 * train_x), torch.from_numpy(train_y)
    for _ in range(1000):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(x), y).backward()
        opt.step()
    return head


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/datasets"))
    args = ap.parse_args()
    path = teacher.model_path()
    print(f"teacher: {path.stat().st_size / 1e6:.1f} MB, {window_ms(teacher.Teacher()):.1f} ms per 1.5 s window (one thread)")

    real = data.real_clips(args.data)
    train_clips = [c for c in real if not c.heldout and not data.is_validation(c)]
    train_clips += data.synth_clips(seed=0, voices=data.digit_training_voices(0))
    train = data.build_features(train_clips, "digits-train-clean", 0, augment_train=False)
    validation, test = data.load_digit_eval_sets(args.data, 0, True)
    emb = {name: teacher.targets(fs, f"probe-{name}", 0).astype(np.float32)
           for name, fs in (("train", train), ("validation", validation), ("test", test))}
    head = probe(emb["train"], train.labels())
    with torch.no_grad():
        logits = {name: head(torch.from_numpy(20 * e)).numpy() for name, e in emb.items()}

    y = validation.labels()
    rule = lambda z: confidence_threshold(softmax(z), y, fusion.MAX_NON_DIGIT)["at_value"]["digit_correct"]  # noqa: E731
    pair = [scoring.onnx_logits(Path("models") / scoring.member_file(f, 0), validation) for f in ("cnn", "rnn")]
    for label, members in (("seed-0 pair", pair), ("seed-0 pair + probe", pair + [logits["validation"]])):
        fused, _ = fusion.shift_non_digit(fusion.fit(members, y), members, y, fusion.SHIFT_NON_DIGIT)
        print(f"validation, {label} fused: {rule(fused(members)):.1%} digits right at <= 2% other words")
    print(f"validation, probe alone: {rule(logits['validation']):.1%}")
    labels = test.labels()
    corpus = np.array([test.clips[c].corpus for c in test.clip_index])
    for c, name in (("fsdd", "English (theo)"), ("asc", "Arabic")):
        digit = (labels != data.NOT_DIGIT) & (corpus == c)
        print(f"test {name}: probe's choice right {np.mean(logits['test'][digit, :10].argmax(1) == labels[digit]):.1%}")


if __name__ == "__main__":
    main()
