"""``streamd verify`` (challenge-response against a running daemon) and ``streamd eval pin``."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

EX_UNAVAILABLE = 69


def register(sub, common) -> None:
    verify = sub.add_parser("verify", parents=[common],
                            help="ask the daemon for a code for SPEAKER to say on STREAM; print the result")
    verify.add_argument("--stream", required=True, help="the stream the speaker talks into")
    verify.add_argument("--speaker", required=True, help="the enrolled speaker who claims to be speaking")
    verify.add_argument("--length", type=int, default=4, help="digits in the code (1-12, default 4)")
    verify.add_argument("--ttl", type=float, default=30.0, metavar="S", help="seconds to answer (default 30)")
    verify.add_argument("--events", metavar="URL", help="the daemon's events endpoint (default: events.endpoint)")
    verify.add_argument("--json", action="store_true", help="print the verification event as JSON")


def cmd_verify(args, cfg) -> int:
    """Exit 0 when the answer passes, 1 when it fails (or the request is refused), 69 when no
    daemon answers."""
    from streamd.service import control
    from streamd.service.control import client_curve
    from streamd.service.events import receive, subscribe

    events = subscribe(args.events or cfg.events.endpoint, f"verification.{args.stream}")
    try:
        time.sleep(0.2)  # the subscription reaches the daemon before the answer can come
        request = {"cmd": "challenge", "stream": args.stream, "speaker": args.speaker, "length": args.length,
                   "ttl_s": args.ttl}
        reply = control.request(control.client_endpoint(cfg), request, timeout_s=5.0, curve=client_curve(cfg))
        if reply is None:
            print("streamd: verify: no reply from the daemon's control socket", file=sys.stderr)
            return EX_UNAVAILABLE
        if not reply.get("ok"):
            print(f"streamd: verify: {reply.get('error')}", file=sys.stderr)
            return 1
        print(f"say: {' '.join(reply['digits'])}", flush=True)
        event = _wait_for(events, reply["id"], args.ttl + 10.0, receive)
    finally:
        events.close(0)
    if event is None:
        print("streamd: verify: no verification event came", file=sys.stderr)
        return 1
    print(json.dumps(event) if args.json else _describe(event), flush=True)
    return 0 if event["result"] == "pass" else 1


def _wait_for(sock, challenge_id: str, timeout_s: float, receive) -> dict | None:
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        event = receive(sock, int(left * 1000))
        if event is not None and event.get("id") == challenge_id:
            return event
    return None


def _describe(e: dict) -> str:
    score = "-" if e.get("voice_score") is None else f"{e['voice_score']:.2f}"
    return (f"{e['result']}: heard {e.get('digits_heard') or '-'} (digits {'ok' if e['digits_ok'] else 'wrong'}), "
            f"voice {e['speaker']} {score} ({'ok' if e['voice_ok'] else 'no'})"
            + (f", reason {e['reason']}" if e.get("reason") else ""))


def eval_pin(args, cfg) -> int:
    from streamd.models.inference import load_models
    from streamd.offline import eval_pin as ep
    from streamd.offline.eval_stream import load_held_out

    held = load_held_out(args.data, args.speakers)
    report = ep.evaluate_pins(held, cfg, load_models(cfg, "cpu"), per_speaker=args.strings, seed=args.seed)
    print(json.dumps(report, indent=1) if args.json else ep.format_report(report))
    return 0


def default_data(args) -> Path:
    return args.data or Path("../shared/datasets")
