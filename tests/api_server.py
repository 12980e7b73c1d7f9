"""A real `arbor serve` (uvicorn) on a free port with a real redis-server as its broker and a SQLite or PostgreSQL
store, no workers: for the API tests that need the HTTP layer only (tests/test_api_*.py)."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from pathlib import Path

import httpx

from tests.support import ArborProcess, RedisServer, arbor_env, free_port, postgres_database, wait_for

TOKEN = "test-token-7f3a-long-enough"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LIMIT = 64 * 1024


def start_serve(env: dict, root: Path, *serve_args: str) -> tuple[ArborProcess, str, int]:
    """`arbor serve` on a free port, once it answers /api/health: (the process, its url, its port)."""
    port = free_port()
    proc = ArborProcess(["serve", "--port", str(port), "--poll-s", "0.2", "--log-level", "warning", *serve_args], env,
                        root / "serve.log").start()
    url = f"http://127.0.0.1:{port}"

    def up():
        if proc.proc.poll() is not None:
            raise RuntimeError(f"arbor serve exited with {proc.proc.returncode}:\n{proc.text()[-3000:]}")
        try:
            return httpx.get(f"{url}/api/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, 90, "arbor serve to answer /api/health", interval=0.3)
    except BaseException:
        proc.stop(timeout=10)
        raise
    return proc, url, port


@contextmanager
def served(root: Path, db: str, *serve_args: str, **env_extra):
    """yields {"url", "env", "db_url", "home", "redis", "proc"}; db: "sqlite" or "postgresql"."""
    root = Path(root)
    server = RedisServer(root / "redis", appendonly=False).start()
    try:
        with (postgres_database() if db == "postgresql" else nullcontext(f"sqlite:///{root / 'arbor.db'}")) as db_url:
            env = arbor_env(root / "home", db_url, server.url, ARBOR_API_TOKEN=TOKEN,
                            ARBOR_API_MAX_REQUEST_BYTES=LIMIT, **env_extra)
            proc, url, port = start_serve(env, root, *serve_args)
            try:
                yield {"url": url, "env": env, "db_url": db_url, "home": root / "home", "redis": server, "proc": proc,
                       "port": port}
            finally:
                proc.stop(timeout=10)
    finally:
        server.stop()
