"""What a request must pass before the app reads a byte of its body (ASGI, around the whole app): one framing
header, the token, and the body limit counted as the body arrives, whatever the headers say.

    Gate(BodyLimit(app))   the Gate answers 401 (or the login redirect) before any body is read;
                           BodyLimit answers 400 for both Content-Length and Transfer-Encoding, 413 over the limit

Open without the token: OPEN_PATHS (/api/health, /login) and /static/*. Everything else, /openapi.json included,
needs `Authorization: Bearer TOKEN`; the web pages also take the login page's session cookie (auth.py Sessions),
which /api/* and /openapi.json never accept, so that a browser's cookie cannot drive the JSON API. A
state-changing page request with the cookie must come from the same site (Sec-Fetch-Site, Origin).
"""

from __future__ import annotations

import json
import secrets
from http.cookies import SimpleCookie
from urllib.parse import quote, urlsplit

OPEN_PATHS = ("/api/health", "/login")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


async def send_json(send, status: int, detail: str, headers: list | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


def _header(scope, name: bytes) -> list[bytes]:
    return [v for k, v in scope["headers"] if k == name]


def is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith("/static/")


def is_api(path: str) -> bool:
    return path.startswith("/api/") or path == "/openapi.json"


class Gate:
    """The token (and, for pages, the session cookie) before the app; sessions: auth.Sessions; token None: open."""

    def __init__(self, app, token: str | None, sessions, cookie: str):
        self.app, self.token, self.sessions, self.cookie = app, token, sessions, cookie

    def _bearer(self, scope) -> bool:
        given = b"".join(_header(scope, b"authorization")[:1]).decode("latin-1")
        return given[:7].lower() == "bearer " and secrets.compare_digest(given[7:].strip().encode("latin-1"),
                                                                          self.token.encode())

    def _session(self, scope) -> bool:
        jar = SimpleCookie()
        for raw in _header(scope, b"cookie"):
            try:
                jar.load(raw.decode("latin-1"))
            except Exception:
                return False
        return self.cookie in jar and self.sessions.valid(jar[self.cookie].value)

    @staticmethod
    def _cross_site(scope) -> bool:
        site = b"".join(_header(scope, b"sec-fetch-site")[:1]).decode("latin-1")
        if site in ("cross-site", "same-site"):
            return True
        origin = b"".join(_header(scope, b"origin")[:1]).decode("latin-1")
        host = b"".join(_header(scope, b"host")[:1]).decode("latin-1")
        return bool(origin) and (origin == "null" or urlsplit(origin).netloc != host)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.token is None or is_open(scope["path"]):
            return await self.app(scope, receive, send)
        if self._bearer(scope):
            scope["arbor.authorized"] = True
            return await self.app(scope, receive, send)
        path = scope["path"]
        if is_api(path):
            return await send_json(send, 401, "missing or wrong API token: send `Authorization: Bearer TOKEN` (the "
                                              "login cookie is for the web pages only)",
                                   [(b"www-authenticate", b"Bearer")])
        if self._session(scope):
            if scope["method"] not in SAFE_METHODS and self._cross_site(scope):
                return await send_json(send, 403, "a change from another site is refused: use the page itself")
            scope["arbor.authorized"] = True
            return await self.app(scope, receive, send)
        location = f"/login?next={quote(path)}".encode("latin-1")
        await send({"type": "http.response.start", "status": 303,
                    "headers": [(b"location", location), (b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})


class BodyTooLarge(Exception):
    """The body grew past the limit while the app read it (the 413 is already sent)."""


class BodyLimit:
    """Settings.api_max_request_bytes, counted through `receive`: chunked, a Content-Length that lies, or none."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    def _over(self, size: str) -> str:
        return (f"request body is {size} bytes, over the limit of {self.limit} (ARBOR_API_MAX_REQUEST_BYTES): split "
                "the file into smaller ones")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        lengths, encodings = _header(scope, b"content-length"), _header(scope, b"transfer-encoding")
        if lengths and encodings:
            return await send_json(send, 400, "both Content-Length and Transfer-Encoding are set: send one of them")
        if len(lengths) > 1 or (lengths and not lengths[0].isdigit()):
            return await send_json(send, 400, "Content-Length must be one whole number")
        if lengths and int(lengths[0]) > self.limit:
            return await send_json(send, 413, self._over(lengths[0].decode()))
        received, refused, started = 0, False, False

        async def counted():
            nonlocal received, refused
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                if not started and not refused:
                    refused = True
                    await send_json(send, 413, self._over(f"over {received}"), [(b"connection", b"close")])
                raise BodyTooLarge()
            return message

        async def guarded(message):
            nonlocal started
            if refused:
                return  # the 413 went out; whatever the app answers to the interrupted read is dropped
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, guarded)
        except BodyTooLarge:
            if not refused:
                raise
