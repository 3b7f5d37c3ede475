"""The pool of forked workers (ml/jobs.py) on its own: every piece once, a worker's errors back in the
caller whatever they are, and only its own children waited for."""

import os
import subprocess

import pytest

from tensorgrid.errors import WorkerFailedError
from tensorgrid.ml import jobs


class Pieces:
    """Writes one file per piece done; ``fail`` maps a piece to what happens there."""

    def __init__(self, folder, fail=None):
        self.folder, self.fail = str(folder), fail or {}

    def run_rank(self, rank, world, take):
        for k in iter(take, None):
            what = self.fail.get(k)
            if what == "exit":
                os._exit(3)
            if what is not None:
                raise what
            with open(os.path.join(self.folder, f"{k}-{rank}"), "w"):
                pass


class NeedsTwo(Exception):
    def __init__(self, path, code):  # pickles, but cannot be rebuilt from its args
        super().__init__(f"{path} failed with {code}")


def test_every_piece_once_and_only_our_children_waited_for(tmp_path):
    other = subprocess.Popen(["sh", "-c", "sleep 0.3; exit 3"])  # the caller's own subprocess
    jobs.forked(Pieces(tmp_path), 2, list(range(40)), str(tmp_path), "test", "pieces")
    done = sorted(int(name.split("-")[0]) for name in os.listdir(tmp_path))
    assert done == list(range(40))
    assert other.wait() == 3  # not reaped by the pool


@pytest.mark.parametrize("fail, error, message", [
    (ValueError("bad piece"), ValueError, "bad piece"),
    (NeedsTwo("/x", 7), WorkerFailedError, "NeedsTwo: /x failed with 7"),
    ("exit", WorkerFailedError, "worker . exited with code 3; the pieces it finished are kept"),
])
def test_a_workers_failure_comes_back_whatever_it_is(tmp_path, fail, error, message):
    with pytest.raises(error, match=message) as info:
        jobs.forked(Pieces(tmp_path, {5: fail}), 2, list(range(10)), str(tmp_path), "test", "pieces")
    if fail != "exit":
        assert "(in the worker)" in str(info.value.__cause__) and "Traceback" in str(info.value.__cause__)


def test_the_workers_die_with_their_parent(tmp_path):
    import signal
    import sys
    import textwrap
    import time

    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(f"""
        import os, time
        from tensorgrid.ml import jobs

        class Slow:
            def run_rank(self, rank, world, take):
                for k in iter(take, None):
                    open(os.path.join({str(tmp_path)!r}, f"pid-{{os.getpid()}}"), "w").close()
                    time.sleep(0.5)

        jobs.forked(Slow(), 2, list(range(100)), {str(tmp_path)!r}, "test", "pieces")
    """))
    parent = subprocess.Popen([sys.executable, str(script)])
    deadline = time.time() + 60
    while len([f for f in os.listdir(tmp_path) if f.startswith("pid-")]) < 2 and time.time() < deadline:
        time.sleep(0.1)
    pids = [int(f[4:]) for f in os.listdir(tmp_path) if f.startswith("pid-")]
    assert len(pids) == 2
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 10
    while any(os.path.exists(f"/proc/{p}") and open(f"/proc/{p}/stat").read().split()[2] != "Z" for p in pids) \
            and time.time() < deadline:
        time.sleep(0.1)
    assert not any(os.path.exists(f"/proc/{p}") and open(f"/proc/{p}/stat").read().split()[2] != "Z" for p in pids)
