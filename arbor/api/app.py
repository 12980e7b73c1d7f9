"""create_app: the FastAPI app of `arbor serve` (arbor/commands/serve.py), the JSON API and the web view in one.

The routes live in routes_api.py (/api/*), routes_web.py (the pages) and auth.py (login, logout); what they share
is one Service (service.py) in app.state.service and the API token in app.state.token.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

from arbor.api import auth, routes_api, routes_web
from arbor.api.config import ApiConfig
from arbor.api.limits import BodyLimit
from arbor.api.pages import WEB
from arbor.api.service import ApiError, Service


async def _api_error(_request: Request, exc: ApiError):
    body = {"detail": exc.detail}
    if exc.errors is not None:
        body["errors"] = exc.errors
    return JSONResponse(body, status_code=exc.status)


async def _login(request: Request, _exc: auth.LoginRequired):
    return RedirectResponse(f"/login?next={request.url.path}", status_code=303)


def create_app(settings=None, cfg: ApiConfig | None = None, token: str | None = None, require_token: bool = True):
    """The ASGI app (the body limit around FastAPI). settings: agent.settings.Settings (default: the environment);
    token: the API token (default: auth.resolve_token(settings)); require_token=False serves without one (local
    use)."""
    if settings is None:
        from agent.settings import Settings

        settings = Settings(device="cpu")
    token = token if token is not None else auth.resolve_token(settings)
    if token is None and require_token:
        raise ValueError("no API token: set ARBOR_API_TOKEN or ARBOR_API_TOKEN_FILE (or serve with --no-auth on a "
                         "trusted host)")
    api = FastAPI(title="Arbor", version="0.1.0",
                  description="Submit problems, follow jobs, read results, manage policy versions and runs. Every "
                              "route but /api/health needs the API token: `Authorization: Bearer TOKEN`.")
    api.state.service = Service(settings, cfg or ApiConfig())
    api.state.token = token
    api.add_exception_handler(ApiError, _api_error)
    api.add_exception_handler(auth.LoginRequired, _login)
    api.include_router(routes_api.public)
    api.include_router(routes_api.router)
    api.mount("/static", StaticFiles(directory=str(WEB / "static")), name="static")
    api.include_router(routes_web.home_router)
    api.include_router(auth.router)
    api.include_router(routes_web.router)
    return BodyLimit(api, settings.api_max_request_bytes)


def openapi_schema(app) -> dict:
    """The schema the app serves at /openapi.json (app: what create_app returned)."""
    return app.app.openapi()
