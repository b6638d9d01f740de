"""Command line: ``streamd run | enroll | listen | speakers | keys | console | train``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
from functools import partial
from pathlib import Path

from streamd import __version__
from streamd import cli_digits, cli_pin
from streamd import config as config_mod
from streamd.console import command as console_command
from streamd.config import EX_CONFIG, ConfigError

EX_DATAERR = 65  # a model or audio file that cannot be used
EX_UNAVAILABLE = 69
EX_CANTCREAT = 73  # the state directory cannot be written: read-only, full, I/O error

log = logging.getLogger("streamd")


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--config", type=Path, help="TOML config file (default: ./config.toml if present)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config key; VALUE in TOML syntax, e.g. state.dir=\"var/state\"")
    return p


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(prog="streamd", description="Speaker and spoken-digit recognition daemon.")
    parser.add_argument("--version", action="version", version=f"streamd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", parents=[common], help="run the daemon")
    run.add_argument("--source", help="mic[:DEVICE] | file:PATH | stdin (default: source.spec)")
    run.add_argument("--pace", choices=("realtime", "fast"), help="replay speed of file sources")
    run.add_argument("--events-jsonl", metavar="PATH", help="also write each event as a JSON line")
    run.add_argument("--wait-subscriber", type=bounded(float, 0, 3600, "seconds"), default=0.0, metavar="SECONDS",
                     help="wait up to SECONDS for a subscriber before processing audio")

    enroll = sub.add_parser("enroll", parents=[common], help="enroll a speaker from audio files")
    enroll.add_argument("name")
    enroll.add_argument("audio", nargs="+")

    listen = sub.add_parser("listen", parents=[common], help="print published events")
    listen.add_argument("--endpoint", help="default: events.endpoint")
    listen.add_argument("--topic", default="", help="topic prefix, e.g. speaker. or digit.default")
    listen.add_argument("--count", type=bounded(int, 0, 10**9, "events"), default=0,
                        help="exit after this many events (default 0: never)")
    listen.add_argument("--timeout", type=bounded(float, 0, 31536000, "seconds"), default=0.0,
                        help="exit after this many idle seconds (default 0: never)")
    listen.add_argument("--format", choices=("json", "text"), default="json",
                        help="json: one event object a line (default); text: a short line for people")
    listen.add_argument("--nats", nargs="?", const="config", metavar="URLS",
                        help="listen on NATS instead (every node's events): nats://HOST:PORT[,...]; "
                             "alone: events.nats")
    listen.add_argument("--subject", default="streamd.>", help="--nats: the subject (default streamd.>)")
    listen.add_argument("--replay", action="store_true",
                        help="--nats: replay from JetStream (--jetstream) what it keeps, or with --durable what "
                             "that name has not seen yet, then go on live")
    listen.add_argument("--jetstream", metavar="STREAM", help="--replay: the stream (default events.nats_jetstream)")
    listen.add_argument("--durable", default="", metavar="NAME",
                        help="--replay: a consumer name the server remembers: each run gets what the last missed")

    speakers = sub.add_parser("speakers", parents=[common], help="manage the enrolled speakers")
    speakers.add_argument("action", choices=tuple(SPEAKER_ACTIONS),
                          help="; ".join(f"{a} {usage}".strip() for a, usage in SPEAKER_ACTIONS.items()))
    speakers.add_argument("name", nargs="?", help="a speaker's name (promote: the cluster, e.g. unknown-3)")
    speakers.add_argument("new_name", nargs="?", help="rename: the new name; promote: the name to enroll")
    speakers.add_argument("--out", type=Path, metavar="FILE",
                          help="export: write the JSON to FILE (made 0600) instead of stdout")
    speakers.add_argument("--client-key", metavar="FILE",
                          help="CurveZMQ: this client's NAME.key_secret (default: control.curve_client_key)")
    speakers.add_argument("--server-key", metavar="FILE",
                          help="CurveZMQ: the daemon's public NAME.key (default: control.curve_server_key)")

    cli_digits.register(sub, common)
    cli_pin.register(sub, common)
    console_command.register(sub, common)

    keys = sub.add_parser("keys", help="CurveZMQ key pairs for remote control")
    keys.add_argument("action", choices=("generate",))
    keys.add_argument("--dir", type=Path, help="folder for the key files (made 0700; default ~/.config/streamd/curve)")
    keys.add_argument("--name", default="streamd", help="file names: NAME.key (public), NAME.key_secret (secret)")
    keys.add_argument("--force", action="store_true", help="replace existing key files of that name")

    ev = sub.add_parser("eval", parents=[common], help="accuracy of the models on held-out speakers")
    ev.add_argument("what", nargs="?", choices=("all", "digits", "speakers", "stream", "words", "pin"), default="all",
                    help="all: digits and speaker summary; digits: per speaker, per digit, confusion, "
                         "clean and at 10 and 0 dB SNR; speakers: open-set identification, DET curve; "
                         "stream: continuous audio through the daemon's engine, per condition (levels, "
                         "pauses, noise floors, noise types and SNRs, channels, noise-only audio); words: "
                         "vocabularies taught by example (templates of some speakers, tested on others); pin: "
                         "4- and 6-digit strings in one utterance and challenge-response trials")
    ev.add_argument("corpora", nargs="?", type=Path, metavar="DATA", help="the same as --data")
    ev.add_argument("--data", type=Path, help="corpora folder (manifests; default ../shared/datasets)")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.add_argument("--plot", type=Path, help="picture: DET curve (speakers, default det.png) or "
                                                "confusion matrices (digits, default confusion.png)")
    ev.add_argument("--clips", type=Path, metavar="CSV",
                    help="digits: also write each clip's answer (decision in use, every condition) to this CSV")
    ev.add_argument("--phrase-clips", type=clip_count, default=3, metavar="N",
                    help="speakers: clips joined into each phrase probe (3: ~2-3 s; 9: a long utterance)")
    ev.add_argument("--words", type=bounded(int, 0, 100000, "words"), default=200, metavar="N",
                    help="stream: digits per corpus in each condition's stream, and half as many other "
                         "words (0: every held-out clip; default 200)")
    ev.add_argument("--noise-minutes", type=bounded(float, 0, 600, "minutes"), default=10.0, metavar="M",
                    help="stream: minutes of each noise-only stream (0: none; default 10)")
    ev.add_argument("--speakers", choices=("held-out", "validation"), default="held-out",
                    help="stream: whose clips make the streams (validation: for tuning, never reported)")
    ev.add_argument("--seed", type=bounded(int, 0, 2**31, "seed"), default=0,
                    help="stream: which words, in which order, with which pauses and noise")
    ev.add_argument("--only", metavar="NAMES",
                    help="stream: only these conditions or groups, comma-separated (e.g. clean,noise)")
    ev.add_argument("--strings", type=bounded(int, 1, 1000, "strings"), default=10, metavar="N",
                    help="pin: strings of each length per speaker (default 10)")
    ev.add_argument("--card", action="store_true",
                    help="digits, speakers: also keep the figures in the model card (digits: the fusion "
                         "card, or the digit card without one; speakers: the speaker card), as heldout_eval")

    send = sub.add_parser("send", parents=[common], help="capture here, recognise on a daemon elsewhere")
    send.add_argument("--source", default="mic", help="mic[:DEVICE], file:PATH or stdin (default mic)")
    send.add_argument("--to", required=True, type=endpoint_list, metavar="ENDPOINT[,ENDPOINT...]",
                      help="the daemon's network.listen, tcp://HOST:PORT; several, comma-separated: the first "
                           "that takes the audio, the next when its node is gone (SIGUSR1: back to the first)")
    send.add_argument("--stream", default=socket.gethostname().split(".")[0], help="stream id (default: host name)")
    send.add_argument("--pace", choices=("realtime", "fast"), default="realtime", help="file sources only")
    send.add_argument("--vad", action="store_true", help="send only speech (with its pre-roll and hangover)")
    send.add_argument("--wait", type=bounded(float, 0.1, 86400, "seconds"), default=30.0, metavar="S",
                      help="files and stdin: give up when no daemon takes audio for S seconds (default 30)")

    bench = sub.add_parser("bench", parents=[common], help="measure the pipeline on speech recordings")
    bench.add_argument("--seconds", type=bounded(float, 0.1, 86400, "seconds"), default=60.0,
                       help="seconds of audio per stream")
    bench.add_argument("--pace", choices=("realtime", "fast"), default="fast")
    bench.add_argument("--streams", type=int, default=1, help="concurrent streams (default 1)")
    bench.add_argument("--silent", action="store_true", help="room noise instead of speech: the idle cost")
    bench.add_argument("--naive", action="store_true",
                       help="the straightforward per-utterance pipeline (no ring buffer, no batching), to compare")
    bench.add_argument("--network", action="store_true",
                       help="send the streams over real ZeroMQ sockets (a sender process, the daemon's receiver)")
    bench.add_argument("--nodes", type=int, default=0, metavar="K",
                       help="K daemons at once, each a process pinned to one core with --streams each, "
                            "sharing state.gallery and events.nats when set (docs/operations.md)")
    bench.add_argument("--repeat", type=bounded(int, 1, 50, "runs"), default=1, metavar="N",
                       help="N runs one after the other, each figure's min / median / max over them "
                            "(a shared machine's speed drifts: one run can mislead)")
    bench.add_argument("--json", action="store_true", help="print one JSON object")

    try:
        from streamd.train import cli as train_cli
    except ImportError:  # the [train] extra is optional
        train_cli = None
    if train_cli is not None:
        train_cli.register(sub)
    return parser


def load_config(args) -> config_mod.Config:
    path = args.config if args.config is not None else config_mod.default_config_path()
    return config_mod.load(path, args.overrides)


def cmd_run(args, cfg) -> int:
    from streamd.service.daemon import Daemon, RunOptions

    opts = RunOptions(
        source=args.source,
        pace=args.pace,
        events_jsonl=args.events_jsonl or cfg.events.jsonl or None,
        wait_subscriber_s=args.wait_subscriber,
        config_path=args.config if args.config is not None else config_mod.default_config_path(),
        overrides=args.overrides,
    )
    return Daemon(cfg, opts).run()


def open_book(cfg, write: bool = True, state: Path | None = None):
    """The gallery (in ``state``, default the config's state directory) and speaker model, for
    commands that run without a daemon. ``write``: the command changes the gallery, so a
    read-only or full one is refused here, in one line."""
    from streamd.identity.gallery import StorageError
    from streamd.identity.store import open_gallery
    from streamd.models.inference import load_model
    from streamd.identity.speakers import SpeakerBook, book_settings

    model = load_model(cfg, "speaker", "cpu")
    gallery = open_gallery(cfg.state.gallery, state or cfg.state_dir())
    if write and gallery.readonly:
        gallery.close()
        raise StorageError(f"gallery {gallery.path}: cannot be changed: {gallery.readonly}")
    return SpeakerBook(gallery, model, **book_settings(cfg.identity))


def cmd_enroll(args, cfg) -> int:
    from streamd.identity.enrollment import file_utterances

    book = open_book(cfg)
    try:
        utts = [u for path in args.audio for u in file_utterances(path, cfg, book.model)]
        result = book.enroll(args.name, utts, source="files:" + ",".join(args.audio), who="cli")
    finally:
        book.close()
        book.gallery.close()
    print(f"enrolled {result['name']!r}: {result['utterances']} utterances, {result['seconds']:.1f} s of speech")
    return 0


def cmd_listen(args, cfg) -> int:
    import zmq

    from streamd.service.events import receive, subscribe

    if args.nats:
        return listen_nats(args, cfg)
    endpoint = args.endpoint or cfg.events.endpoint
    try:
        sock = subscribe(endpoint, args.topic)
    except zmq.ZMQError as exc:
        print(f"streamd: listen --endpoint {endpoint}: cannot connect: {zmq.strerror(exc.errno)}", file=sys.stderr)
        return 2
    seen, last_seq = 0, None
    timeout_ms = int(args.timeout * 1000) if args.timeout else None
    try:
        while not args.count or seen < args.count:
            event = receive(sock, timeout_ms)
            if event is None:
                break
            if last_seq is not None and event.get("seq", 0) > last_seq + 1 and not args.topic:
                print(f"# {event['seq'] - last_seq - 1} events lost", file=sys.stderr)
            last_seq = event.get("seq")
            line = describe(event) if args.format == "text" else json.dumps(event, ensure_ascii=False)
            if line:
                print(line, flush=True)
            seen += 1
    except KeyboardInterrupt:
        pass
    finally:
        sock.close(0)
    return 0


def listen_nats(args, cfg) -> int:
    """``listen --nats``: every node's events, live or replayed from JetStream."""
    from streamd.service.nats_in import ListenError, NatsListen, listen

    urls = cfg.events.nats if args.nats == "config" else args.nats
    stream = args.jetstream if args.jetstream is not None else cfg.events.nats_jetstream
    if not urls or (args.replay and not stream):
        print("streamd: listen --nats needs URLs (or events.nats)" if not urls else
              "streamd: listen --replay needs a JetStream stream (--jetstream or events.nats_jetstream)",
              file=sys.stderr)
        return 2
    opts = NatsListen(tuple(u.strip() for u in urls.split(",") if u.strip()), args.subject, stream, args.replay,
                      args.durable, args.count, args.timeout)
    last_seq: dict[str, int] = {}

    def show(event: dict) -> None:
        node, seq = str(event.get("node", "")), event.get("seq")
        if node in last_seq and isinstance(seq, int) and seq > last_seq[node] + 1 and args.subject == "streamd.>":
            print(f"# {seq - last_seq[node] - 1} events lost (node {node})", file=sys.stderr)
        if isinstance(seq, int):
            last_seq[node] = seq
        line = f"{node} {describe(event)}" if args.format == "text" else json.dumps(event, ensure_ascii=False)
        print(line, flush=True)

    try:
        listen(opts, show)
    except ListenError as exc:
        print(f"streamd: {exc}", file=sys.stderr)
        return EX_UNAVAILABLE
    except KeyboardInterrupt:
        pass
    return 0


def describe(event: dict) -> str:
    """A short human line for an event (``listen --format text``)."""
    kind = event.get("type", "?")
    if kind == "gallery":
        who = event.get("name") or f"subject {event.get('subject')}"
        return f"[gallery] {event.get('action')} {who} by {event.get('who')}"
    if "utterance" not in event:  # stream status, or a type newer than this listener
        state = f" {event['state']}" if "state" in event else ""
        reason = f" ({event['reason']})" if event.get("reason") else ""
        return f"[{event.get('stream', '?')}] {kind}{state}{reason}"
    head = f"[{event['stream']}] #{event['utterance']:<3} {event['t_start']:7.2f}-{event['t_end']:<7.2f}"
    if kind in ("speaker", "speaker.partial"):
        best = event["candidates"][0] if event["candidates"] else None
        who = event.get("cluster") or event["speaker"]
        hint = f" (closest: {best['name']} {best['score']:.2f})" if best and event["speaker"] == "unknown" else ""
        label = "speaker" if kind == "speaker" else "so far "
        return f"{head} {label} {who} {event['score']:.2f}{hint}  latency {event['latency_s'] * 1000:.0f} ms"
    if kind == "digit":
        said = "-" if event["digit"] is None else str(event["digit"])
        if event.get("vocabulary") not in (None, "builtin"):
            said += f" ({event['vocabulary']})"  # named by a vocabulary taught at run time
        return f"{head} digit   {said} (p {event['confidence']:.2f})  latency {event['latency_s'] * 1000:.0f} ms"
    if kind == "digits":
        said = event["digits"] if event["digits"] is not None else f"- ({event.get('reason')})"
        return f"{head} digits  {said} (p {event['confidence']:.2f})  latency {event['latency_s'] * 1000:.0f} ms"
    if kind == "verification":
        return f"{head} verify  {event['speaker']} {event['result']}" + (f" ({event['reason']})" if event.get("reason") else "")
    if kind == "vad.end":
        return f"{head} speech ended ({event['reason']})"
    return f"{head} speech started" if kind == "vad.start" else f"{head} {kind}"


def cmd_speakers(args, cfg) -> int:
    """Against the running daemon's control socket when one answers, else on the database.
    The request names the state directory this command means; a daemon serving another one
    is refused (its gallery is not the one asked about). With no daemon, a read never creates
    a gallery, and every command says which gallery it used."""
    from streamd.service import control

    request = speakers_request(args)
    if request is None:
        print(f"streamd: speakers {args.action} needs {SPEAKER_ACTIONS[args.action]}", file=sys.stderr)
        return 2
    curve = control.client_curve(cfg, args.client_key, args.server_key)
    reply = checked(ask_state(cfg, request, curve, lambda state: speakers_offline(cfg, request, state), SPEAKER_READS))
    if isinstance(reply, int):
        return reply
    if args.action == "export":
        return write_export(args, reply["speaker"])
    print_speakers_reply(args, reply)
    return 0


def write_export(args, speaker: dict) -> int:
    """``speakers export NAME [--out FILE]``: the JSON of what is stored about one person."""
    text = json.dumps(speaker, ensure_ascii=False, indent=1) + "\n"
    if args.out is None:
        sys.stdout.write(text)
        return 0
    try:
        fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # biometric data: private
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
    except OSError as exc:
        print(f"streamd: cannot write --out {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return EX_CANTCREAT
    print(f"exported {speaker['name']!r}: {len(speaker['enrollments'])} enrollments, "
          f"{len(speaker['clusters'])} unknown-voice clusters, to {args.out}", file=sys.stderr)
    return 0


def checked(reply: dict | int) -> dict | int:
    """An exit code stays one; a refused request becomes exit 1, its error printed."""
    if isinstance(reply, int):
        return reply
    if not reply.get("ok"):
        print(f"streamd: {reply.get('error')}", file=sys.stderr)
        return 1
    return reply


def ask_state(cfg, request: dict, curve, offline, reads: tuple[str, ...]) -> dict | int:
    """The answer of the daemon serving this command's state directory, or, with no daemon,
    ``offline(state)``'s on the database; an int is an exit code (its message printed). A
    daemon serving another state directory is refused; with no daemon a read never creates
    a gallery; either way stderr says which gallery answered."""
    from streamd.service import control
    from streamd.service.commands import same_dir
    from streamd.service.daemon import GALLERY_FILE

    state = cfg.client_state_dir()
    request["state_dir"] = str(state)
    endpoint = control.client_endpoint(cfg)
    reply = control.request(endpoint, request, timeout_s=2.0, curve=curve) if control.reachable(endpoint) else None
    if reply is None and not config_mod.local_endpoint(endpoint):
        print(f"streamd: no reply from {endpoint} (daemon not running, or it refused this client's key)",
              file=sys.stderr)
        return EX_UNAVAILABLE
    gallery = state / GALLERY_FILE
    if cfg.state.gallery:  # shared: no file here to look for
        from streamd.identity.store import describe

        gallery = describe(cfg.state.gallery, state)
    if reply is not None:
        served = reply.get("state_dir")
        if isinstance(served, str) and not same_dir(served, str(state)):
            print(f"streamd: the daemon at {endpoint} serves the state directory {served}, not {state} "
                  "(this command's state.dir): give the command that daemon's config", file=sys.stderr)
            return EX_UNAVAILABLE
        print(f"gallery: {gallery} (daemon at {endpoint})", file=sys.stderr)
        return reply
    if cfg.state.gallery:
        print(f"gallery: {gallery}", file=sys.stderr)
        return offline(state)
    try:
        os.stat(gallery)
    except FileNotFoundError:
        print(f"streamd: no gallery at {gallery}: nothing enrolled", file=sys.stderr)
        return 0 if request["cmd"] in reads else 1
    except OSError as exc:
        print(f"streamd: gallery {gallery}: cannot read it: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(f"gallery: {gallery}", file=sys.stderr)
    return offline(state)


SPEAKER_ACTIONS = {"list": "", "remove": "NAME", "rename": "NAME NEW_NAME", "clusters": "",
                   "promote": "CLUSTER NAME", "export": "NAME", "audit": ""}
SPEAKER_READS = ("list", "clusters", "export", "audit")  # never change the gallery


def speakers_request(args) -> dict | None:
    """The control request for ``streamd speakers ACTION ...``; None when arguments are missing."""
    wanted = len(SPEAKER_ACTIONS[args.action].split())
    given = [a for a in (args.name, args.new_name) if a]
    if len(given) < wanted:
        return None
    if args.action == "promote":
        return {"cmd": "promote", "cluster": args.name, "name": args.new_name}
    request = {"cmd": args.action}
    if wanted:
        request["name"] = args.name
    if wanted > 1:
        request["new_name"] = args.new_name
    return request


def print_speakers_reply(args, reply: dict) -> None:
    if args.action == "list":
        for s in reply["speakers"]:
            print(f"{s['name']}\t{s['utterances']} utterances\t{s['seconds']:.1f} s")
    elif args.action == "clusters":
        for c in reply["clusters"]:
            print(f"{c['cluster']}\theard {c['heard']} times\t{c['seconds']:.1f} s\t"
                  f"{c['kept_seconds']:.1f} s kept for promotion")
    elif args.action == "audit":
        import time as _time

        for e in reply["audit"]:
            when = _time.strftime("%Y-%m-%d %H:%M:%S", _time.localtime(e["time"]))
            who = e["name"] if e["name"] is not None else f"(removed: subject {e['subject']})"
            extra = {k: v for k, v in e.items() if k not in ("audit", "time", "who", "action", "subject", "name")}
            print(f"{when}\t{e['who']}\t{e['action']}\t{who}\t{e['subject']}\t{json.dumps(extra, ensure_ascii=False)}")
    elif args.action == "promote":
        print(f"promoted {args.name!r} to {reply['name']!r}: {reply['utterances']} utterances, "
              f"{reply['seconds']:.1f} s of speech")
    elif args.action == "remove":
        dropped = reply.get("clusters") or []
        print(f"removed {args.name!r}" + (f" and the clusters of the same voice: {', '.join(dropped)}" if dropped else ""))
        if reply.get("erased") is False:
            print("streamd: warning: another process holds the gallery open: the removed data stays in its -wal "
                  "file until that process lets go", file=sys.stderr)
    else:
        print(f"{args.action}d {args.name!r}" + (f" -> {args.new_name!r}" if args.action == "rename" else ""))


def cmd_keys(args) -> int:
    """``keys generate``: needs no config (the config may name keys not made yet)."""
    from streamd import keys

    directory = args.dir if args.dir is not None else Path(keys.DEFAULT_DIR)
    try:
        public, secret = keys.generate(directory.expanduser(), args.name, args.force)
    except keys.KeyFileError as exc:
        print(f"streamd: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"streamd: {directory}: {exc.strerror or exc}", file=sys.stderr)
        return EX_UNAVAILABLE
    print(f"public key: {public}  (give it to the other side)")
    print(f"secret key: {secret}  (mode 0600; keep it here)")
    return 0


def speakers_offline(cfg, request: dict, state: Path | None = None) -> dict:
    """The same commands directly on the gallery database (no daemon running)."""
    from streamd.service.commands import cluster_command, gallery_command
    from streamd.service.control import ControlError
    from streamd.identity.gallery import GalleryError

    try:
        book = open_book(cfg, write=request["cmd"] not in SPEAKER_READS, state=state)
    except GalleryError as exc:
        return {"ok": False, "error": str(exc)}
    try:
        if request["cmd"] in ("clusters", "promote"):
            return cluster_command(book, request, "cli")
        return gallery_command(book.gallery, request, book, "cli")
    except ControlError as exc:
        return {"ok": False, "error": str(exc)}
    finally:
        book.close()
        book.gallery.close()


def cmd_eval(args, cfg) -> int:
    from streamd.offline import evaluate
    from streamd.models.inference import load_models

    if args.corpora and args.data and args.corpora != args.data:
        print(f"streamd: eval: two corpora folders given ({args.corpora} and --data {args.data})", file=sys.stderr)
        return 2
    args.data = args.corpora or args.data or Path("../shared/datasets")
    if not (args.data / "fsdd" / "manifest.csv").is_file():
        print(f"streamd: {args.data}: no fsdd/manifest.csv here (--data names the corpora folder)", file=sys.stderr)
        return EX_DATAERR
    if args.what == "speakers":
        return eval_speakers(args, cfg)
    if args.what == "digits":
        return eval_digits(args, cfg)
    if args.what == "stream":
        return eval_stream(args, cfg)
    if args.what == "words":
        return cli_digits.eval_words(args, cfg)
    if args.what == "pin":
        return cli_pin.eval_pin(args, cfg)
    models = load_models(cfg, "cpu")

    def progress(n: int, total: int) -> None:
        if n % 200 == 0 or n == total:
            print(f"\r{n}/{total} clips", end="\n" if n == total else "", file=sys.stderr, flush=True)

    report = evaluate.evaluate(args.data, cfg, models, progress)
    print(evaluate.to_json(report) if args.json else evaluate.format_report(report))
    return 0


def eval_digits(args, cfg) -> int:
    from dataclasses import replace

    from streamd.offline import eval_digits as ed
    from streamd.models.digits import digit_plan
    from streamd.models.inference import load_digits

    def progress(condition: str, n: int, total: int) -> None:
        if n % 500 == 0 or n == total:
            print(f"\r{condition}: {n}/{total} clips", end="\n" if n == total else "", file=sys.stderr, flush=True)

    if args.clips and not writable(args.clips, "--clips"):  # before the minutes of evaluation, not after
        return EX_CANTCREAT
    plan = digit_plan(cfg)
    in_use = plan.choice
    every = replace(cfg, digits=replace(cfg.digits, model="fused")) if in_use != "single" else cfg
    digits = load_digits(every, "cpu")
    rows: list[dict] | None = [] if args.clips else None
    report = ed.evaluate_digits(args.data, cfg, digits, in_use if in_use != "single" else next(iter(digits.members)),
                                progress=progress, rows=rows)
    if args.clips:
        write_rows(args.clips, rows)
    plot = args.plot or Path("confusion.png")
    ed.confusion_plot(report, plot)
    print(json.dumps(report, indent=2) if args.json else ed.format_report(report) + f"\nconfusion matrices: {plot}")
    if args.card:
        return keep_in_card(plan.source, report, f"streamd eval digits --data {args.data} --card")
    return 0


def eval_stream(args, cfg) -> int:
    from streamd.offline import eval_stream as es
    from streamd.models.inference import load_models
    from streamd.audio.stream_audio import standard_conditions

    conditions = standard_conditions(args.noise_minutes * 60)
    if args.only:
        wanted = {w.strip() for w in args.only.split(",") if w.strip()}
        unknown = wanted - {c.name for c in conditions} - {c.group for c in conditions}
        if unknown:
            print(f"streamd: eval stream: no condition or group {', '.join(sorted(unknown))}", file=sys.stderr)
            return 2
        conditions = [c for c in conditions if c.name in wanted or c.group in wanted]
    plot = args.plot or Path("stream.png")
    if not writable(plot, "--plot"):
        return EX_CANTCREAT

    def progress(tick: int, total: int) -> None:
        print(f"\r{tick * cfg.vad.frame_ms / 1000:.0f}/{total * cfg.vad.frame_ms / 1000:.0f} s of audio",
              end="", file=sys.stderr, flush=True)

    held = es.load_held_out(args.data, args.speakers)
    if not held.talkers and any(c.noise == "babble" for c in conditions):
        print(f"streamd: eval stream: no librispeech-excerpts/ in {args.data} to make babble of: "
              "babble conditions left out", file=sys.stderr)
        conditions = [c for c in conditions if c.noise != "babble"]
    report = es.evaluate_streams(held, cfg, load_models(cfg, "cpu"), conditions, args.words, args.seed, progress)
    print(file=sys.stderr)
    es.plot(report, plot)
    print(json.dumps(report, indent=2) if args.json else es.format_report(report) + f"\npicture: {plot}")
    return 0


def writable(path: Path, what: str) -> bool:
    try:
        path.open("a").close()
    except OSError as e:
        print(f"streamd: cannot write {what} {path}: {e.strerror or e}", file=sys.stderr)
        return False
    return True


def write_rows(path: Path, rows: list[dict]) -> None:
    import csv

    with open(path, "w", newline="") as fh:
        out = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["condition"])
        out.writeheader()
        out.writerows(rows)


def connect_endpoint(text: str) -> str:
    if not text.startswith(config_mod.ENDPOINT_SCHEMES):
        raise argparse.ArgumentTypeError(f"{text!r} is not a tcp://HOST:PORT or ipc://PATH endpoint")
    return text


def endpoint_list(text: str) -> list[str]:
    """``--to A,B``: one endpoint or several, comma-separated."""
    return [connect_endpoint(part.strip()) for part in text.split(",")]


def bounded(kind: type, low: float, high: float, what: str):
    """An argparse type: a number of ``what`` from ``low`` to ``high``, else a one-line usage error."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:  # NaN fails too
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of {what} from {low} to {high}")
        return value

    return parse


clip_count = bounded(int, 1, 50, "clips")


def eval_speakers(args, cfg) -> int:
    from streamd.offline import eval_speakers as es
    from streamd.models.inference import load_model
    from streamd.identity.speakers import SpeakerBook, book_settings

    book = SpeakerBook(None, load_model(cfg, "speaker", "cpu"), **book_settings(cfg.identity))
    result = es.evaluate_speakers(args.data, cfg, book, phrase_clips=args.phrase_clips)
    plot = args.plot or Path("det.png")
    es.det_plot(result, plot)
    report = es.public(result)
    print(json.dumps(report, indent=2) if args.json else es.format_report(report) + f"\nDET curve: {plot}")
    if args.card:
        longer = f" --phrase-clips {args.phrase_clips}" if args.phrase_clips != es.PHRASE_CLIPS else ""
        return keep_in_card(cfg.path(cfg.models.dir) / cfg.models.speaker, report,
                            f"streamd eval speakers --data {args.data}{longer} --card")
    return 0


def keep_in_card(card: Path, report: dict, command: str) -> int:
    from streamd.offline.evaluate import record_in_card

    try:
        record_in_card(card, report, command)
    except (OSError, ValueError) as e:
        print(f"streamd: cannot keep the figures in {card}: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
        return EX_CANTCREAT
    return 0


def cmd_bench(args, cfg) -> int:
    from streamd.offline import bench

    if not 1 <= args.streams <= 10000:
        print("streamd: bench --streams must be 1..10000", file=sys.stderr)
        return 2
    if args.nodes and (not 1 <= args.nodes <= 64 or args.network or args.naive):
        print("streamd: bench --nodes must be 1..64, without --network or --naive", file=sys.stderr)
        return 2
    if args.nodes:
        run_once = partial(bench.run_nodes, _without_nodes(args.argv), args.nodes)
    else:
        run_once = partial(bench.run, cfg, args.seconds, args.pace, args.streams, args.silent, args.naive, args.network)
    if args.repeat == 1:
        return _print_bench(run_once(), args.json)
    from streamd.offline import bench_runs

    on_run = None if args.json else lambda i, r: print(bench_runs.run_line(i, r), flush=True)
    result = bench_runs.repeated(run_once, args.repeat, on_run)
    print(json.dumps(result) if args.json else "\n".join(bench_runs.spread_table(result["spread"])))
    return 0


def _without_nodes(argv: list[str]) -> list[str]:
    """The command line a node of ``bench --nodes`` runs: this one, less --nodes, --repeat
    (the nodes run once for each of its runs) and --json."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--nodes", "--repeat"):
            skip = True
        elif not a.startswith(("--nodes=", "--repeat=")) and a != "--json":
            out.append(a)
    return out


def _print_bench(result: dict, as_json: bool) -> int:
    if as_json:
        print(json.dumps(result))
    else:
        from streamd.offline.bench_runs import rounded
        from streamd.offline.machine import summary

        for key, value in result.items():
            if key == "machine":
                value = summary(value)
            if key != "per_node":
                print(f"{key:16} {rounded(value)}")
    return 0


def cmd_send(args, cfg) -> int:
    """Frames of a local source to a daemon's network source, optionally only speech."""
    from streamd.service import control
    from streamd.audio.frames import STREAM_ID
    from streamd.audio.netaudio import Sender
    from streamd.audio.sources import open_source
    from streamd.signal.vad import Segmenter

    if not STREAM_ID.match(args.stream):
        print(f"streamd: --stream {args.stream!r} must be 1-64 letters, digits, '_' or '-'", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)  # systemd's stop: end as Ctrl-C does, queued audio flushed
    source = open_source(args.source, args.stream, cfg.vad.frame_samples, args.pace, cfg.source.mic_rate)
    sender = Sender(args.to, args.stream, control.client_curve(cfg), wait_s=args.wait)
    signal.signal(signal.SIGUSR1, lambda *_: sender.prefer_first())  # no fail-back unless told
    segmenter = Segmenter(cfg.vad) if args.vad else None
    sent = 0
    try:
        for frame in source.frames():
            sender.check()
            for f in (_speech_frames(segmenter, frame) if segmenter else [frame]):
                sender.send(f, block=not args.source.startswith("mic"))
                sent += 1
        sender.finish()
    except KeyboardInterrupt:
        pass
    finally:
        source.close()
        sender.close()
    print(f"sent {sent} frames of stream {args.stream!r} to {', '.join(args.to)}"
          + (f"; moved {sender.moves} times between nodes" if sender.moves else "")
          + (f"; {sender.dropped} dropped while the daemon was away" if sender.dropped else ""), file=sys.stderr)
    return 0


def _interrupt(signum, _frame) -> None:
    raise KeyboardInterrupt


def _speech_frames(segmenter, frame):
    """--vad: the frames to send for this one (its utterance's pre-roll when speech starts)."""
    from streamd.audio.frames import SAMPLE_RATE, Frame
    from streamd.signal.vad import SpeechAudio, SpeechStart

    out = []
    for o in segmenter.push(frame):
        if isinstance(o, SpeechStart):
            step = len(frame.samples)
            for k in range(0, len(o.audio) - step + 1, step):
                t = o.audio_t + k / SAMPLE_RATE
                out.append(Frame(frame.stream, int(round(t / frame.duration)), o.audio[k : k + step], t,
                                 frame.captured_at))
        elif isinstance(o, SpeechAudio):
            out.append(frame)
    return out


COMMANDS = {"run": cmd_run, "enroll": cmd_enroll, "listen": cmd_listen, "speakers": cmd_speakers,
            "digits": cli_digits.cmd_digits, "eval": cmd_eval, "bench": cmd_bench, "send": cmd_send,
            "console": console_command.cmd_console, "verify": cli_pin.cmd_verify}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # bench --nodes runs it again, per node
    if args.command == "train":
        from streamd.train import cli as train_cli

        return train_cli.run(args)
    if args.command == "keys":
        return cmd_keys(args)
    from streamd.service.daemon import setup_logging
    from streamd.service.control import ControlError
    from streamd.identity.gallery import GalleryError, StorageError
    from streamd.models.cards import ModelError
    from streamd.audio.sources import SourceError

    try:
        cfg = load_config(args)
        setup_logging(cfg.log.level)
        return COMMANDS[args.command](args, cfg)
    except ConfigError as exc:
        print(f"streamd: config: {exc}", file=sys.stderr)
        return EX_CONFIG
    except StorageError as exc:
        print(f"streamd: {exc}", file=sys.stderr)
        return EX_CANTCREAT
    except (ModelError, SourceError, GalleryError) as exc:
        print(f"streamd: {exc}", file=sys.stderr)
        return EX_DATAERR
    except ControlError as exc:
        print(f"streamd: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"streamd: {exc}", file=sys.stderr)
        return EX_UNAVAILABLE
