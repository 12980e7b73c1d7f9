"""Configuration written once: every config field carries its help, CLI options take default and help from the
dataclass, ARBOR_* variables are read only in agent/settings.py, and the dtype setting reaches a loaded policy."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from agent.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def _configs():
    from agent.config import LoopConfig, WarmStartConfig
    from agent.config import BuiltinConfig
    from agent.config import SelectConfig
    from agent.config import TrainConfig
    from search import SearchConfig
    from workers.config import QueueConfig

    return [SearchConfig, SelectConfig, TrainConfig, LoopConfig, WarmStartConfig, BuiltinConfig, QueueConfig, Settings]


def test_every_config_field_has_help():
    missing = [f"{c.__name__}.{f.name}" for c in _configs() for f in fields(c) if not f.metadata.get("help")]
    assert missing == []


def test_arbor_variables_are_read_only_in_settings():
    read = re.compile(r"environ\.get\(|getenv\(|environ\[[^\]]+\](?!\s*=[^=])|envvar=")
    offenders = []
    for package in ("agent", "search", "workers", "memory", "arbor", "tasks"):
        for path in (ROOT / package).rglob("*.py"):
            if path == ROOT / "agent" / "settings.py":
                continue
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if read.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert offenders == []


def test_settings_read_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ARBOR_HOME", str(tmp_path))
    monkeypatch.setenv("ARBOR_VISIBILITY_TIMEOUT", "30")
    monkeypatch.setenv("ARBOR_PROMOTE_MARGIN", "-1")
    monkeypatch.setenv("ARBOR_DTYPE", "bfloat16")
    monkeypatch.delenv("ARBOR_TRAIN_BUDGET_S", raising=False)
    s = Settings(device="cpu")
    assert s.home == tmp_path and s.visibility_timeout == 30 and s.promote_margin == -1.0 and s.dtype == "bfloat16"
    assert s.train_budget_s is None and s.lease_ttl == 60  # unset: the declared default
    from agent.train_cycle import loop_config_from_env
    from agent.config import LoopConfig

    cfg = loop_config_from_env(s)
    assert cfg.promote_margin == -1.0 and cfg.train.time_budget_s == LoopConfig().train.time_budget_s
    from workers.config import QueueConfig

    assert QueueConfig().visibility_timeout == 30 and QueueConfig.from_settings(s).visibility_timeout == 30


@pytest.mark.parametrize("var,value,message", [
    ("ARBOR_DTYPE", "float64", "ARBOR_DTYPE='float64' is not one of float32, bfloat16, float16"),
    ("ARBOR_VISIBILITY_TIMEOUT", "1", "ARBOR_VISIBILITY_TIMEOUT must be at least 2 s (got 1)"),
    ("ARBOR_LEASE_TTL", "ten", "ARBOR_LEASE_TTL='ten' is not an integer"),
])
def test_a_bad_value_is_one_clear_line(monkeypatch, var, value, message):
    monkeypatch.setenv(var, value)
    with pytest.raises(ValueError) as err:
        Settings(device="cpu")
    assert str(err.value) == message
    from arbor.cli import app

    res = CliRunner().invoke(app, ["status"], env={var: value, "ARBOR_HOME": "/nonexistent-arbor-home"})
    assert res.exit_code == 1 and res.output.strip() == f"error: {message}"


def test_bad_dtype_fails_the_cli_search_and_worker_with_one_line(tmp_path):
    from arbor.cli import app

    res = CliRunner().invoke(app, ["search", "--model", str(tmp_path), "--prompt", "1+1=", "--dtype", "float64"])
    assert res.exit_code == 1 and "ARBOR_DTYPE must be one of float32, bfloat16, float16 (got 'float64')" in res.output
    res = CliRunner().invoke(app, ["worker"], env={"ARBOR_BROKER_URL": "redis://127.0.0.1:1/0", "ARBOR_DTYPE": "half"})
    assert res.exit_code == 1 and res.output.strip() == "error: ARBOR_DTYPE='half' is not one of float32, bfloat16, float16"


def test_policy_loaded_with_bfloat16_has_bfloat16_parameters(tmp_path, tiny_policy):
    from agent.policy import Policy, load_policy
    from agent.registry import PolicyRegistry
    from agent.store import Store
    from search import SearchConfig, run_search
    from tasks import Problem
    from workers.cache import PolicyCache

    store = Store(f"sqlite:///{tmp_path / 'a.db'}")
    registry = PolicyRegistry(tmp_path / "policies", store)
    version = registry.save(tiny_policy.model, tiny_policy.tokenizer, parent=None, trained_on={})
    registry.promote(version, {})
    assert {p.dtype for p in registry.load(version).model.parameters()} == {torch.float32}
    policy = PolicyCache(registry, "cpu", "bfloat16").get()
    assert {p.dtype for p in policy.model.parameters()} == {torch.bfloat16}
    half = Policy.load(tmp_path / "policies" / version, dtype="float16")
    assert {p.dtype for p in half.model.parameters()} == {torch.float16}
    result = run_search([Problem("1+2=", "30")], SearchConfig(strategy="greedy", max_new_tokens=3), policy)[0]
    assert len(result.best.token_ids) >= 1  # a bf16 policy searches
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_policy(tmp_path / "policies" / version, dtype="float64")


def test_cli_options_take_default_and_help_from_the_dataclass():
    import typer

    from arbor.options import option
    from search import SearchConfig
    from agent.config import LoopConfig

    beams = option(SearchConfig, "beams")
    assert isinstance(beams, typer.models.OptionInfo)
    assert beams.default == 4 and beams.help == SearchConfig.__dataclass_fields__["beams"].metadata["help"]
    assert option(LoopConfig().search, "n", "--samples").default == 4  # an instance gives its own value
    unset = option(SearchConfig, "simulations", unset=True)
    assert unset.default is None and unset.show_default == "8"
    device = option(Settings, "device")  # read from the environment: never evaluated here
    assert device.default is None and device.show_default == "auto" and "ARBOR_DEVICE" in device.help
    with pytest.raises(KeyError):
        option(SearchConfig, "no_such_field")


def test_cli_and_celery_app_import_no_torch():
    code = ("import sys, arbor.cli, workers.app, workers.tasks; from typer.testing import CliRunner; "
            "r = CliRunner().invoke(arbor.cli.app, ['worker', '--help']); assert r.exit_code == 0, r.output; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.parametrize("url,shown", [
    ("redis://arbor:S3c@r3tPW@host:6379/0", "redis://arbor:***@host:6379/0"),  # a raw '@' in the password
    ("redis://arbor:a@b@c@host/0", "redis://arbor:***@host/0"),
    ("postgresql+psycopg://arbor:pa:ss:word@db:5432/arbor", "postgresql+psycopg://arbor:***@db:5432/arbor"),
    ("postgresql://u:p%40ss%3Aw@db/a", "postgresql://u:***@db/a"),  # percent-encoded, as with_password writes it
    ("redis://u:pa/ss?x#y@host/0", "redis://u:***@host/0"),  # raw '/', '?', '#': a broken URL, still masked
    ("redis://u:pw@[::1]:6379/0", "redis://u:***@[::1]:6379/0"),  # IPv6 host
    ("rediss://:hunter2@broker:6380", "rediss://:***@broker:6380"),  # a password without a user
    ("redis://arbor@redis:6379/0", "redis://arbor@redis:6379/0"),  # a user without a password: nothing to hide
    ("redis://redis:6379/0", "redis://redis:6379/0"),
    ("redis://[::1]:6379/0", "redis://[::1]:6379/0"),
    ("sqlite:////arbor/arbor.db", "sqlite:////arbor/arbor.db"),
])
def test_mask_never_shows_any_part_of_a_password(url, shown):
    from agent.settings import mask

    assert mask(url) == shown
    line = f"error: cannot reach {url!r} (ConnectionError); ARBOR_BROKER_URL={url}\nnext line"
    assert mask(line) == f"error: cannot reach {shown!r} (ConnectionError); ARBOR_BROKER_URL={shown}\nnext line"


def test_mask_hides_every_password_in_a_text():
    from agent.settings import mask

    text = "a=redis://u:one@h1/0 b=postgresql://v:t@wo@h2/db,c=redis://w:three@h3"
    masked = mask(text)
    assert not any(secret in masked for secret in ("one", "t@wo", "wo@", "three")), masked
    assert masked.startswith("a=redis://u:***@h1/0 b=postgresql://v:***@")


def test_an_api_token_shorter_than_16_characters_is_refused(monkeypatch, tmp_path):
    from agent.settings import MIN_API_TOKEN_CHARS, TOKEN_RECIPE, resolve_api_token

    assert MIN_API_TOKEN_CHARS == 16
    monkeypatch.delenv("ARBOR_API_TOKEN_FILE", raising=False)
    monkeypatch.delenv("ARBOR_API_TOKEN", raising=False)
    assert resolve_api_token(Settings(device="cpu")) is None  # none set: serving without one is the caller's call
    monkeypatch.setenv("ARBOR_API_TOKEN", "hunter2-short")
    with pytest.raises(ValueError) as err:
        resolve_api_token(Settings(device="cpu"))
    message = str(err.value)
    assert message.startswith("ARBOR_API_TOKEN ") and "13 characters" in message and "at least 16" in message
    assert TOKEN_RECIPE in message and "hunter2" not in message and "\n" not in message
    made = subprocess.run(TOKEN_RECIPE, shell=True, capture_output=True, text=True, timeout=60, check=True)
    made = made.stdout.strip()
    monkeypatch.setenv("ARBOR_API_TOKEN", made)  # what the recipe makes is accepted
    assert resolve_api_token(Settings(device="cpu")) == made
    monkeypatch.setenv("ARBOR_API_TOKEN", "x" * 16)
    assert resolve_api_token(Settings(device="cpu")) == "x" * 16

    monkeypatch.delenv("ARBOR_API_TOKEN")
    token_file = tmp_path / "api_token"
    token_file.write_text("short-secret\n")
    monkeypatch.setenv("ARBOR_API_TOKEN_FILE", str(token_file))
    with pytest.raises(ValueError) as err:
        resolve_api_token(Settings(device="cpu"))
    message = str(err.value)
    assert message.startswith(f"ARBOR_API_TOKEN_FILE={token_file} ") and "12 characters" in message
    assert TOKEN_RECIPE in message and "short-secret" not in message
    token_file.write_text("y" * 40 + "\n")
    assert resolve_api_token(Settings(device="cpu")) == "y" * 40
    token_file.write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        resolve_api_token(Settings(device="cpu"))
    monkeypatch.setenv("ARBOR_API_TOKEN_FILE", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="cannot read it"):
        resolve_api_token(Settings(device="cpu"))
