"""The API token, the login page's sessions, and the dependencies the routers declare.

The token itself is checked in the ASGI layer before any body is read (gate.py); the dependencies here refuse a
request the gate did not pass (a router mounted without it) and put the bearer scheme into the schema. The login
page trades the token for a random session id in a cookie: the token never sits in a browser, and a session ends
at logout or after SESSION_S.
"""

from __future__ import annotations

import secrets
import threading
import time

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.security import HTTPBearer

from arbor.api.pages import page

COOKIE = "arbor_session"
SESSION_S = 12 * 3600


def resolve_token(settings) -> str | None:
    """The API token (agent/settings.py resolve_api_token: at least 16 characters); None when none is set."""
    from agent.settings import resolve_api_token

    return resolve_api_token(settings)


class Sessions:
    """Logged-in browser sessions, in this process's memory (a restart logs everyone out)."""

    def __init__(self, lifetime_s: float = SESSION_S, most: int = 10_000):
        self.lifetime_s, self.most = lifetime_s, most
        self._until: dict[str, float] = {}
        self._lock = threading.Lock()

    def start(self) -> str:
        sid = secrets.token_urlsafe(32)
        now = time.monotonic()
        with self._lock:
            self._until = {k: t for k, t in self._until.items() if t > now}
            if len(self._until) >= self.most:  # the oldest goes first
                self._until.pop(min(self._until, key=self._until.get))
            self._until[sid] = now + self.lifetime_s
        return sid

    def valid(self, sid: str) -> bool:
        with self._lock:
            return self._until.get(sid, 0.0) > time.monotonic()

    def end(self, sid: str | None) -> None:
        with self._lock:
            self._until.pop(sid or "", None)


class LoginRequired(Exception):
    """A web page asked for without a session: create_app answers with a redirect to the login page."""


bearer = HTTPBearer(auto_error=False, description="the API token (ARBOR_API_TOKEN)")


def _passed(request: Request) -> bool:
    return request.app.state.token is None or bool(request.scope.get("arbor.authorized"))


def require_token(request: Request, _credentials=Depends(bearer)) -> None:
    """The JSON API's dependency: 401 unless the gate let the request through."""
    if not _passed(request):
        raise HTTPException(401, "missing or wrong API token: send `Authorization: Bearer TOKEN`",
                            headers={"WWW-Authenticate": "Bearer"})


def require_login(request: Request) -> None:
    """The web pages' dependency: to the login page unless the gate let the request through."""
    if not _passed(request):
        raise LoginRequired()


router = APIRouter(include_in_schema=False)


def _target(next_path: str) -> str:
    return next_path if next_path.startswith("/") and not next_path.startswith("//") else "/jobs"


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: str = "/jobs"):
    return page(request, "login.html", next=_target(next), error=None)


@router.post("/login")
def login(request: Request, token_given: str = Form("", alias="token"), next: str = Form("/jobs")):
    token = request.app.state.token
    if token is not None and not secrets.compare_digest(token_given.encode(), token.encode()):
        return page(request, "login.html", code=401, next=_target(next), error="wrong token")
    response = RedirectResponse(_target(next), status_code=303)
    secure = request.url.scheme == "https" or request.app.state.service.cfg.secure_cookie
    response.set_cookie(COOKIE, request.app.state.sessions.start(), max_age=SESSION_S, httponly=True,
                        samesite="strict", secure=secure)
    return response


@router.post("/logout", dependencies=[Depends(require_login)])
def logout(request: Request):
    request.app.state.sessions.end(request.cookies.get(COOKIE))
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE)
    return response
