"""keep_freed_memory: the fast engine's tensors are reused instead of page-faulted in on every call."""

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
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    engine.batch_sums(model, x, y, loss, layout, param_moments=True)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""


def faults_per_call(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], check=True, capture_output=True, text=True).stdout
    return float(out.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_memory_is_reused():
    default, kept = faults_per_call("default"), faults_per_call("kept")
    # this machine's glibc: ~1900-2500 page faults per call by default (the call's tensors are ~8 MB), 0-30 kept
    assert kept <= max(20.0, default / 10), (default, kept)
