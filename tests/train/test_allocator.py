"""The trainer's malloc tuning: freed memory stays in the heap for the next step instead of being handed
back to the kernel and faulted in again."""

import os
import subprocess
import sys

PROBE = """
import resource, torch
from tensorgrid.allocator import tune_malloc
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


# Allocate, touch and free 96 MiB in 96 KiB blocks (below every mmap threshold, so from the heap) three
# times; count page faults in the last two. glibc's defaults trim the freed heap top back to the kernel
# (trim threshold 128 KiB, at most 64 MiB after its dynamic adjustment), so each round faults it in again.
HEAP_PROBE = """
import ctypes, resource
from tensorgrid.allocator import tune_malloc
tuned = tune_malloc() if {tune} else False
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def cycle():
    blocks = [libc.malloc(96 << 10) for _ in range(1024)]
    for b in blocks:
        ctypes.memset(b, 1, 96 << 10)
    for b in reversed(blocks):
        libc.free(b)
cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
cycle()
cycle()
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def probe(tune: bool, code: str = PROBE, **env) -> tuple[bool, int]:
    clean = {k: v for k, v in os.environ.items()  # the machine's own allocator settings, if any, are not ours
             if not k.startswith("MALLOC_") and k not in ("LD_PRELOAD", "GLIBC_TUNABLES")}
    out = subprocess.run([sys.executable, "-c", code.format(tune=tune)], capture_output=True, text=True,
                         env={**clean, **env}, check=True).stdout.split()
    return out[0] == "True", int(out[1])


def test_tuned_heap_keeps_freed_memory():
    _, default_faults = probe(False, HEAP_PROBE)
    tuned, tuned_faults = probe(True, HEAP_PROBE)
    assert tuned
    assert default_faults > 2 * 96 * 256 // 4  # two rounds of 96 MiB in 4 KiB pages, most faulted again
    assert tuned_faults < 100


def test_tuned_training_step_smoke_stays_under_20_faults_a_step():
    # Whether glibc's defaults fault on this model's step depends on the CPU (oneDNN picks kernels, and
    # their buffer sizes, by instruction set): 425-1,100 faults a step on one machine here, ~0 on another.
    # Tuned, a step reuses the heap everywhere: a few faults a step at most (577 over 20 steps once, in a full
    # suite on a busy host; untuned steps fault hundreds each).
    tuned, tuned_faults = probe(True)
    assert tuned
    assert tuned_faults < 20 * 50


def test_users_own_malloc_settings_are_left_alone():
    assert not probe(True, MALLOC_MMAP_THRESHOLD_="65536")[0]
    assert not probe(True, GLIBC_TUNABLES="glibc.malloc.trim_threshold=65536")[0]


# Inference in a fresh process (NNModel.transform in parts, tg.predict): nothing else in it frees a large
# block, so glibc's dynamic thresholds stay low and the model's per-batch activations were faulted in fresh
# every batch (1.2 M faults a pass over 200k digits, +20-40% time: benchmarks/bench_ml.py).
INFERENCE_PROBE = """
import tempfile, numpy as np, pyarrow as pa, torch
import tensorgrid as tg, tensorgrid.allocator as allocator
from tensorgrid.ml import NNModel
root = tempfile.mkdtemp()
x = pa.FixedShapeTensorArray.from_numpy_ndarray(np.random.rand(300, 4).astype("float32"))
ds = tg.write(root + "/x", pa.table({{"x": x}}))
stage = NNModel(torch.nn.Linear(4, 2), features_col="x", batch_size=64)
before = allocator._done
assert stage.transform(ds, out=root + "/out", workers=1).num_rows == 300
print(allocator._done and not before, 0)
"""


def test_inference_tunes_the_allocator_in_its_process():
    tuned, _ = probe(False, INFERENCE_PROBE)
    assert tuned
