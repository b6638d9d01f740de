"""Several nodes on this machine: one node on one core against K nodes on K cores, sharing a
throw-away PostgreSQL gallery and a JetStream NATS (issue 34, "two nodes serve twice one
node's streams minus the overhead"). Each node is `streamd bench` in a process of its own,
pinned to its core (`streamd bench --nodes K`); the figures are the bench's own.

    python scripts/bench_nodes.py --streams 40 --seconds 30 [--nodes 2] [--json]

Runs, in order: 1 node alone (SQLite gallery, no NATS), 1 node shared (PostgreSQL + NATS),
K nodes shared. Needs Debian's postgresql and nats-server (make sysdeps installs them).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from natsd import NatsServer  # noqa: E402  (the tests' throw-away servers)
from pg import PgCluster, need_postgres  # noqa: E402

from streamd.offline.machine import summary  # noqa: E402


def bench(nodes: int, streams: int, seconds: float, pace: str, sets: list[str]) -> dict:
    cmd = [sys.executable, "-m", "streamd", "bench", "--config", str(ROOT / "config.toml"), "--streams",
           str(streams), "--seconds", str(seconds), "--pace", pace, "--nodes", str(nodes), "--json"]
    for s in sets:
        cmd += ["--set", s]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def row(name: str, r: dict) -> dict:
    nats = [n["nats"] for n in r["per_node"] if n.get("nats")]
    return {"run": name, "nodes": r["nodes"], "streams": r["streams"], "overruns": r["overruns"],
            "latency_s_p99_worst_node": r["latency_s_p99_worst_node"],
            "cpu_cores_per_node": r["cpu_cores_per_node"],
            "realtime_factor_worst_node": r["realtime_factor_worst_node"],
            "nats_dropped": sum(n["dropped"] for n in nats) if nats else None,
            "nats_published": sum(n["published"] for n in nats) if nats else None,
            "machine": summary(r["per_node"][0]["machine"])}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=40, help="streams per node")
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--pace", choices=("realtime", "fast"), default="realtime")
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    pg = PgCluster(need_postgres())
    pg.start()
    with tempfile.TemporaryDirectory() as store:
        nats = NatsServer(Path(store))
        nats.start()
        try:
            shared = [f'state.gallery="{pg.create_database("bench")}"', f'events.nats="{nats.url}"',
                      'events.nats_jetstream="streamd"']
            rows = [row("1 node, local gallery", bench(1, args.streams, args.seconds, args.pace, [])),
                    row("1 node, shared", bench(1, args.streams, args.seconds, args.pace, shared)),
                    row(f"{args.nodes} nodes, shared", bench(args.nodes, args.streams, args.seconds, args.pace, shared))]
        finally:
            nats.stop()
            pg.close()
    if args.json:
        print(json.dumps(rows))
    else:
        for r in rows:
            print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
