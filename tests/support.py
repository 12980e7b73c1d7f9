"""Real parts for tests and benchmarks, without Docker: a redis-server on a free port, a throwaway PostgreSQL
database, a registry seeded with the built-in policy, and `arbor worker` / `arbor beat` subprocesses.

Used by tests/test_workers_*.py and bench/queue.py; nothing here runs in production.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

ARBOR = str(Path(sys.executable).parent / "arbor")  # the console script installed beside this interpreter
PG_ADMIN_URL = os.environ.get("ARBOR_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


class RedisServer:
    """`redis-server` on a free port with its own folder; `appendonly` keeps queued jobs across a restart. With a
    `password`, as compose.yaml runs it: one ACL user `arbor` with that password, the default user off."""

    def __init__(self, folder: Path, appendonly: bool = True, port: int | None = None, password: str | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.appendonly = appendonly
        self.port = port or free_port()
        self.password = password
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        from urllib.parse import quote

        auth = f"arbor:{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed: apt-get install redis-server")
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes" if self.appendonly else "no", "--dir", str(self.folder),
             "--maxmemory-policy", "noeviction",
             *(["--user", "arbor", "on", f">{self.password}", "~*", "&*", "+@all", "--user", "default", "off"]
               if self.password else [])],
            stdout=open(self.folder / "redis.log", "ab"), stderr=subprocess.STDOUT,
        )
        wait_for(self.ping, 10, f"redis-server on port {self.port}", interval=0.02)
        return self

    def ping(self) -> bool:
        import redis

        try:
            return bool(redis.Redis.from_url(self.url, socket_connect_timeout=0.5).ping())
        except Exception:
            return False

    def stop(self) -> None:
        """Graceful shutdown (SIGTERM: the append-only file is flushed), as a restarted server would see it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)
        self.proc = None


@contextmanager
def postgres_database(admin_url: str = PG_ADMIN_URL):
    """A uniquely named PostgreSQL database, dropped afterwards; yields its SQLAlchemy URL."""
    from sqlalchemy import create_engine, text

    name = f"arbor_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def seed_policy(home: Path, db_url: str) -> str:
    """Save the (untrained) built-in policy as the promoted version; queue mechanics do not need a trained one."""
    from agent.policy import build_builtin_policy
    from agent.registry import PolicyRegistry
    from agent.store import Store

    store = Store(db_url)
    registry = PolicyRegistry(Path(home) / "policies", store)
    model, tokenizer = build_builtin_policy()
    version = registry.save(model, tokenizer, parent=None, trained_on={})
    registry.promote(version, {})
    store.engine.dispose()
    return version


def arbor_env(home: Path, db_url: str, broker_url: str | None, **extra) -> dict:
    env = dict(os.environ)
    env.update(ARBOR_HOME=str(home), ARBOR_DATABASE_URL=db_url, ARBOR_DEVICE="cpu", ARBOR_TORCH_THREADS="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.pop("ARBOR_BROKER_URL", None)
    if broker_url:
        env["ARBOR_BROKER_URL"] = broker_url
    env.update({k: str(v) for k, v in extra.items()})
    return env


def arbor(*args: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run an `arbor` command to completion."""
    return subprocess.run([ARBOR, *args], env=env, capture_output=True, text=True, timeout=timeout)


class ArborProcess:
    """A long-running `arbor worker ...` or `arbor beat` in its own session, logging to a file."""

    def __init__(self, args: list[str], env: dict, log: Path):
        self.args, self.env, self.log = args, env, Path(log)
        self.proc: subprocess.Popen | None = None

    def start(self) -> "ArborProcess":
        self.proc = subprocess.Popen([ARBOR, *self.args], env=self.env,
                                     stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_ready(self, timeout: float = 90) -> "ArborProcess":
        # the pool child loads the model in worker_process_init and logs it; "ready." is the consumer
        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{' '.join(self.args)} exited with {self.proc.returncode}:\n{self.text()[-3000:]}")
            return " ready." in self.text() and "loaded policy" in self.text()
        wait_for(ready, timeout, f"{' '.join(self.args)} to be ready (log: {self.log})", interval=0.2)
        return self

    def children(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def kill(self) -> None:
        """SIGKILL the whole worker (parent and pool child): a lost machine."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=20)

    def stop(self, timeout: float = 30) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL if it lingers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # a pool child left behind
        except ProcessLookupError:
            pass


def worker(name: str, queues: str, env: dict, folder: Path) -> ArborProcess:
    return ArborProcess(["worker", "--queues", queues, "--name", f"{name}@%h", "--loglevel", "INFO"], env,
                        Path(folder) / f"{name}.log").start()


@contextmanager
def deployment_stack(root: Path, seed, appendonly: bool, **env_extra):
    """A redis-server, a throwaway PostgreSQL database with a promoted policy (`seed(home, db_url)`), the
    `arbor` environment pointing at both, and a store; yields a dict the test adds its workers to (stopped
    afterwards) under "workers"."""
    from agent.store import Store

    server = RedisServer(Path(root) / "redis", appendonly=appendonly).start()
    try:
        with postgres_database() as db_url:
            seed(Path(root) / "home", db_url)
            env = arbor_env(Path(root) / "home", db_url, server.url, **env_extra)
            store = Store(db_url)
            state = {"root": Path(root), "redis": server, "env": env, "store": store, "db_url": db_url, "workers": []}
            try:
                yield state
            finally:
                for w in state["workers"]:
                    w.stop(timeout=10)
                store.engine.dispose()
    finally:
        server.stop()


def point_celery_app_at(url: str):
    """The test process's Celery app, pointed at this test's broker. Celery caches its connection and producer
    pools and its result backend on first use, so changing the URL alone would keep sending to the broker of an
    earlier test module (stopped by now). Returns the app."""
    from workers.app import app

    app.conf.broker_url = app.conf.result_backend = url
    app._after_fork()  # drops the cached connection and producer pools, as Celery does in a forked child
    app._backend_cache = None
    app._local.__dict__.pop("backend", None)
    return app


def tiny_promoted_policy(registry) -> str:
    """A one-layer built-in policy with sequential positions, saved and promoted in `registry`: the train-cycle
    tests fine-tune it in seconds."""
    from agent.config import BuiltinConfig
    from agent.policy import build_builtin_policy

    model, tokenizer = build_builtin_policy(BuiltinConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                                                          position_scheme="sequential"))
    version = registry.save(model, tokenizer, parent=None, trained_on={})
    registry.promote(version, {})
    return version


def add_trajectories(store, rows: list[dict]) -> None:
    """Trajectory rows as a worker or a cycle would have recorded them (the product writes them with their job's
    finish or their cycle's record)."""
    from sqlalchemy import insert

    from agent.schema import TrajectoryRow

    with store.session() as s:
        s.execute(insert(TrajectoryRow), rows)
