"""CLI options that take their default and help from a config dataclass field: a default is written once.

    beams: int = option(SearchConfig, "beams")                          # --beams, default 4, SearchConfig's help
    samples: int = option(LoopConfig().search, "n", "--samples")        # an instance: its own value is the default
    n: Optional[int] = option(SearchConfig, "n", unset=True)            # None when not given (overrides a file)

Fields read from the environment (agent/settings.py Settings) show their variable and documented default in the
help, and are never read here: the CLI reads the environment only through Settings.
"""

from __future__ import annotations

from dataclasses import MISSING, fields, is_dataclass
from typing import Any

import typer


def _field(source, name: str):
    cls = source if isinstance(source, type) else type(source)
    if not is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a config dataclass")
    for f in fields(cls):
        if f.name == name:
            if not f.metadata.get("help"):
                raise KeyError(f"{cls.__name__}.{name} has no help in its metadata")
            return f
    raise KeyError(f"{cls.__name__} has no field {name!r}")


def field_default(source, name: str) -> Any:
    """The field's default: an instance's own value, a declared default, or (Settings) the documented default."""
    f = _field(source, name)
    if not isinstance(source, type):
        return getattr(source, name)
    if "env" in f.metadata:  # read from the environment: never evaluated at import time
        return f.metadata["default"]
    if f.default is not MISSING:
        return f.default
    return f.default_factory()


def field_help(source, name: str) -> str:
    f = _field(source, name)
    text = f.metadata["help"]
    if "env" in f.metadata:
        text += f" (environment: {f.metadata['env']})"
    return text


def _shown(value) -> str | bool:
    if value is None:
        return False
    return repr(value) if isinstance(value, str) and (value.strip() != value or not value) else str(value)


def option(source, name: str, *flags: str, unset: bool = False, **kwargs) -> Any:
    """A typer.Option for field `name` of `source` (a config dataclass or an instance of one).

    unset=True: the option's value is None when the flag is not given (the help still shows the default), so that
    a flag can override a config file or the environment only when given. Other keyword arguments go to typer."""
    default = field_default(source, name)
    help_text = kwargs.pop("help", None) or field_help(source, name)
    if unset or "env" in _field(source, name).metadata:
        return typer.Option(None, *flags, help=help_text, show_default=_shown(default), **kwargs)
    return typer.Option(default, *flags, help=help_text, **kwargs)


def load_settings(**given):
    """Settings from the environment with the flags that were given (None: not given); a bad value (e.g.
    ARBOR_DTYPE=float64) ends the command with one line."""
    from agent.settings import Settings

    try:
        return Settings(**{k: v for k, v in given.items() if v is not None})
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
