"""``streamd console [--listen HOST:PORT]``: registered by the CLI without importing the web
framework, which is the optional ``[console]`` extra."""

from __future__ import annotations

import argparse
import socket
import sys

EX_UNAVAILABLE = 69


def register(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("console", parents=[common], help="the web console of a running daemon (docs/console.md)")
    p.add_argument("--listen", metavar="HOST:PORT", help="default: console.listen (127.0.0.1:8090)")


def cmd_console(args, cfg) -> int:
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError as exc:
        print(f"streamd: console needs the [console] extra ({exc.name} is missing): "
              "pip install 'streamd[console]'", file=sys.stderr)
        return EX_UNAVAILABLE
    from streamd.console import access, app

    listen = access.plan(cfg, args.listen)
    sock = bound(listen)
    server = uvicorn.Server(uvicorn.Config(
        app.build(cfg, listen), log_level="warning", access_log=False, server_header=False,
        timeout_graceful_shutdown=2, lifespan="on",
        ssl_certfile=str(listen.tls[0]) if listen.tls else None, ssl_keyfile=str(listen.tls[1]) if listen.tls else None))
    print(f"console: {listen.url} ({'token required' if listen.token else 'no token: loopback only'}; "
          f"events {cfg.events.endpoint})", file=sys.stderr, flush=True)
    server.run(sockets=[sock])
    return 0


def bound(listen) -> socket.socket:
    """The listening socket, bound here so a taken port is one line (exit 69), not a traceback."""
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((listen.host, listen.port))
    except OSError as exc:
        sock.close()
        raise OSError(f"console.listen {listen.host}:{listen.port}: cannot listen: {exc.strerror or exc}") from None
    sock.listen(256)  # from now on a connection waits for the server instead of being refused
    return sock
