"""The console's requests to the daemon: control commands, made as ``streamd speakers`` makes
them (so each change is the daemon's own, in its audit trail), and its /metrics."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from streamd.config import Config
from streamd.console.metrics_view import MetricsWatch
from streamd.service import control

STATS_TTL_S = 1.0  # many open pages cost the daemon one stats request a second at most


def metrics_url(listen: str) -> str | None:
    """The URL of ``metrics.listen``; a wildcard address is reached on loopback."""
    if not listen:
        return None
    host, _, port = listen.rpartition(":")
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "[::]": "[::1]", "::": "[::1]"}.get(host, host)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}/metrics"


@dataclass
class DaemonLink:
    endpoint: str
    state_dir: str
    curve: control.ClientCurve | None
    metrics: MetricsWatch | None
    _stats: tuple[float, dict[str, Any]] | None = None
    _stats_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _metrics_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @classmethod
    def of(cls, cfg: Config) -> "DaemonLink":
        url = metrics_url(cfg.metrics.listen)
        return cls(control.client_endpoint(cfg), str(cfg.client_state_dir()), control.client_curve(cfg),
                   MetricsWatch(url) if url else None)

    async def ask(self, request: dict[str, Any], timeout_s: float = 5.0) -> dict[str, Any]:
        """The daemon's reply, or ``{"ok": false, "error": ...}`` when none comes. The request
        names the state directory this console's config means: a daemon serving another one
        refuses it, as it refuses ``streamd speakers``."""
        if not control.reachable(self.endpoint):
            return {"ok": False, "error": f"no daemon at {self.endpoint} (not running?)"}
        message = {**request, "state_dir": self.state_dir}
        reply = await asyncio.to_thread(control.request, self.endpoint, message, timeout_s, None, self.curve)
        if reply is None:
            return {"ok": False, "error": f"no reply from the daemon at {self.endpoint} within {timeout_s:.0f} s"}
        return reply

    async def stats(self) -> dict[str, Any]:
        async with self._stats_lock:
            if self._stats is None or time.monotonic() - self._stats[0] > STATS_TTL_S:
                self._stats = (time.monotonic(), await self.ask({"cmd": "stats"}, timeout_s=2.0))
            return self._stats[1]

    async def metrics_view(self) -> dict[str, Any] | None:
        if self.metrics is None:
            return None
        async with self._metrics_lock:
            await asyncio.to_thread(self.metrics.scrape)
            return self.metrics.view()
