#!/usr/bin/env bash
# Create .venv and install Arbor with its pinned ML stack. Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
if ! python -c "import torch" 2>/dev/null; then
  # Pin the exact release first: on CPU-only machines a bare `torch` requirement resolves to a multi-GB CUDA
  # build. ARBOR_TORCH_INDEX may name a CPU wheel index for machines that do not carry the wheel locally.
  python -m pip install -q "torch==2.13.0" ${ARBOR_TORCH_INDEX:+--index-url "$ARBOR_TORCH_INDEX"}
fi
python -m pip install -q -e ".[dev]"
# Headless Chromium and its driver for the browser tests (tests/test_web.py, Selenium); Debian's packages, since
# Playwright's own browser download is not reachable everywhere. Skipped when both are already installed.
if ! { command -v chromium >/dev/null && command -v chromedriver >/dev/null; }; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null \
      || echo "setup: chromium could not be installed: the browser tests will be skipped" >&2
  else
    echo "setup: chromium/chromedriver missing (apt-get as root installs them): the browser tests will be skipped" >&2
  fi
fi
