"""create_app: the FastAPI app of `arbor serve` (arbor/commands/serve.py), the JSON API and the web view in one.

The routes live in routes_api.py (/api/*), routes_web.py (the pages) and auth.py (login, logout); what they share
is one Service (service.py) in app.state.service, the API token in app.state.token and the login sessions in
app.state.sessions. Around the app: gate.py (the token, then the body limit, before any body is read). No /docs or
/redoc pages (they load scripts from a CDN); the schema is /openapi.json, with the token, and docs/openapi.json.

Every refusal is JSON with a `detail`: one line from the app (ApiError), or FastAPI's list of validation errors.
What the app cannot do for a reason outside the request is a 503 naming it: the database cannot be reached, the
disk is full, a run's report.json is damaged.
"""

from __future__ import annotations

import errno
import json

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

from arbor.api import auth, routes_api, routes_web
from arbor.api.config import ApiConfig
from arbor.api.gate import BodyLimit, Gate
from arbor.api.pages import WEB
from arbor.api.service import ApiError, Service


class AsciiJSON(JSONResponse):
    """JSON in ASCII: text from a request (a lone surrogate included) is echoed escaped, never a 500."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":"), default=str).encode()


def _refused(status: int, detail: str, errors=None, headers=None) -> AsciiJSON:
    return AsciiJSON({"detail": detail, **({"errors": errors} if errors is not None else {})}, status_code=status,
                     headers=headers)


async def _api_error(_request: Request, exc: ApiError):
    return _refused(exc.status, exc.detail, exc.errors, exc.headers)


async def _validation(_request: Request, exc: RequestValidationError):
    return AsciiJSON({"detail": jsonable_encoder(exc.errors(), custom_encoder={bytes: lambda b: repr(b)[:80]})},
                     status_code=422)


async def _too_deep(_request: Request, _exc: RecursionError):
    return _refused(422, "the request is nested too deeply (JSON arrays or objects inside each other): flatten it")


async def _database_down(_request: Request, exc: Exception):
    return _refused(503, f"the database cannot be reached ({type(exc).__name__}): try again once it is back")


async def _os_error(_request: Request, exc: OSError):
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return _refused(503, "no space left on the server's disk: nothing was submitted; free some and try again")
    return _refused(500, f"the server could not read or write a file ({type(exc).__name__}: {exc.strerror})")


async def _wrong_method(request: Request, _exc):
    """405 with every method of the path in Allow (Starlette names only the first matching route's)."""
    from starlette.routing import Match

    allowed = sorted({m for r in request.app.routes if getattr(r, "methods", None)
                      and r.matches(request.scope)[0] is not Match.NONE for m in r.methods})
    return _refused(405, f"{request.method} is not allowed here: use {', '.join(allowed)}",
                    headers={"Allow": ", ".join(allowed)})


async def _login(request: Request, _exc: auth.LoginRequired):
    return RedirectResponse(f"/login?next={request.url.path}", status_code=303)


def create_app(settings=None, cfg: ApiConfig | None = None, token: str | None = None, require_token: bool = True):
    """The ASGI app (gate.py around FastAPI; the FastAPI app is its `.api`). settings: agent.settings.Settings
    (default: the environment); token: the API token (default: auth.resolve_token(settings)); require_token=False
    serves without one (local use)."""
    from sqlalchemy.exc import InterfaceError, OperationalError

    if settings is None:
        from agent.settings import Settings

        settings = Settings(device="cpu")
    token = token if token is not None else auth.resolve_token(settings)
    if token is None and require_token:
        raise ValueError("no API token: set ARBOR_API_TOKEN or ARBOR_API_TOKEN_FILE (or serve with --no-auth on a "
                         "trusted host)")
    api = FastAPI(title="Arbor", version="0.1.0", docs_url=None, redoc_url=None, default_response_class=AsciiJSON,
                  description="Submit problems, follow jobs, read results, manage policy versions and runs. Every "
                              "route but /api/health needs the API token: `Authorization: Bearer TOKEN`.")
    api.state.service = Service(settings, cfg or ApiConfig())
    api.state.token = token
    api.state.sessions = auth.Sessions()
    api.add_exception_handler(ApiError, _api_error)
    api.add_exception_handler(RequestValidationError, _validation)
    api.add_exception_handler(RecursionError, _too_deep)
    api.add_exception_handler(OperationalError, _database_down)
    api.add_exception_handler(InterfaceError, _database_down)
    api.add_exception_handler(OSError, _os_error)
    api.add_exception_handler(auth.LoginRequired, _login)
    api.add_exception_handler(405, _wrong_method)
    api.include_router(routes_api.public)
    api.include_router(routes_api.router)
    api.mount("/static", StaticFiles(directory=str(WEB / "static")), name="static")
    api.include_router(routes_web.home_router)
    api.include_router(auth.router)
    api.include_router(routes_web.router)
    gate = Gate(BodyLimit(api, settings.api_max_request_bytes), token, api.state.sessions, auth.COOKIE)
    gate.api = api
    return gate


def openapi_schema(app) -> dict:
    """The schema the app serves at /openapi.json (app: what create_app returned)."""
    return app.api.openapi()
