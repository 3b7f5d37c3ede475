"""Real processes in tests: find them by reading /proc (no extra dependency), kill them with real signals."""

import glob
import os
import signal
import threading
import time


def _stat_fields(pid) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def _cmdline(pid) -> bytes:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read()


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def children_of(pid: int) -> list[int]:
    """Live (not zombie) child processes of ``pid``."""
    out = []
    for p in _pids():
        try:
            fields = _stat_fields(p)
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(p)
        except (OSError, ValueError):
            pass
    return out


def spawned_children_of(pid: int, exclude=()) -> list[int]:
    """Training workers the local engine started for ``pid`` (``python -m tensorgrid.train.engines.worker``)
    or children multiprocessing's spawn started, leaving out ``exclude``. Matching "python" alone is not
    enough: a session-wide Ray or Spark started by other tests also leaves python children of the test process."""
    out = []
    for c in children_of(pid):
        try:
            line = _cmdline(c)
            if (b"spawn_main" in line or b"tensorgrid.train.engines.worker" in line) and c not in exclude:
                out.append(c)
        except OSError:
            pass
    return out


def processes_running(marker: bytes) -> list[int]:
    """Processes whose command line holds ``marker`` (e.g. Ray names its actor processes after the task)."""
    out = []
    for p in _pids():
        try:
            if marker in _cmdline(p):
                out.append(p)
        except OSError:
            pass
    return out


def spark_task_workers() -> list[int]:
    """Python workers running Spark tasks: children of pyspark's daemon, forked from it."""
    out = []
    for p in processes_running(b"pyspark.daemon"):
        try:
            if b"pyspark.daemon" in _cmdline(_stat_fields(p)[1]):
                out.append(p)
        except OSError:
            pass
    return out


class KillAfterFirstCheckpoint:
    """A thread that waits for the first checkpoint in ``ckpt_dir``, then SIGKILLs one process that
    ``find()`` returns (a training worker, mid-run). ``with`` it around a fit; ``killed`` holds the pid."""

    def __init__(self, ckpt_dir: str, find, timeout_s: float = 120, kill_all: bool = False):
        self.ckpt_dir, self.find, self.timeout_s, self.killed = ckpt_dir, find, timeout_s, []
        self.kill_all = kill_all  # every process find() returns (when it cannot tell a busy one from an idle one)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        deadline = time.time() + self.timeout_s
        while time.time() < deadline and not glob.glob(f"{self.ckpt_dir}/ckpt-*.pt"):
            time.sleep(0.05)
        while time.time() < deadline:
            pids = self.find()
            if pids:
                for pid in (pids if self.kill_all else pids[-1:]):
                    try:
                        os.kill(pid, signal.SIGKILL)
                        self.killed.append(pid)
                    except ProcessLookupError:
                        pass
                return
            time.sleep(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._thread.join()
        return False


def kill_once_it_writes(script: str, url: str, folder: str, before: set, files: int = 3, timeout: float = 60) -> set:
    """Run ``script`` (python -c, argv[1] = url) and SIGKILL it once ``folder`` holds ``files`` new entries
    (mid-way through its work); the new entries it left (checked to be at least ``files``)."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", script, url])
    try:
        deadline = time.time() + timeout
        while len(set(os.listdir(folder)) - before) < files and time.time() < deadline:
            time.sleep(0.01)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    left = set(os.listdir(folder)) - before
    assert len(left) >= files, "the process was killed before it got going"
    return left
