"""`arbor serve`: the HTTP API and the web view (arbor/api/) under uvicorn.

    ARBOR_API_TOKEN=... arbor serve --host 0.0.0.0 --port 8000
    ARBOR_API_TOKEN_FILE=/run/secrets/arbor_api_token arbor serve     # the token from a file
    arbor serve --no-auth                                          # a trusted host only: no token asked
    arbor serve --no-auth --write-openapi docs/openapi.json        # the schema the server serves, to a file

Jobs submitted through the API go to the broker (ARBOR_BROKER_URL) for `arbor worker` processes; the store is
ARBOR_DATABASE_URL's. The server itself loads no model (the tree page loads a version's tokenizer only).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from arbor.api import ApiConfig
from arbor.options import load_settings, option


def serve(
    host: str = option(ApiConfig, "host"),
    port: int = option(ApiConfig, "port"),
    poll_s: float = option(ApiConfig, "poll_s", "--poll-s"),
    max_streams: int = option(ApiConfig, "max_streams", "--max-streams"),
    secure_cookie: bool = typer.Option(False, "--secure-cookie", help=ApiConfig.__dataclass_fields__["secure_cookie"]
                                       .metadata["help"]),
    no_auth: bool = typer.Option(False, "--no-auth", help="serve without an API token (a trusted host only)"),
    log_level: str = typer.Option("info", help="uvicorn's log level"),
    write_openapi: Optional[Path] = typer.Option(None, "--write-openapi",
                                                 help="write the OpenAPI schema to this file and exit "
                                                      "(docs/openapi.json)"),
):
    """Serve the HTTP API (its schema at /openapi.json, with the token) and the web view of runs, jobs, policies and
    search trees."""
    import uvicorn

    from arbor.api import create_app

    settings = load_settings(device="cpu")
    try:
        asgi = create_app(settings, ApiConfig(host=host, port=port, poll_s=poll_s, max_streams=max_streams,
                                                    secure_cookie=secure_cookie),
                          require_token=not (no_auth or write_openapi is not None))
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    if write_openapi is not None:
        from arbor.api import openapi_schema

        write_openapi.write_text(json.dumps(openapi_schema(asgi), indent=2, sort_keys=True) + "\n")
        typer.echo(f"wrote {write_openapi}")
        return
    try:
        asgi.api.state.service.store  # noqa: B018  (opens it: a bad ARBOR_DATABASE_URL fails before listening)
    except Exception as exc:
        from agent.settings import mask

        typer.echo(mask(f"error: cannot open the store at {settings.db_url}: {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0]} (check ARBOR_DATABASE_URL and that the database is running)"),
                   err=True)
        raise typer.Exit(1) from None
    if no_auth:
        typer.echo("warning: serving without an API token (--no-auth): anyone who reaches this port can submit and "
                   "promote", err=True)
    uvicorn.run(asgi, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
