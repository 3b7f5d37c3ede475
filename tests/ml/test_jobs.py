"""The pool of forked workers (ml/jobs.py) on its own: every piece once, a worker's errors back in the
caller whatever they are, and only its own children waited for."""

import os
import subprocess
import sys
import threading
import time

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


HELD = threading.Lock()  # module-level: a fresh interpreter imports its own, free


class AfterTheLock:
    """Takes HELD, then writes one file per piece; piece 0 may first keep a CPU, or a subprocess, busy."""

    def __init__(self, folder, todo, busy_s=0.0):
        self.folder, self.todo, self.busy_s = str(folder), todo, busy_s

    def run_rank(self, rank, world, take=None):
        with HELD:  # forked while another thread of the parent held it: never released in the child
            pass
        done = 0
        for k in jobs.pieces(self.todo, rank, world, take):
            if k == 0 and self.busy_s:
                end = time.time() + self.busy_s
                while time.time() < end:
                    pass
            if k == 1 and self.busy_s:  # the work is in a process it started: it waits without running
                subprocess.run([sys.executable, "-c", f"import time\nend = time.time() + {self.busy_s}\n"
                                "while time.time() < end: pass"], check=True)
            with open(os.path.join(self.folder, f"{k}-{rank}-{os.getpid()}"), "w"):
                done += 1
        return {"pieces": done}  # the engines' workers hand back a result


def _pieces_done(folder):
    return sorted(int(name.split("-")[0]) for name in os.listdir(folder))


def test_a_worker_stuck_on_a_lock_held_at_the_fork_hands_its_pieces_to_fresh_interpreters(tmp_path, monkeypatch):
    """A thread held a lock when the workers were forked: they wait for it forever. Their processes stop
    running at all; after STALL_S the pieces left run in fresh interpreters, with a warning saying why."""
    monkeypatch.setattr(jobs, "STALL_S", 2.0)
    monkeypatch.setattr(jobs, "POLL_S", 0.2)
    holding, release = threading.Event(), threading.Event()

    def holder():
        with HELD:
            holding.set()
            release.wait()

    thread = threading.Thread(target=holder)
    thread.start()
    holding.wait()
    todo = list(range(12))
    try:
        started = time.monotonic()
        with pytest.warns(RuntimeWarning, match="forked worker . has not run for . s .* fresh interpreters"):
            jobs.forked_else_fresh(AfterTheLock(tmp_path, todo), 2, todo, str(tmp_path), "test", "pieces",
                                   lambda: [k for k in todo if k not in _pieces_done(tmp_path)])
    finally:
        release.set()
        thread.join()
    assert _pieces_done(tmp_path) == todo  # each once, by fresh interpreters (none was done while stuck)
    assert {name.split("-")[2] for name in os.listdir(tmp_path)}.isdisjoint({str(os.getpid())})
    assert time.monotonic() - started >= 2.0


def test_workers_busy_longer_than_the_stall_limit_are_not_stuck(tmp_path, monkeypatch, recwarn):
    """A piece computing for 3 s, another waiting 3 s on a process it started: both run, nothing stalls."""
    monkeypatch.setattr(jobs, "STALL_S", 1.5)
    monkeypatch.setattr(jobs, "POLL_S", 0.2)
    todo = [0, 1, 2, 3]
    jobs.forked_else_fresh(AfterTheLock(tmp_path, todo, busy_s=3.0), 2, todo, str(tmp_path), "test", "pieces",
                           lambda: pytest.fail("no worker is stuck"))
    forked_pids = {name.split("-")[2] for name in os.listdir(tmp_path)}
    assert _pieces_done(tmp_path) == todo and len(forked_pids) <= 2
    assert not [w for w in recwarn if "has not run" in str(w.message)]
