"""The HTTP API and the web view, one FastAPI app (served by `arbor serve`, arbor/commands/serve.py).

    config.py      ApiConfig: the server's options (no web framework: the CLI reads it for its flags)
    app.py         create_app: the app, its routers, its exception handlers, the body limit around it
    service.py     Service: the store, the broker, and the rules for jobs, policies and runs
    routes_api.py  /api/* (JSON; docs/openapi.json)        routes_web.py  the pages (jinja2, arbor/web/)
    auth.py        the API token, its dependencies, login and logout
    gate.py        the token and the body limit (ASGI)      models.py      the JSON bodies of /api/*

Submission is `arbor submit`'s (arbor/submission.py). Open without the token: GET /api/health, GET and POST
/login, and /static/*. Everything else needs the API token (Settings.api_token), checked before any body is read
(gate.py): /api/* and /openapi.json take only `Authorization: Bearer TOKEN`; the web pages (/, /jobs..., /runs...,
/policies..., /logout) take the header or the login page's session cookie (a random id, never the token). There
are no /docs or /redoc pages. Request bodies are limited to Settings.api_max_request_bytes, counted as they arrive.
"""

from arbor.api.config import ApiConfig


def __getattr__(name: str):
    # the app loads FastAPI: only when asked for, so that `arbor --help` (serve's flags read ApiConfig) stays quick
    if name in ("create_app", "openapi_schema"):
        from arbor.api import app

        return getattr(app, name)
    if name == "resolve_token":
        from arbor.api.auth import resolve_token

        return resolve_token
    raise AttributeError(f"module 'arbor.api' has no attribute {name!r}")


__all__ = ["ApiConfig", "create_app", "openapi_schema", "resolve_token"]
