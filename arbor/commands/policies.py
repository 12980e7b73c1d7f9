"""`arbor policies`: list policy versions, create the first one, or register your own model.

    arbor policies [--json]
    arbor policies init                                  # the store's schema and the built-in v0 (warm-started)
    arbor policies add ./my-model                        # a local transformers folder becomes the promoted version
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from arbor.commands.common import console, fail, open_store, queue_settings

policies_app = typer.Typer(help="Policy versions: list them, or register your own model.", no_args_is_help=False)


@policies_app.callback(invoke_without_command=True)
def policies(ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help="print a JSON list")):
    """List policy versions (the promoted one marked)."""
    if ctx.invoked_subcommand is not None:
        return
    from agent.versions import on_disk, shown_size

    store = open_store(queue_settings())
    rows = [{"version": r.version, "path": r.path, "status": r.status, "metrics": r.metrics, **on_disk(r.path)}
            for r in store.policies()]
    if as_json:
        typer.echo(json.dumps(rows, indent=2, default=str))
        return
    if not rows:
        typer.echo("no policy versions yet: `arbor policies add PATH` or `arbor run`")
    for r in rows:
        typer.echo(f"{'*' if r['status'] == 'promoted' else ' '} {r['version']:6} {r['status']:9} "
                   f"{r['kind'] or '-':12} {shown_size(r['bytes']):>9} {r['prompt_format'] or '-':4} {r['path']}")


@policies_app.command("init")
def policies_init():
    """Create the store's schema and, when no version is promoted yet, warm-start the built-in policy as v0."""
    from agent.warm_start import ensure_policy
    from agent.registry import PolicyRegistry

    settings = queue_settings(model=True)
    store = open_store(settings)
    registry = PolicyRegistry(settings.policies_dir, store)
    if registry.promoted() is None:
        with console.status("warm-starting the built-in policy"):
            ensure_policy(settings, registry)
    typer.echo(registry.promoted()[0])


@policies_app.command("add")
def policies_add(path: Path = typer.Argument(..., help="a local transformers model folder (save_pretrained)")):
    """Register a local model folder as a new version and promote it: workers move to it between jobs."""
    from agent.policy import PolicyLoadError
    from agent.registry import PolicyRegistry

    if not path.is_dir():
        fail(f"{path} is not a folder: pass a directory written by save_pretrained (config.json, weights, tokenizer)")
    settings = queue_settings()
    store = open_store(settings)
    try:
        version = PolicyRegistry(settings.policies_dir, store).add_external(path, promote=True)
    except PolicyLoadError as exc:
        fail(f"{exc}; nothing was registered")
    typer.echo(version)
