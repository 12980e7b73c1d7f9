"""What the queue commands share: settings without torch, the store, the broker check, one-line failures."""

from __future__ import annotations

import typer
from rich.console import Console

from arbor.options import load_settings

console = Console(stderr=True)


def fail(message: str) -> None:
    """End the command with one line (a URL's password is never printed)."""
    from agent.settings import mask

    typer.echo(f"error: {mask(message)}", err=True)
    raise typer.Exit(1)


def queue_settings(model: bool = False):
    """Settings from the environment. The device matters only where this process loads a model (model=True:
    ARBOR_DEVICE, default auto); "cpu" keeps torch out of the queue-only commands."""
    return load_settings() if model else load_settings(device="cpu")


def open_store(settings):
    from agent.store import Store

    try:
        return Store(settings.db_url)
    except Exception as exc:
        fail(f"cannot open the store at {settings.db_url}: {type(exc).__name__}: {str(exc).splitlines()[0]} "
             "(check ARBOR_DATABASE_URL and that the database is running)")


def check_broker(url: str) -> None:
    from arbor.submission import BrokerError, check_broker as ping

    try:
        ping(url)
    except BrokerError as exc:
        fail(f"{exc}: start Redis, or unset ARBOR_BROKER_URL to run jobs in this process; nothing was submitted")
