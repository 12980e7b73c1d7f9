"""The server's options (`arbor serve` takes its flags from them): no web framework, so the CLI loads it cheaply."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ApiConfig:
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on (0.0.0.0 inside a container)"})
    port: int = field(default=8000, metadata={"help": "port to listen on"})
    poll_s: float = field(default=0.5, metadata={"help": "how often the progress stream reads job states, seconds"})
    list_limit: int = field(default=500, metadata={"help": "the most jobs one listing returns (newest first)"})
    max_streams: int = field(default=32, metadata={"help": "the most progress streams (/api/events) open at once"})
    max_poll_s: float = field(default=3.0, metadata={"help": "a quiet progress stream polls less often, down to "
                                                             "once in this many seconds"})
    secure_cookie: bool = field(default=False, metadata={"help": "mark the login cookie Secure even when the request "
                                                                 "did not come over https"})
