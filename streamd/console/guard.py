"""The ASGI middleware that applies the access policy to every request, and the security
headers every response carries."""

from __future__ import annotations

import asyncio
from http.cookies import SimpleCookie

from starlette.datastructures import Headers
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from streamd.console.access import Policy

OPEN_PATHS = ("/login", "/static/console.css")  # reachable before the token is given
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'"),
    (b"x-frame-options", b"DENY"),  # no page may frame the console and trick a click on "remove"
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]


def cookies_of(headers: Headers) -> dict[str, str]:
    jar = SimpleCookie()
    try:
        jar.load(headers.get("cookie", ""))
    except Exception:  # a malformed Cookie header is as good as none
        return {}
    return {k: v.value for k, v in jar.items()}


class Guard:
    def __init__(self, app: ASGIApp, policy: Policy):
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = await self.refusal(scope)

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + SECURITY_HEADERS
            await send(message)

        await (refusal or self.app)(scope, receive, with_headers)

    async def refusal(self, scope: Scope) -> Response | None:
        headers = Headers(scope=scope)
        plain = {k.lower(): v for k, v in headers.items()}
        path, method = scope["path"], scope["method"]
        if not self.policy.host_allowed(plain.get("host", "")):
            return PlainTextResponse("this console answers to loopback names only (127.0.0.1, localhost)\n",
                                     status_code=421)
        if path not in OPEN_PATHS and not self.policy.authenticated(plain, cookies_of(headers)):
            if path.startswith("/api/") or method != "GET":
                await asyncio.sleep(0.2)  # a guesser gets five tries a second per connection
                return JSONResponse({"ok": False, "error": "a token is needed: log in, or send "
                                     "Authorization: Bearer TOKEN"}, status_code=401)
            return RedirectResponse("/login", status_code=303)
        if method == "POST" and path != "/login" and not self.policy.csrf_ok(plain):
            return JSONResponse({"ok": False, "error": "refused: changes need the page's CSRF token "
                                 "(X-CSRF-Token header) from this console's own pages; reload the page if the console restarted"}, status_code=403)
        if method == "POST" and path == "/login" and not self.policy.same_origin(plain):
            return JSONResponse({"ok": False, "error": "refused: a login from another site"}, status_code=403)
        return None
