"""Files written whole or not at all: a reader, a kill or a full disk never leaves a truncated one behind."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import BinaryIO, Callable


def write_atomic(path: str | Path, content: str | bytes | Callable[[BinaryIO], None]) -> None:
    """Write `content` (text as UTF-8, bytes, or a function that writes into a binary file) to `path`.

    It goes to a temporary file in the same folder, is flushed and fsynced, then renamed over `path` (os.replace is
    atomic within a file system): `path` holds the previous complete file until the new one is complete. On any
    failure the temporary file is removed and the error raised."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")  # hidden, unique: never taken for the file
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for a plain write
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode("utf-8") if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    # the rename lives in the folder: without this a power loss may bring back the old name
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a folder; the rename is still atomic
    finally:
        os.close(fd)
