"""The `arbor` command line: each command is a plain function in arbor/commands/<name>.py, registered here.

Command modules import nothing heavy at the top (no torch, no web framework): `arbor worker` (the Celery parent,
which must stay free of CUDA), the queue commands and `arbor --help` load only what they use; a command that needs
a model stack imports it inside its function (tests/test_cli_imports.py).
"""

from __future__ import annotations

import typer

from arbor.commands import jobs, policies, run, search, serve, submit, worker

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Arbor: a self-improving problem solver.")

# the order `arbor --help` lists them in (typer lists a command group, `policies`, after the commands)
app.command()(jobs.requeue)
app.command()(jobs.status)
app.command()(jobs.results)
app.command()(jobs.train)
app.command()(worker.worker)
app.command()(worker.beat)
app.command()(worker.flower)
app.command("run")(run.run)
app.command("search")(search.search_command)
app.command()(submit.submit)
app.command()(serve.serve)
app.add_typer(policies.policies_app, name="policies")
