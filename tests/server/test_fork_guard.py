"""A process in which gRPC runs (a Flight server or client, as here) never forks pools of workers: a child
forked while one of gRPC's threads holds a lock hangs."""

import pyarrow as pa
import pyarrow.flight as flight

import tensorgrid as tg
from tensorgrid.ml import jobs


def test_a_process_that_ran_grpc_never_forks_its_workers(tmp_path):
    ds = tg.write(str(tmp_path / "d"), pa.table({"x": list(range(10))}))
    server = flight.FlightServerBase("grpc://127.0.0.1:0")
    try:
        assert jobs._grpc_started() and not jobs.can_fork(1024, ds)
    finally:
        server.shutdown()


CHILD_USES_AN_INHERITED_GRID = r"""
import gc, os, sys, fsspec
from tensorgrid.server.grid import GridServer
server = GridServer(sys.argv[1])
host, port = server.url.split("://")[1].rsplit(":", 1)
fs = fsspec.filesystem("grid", host=host, port=int(port))  # fsspec caches it, with its Flight client
fs.pipe("x.txt", b"hello")
assert fs.cat("x.txt") == b"hello"
del fs  # only fsspec's cache holds the filesystem (and its client) now
pid = os.fork()
if pid == 0:  # fsspec drops its cached filesystems in the child: the client must not be closed here
    gc.collect()
    os._exit(0)
_, status = os.waitpid(pid, 0)
print("child", os.waitstatus_to_exitcode(status))
server.close()
"""


def test_a_child_forked_after_grid_calls_never_closes_the_parents_client(tmp_path):
    # a client inherited through fork() must not be closed in the child: gRPC's threads stayed in the parent,
    # and closing waits for them (a Popen with preexec_fn, as Ray's, hung before its exec). (gRPC itself
    # cannot be used in such a child: that is why loader workers over a grid are spawned.)
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-c", CHILD_USES_AN_INHERITED_GRID, str(tmp_path / "root")],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "child 0" in p.stdout, p.stderr[-2000:]
