#!/usr/bin/env bash
# The CUDA checks, for a machine with a GPU: the CUDA test module (every strategy, the tree step, full and LoRA
# fine-tunes with bf16, gradient checkpointing and accumulation, a worker job), then the search benchmark on the GPU.
# Prints everything to stdout; record what it printed in docs/benchmarks.md ("GPU check").
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
.venv/bin/python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
.venv/bin/python -m pytest -q tests/test_cuda.py -rs
status=$?
.venv/bin/python bench/search.py --device cuda --quick
exit $status
