"""What each entry point loads: the CLI's help and its queue commands load no torch (the Celery parent must stay free
of CUDA) and no web framework; the HTTP app loads no typer; command modules do not import the CLI that registers
them. Each check runs in a fresh interpreter, so that nothing an earlier test imported hides an import."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> None:
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]


def test_help_and_queue_commands_import_no_torch_and_no_web_framework():
    _run("import sys\n"
         "from typer.testing import CliRunner\n"
         "from arbor.cli import app\n"
         "for args in (['--help'], ['worker', '--help'], ['submit', '--help'], ['status', '--help'],\n"
         "             ['results', '--help'], ['requeue', '--help'], ['policies', '--help'], ['serve', '--help'],\n"
         "             ['run', '--help'], ['search', '--help']):\n"
         "    r = CliRunner().invoke(app, args)\n"
         "    assert r.exit_code == 0, (args, r.output)\n"
         "loaded = [m for m in ('torch', 'transformers', 'fastapi', 'starlette') if m in sys.modules]\n"
         "assert not loaded, loaded\n")


def test_the_http_app_checks_a_submission_without_loading_the_cli_or_torch():
    _run("import sys\n"
         "from fastapi.testclient import TestClient\n"
         "from agent.settings import Settings\n"
         "from arbor.api import create_app\n"
         "app = create_app(Settings(device='cpu', database_url='sqlite://', broker_url=''), require_token=False)\n"
         "client = TestClient(app)\n"
         "problems = [{'prompt': '1+1=', 'answer': '2'}]\n"
         "r = client.post('/api/jobs', json={'problems': problems, 'search': {'beams': 'four'}})\n"
         "assert r.status_code == 422 and r.json()['detail'].startswith(\"search field 'beams'\"), r.text\n"
         "r = client.post('/api/jobs', json={'problems': problems})  # checked whole, then refused: no broker\n"
         "assert r.status_code == 503 and r.json()['detail'].startswith('no broker configured'), r.text\n"
         "loaded = [m for m in ('typer', 'arbor.cli', 'torch') if m in sys.modules]\n"
         "assert not loaded, loaded\n")


def test_command_modules_do_not_import_the_cli():
    circular = []
    for path in sorted((ROOT / "arbor" / "commands").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "arbor.cli" or isinstance(node, ast.Import) and any(
                    alias.name == "arbor.cli" for alias in node.names):
                circular.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not circular, "arbor/cli.py imports the command modules; they must not import it: " + ", ".join(circular)
