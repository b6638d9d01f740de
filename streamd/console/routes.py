"""The console's pages and its JSON API. Reads come from the event hub and the daemon's
replies; every change is one control request, so the daemon checks it and audits it."""

from __future__ import annotations

import asyncio
import base64
import json
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, quote

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from streamd.console.access import Policy, same
from streamd.console.daemon_link import DaemonLink
from streamd.console.hub import EventHub

MAX_BODY = 64 * 1024
KEEPALIVE_S = 15.0
REPLAY = 50  # events a page that connects is shown from before it came
PAGES = ("live", "speakers", "recent", "challenge", "login")
FRAMED = {"live": "Live", "speakers": "Speakers", "recent": "Recent voices", "challenge": "Challenge"}  # title
AUDIO_KEPT_NOTE = ("The daemon keeps the audio of these utterances in memory (identity.keep_recent_audio is on), "
                   "never on disk: ▶ plays one. It is dropped with the utterance: pushed out by newer ones, "
                   "removed with the speaker it was given to, or at the daemon's stop.")
AUDIO_OFF_NOTE = ("Audio of recent utterances is not kept: identity.keep_recent_audio is off, as it is by default, "
                  "since a voice recording is personal data. Decisions and times are shown instead; turning it on "
                  "in the daemon's config (then a reload) lets this page play utterances back.")
AUDIO_UNKNOWN_NOTE = "Whether the daemon keeps audio to play back is not known: {error}"


class BadRequest(ValueError):
    """A request the console refuses before asking the daemon (HTTP 400, one line)."""


def read_pages() -> dict[str, str]:
    """Each page: the console's pages share one frame (head, header, nav), then their main part."""
    static = resources.files("streamd.console") / "static"
    frame = (static / "_frame.html").read_text(encoding="utf-8")
    pages = {name: (static / f"{name}.html").read_text(encoding="utf-8") for name in PAGES}
    for name, title in FRAMED.items():
        pages[name] = frame.replace("{{title}}", title).replace("{{page}}", name) + pages[name]
    return pages


def field(body: dict[str, Any], name: str, kind: type, default: Any = ...) -> Any:
    value = body.get(name, default)
    if value is ...:
        raise BadRequest(f"missing field {name!r}")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise BadRequest(f"field {name!r} must be {kind.__name__}")
    return value


async def json_body(request: Request) -> dict[str, Any]:
    if "application/json" not in request.headers.get("content-type", ""):
        raise BadRequest("send JSON (Content-Type: application/json)")
    body = await request.body()
    if len(body) > MAX_BODY:
        raise BadRequest(f"request too large ({len(body)} bytes > {MAX_BODY})")
    try:
        parsed = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"malformed JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise BadRequest("expected a JSON object")
    return parsed


def answer(reply: dict[str, Any]) -> JSONResponse:
    """The daemon's reply; a refusal is 422 with its one-line reason, no daemon 503."""
    if reply.get("ok"):
        return JSONResponse(reply)
    error = str(reply.get("error", "refused"))
    return JSONResponse({"ok": False, "error": error}, status_code=503 if error.startswith("no ") and
                        "daemon" in error else 422)


def audio_kept(stats: dict[str, Any]) -> tuple[bool, str]:
    """Whether the daemon keeps the recent utterances' audio (its ``stats`` reply says), and
    the note the Recent voices page shows about it."""
    if not stats.get("ok"):
        return False, AUDIO_UNKNOWN_NOTE.format(error=stats.get("error", "the daemon did not answer"))
    if stats.get("keep_recent_audio") is True:
        return True, AUDIO_KEPT_NOTE
    return False, AUDIO_OFF_NOTE


def utterance_number(value: str | None) -> int:
    if value is None or value == "":
        raise BadRequest("which utterance? (?utterance=N)")
    if not (value.isascii() and value.isdigit()) or len(value) > 18:
        raise BadRequest("'utterance' must be an utterance number (0 or more)")
    return int(value)


