"""On Linux (glibc, where Arbor runs), the allocator settings are taken and keep a decode-like workload from
page-faulting its memory in again."""

import subprocess
import sys

from agent.allocator import keep_freed_memory

WORKLOAD = """
import resource, sys, torch
from agent.allocator import keep_freed_memory
if sys.argv[1] == "kept":
    assert keep_freed_memory()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for step in range(300):  # tensors of a new shape every step, as a growing decode makes
    x = torch.ones(256 + step, 1024)
    y = (x @ x.T).sum()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_freed_memory_stays_in_the_process():
    assert keep_freed_memory() is True

    def faults(mode):
        out = subprocess.run([sys.executable, "-c", WORKLOAD, mode], capture_output=True, text=True, check=True)
        return int(out.stdout.strip().splitlines()[-1])

    default, kept = faults("default"), faults("kept")
    assert kept * 2 < default, (kept, default)
