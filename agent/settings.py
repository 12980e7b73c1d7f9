"""Every setting read from the environment, in one place: the only module that reads ARBOR_* variables.

`Settings()` reads each field's variable (its default when unset or empty); CLI flags override fields by passing
them (`Settings(device="cpu")`). `Settings.env(name)` reads one field without building the rest: the Celery
parent reads its queue numbers that way and never imports torch (device "auto" is resolved, importing torch,
only when a Settings object is built). A bad value fails with one line that names the variable.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

DTYPES = ("float32", "bfloat16", "float16")


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _int(raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise ValueError("is not an integer") from None


def _float(raw: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise ValueError("is not a number") from None


def _switch(raw: str) -> bool:
    if raw.lower() not in ("1", "0", "true", "false", "on", "off", "yes", "no"):
        raise ValueError("is not one of on, off (or 1, 0, true, false, yes, no)")
    return raw.lower() in ("1", "true", "on", "yes")


def _adapter(raw: str) -> str:
    if raw not in ("auto", "full", "lora"):  # agent/config.py ADAPTERS (this module imports no config)
        raise ValueError("is not one of auto, full, lora")
    return raw


def _dtype(raw: str) -> str:
    if raw not in DTYPES:
        raise ValueError(f"is not one of {', '.join(DTYPES)}")
    return raw


def _env(var: str, default, help: str, parse=str, minimum: int | None = None):
    """A field read from the environment variable `var` when the object is built."""

    def read():
        raw = os.environ.get(var)
        if raw is None or raw.strip() == "":
            return default
        try:
            return parse(raw.strip())
        except ValueError as exc:
            raise ValueError(f"{var}={raw!r} {exc}") from None

    meta = {"help": help, "env": var, "default": default}
    if minimum is not None:
        meta["minimum"] = minimum
    return field(default_factory=read, metadata=meta)


def _secret(var: str) -> str | None:
    """A password from `var` or from the file named by `var`_FILE (a Docker secret); None when neither is set."""
    value = os.environ.get(var)
    path = os.environ.get(f"{var}_FILE")
    if (value is None or value == "") and path:
        try:
            value = Path(path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ValueError(f"{var}_FILE={path!r} cannot be read ({exc.strerror})") from None
    return value or None


def with_password(url: str | None, password: str | None) -> str | None:
    """`url` with its password set (percent-encoded): scheme://user:PASSWORD@host..."""
    if not url or not password:
        return url
    parts = urlsplit(url)
    user = parts.netloc.rpartition("@")[0].partition(":")[0] if "@" in parts.netloc else ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:{quote(password, safe='')}@{host}"))


def _url_env(var: str, password_var: str, help: str):
    """A URL field (`var`) whose password may come from `password_var` or `password_var`_FILE instead of the URL."""

    def read():
        raw = (os.environ.get(var) or "").strip() or None
        return with_password(raw, _secret(password_var)) if raw else None

    return field(default_factory=read, metadata={"help": help, "env": var, "default": None, "password": password_var})


_URL = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.-]*://)(\S+)")


def _hide_password(found: re.Match) -> str:
    # the user info ends at the LAST '@' (a raw '@', ':' or '/' may sit in a password; a host holds none), so no
    # part of a password is ever shown; an '@' further on (in a query) hides more than needed, never less
    scheme, rest = found.groups()
    userinfo, at, host = rest.rpartition("@")
    if not at or ":" not in userinfo:
        return found.group()  # no password
    return f"{scheme}{userinfo.partition(':')[0]}:***@{host}"


def mask(text: str) -> str:
    """`text` with the password of every URL in it replaced by *** (redis://arbor:***@host/0)."""
    return _URL.sub(_hide_password, str(text))


class MaskPasswords(logging.Filter):
    """A handler filter that masks URL passwords in a record's message and in its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed call: logging reports it itself when the handler formats the record
            return True
        if "://" in message:
            record.msg, record.args = mask(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text and "://" in record.exc_text:
            record.exc_text = mask(record.exc_text)
        return True


def mask_logs(logger: logging.Logger | None = None) -> None:
    """Add MaskPasswords to every handler of `logger` (the root logger by default)."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, MaskPasswords) for f in handler.filters):
            handler.addFilter(MaskPasswords())


