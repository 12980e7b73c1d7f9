"""One settings object, read from the environment; CLI flags override fields."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class Settings:
    home: Path = field(default_factory=lambda: Path(os.environ.get("ARBOR_HOME", "./.arbor")))
    database_url: str | None = field(default_factory=lambda: os.environ.get("ARBOR_DATABASE_URL") or None)
    broker_url: str | None = field(default_factory=lambda: os.environ.get("ARBOR_BROKER_URL") or None)
    device: str = field(default_factory=lambda: os.environ.get("ARBOR_DEVICE", "auto"))

    def __post_init__(self):
        self.home = Path(self.home)
        if self.device == "auto":
            self.device = _default_device()

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
