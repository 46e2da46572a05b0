"""keep_freed_memory: the fast engine's tensors are reused instead of page-faulted in on every call.

Marked `machine`: it counts minor page faults of a child process, which depend on glibc's malloc (its
mmap threshold and trim behaviour), the kernel and the machine's load, not on this code alone; another
libc, allocator or a busy machine can fail it with nothing wrong. Deselect with -m 'not machine'.
"""

import os
import subprocess
import sys

import pytest

PROBE = """
import resource, sys, torch
from torch import nn
from gns_sweep.allocator import keep_freed_memory
from gns_sweep.per_example import param_layout
from gns_sweep.per_example.fast import FastEngine

if sys.argv[1] == "kept":
    assert keep_freed_memory() and keep_freed_memory()  # idempotent
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
x, y = torch.randn(256, 784), torch.randint(0, 10, (256,))
loss = lambda out, t: nn.functional.cross_entropy(out, t, reduction="none")
engine, layout = FastEngine(), param_layout(model)
for _ in range(3):
    engine.batch_sums(model, x, y, loss, layout, param_moments=True)
faults = []
for _ in range(21):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    engine.batch_sums(model, x, y, loss, layout, param_moments=True)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sorted(faults)[10])  # the median call: a one-off growth of the heap is not what this measures
"""

# glibc's default mmap threshold, fixed: set in the environment it turns off glibc's adaptive threshold, whose
# verdict on a given call depends on the order of earlier frees (0 to 2000 faults per call here)
GLIBC_DEFAULT = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def faults_per_call(mode: str) -> float:
    env = {**os.environ, **GLIBC_DEFAULT}
    cmd = [sys.executable, "-c", PROBE, mode]
    return float(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout.strip())


@pytest.mark.machine
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_memory_is_reused():
    default, kept = faults_per_call("default"), faults_per_call("kept")
    # this machine: ~3900 page faults per call at that threshold, 0 kept
    assert default >= 200, default  # else this workload no longer shows what the setting is for
    assert kept <= max(20.0, default / 10), (default, kept)