@dataclass
class Settings:
    # where things live
    home: Path = _env("ARBOR_HOME", Path("./.arbor"), "checkpoints, the SQLite store and runs", Path)
    database_url: str | None = _url_env("ARBOR_DATABASE_URL", "ARBOR_DATABASE_PASSWORD",
                                        "the store, e.g. postgresql+psycopg://user@host/db (unset: SQLite in the home "
                                        "folder); its password may come from ARBOR_DATABASE_PASSWORD or the file "
                                        "ARBOR_DATABASE_PASSWORD_FILE")
    broker_url: str | None = _url_env(
        "ARBOR_BROKER_URL",
        "ARBOR_REDIS_PASSWORD",
        "Redis for the job queue, e.g. redis://arbor@localhost:6379/0 (unset: jobs run in "
        "process); its password may come from ARBOR_REDIS_PASSWORD or the file "
        "ARBOR_REDIS_PASSWORD_FILE",
    )
    # how a policy is loaded for search
    device: str = _env("ARBOR_DEVICE", "auto", "cpu, cuda, cuda:0 ... (auto: cuda when present)")
    dtype: str = _env(
        "ARBOR_DTYPE", "float32", "parameter dtype of a policy loaded for search: float32, bfloat16 or float16", _dtype
    )
    torch_threads: int | None = _env(
        "ARBOR_TORCH_THREADS", None, "torch threads per worker process (unset: torch's default)", _int, minimum=1
    )
    # the queue (workers/config.py QueueConfig takes these)
    visibility_timeout: int = _env(
        "ARBOR_VISIBILITY_TIMEOUT",
        6 * 3600,
        "seconds a delivered, unacked message waits before Redis hands it out again",
        _int,
        minimum=2,
    )
    proc_alive_timeout: int = _env(
        "ARBOR_PROC_ALIVE_TIMEOUT", 300, "seconds a fresh pool child may take to load its model", _int, minimum=1
    )
    lease_ttl: int = _env(
        "ARBOR_LEASE_TTL",
        60,
        "seconds a job's lease lives without renewal (renewed every third of it)",
        _int,
        minimum=3,
    )
    max_deliveries: int = _env(
        "ARBOR_MAX_DELIVERIES", 5, "deliveries after which a job is marked failed instead of run again", _int, minimum=1
    )
    soft_shutdown_s: int = _env("ARBOR_SOFT_SHUTDOWN_S", 60,
                                "seconds a stopping worker lets its running job finish before it stops it and puts its "
                                "message back on the queue (cold shutdown)", _int, minimum=1)
    dead_letter_max: int = _env(
        "ARBOR_DEAD_LETTER_MAX",
        10000,
        "malformed queue entries kept in the arbor:dead-letter list (the newest; older ones are " "dropped)",
        _int,
        minimum=1,
    )
    train_every_s: int = _env(
        "ARBOR_TRAIN_EVERY_S", 3600, "seconds between train cycles started by `arbor beat`", _int, minimum=1
    )
    train_threshold: int = _env(
        "ARBOR_TRAIN_THRESHOLD", 200, "new best trajectories that start a train cycle (0 turns it off)", _int
    )
    # the train cycle (agent/train_cycle.py); unset: LoopConfig's own default
    train_budget_s: float | None = _env(
        "ARBOR_TRAIN_BUDGET_S", None, "fine-tune wall clock of a train cycle, seconds (unset: LoopConfig.train)", _float
    )
    promote_margin: float | None = _env("ARBOR_PROMOTE_MARGIN", None,
                                        "how much a candidate must beat the promoted version by on held-out problems "
                                        "(unset: LoopConfig.promote_margin)", _float)
    adapter: str | None = _env("ARBOR_ADAPTER", None, "what a train cycle fine-tunes: full (every parameter), lora "
                               "(an adapter over the promoted version's base) or auto (lora from 300M parameters; "
                               "unset: LoopConfig.train, which is auto)", _adapter)
    value_model: bool | None = _env("ARBOR_VALUE_MODEL", None, "a train cycle that promotes also trains the version's "
                                    "value model (on or off; unset: LoopConfig.value_model, which is off)", _switch)
    heldout_per_difficulty: int | None = _env("ARBOR_HELDOUT_PER_DIFFICULTY", None,
                                              "built-in held-out problems per difficulty in a train cycle "
                                              "(unset: LoopConfig.heldout_per_difficulty)", _int, minimum=1)
    # task families beside the built-in and installed (arbor.tasks entry point) ones
    tasks: str | None = _env("ARBOR_TASKS", None, "module:Class task families this process may run, comma-separated "
                             "(problems name them in their `task` field)")
    train_processes: int = _env("ARBOR_TRAIN_PROCESSES", 1,
                                "processes (one per GPU) a worker's train cycle spans through `accelerate launch`; "
                                "the first writes the version", _int, minimum=1)
    # the HTTP API (arbor serve)
    api_token: str | None = _env("ARBOR_API_TOKEN", None,
                                 "the token every API request and web page must present (Authorization: Bearer TOKEN); "
                                 "at least 16 characters")
    api_token_file: Path | None = _env(
        "ARBOR_API_TOKEN_FILE",
        None,
        "a file holding the API token (a Docker secret); used when ARBOR_API_TOKEN is unset",
        Path,
    )
    api_max_request_bytes: int = _env(
        "ARBOR_API_MAX_REQUEST_BYTES",
        8 * 1024 * 1024,
        "the largest request body the API accepts, bytes (a larger one is refused with 413)",
        _int,
        minimum=1024,
    )

    def __post_init__(self):
        self.home = Path(self.home)
        for f in fields(self):
            self.check(f.name, getattr(self, f.name))
        if self.device == "auto":
            self.device = _default_device()
        if self.tasks:
            from tasks import allow_from_setting

            allow_from_setting(self.tasks)  # a bad spec is one ValueError line, like any other setting

    @classmethod
    def env(cls, name: str):
        """One field's value from the environment (its default when unset), checked, without building a Settings."""
        value = cls.__dataclass_fields__[name].default_factory()
        cls.check(name, value)
        return value

    @classmethod
    def check(cls, name: str, value) -> None:
        """Raise ValueError (one line, naming the variable) when `value` is out of range for field `name`."""
        meta = cls.__dataclass_fields__[name].metadata
        low = meta.get("minimum")
        if low is not None and value is not None and value < low:
            unit = (
                " s"
                if name in ("visibility_timeout", "lease_ttl", "proc_alive_timeout", "train_every_s", "soft_shutdown_s")
                else ""
            )
            raise ValueError(f"{meta['env']} must be at least {low}{unit} (got {value})")
        if name == "dtype" and value not in DTYPES:
            raise ValueError(f"ARBOR_DTYPE must be one of {', '.join(DTYPES)} (got {value!r})")

    @property
    def db_url(self) -> str:
        """The store's URL: ARBOR_DATABASE_URL, else a SQLite file in the home folder."""
        return self.database_url or f"sqlite:///{(self.home / 'arbor.db').resolve()}"

    @property
    def policies_dir(self) -> Path:
        return self.home / "policies"

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"


