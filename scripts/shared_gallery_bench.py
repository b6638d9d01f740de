#!/usr/bin/env python3
"""How soon another node sees an enrollment in the shared PostgreSQL gallery (issue 34;
BENCHMARKS.md, "Several nodes: shared gallery").

    python scripts/shared_gallery_bench.py [--enrollments 100] [--url postgresql://...]

Node B is a real ``streamd run`` daemon (stdin source, state.gallery = the database); node A
enrolls through the same code ``streamd enroll`` runs (SpeakerBook over a PgGallery, in this
process: no process start per enrollment), each time the same speaker again (a new voice per
enrollment would be refused as a duplicate). For each enrollment: from A's acknowledgement
(add_enrollments returned: committed) to the arrival of B's ``gallery`` event for it on B's
ZeroMQ socket, which B publishes once its snapshot holds the enrollment. So the figure is the
whole path: commit, NOTIFY, B's watcher re-reading, B's loop publishing, ZeroMQ.

Without --url a throw-away PostgreSQL is started (tests/pg.py). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def cpu() -> str:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def node_b(url: str, folder: Path):
    from conftest import Isolated, NotifySocket, start_streamd
    from streamd.service.events import subscribe

    iso = Isolated(folder)
    notify = NotifySocket(folder / "notify.sock")
    sub = subscribe(iso.endpoint, "gallery")
    proc = start_streamd("run", *iso.sets(f'state.gallery="{url}"', f'control.endpoint="ipc://{folder}/b.sock"'),
                         "--source", "stdin", "--wait-subscriber", "20", env={"NOTIFY_SOCKET": notify.path},
                         stdin=subprocess.PIPE)
    if not notify.wait_for("READY=1", 120):
        raise SystemExit(f"node B did not start: {proc.stderr.read()[-2000:] if proc.poll() is not None else ''}")
    time.sleep(0.5)
    return proc, sub, notify


def measure(url: str, n: int, folder: Path) -> list[float]:
    from conftest import stop
    from streamd import config as config_mod
    from streamd.identity.enrollment import file_utterances
    from streamd.identity.speakers import SpeakerBook, book_settings
    from streamd.identity.store import open_gallery
    from streamd.models.inference import load_model
    from streamd.service.events import receive

    cfg = config_mod.load(ROOT / "config.toml", [])
    model = load_model(cfg, "speaker", "cpu")
    book = SpeakerBook(open_gallery(url, folder), model, **book_settings(cfg.identity))
    utts = file_utterances(str(ROOT / "tests" / "data" / "enroll_theo.flac"), cfg, model)
    vectors = np.stack([model.run(u.features) for u in utts])
    proc, sub, notify = node_b(url, folder)
    waits = []
    try:
        for _ in range(n):
            book.gallery.add_enrollments("theo", utts, vectors, book.sha, book.key, "files:theo.flac", "bench")
            acked = time.monotonic()
            while True:
                event = receive(sub, 5000)
                if event is None:
                    raise SystemExit("node B published no gallery event within 5 s")
                if event.get("action") == "enroll":
                    waits.append(time.monotonic() - acked)
                    break
            time.sleep(0.05)
    finally:
        stop(proc)
        sub.close(0)
        notify.close()
        book.gallery.close()
    return waits


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--enrollments", type=int, default=100)
    parser.add_argument("--url", help="an existing database (default: a throw-away PostgreSQL)")
    args = parser.parse_args()
    cluster = None
    url = args.url
    if url is None:
        from pg import PgCluster, pg_binaries

        if pg_binaries() is None:
            raise SystemExit("PostgreSQL is not installed (apt-get install postgresql), and no --url given")
        cluster = PgCluster(pg_binaries())
        cluster.start()
        url = cluster.create_database("bench")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            waits = np.array(measure(url, args.enrollments, Path(tmp)))
    finally:
        if cluster is not None:
            cluster.close()
    out = {"enrollments": len(waits), "p50_ms": round(float(np.percentile(waits, 50)) * 1000, 1),
           "p99_ms": round(float(np.percentile(waits, 99)) * 1000, 1), "max_ms": round(float(waits.max()) * 1000, 1),
           "cpu": cpu(), "cores": len(__import__("os").sched_getaffinity(0))}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
