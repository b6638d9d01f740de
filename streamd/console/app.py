"""The console's ASGI application: routes behind the access guard, the event hub running for
as long as the application does."""

from __future__ import annotations

import asyncio
import contextlib

from starlette.applications import Starlette

from streamd.config import Config
from streamd.console.access import ListenPlan, Policy
from streamd.console.daemon_link import DaemonLink
from streamd.console.guard import Guard
from streamd.console.hub import EventHub
from streamd.console.routes import Console, read_pages

RING_EVENTS = 5000  # what a browser may fall behind by before it is told it missed events


def build(cfg: Config, listen: ListenPlan) -> Guard:
    hub = EventHub(cfg.events.endpoint, cfg.identity.recent_utterances, RING_EVENTS)
    console = Console(hub, DaemonLink.of(cfg), Policy.of(listen), read_pages())

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        hub.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            hub.stop()

    return Guard(Starlette(routes=console.routes(), lifespan=lifespan), console.policy)
