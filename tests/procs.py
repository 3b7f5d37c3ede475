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
