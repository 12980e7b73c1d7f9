#!/usr/bin/env bash
# Set up (if needed) and run the main job: the self-improvement loop on the built-in task, in one process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/arbor run "$@"
