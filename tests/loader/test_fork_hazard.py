"""A process with a torch.distributed process group (a training rank) never forks its loader workers.

gloo's threads free each finished collective's tensors under pybind11's ``gil_scoped_acquire``, creating a
Python thread state without the GIL; a child forked at that moment inherits CPython's thread-state lock
held and hangs in ``PyOS_AfterFork_Child`` (CPython gh-112275, up to 3.11.9), before any Python runs. Seen
as a rank of a flat script on 2 local workers waiting for its loader worker's first batch forever."""

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# run as `python -c` (a notebook cell's case: no __main__ file that a fork server's worker would run again)
RANK = textwrap.dedent("""
    import os, socket, sys, threading, time
    import numpy as np, pyarrow as pa, torch, torch.distributed as dist
    import tensorgrid as tg
    from tensorgrid import forking
    from tensorgrid.loader.stream import _context
    from tensorgrid.ml import jobs

    x = np.arange(400, dtype="float32").reshape(100, 4)
    ds = tg.from_arrow(pa.table({"features": list(x), "id": np.arange(100)}))
    assert forking.hazard() is None and ds.to_torch(batch_size=10, num_workers=1)._start_method() == "fork"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    assert "gloo" in forking.hazard()
    assert not jobs.can_fork(torch.get_num_threads(), ds)  # nor are a job's workers forked here

    stop = False
    def collectives():  # a rank's DDP all-reduces: gloo's threads free each one as it ends
        t = torch.ones(4)
        while not stop:
            dist.all_reduce(t, async_op=True)
            time.sleep(0)
    for _ in range(2):
        threading.Thread(target=collectives, daemon=True).start()

    loader = ds.to_torch(batch_size=10, num_workers=1, shuffle=True, timeout=60,
                         transform=lambda b: {**b, "ppid": torch.full((len(b["id"]),), os.getppid())})
    assert loader._start_method() == "forkserver", loader._start_method()
    for epoch in range(4):  # a worker started each epoch while the collectives run
        ids, parents = [], set()
        for b in loader:
            ids += b["id"].tolist()
            parents.update(b["ppid"].tolist())
        assert sorted(ids) == list(range(100)), epoch
        assert os.getpid() not in parents  # the worker's parent is the fork server
    stop = True
    # a script run by its path keeps fork: a fork server's worker would run the whole script again
    sys.modules["__main__"].__file__ = "/somewhere/train.py"
    assert _context(None, ds, 1) is None
    print("OK", flush=True)
    os._exit(0)  # gloo's threads: no interpreter shutdown to wait on
""")


def test_a_rank_with_a_process_group_starts_its_loader_workers_from_a_fork_server():
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env = {k: v for k, v in env.items() if not k.startswith(("RANK", "WORLD_SIZE", "MASTER_", "LOCAL_"))}
    p = subprocess.run([sys.executable, "-c", RANK], capture_output=True, text=True, timeout=240, env=env)
    assert p.returncode == 0 and "OK" in p.stdout, p.stderr[-3000:]
