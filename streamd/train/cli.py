"""``streamd train {digits,speaker}``: argparse wiring for the trainers.

``digits`` trains the digit classifier (streamd.train.digits). ``speaker`` builds the shipped
speaker model, Resemblyzer's pretrained GE2E encoder converted by streamd.train.speaker_encoder;
``speaker --scratch`` trains the from-scratch AAM-softmax x-vector baseline (streamd.train.speaker).

torch is imported only when the subcommand runs, so the daemon's CLI works without it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

DEFAULT_EPOCHS = {"digits": 30, "speaker": 30}


def register(subparsers) -> None:
    """Add the ``train`` subcommand to an argparse subparsers object."""
    p = subparsers.add_parser("train", help="train a model (needs the [train] extra: torch)")
    p.add_argument("model", choices=("digits", "speaker"), help="which model to train")
    p.add_argument("--data", type=Path, default=Path("../shared/datasets"),
                   help="folder holding fsdd/ and arabic-speech-commands/ (default ../shared/datasets)")
    p.add_argument("--out", type=Path, default=Path("models"),
                   help="where the .onnx and .card.json go (default models)")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"training epochs (default {DEFAULT_EPOCHS['digits']} digits, "
                        f"{DEFAULT_EPOCHS['speaker']} speaker)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--no-synth", dest="synth", action="store_false",
                   help="do not add synthetic espeak-ng speech to the training data")
    p.add_argument("--cache", type=Path, default=None,
                   help="speaker: folder for the encoder's per-window outputs on the corpora "
                        "(default $STREAMD_TRAIN_WORK/speaker-ge2e)")
    p.add_argument("--scratch", action="store_true",
                   help="speaker: train the x-vector baseline from scratch instead of converting "
                        "the pretrained GE2E encoder (the shipped model)")


def run(args) -> int:
    """Run ``streamd train``; returns the exit code."""
    try:
        import torch  # noqa: F401
    except ImportError:
        print("streamd train needs torch: install the [train] extra")
        return 2
    for corpus in ("fsdd", "arabic-speech-commands"):
        if not (args.data / corpus / "manifest.csv").exists():
            print(f"no {corpus}/manifest.csv under {args.data}")
            return 2
    epochs = args.epochs if args.epochs is not None else DEFAULT_EPOCHS[args.model]
    t0 = time.time()
    if args.model == "digits":
        from streamd.train import digits

        code = digits.run(digits.Options(args.data, args.out, epochs, args.seed, args.synth))
    elif args.scratch:
        from streamd.train import speaker

        code = speaker.run(speaker.Options(args.data, args.out, epochs, args.seed, args.synth))
    else:
        from streamd.train import speaker_encoder

        code = speaker_encoder.run(speaker_encoder.Options(args.data, args.out, cache_dir=args.cache))
    print(f"streamd train {args.model}: done in {time.time() - t0:.0f} s")
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m streamd.train")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    return run(parser.parse_args(argv))
