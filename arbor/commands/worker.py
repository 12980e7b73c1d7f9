"""`arbor worker`, `arbor beat`, `arbor flower`: the processes of a queued deployment (see compose.yaml).

    arbor worker --queues search --device cuda:0 --name search0    # one per GPU
    arbor worker --queues train,default --device cuda:1 --name trainer
    arbor beat                                                       # exactly one: starts train cycles on schedule
    arbor flower --port 5555                                         # needs `pip install arbor[deploy]`
"""

from __future__ import annotations

import os
from typing import Optional

import typer

from agent.settings import Settings
from arbor.options import option


def _setting(name: str):
    """One setting from the environment, without building Settings (no torch here); a bad value: one line."""
    try:
        return Settings.env(name)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


def _broker_or_exit() -> str:
    url = _setting("broker_url")
    if not url:
        typer.echo("error: no broker configured: set ARBOR_BROKER_URL=redis://HOST:6379/0 (without one, "
                   "`arbor submit` runs jobs in process and needs no worker)", err=True)
        raise typer.Exit(1)
    return url


def worker(
    queues: str = typer.Option("search,default", help="comma-separated queues: search, train, default"),
    device: Optional[str] = option(Settings, "device"),
    dtype: Optional[str] = option(Settings, "dtype"),
    name: str = typer.Option(None, help="worker node name (default: <first queue>@<host>)"),
    loglevel: str = typer.Option("INFO", help="Celery log level"),
):
    """Serve jobs from the queue: one process that loads the promoted policy once and reloads it between jobs."""
    _broker_or_exit()
    from workers.config import QUEUES

    wanted = [q.strip() for q in queues.split(",") if q.strip()]
    unknown = [q for q in wanted if q not in QUEUES]
    if unknown or not wanted:
        typer.echo(f"error: unknown queue(s) {', '.join(unknown) or '(none given)'}: choose from "
                   f"{', '.join(QUEUES)}", err=True)
        raise typer.Exit(1)
    # passed on to the pool child, whose Settings() reads them when it loads the model (the parent never touches CUDA)
    if device:
        os.environ["ARBOR_DEVICE"] = device
    if dtype:
        os.environ["ARBOR_DTYPE"] = dtype
    _setting("dtype")  # a bad ARBOR_DTYPE ends here with one line, not in a pool child that restarts in a loop
    _setting("visibility_timeout")
    _setting("lease_ttl")
    from workers.app import app as celery_app

    # prefork with one child: the parent keeps heartbeats and remote control alive during a job, a killed child's
    # job is requeued at once, and a time limit can end a stuck search (notes: solo can do none of these)
    celery_app.worker_main([
        "worker", "-Q", ",".join(wanted), "--pool=prefork", "--concurrency=1", "-E",
        "-n", name or f"{wanted[0]}@%h", f"--loglevel={loglevel}",
    ])


def beat(
    schedule: str = typer.Option(None, help="schedule state file (default: $ARBOR_HOME/celerybeat-schedule)"),
    loglevel: str = typer.Option("INFO", help="Celery log level"),
):
    """Start train cycles every ARBOR_TRAIN_EVERY_S seconds. Run exactly one per deployment."""
    _broker_or_exit()
    from pathlib import Path

    from workers.app import app as celery_app

    home = Path(_setting("home"))
    home.mkdir(parents=True, exist_ok=True)
    celery_app.start(["beat", "-s", schedule or str(home / "celerybeat-schedule"), f"--loglevel={loglevel}"])


def flower(port: int = typer.Option(5555, help="HTTP port"),
           address: str = typer.Option("127.0.0.1", help="bind address")):
    """The Flower dashboard over the queue (workers send events). Binds to localhost unless told otherwise."""
    _broker_or_exit()
    try:
        import flower as _flower  # noqa: F401
    except ImportError:
        typer.echo("error: Flower is not installed: pip install 'arbor[deploy]'", err=True)
        raise typer.Exit(1) from None
    from workers.app import app as celery_app

    celery_app.start(["flower", f"--port={port}", f"--address={address}"])
