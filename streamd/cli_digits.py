"""``streamd digits enroll|list|remove``: vocabularies taught at run time, from files.

Enrollment writes the templates into the state database, where a running daemon sees them
before its next decision (no restart); list and remove go to the daemon's control socket
when one answers (as ``streamd speakers`` does), else to the database.
"""

from __future__ import annotations

import sys

def register(sub, common) -> None:
    p = sub.add_parser("digits", help="teach streamd the digits of a language or accent by example (no training)")
    actions = p.add_subparsers(dest="action", required=True)
    enroll = actions.add_parser("enroll", parents=[common], help="each word said in the files becomes a template")
    enroll.add_argument("--vocabulary", required=True, help="the vocabulary's name, e.g. az or en-scotland")
    enroll.add_argument("digit", type=int, help="the digit (0-9) the files say")
    enroll.add_argument("audio", nargs="+", help="audio files")
    actions.add_parser("list", parents=[common], help="the vocabularies and their templates per digit")
    remove = actions.add_parser("remove", parents=[common], help="drop a vocabulary's templates")
    remove.add_argument("--vocabulary", required=True)
    remove.add_argument("digit", type=int, nargs="?", help="only this digit's")


def cmd_digits(args, cfg) -> int:
    if args.action == "enroll":
        return enroll(args, cfg)
    request = {"cmd": "words"} if args.action == "list" else {"cmd": "remove_words", "vocabulary": args.vocabulary}
    if args.action == "remove" and args.digit is not None:
        request["digit"] = args.digit
    from streamd.cli import checked

    reply = checked(ask(cfg, request))
    if isinstance(reply, int):
        return reply
    if args.action == "list":
        for v in reply["vocabularies"]:
            counts = ", ".join(f"{d}: {n}" for d, n in sorted(v["digits"].items()))
            print(f"{v['vocabulary']}\t{counts}")
    else:
        print(f"removed {reply['removed']} templates of {reply['vocabulary']!r}")
    return 0


def ask(cfg, request: dict) -> dict | int:
    """The running daemon's answer when one serves this state directory, else the database's
    (``streamd.cli.ask_state``: a read never creates a gallery); an int is an exit code."""
    from streamd.service import control
    from streamd.cli import ask_state

    def offline(state) -> dict:
        from streamd.service.commands import word_command
        from streamd.service.control import ControlError

        book = open_words(cfg, state)
        try:
            return word_command(book, request)
        except ControlError as exc:
            return {"ok": False, "error": str(exc)}
        finally:
            book.gallery.close()

    return ask_state(cfg, request, control.client_curve(cfg, None, None), offline, ("words",))


def open_words(cfg, state=None):
    from streamd.identity.store import open_gallery
    from streamd.models.cards import ModelError
    from streamd.identity.vocabulary import WordBook, load_word_model

    model = load_word_model(cfg)
    if model is None:
        raise ModelError("models.words is empty: vocabularies are turned off in the config")
    return WordBook(open_gallery(cfg.state.gallery, state or cfg.state_dir()), model)


def enroll(args, cfg) -> int:
    from streamd.identity.enrollment import file_words
    from streamd.identity.vocabulary import check_digit, check_vocabulary

    check_vocabulary(args.vocabulary), check_digit(args.digit)  # before any file is read or made
    cuts = [cut for path in args.audio for cut in file_words(path, cfg)]
    book = open_words(cfg)
    try:
        result = book.enroll(args.vocabulary, args.digit, cuts, "files:" + ",".join(args.audio))
    finally:
        book.gallery.close()
    print(f"vocabulary {result['vocabulary']!r}, digit {result['digit']}: {result['added']} templates added "
          f"({result['templates']} in all)")
    return 0


def eval_words(args, cfg) -> int:
    """``streamd eval words``: templates-only figures on held-out speakers, with the shipped
    word model and its card's match rule (the rule was fitted on validation speakers)."""
    import json

    from streamd.offline import eval_words as ew
    from streamd.identity.vocabulary import load_word_model, match_rule

    model = load_word_model(cfg)
    if model is None:
        print("streamd: eval words: models.words is empty (vocabularies turned off)", file=sys.stderr)
        return 2
    clips = ew.needed(ew.corpus_words(args.data))
    vectors = model.embed_many(ew.clip_inputs(clips))
    report = ew.held_out_report(clips, vectors, match_rule(model))
    print(json.dumps(report, indent=2) if args.json else ew.format_report(report))
    return 0
