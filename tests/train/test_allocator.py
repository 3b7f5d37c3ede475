"""The trainer's malloc tuning: a training step reuses freed memory instead of faulting it in again."""

import os
import subprocess
import sys

PROBE = """
import resource, torch
from tensorgrid.train.allocator import tune_malloc
torch.set_num_threads(1)
tuned = tune_malloc() if {tune} else False
nn = torch.nn
model = nn.Sequential(nn.Unflatten(1, (1, 28)), nn.Conv2d(1, 16, 5, stride=2), nn.ReLU(),
                      nn.Conv2d(16, 32, 5, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 16, 10))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
x, y = torch.rand(128, 28, 28), torch.randint(0, 10, (128,))
def step():
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
for _ in range(5):
    step()  # warm-up
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def probe(tune: bool, **env) -> tuple[bool, int]:
    clean = {k: v for k, v in os.environ.items()  # the machine's own allocator settings, if any, are not ours
             if not k.startswith("MALLOC_") and k not in ("LD_PRELOAD", "GLIBC_TUNABLES")}
    out = subprocess.run([sys.executable, "-c", PROBE.format(tune=tune)], capture_output=True, text=True,
                         env={**clean, **env}, check=True).stdout.split()
    return out[0] == "True", int(out[1])


def test_tuned_training_step_reuses_freed_memory():
    _, default_faults = probe(False)
    tuned, tuned_faults = probe(True)
    assert tuned
    # glibc's defaults trim the heap after each step, so its activations are faulted in again every step
    # (~1,100 page faults a step measured here); tuned, the memory stays in the heap for the next step.
    assert default_faults > 20 * 200
    assert tuned_faults < default_faults / 10


def test_users_own_malloc_settings_are_left_alone():
    assert not probe(True, MALLOC_MMAP_THRESHOLD_="65536")[0]
    assert not probe(True, GLIBC_TUNABLES="glibc.malloc.trim_threshold=65536")[0]
