"""The API token: where it comes from, the dependencies that ask for it, and the login page that sets its cookie.

A request carries the token as `Authorization: Bearer TOKEN` or as the cookie the login page sets. create_app keeps
the token in app.state.token (None: serving without one, `arbor serve --no-auth`).
"""

from __future__ import annotations

import secrets
from pathlib import Path

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from arbor.api.pages import page

COOKIE = "arbor_token"


def resolve_token(settings) -> str | None:
    """ARBOR_API_TOKEN, else the contents of ARBOR_API_TOKEN_FILE (stripped); None when neither is set."""
    if settings.api_token:
        return settings.api_token
    if settings.api_token_file is not None:
        try:
            token = Path(settings.api_token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ValueError(f"ARBOR_API_TOKEN_FILE={settings.api_token_file}: cannot read it "
                             f"({exc.strerror})") from None
        if not token:
            raise ValueError(f"ARBOR_API_TOKEN_FILE={settings.api_token_file} is empty")
        return token
    return None


class LoginRequired(Exception):
    """A web page asked for without the token: create_app answers with a redirect to the login page."""


def _matches(given: str | None, token: str) -> bool:
    return given is not None and secrets.compare_digest(given.encode(), token.encode())


def _given_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return request.cookies.get(COOKIE)


def _allowed(request: Request) -> bool:
    token = request.app.state.token
    return token is None or _matches(_given_token(request), token)


def require_token(request: Request) -> None:
    """The JSON API's dependency: 401 without the token."""
    if not _allowed(request):
        raise HTTPException(401, "missing or wrong API token: send `Authorization: Bearer TOKEN`",
                            headers={"WWW-Authenticate": "Bearer"})


def require_login(request: Request) -> None:
    """The web pages' dependency: to the login page without the token."""
    if not _allowed(request):
        raise LoginRequired()


router = APIRouter(include_in_schema=False)


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: str = "/jobs"):
    return page(request, "login.html", next=next if next.startswith("/") else "/jobs", error=None)


@router.post("/login")
def login(request: Request, token_given: str = Form("", alias="token"), next: str = Form("/jobs")):
    target = next if next.startswith("/") and not next.startswith("//") else "/jobs"
    token = request.app.state.token
    if token is not None and not _matches(token_given, token):
        return page(request, "login.html", code=401, next=target, error="wrong token")
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(COOKIE, token_given, httponly=True, samesite="strict")
    return response


@router.post("/logout")
def logout():
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE)
    return response