MIN_API_TOKEN_CHARS = 16  # a shorter token can be guessed; token_urlsafe(32) makes 43 characters
TOKEN_RECIPE = 'python3 -c "import secrets; print(secrets.token_urlsafe(32))"'


def _long_enough(token: str, source: str) -> str:
    if len(token) < MIN_API_TOKEN_CHARS:
        raise ValueError(f"{source} holds a token of {len(token)} characters: use at least {MIN_API_TOKEN_CHARS}; "
                         f"make one with {TOKEN_RECIPE}")
    return token


def resolve_api_token(settings: Settings) -> str | None:
    """ARBOR_API_TOKEN, else the contents of ARBOR_API_TOKEN_FILE (stripped); None when neither is set. A token
    shorter than MIN_API_TOKEN_CHARS, an empty or unreadable file: ValueError, one line naming the variable."""
    if settings.api_token:
        return _long_enough(settings.api_token, "ARBOR_API_TOKEN")
    if settings.api_token_file is None:
        return None
    source = f"ARBOR_API_TOKEN_FILE={settings.api_token_file}"
    try:
        token = Path(settings.api_token_file).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ValueError(f"{source}: cannot read it ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{source}: cannot read it (not UTF-8 text)") from None
    if not token:
        raise ValueError(f"{source} is empty: write a token into it; make one with {TOKEN_RECIPE}")
    return _long_enough(token, source)
