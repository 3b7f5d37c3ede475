"""Real processes in tests: find children by reading /proc (no extra dependency)."""

import os


def children_of(pid: int) -> list[int]:
    """Live (not zombie) child processes of ``pid``."""
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid and fields[0] != "Z":
                    out.append(int(p))
            except (OSError, ValueError):
                pass
    return out


def spawned_children_of(pid: int, exclude=()) -> list[int]:
    """Children of ``pid`` started by multiprocessing's spawn (torch's elastic launcher starts its workers
    this way), leaving out ``exclude``. Matching "python" alone is not enough: a session-wide Ray or Spark
    started by other tests also leaves python children of the test process."""
    out = []
    for c in children_of(pid):
        try:
            with open(f"/proc/{c}/cmdline", "rb") as f:
                if b"spawn_main" in f.read() and c not in exclude:
                    out.append(c)
        except OSError:
            pass
    return out
