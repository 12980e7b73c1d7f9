"""What a policy version's folder is, read from its files alone (no torch, so that listing versions stays light): a
full model, or a LoRA adapter whose base.json names the full folder it is over and that folder's content hash."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from search.prompt_format import PromptFormat

BASE_FILE = "base.json"
_HASHES: dict[tuple, str] = {}  # (folder, its files' names, sizes and mtimes) -> sha256


def read_base(folder: str | Path) -> dict | None:
    """An adapter version's base.json ({"path", "sha256"}), or None for a full version."""
    path = Path(folder) / BASE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def kind(folder: str | Path) -> str:
    return "lora adapter" if (Path(folder) / BASE_FILE).is_file() else "full"


def folder_bytes(folder: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def shown_size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def on_disk(folder: str | Path) -> dict:
    """What `arbor policies`, the API and the web view show of a version's folder: its kind, its size and how it
    puts prompts to its model (all None once a rejected version's folder is pruned; its record stays)."""
    if not Path(folder).is_dir():
        return {"kind": None, "bytes": None, "prompt_format": None}
    return {"kind": kind(folder), "bytes": folder_bytes(folder), "prompt_format": PromptFormat.load(folder).style}


def folder_hash(folder: str | Path) -> str:
    """sha256 over a folder's files: each relative path (sorted) and its bytes. Cached per (folder, mtimes), so a
    base of many GB is read once per process unless its files change."""
    folder = Path(folder).resolve()
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    stats = [p.stat() for p in files]
    key = (str(folder), tuple((p.relative_to(folder).as_posix(), s.st_size, s.st_mtime_ns) for p, s in zip(files, stats)))
    if key not in _HASHES:
        digest = hashlib.sha256()
        for p, s in zip(files, stats):
            digest.update(f"{p.relative_to(folder).as_posix()}\0{s.st_size}\0".encode())
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]
