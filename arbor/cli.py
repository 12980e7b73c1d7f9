"""The `arbor` command line. Each command group lives in arbor/commands/<name>.py and registers on `app`."""

from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Arbor: a self-improving problem solver.")

# command modules register themselves on `app` when imported
from arbor.commands import run as _run  # noqa: E402,F401
from arbor.commands import jobs as _jobs  # noqa: E402,F401
from arbor.commands import worker as _worker  # noqa: E402,F401
from arbor.commands import search as _search  # noqa: E402,F401
