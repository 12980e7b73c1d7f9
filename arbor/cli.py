"""The `arbor` command line. Each command group lives in arbor/commands/<name>.py and registers on `app`.

`run`, `search` and `submit` take their option defaults from config dataclasses whose modules import torch, so
their modules are imported only when one of them is named (or `--help` lists them): `arbor worker` (the Celery
parent, which must stay free of CUDA) and the queue commands never import torch.
"""

from __future__ import annotations

import importlib

import typer
from typer.core import TyperGroup

LAZY = {"run": "arbor.commands.run", "search": "arbor.commands.search", "submit": "arbor.commands.submit",
        "serve": "arbor.commands.serve"}


class _LazyGroup(TyperGroup):
    def list_commands(self, ctx) -> list[str]:
        return list(dict.fromkeys([*super().list_commands(ctx), *LAZY]))

    def get_command(self, ctx, name: str):
        if name in LAZY and name not in self.commands:
            importlib.import_module(LAZY[name])  # registers the command on `app`
            for info in app.registered_commands:
                if (info.name or typer.main.get_command_name(info.callback.__name__)) == name:
                    self.add_command(typer.main.get_command_from_info(
                        info, pretty_exceptions_short=app.pretty_exceptions_short, rich_markup_mode=app.rich_markup_mode), name)
        return super().get_command(ctx, name)


app = typer.Typer(add_completion=False, no_args_is_help=True, help="Arbor: a self-improving problem solver.", cls=_LazyGroup)

# command modules register themselves on `app` when imported
from arbor.commands import jobs as _jobs  # noqa: E402,F401
from arbor.commands import worker as _worker  # noqa: E402,F401