@dataclass
class Console:
    hub: EventHub
    link: DaemonLink
    policy: Policy
    pages: dict[str, str]

    def routes(self) -> list:
        return [
            Route("/", self.page("live")), Route("/speakers", self.page("speakers")),
            Route("/recent", self.page("recent")), Route("/challenge", self.page("challenge")),
            Route("/login", self.login_page, methods=["GET"]), Route("/login", self.login, methods=["POST"]),
            Route("/api/events", self.events), Route("/api/health", self.health),
            Route("/api/speakers", self.speakers), Route("/api/speakers/export", self.export),
            Route("/api/speakers/rename", self.change("rename", ("name", "new_name")), methods=["POST"]),
            Route("/api/speakers/remove", self.change("remove", ("name",)), methods=["POST"]),
            Route("/api/audit", self.audit), Route("/api/recent", self.recent),
            Route("/api/recent/audio", self.recent_audio), Route("/api/clusters", self.clusters),
            Route("/api/enroll_recent", self.enroll_recent, methods=["POST"]),
            Route("/api/enroll_next", self.enroll_next, methods=["POST"]),
            Route("/api/promote", self.change("promote", ("cluster", "name")), methods=["POST"]),
            Route("/api/challenge", self.challenge, methods=["POST"]),
            Mount("/static", StaticFiles(packages=[("streamd.console", "static")]), name="static"),
        ]

    # ------------------------------------------------------------ pages

    def page(self, name: str):
        async def show(request: Request) -> HTMLResponse:
            return HTMLResponse(self.pages[name].replace("{{csrf}}", self.policy.csrf))
        return show

    async def login_page(self, request: Request) -> Response:
        if not self.policy.token:
            return RedirectResponse("/", status_code=303)
        return HTMLResponse(self.pages["login"].replace("{{error}}", ""))

    async def login(self, request: Request) -> Response:
        body = await request.body()
        given = parse_qs(body[:MAX_BODY].decode("utf-8", "replace")).get("token", [""])[0]
        if not self.policy.token or same(given.strip(), self.policy.token):
            response = RedirectResponse("/", status_code=303)
            if self.policy.token:
                response.headers["set-cookie"] = self.policy.cookie()
            return response
        await asyncio.sleep(1.0)  # slows a guesser down
        return HTMLResponse(self.pages["login"].replace("{{error}}", "That is not the token."), status_code=401)

    # ------------------------------------------------------------ live events

    async def events(self, request: Request) -> StreamingResponse:
        """Server-sent events: every daemon event as it arrives (``id`` is its number here, so a
        reconnecting EventSource resumes after the last one it saw)."""
        resume = request.headers.get("last-event-id", "")
        cursor = int(resume) + 1 if resume.isdigit() else max(0, self.hub.ring.next - REPLAY)
        return StreamingResponse(self._stream(cursor), media_type="text/event-stream",
                                 headers={"cache-control": "no-store", "x-accel-buffering": "no"})

    async def _stream(self, cursor: int):
        yield "retry: 1000\n\n"
        while not self.hub.closed:
            arrived = self.hub.waiter()
            batch = self.hub.ring.since(cursor)
            cursor = batch.cursor
            if batch.skipped:
                yield f"event: skipped\ndata: {json.dumps({'skipped': batch.skipped})}\n\n"
            if batch.events:
                first = cursor - len(batch.events)
                yield "".join(f"id: {first + i}\ndata: {json.dumps(e, ensure_ascii=False)}\n\n"
                              for i, e in enumerate(batch.events))
                continue
            try:
                await asyncio.wait_for(arrived.wait(), KEEPALIVE_S)
            except asyncio.TimeoutError:
                yield ": keepalive\n\n"

    async def health(self, request: Request) -> JSONResponse:
        stats, metrics = await asyncio.gather(self.link.stats(), self.link.metrics_view())
        return JSONResponse({"ok": True, "daemon": stats, "metrics": metrics, "streams": self.hub.streams(),
                             "events": self.hub.summary(),
                             "metrics_note": None if metrics is not None else
                             "metrics.listen is off in this config: latency percentiles are not shown"})

    # ------------------------------------------------------------ speakers

    async def speakers(self, request: Request) -> JSONResponse:
        reply = await self.link.ask({"cmd": "list"})
        heard = self.hub.heard()
        for s in reply.get("speakers", []):
            s["last_heard"] = heard.get(s["name"])
        return answer(reply)

    async def export(self, request: Request) -> Response:
        name = request.query_params.get("name", "")
        if not name:
            return JSONResponse({"ok": False, "error": "export: which speaker? (?name=NAME)"}, status_code=400)
        reply = await self.link.ask({"cmd": "export", "name": name}, timeout_s=10.0)
        if not reply.get("ok"):
            return answer(reply)
        text = json.dumps(reply["speaker"], ensure_ascii=False, indent=1) + "\n"
        filename = quote(f"streamd-{name}.json")
        return Response(text, media_type="application/json",
                        headers={"content-disposition": f"attachment; filename*=UTF-8''{filename}"})

    async def audit(self, request: Request) -> JSONResponse:
        return answer(await self.link.ask({"cmd": "audit"}))

    def change(self, cmd: str, names: tuple[str, ...]):
        """A POST that becomes one control command with these string fields."""
        async def run(request: Request) -> JSONResponse:
            try:
                body = await json_body(request)
                values = {name: field(body, name, str) for name in names}
            except BadRequest as exc:
                return JSONResponse({"ok": False, "error": f"{cmd}: {exc}"}, status_code=400)
            return answer(await self.link.ask({"cmd": cmd, **values}, timeout_s=10.0))
        return run

    # ------------------------------------------------------------ recent voices

    async def recent(self, request: Request) -> JSONResponse:
        kept, note = audio_kept(await self.link.stats())
        return JSONResponse({"ok": True, "utterances": self.hub.recent(), "audio_kept": kept, "audio_note": note})

    async def recent_audio(self, request: Request) -> Response:
        """A recent utterance's audio (audio/wav), from the daemon's ``recent_audio``: only
        while identity.keep_recent_audio is on. A GET: it changes nothing."""
        try:
            request_ = {"cmd": "recent_audio", "utterance": utterance_number(request.query_params.get("utterance"))}
        except BadRequest as exc:
            return JSONResponse({"ok": False, "error": f"recent_audio: {exc}"}, status_code=400)
        if request.query_params.get("stream"):
            request_["stream"] = request.query_params["stream"]
        reply = await self.link.ask(request_, timeout_s=10.0)
        if not reply.get("ok"):
            return answer(reply)
        try:
            wav = base64.b64decode(reply["base64"], validate=True)
        except (KeyError, TypeError, ValueError):
            return JSONResponse({"ok": False, "error": "recent_audio: the daemon's reply holds no audio"},
                                status_code=502)
        name = quote(f"streamd-{reply.get('stream', 'stream')}-{request_['utterance']}.wav")
        return Response(wav, media_type="audio/wav",
                        headers={"content-disposition": f"inline; filename*=UTF-8''{name}"})

    async def clusters(self, request: Request) -> JSONResponse:
        return answer(await self.link.ask({"cmd": "clusters"}))

    async def enroll_recent(self, request: Request) -> JSONResponse:
        try:
            body = await json_body(request)
            request_ = {"cmd": "enroll_recent", "name": field(body, "name", str),
                        "utterances": field(body, "utterances", list)}
            if not all(isinstance(u, int) and not isinstance(u, bool) for u in request_["utterances"]):
                raise BadRequest("field 'utterances' must be a list of utterance numbers")
            if "stream" in body:
                request_["stream"] = field(body, "stream", str)
        except BadRequest as exc:
            return JSONResponse({"ok": False, "error": f"enroll_recent: {exc}"}, status_code=400)
        return answer(await self.link.ask(request_, timeout_s=30.0))

    async def enroll_next(self, request: Request) -> JSONResponse:
        """Waits for the daemon's reply: it comes once that much speech has been heard."""
        try:
            body = await json_body(request)
            seconds = field(body, "seconds", float, 10.0)
            if not 0.5 <= seconds <= 120:
                raise BadRequest("'seconds' must be from 0.5 to 120")
            request_ = {"cmd": "enroll_next", "name": field(body, "name", str), "seconds": seconds}
            if "stream" in body:
                request_["stream"] = field(body, "stream", str)
        except BadRequest as exc:
            return JSONResponse({"ok": False, "error": f"enroll_next: {exc}"}, status_code=400)
        wait = max(30.0, 4 * seconds)  # the daemon's own timeout for it
        return answer(await self.link.ask(request_, timeout_s=wait + 5.0))

    # ------------------------------------------------------------ challenge

    async def challenge(self, request: Request) -> JSONResponse:
        """A code for an enrolled speaker to say on a stream; the daemon's ``verification``
        event, which the page waits for, says whether they did."""
        try:
            body = await json_body(request)
            request_ = {"cmd": "challenge", "speaker": field(body, "speaker", str), "stream": field(body, "stream", str),
                        "length": field(body, "length", int, 4), "ttl_s": field(body, "ttl_s", float, 30.0)}
        except BadRequest as exc:
            return JSONResponse({"ok": False, "error": f"challenge: {exc}"}, status_code=400)
        return answer(await self.link.ask(request_))
