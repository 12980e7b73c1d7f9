"""Schemathesis against a real `arbor serve` (uvicorn, a real redis-server as the broker), on SQLite and on
PostgreSQL: every operation of the served /openapi.json with the token and every check (`--checks all`: no 5xx,
each status and body as the schema documents them, schema-invalid input refused, ...), time-bounded. The progress
stream (/api/events) never ends by itself: tests/test_api_hardening.py tests it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.api_server import TOKEN, served

SCHEMATHESIS = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
pytestmark = pytest.mark.skipif(SCHEMATHESIS is None, reason="schemathesis is not installed (pip install -e .[dev])")


@pytest.mark.timeout(240)
@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
def test_schemathesis_finds_nothing(db, tmp_path):
    with served(tmp_path, db) as s:
        res = subprocess.run(
            [SCHEMATHESIS, "--config-file", str(Path(__file__).with_name("schemathesis.toml")), "--no-color", "run",
             f"{s['url']}/openapi.json", "--checks", "all", "-H", f"Authorization: Bearer {TOKEN}",
             "--exclude-path", "/api/events", "--max-time", "60", "--max-examples", "40", "--seed", "1",
             "--request-timeout", "20"],
            capture_output=True, text=True, timeout=200, cwd=tmp_path)
        assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-2000:]
