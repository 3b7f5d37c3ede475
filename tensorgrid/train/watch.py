"""Which training rank stopped first.

When one rank hangs or exits early, its peers fail next, in a collective ("timed out waiting", "connection
reset by peer"), and the launcher reports a peer. So each rank reports to the driver over a loopback socket:
that it started (its pid), its progress (a few times a second at most), its own error, or that it finished.
A connection that closes without either means the process exited on its own; one still open when its peers
fail in a collective means it hung. The driver then names that rank.
"""

from __future__ import annotations

import json
import re
import selectors
import socket
import threading
import time
from dataclasses import dataclass

BEAT_S = 0.25  # a rank reports its step at most this often
# A peer killed by the launcher disconnects only after the failed rank has exited, which is at least the
# loop's FAILURE_GRACE_S (1 s) after it reported its error; a rank that disconnects earlier left on its own.
KILLED_AFTER_S = 0.5
_COLLECTIVE = re.compile(r"gloo|nccl|Connection (reset|closed) by peer|Timed out waiting|Broken pipe|"
                         r"Socket Timeout|ProcessGroup", re.I)
_SOURCE = re.compile(r"\[[^\]\s]*\.(?:cc|cpp|h):\d+\] ")


def is_collective_error(e: BaseException) -> bool:
    """Whether ``e`` is a rank failing in a collective because of a peer (not an error of its own)."""
    import torch.distributed as dist

    return isinstance(e, getattr(dist, "DistError", ())) or bool(_COLLECTIVE.search(f"{type(e).__name__}: {e}"))


@dataclass
class _Rank:
    pid: int | None = None
    step: int = 0
    beat: float = 0.0  # when the driver last heard from it (time.monotonic)
    error: str | None = None
    collective: bool = False
    error_at: float | None = None
    done: bool = False
    closed_at: float | None = None


class Watch:
    """The driver's side: listens on loopback, records what every rank reports. ``address`` goes to the
    workers; ``culprit()`` names the rank that stopped first once the group has failed."""

    def __init__(self):
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.setblocking(False)
        self.address = f"127.0.0.1:{self._server.getsockname()[1]}"
        self.ranks: dict[int, _Rank] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._drain_until = 0.0
        self._thread = threading.Thread(target=self._run, name="tensorgrid-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._server, selectors.EVENT_READ, None)
        buffers: dict[socket.socket, list] = {}
        try:
            while not (self._stop.is_set() and (not buffers or time.monotonic() > self._drain_until)):
                for key, _ in sel.select(timeout=0.1):
                    if key.data is None:  # a new rank connects
                        try:
                            conn, _ = self._server.accept()
                        except OSError:
                            continue
                        conn.setblocking(False)
                        buffers[conn] = [b"", None]
                        sel.register(conn, selectors.EVENT_READ, True)
                        continue
                    conn = key.fileobj
                    try:
                        data = conn.recv(65536)
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    buf = buffers[conn]
                    buf[0] += data
                    *lines, buf[0] = buf[0].split(b"\n")
                    for line in lines:
                        buf[1] = self._record(buf[1], line)
                    if not data:  # the rank's process closed it: finished, failed or gone
                        if buf[1] is not None:
                            with self._lock:
                                self.ranks[buf[1]].closed_at = time.monotonic()
                        sel.unregister(conn)
                        conn.close()
                        del buffers[conn]
        finally:
            for conn in buffers:
                conn.close()
            sel.close()

    def _record(self, rank: int | None, line: bytes) -> int | None:
        try:
            msg = json.loads(line)
        except ValueError:
            return rank
        now = time.monotonic()
        with self._lock:
            if "rank" in msg:
                rank = int(msg["rank"])
                self.ranks[rank] = _Rank(pid=msg.get("pid"), beat=now)
                return rank
            if rank is None:
                return rank
            r = self.ranks[rank]
            r.beat = now
            if "step" in msg:
                r.step = int(msg["step"])
            if "error" in msg:
                r.error, r.collective, r.error_at = str(msg["error"]), bool(msg.get("collective")), now
            if msg.get("done"):
                r.done = True
        return rank

    def close(self, drain_s: float = 2.0) -> None:
        """Stop listening once every rank's connection has closed (their last reports read), or after
        ``drain_s``."""
        self._drain_until = time.monotonic() + drain_s
        self._stop.set()
        self._thread.join(timeout=drain_s + 1)
        self._server.close()

    def culprit(self, timeout_s: float, died: dict[int, str] | None = None) -> tuple[int, str] | None:
        """(rank, what happened to it) for the rank that stopped first while its peers failed waiting for it
        in a collective; None when a rank failed with an error of its own (the launcher names that one).
        ``died``: rank -> how the launcher saw it end ("signal SIGKILL", "exit code 3"), when it did."""
        died = died or {}
        with self._lock:
            ranks = {k: _Rank(**vars(v)) for k, v in self.ranks.items()}
        if any(r.error and not r.collective for r in ranks.values()):
            return None
        waited = [r.error_at for r in ranks.values() if r.error and r.collective]
        gave_up = min(waited) if waited else None
        victims = sorted(k for k, r in ranks.items() if r.error and r.collective)
        then = f"; then rank {victims[0]} failed: {ranks[victims[0]].error}" if victims else ""
        # exited on its own: gone without finishing or failing, before any peer gave up (or none did)
        gone = [(r.closed_at, k) for k, r in ranks.items() if r.closed_at is not None and not r.done and not r.error
                and (gave_up is None or r.closed_at < gave_up + KILLED_AFTER_S)]
        if gone:
            _, k = min(gone)
            r = ranks[k]
            how = f"died with {died[k]}" if k in died else "exited before the end of training without reporting an error"
            return k, f"worker rank {k} (pid {r.pid}) {how} (last report at step {r.step}){then}"
        if gave_up is None:
            return None
        # hung: neither finished nor failed, still there when a peer gave up waiting
        hung = [(r.step, r.beat, k) for k, r in ranks.items() if not r.done and not r.error]
        if not hung:
            return None
        _, _, k = min(hung)
        r = ranks[k]
        return k, (f"worker rank {k} (pid {r.pid}) stopped making progress (last report at step {r.step}, "
                   f"{gave_up - r.beat:.1f} s before its peers gave up): it hung, and the others timed out "
                   f"waiting for it after timeout_s={timeout_s:g}{then}")


class Reporter:
    """A rank's side: reports to the driver's ``Watch``; never fails or slows training (a driver that went
    away just ends the reports)."""

    def __init__(self, address: str, rank: int):
        import os

        host, port = address.rsplit(":", 1)
        self._last = 0.0
        try:
            self._sock: socket.socket | None = socket.create_connection((host, int(port)), timeout=10)
        except OSError:
            self._sock = None
        self._send({"rank": rank, "pid": os.getpid()})

    def _send(self, msg: dict) -> None:
        if self._sock is None:
            return
        try:
            self._sock.sendall(json.dumps(msg).encode() + b"\n")
        except OSError:
            self._sock = None

    def step(self, step: int) -> None:
        now = time.monotonic()
        if now - self._last >= BEAT_S:
            self._last = now
            self._send({"step": step})

    def error(self, e: BaseException) -> None:
        text = (str(e).strip().splitlines() or [""])[-1]
        text = _SOURCE.sub("", text).split(". This is typically")[0][:500]  # gloo's file:line and advice
        self._send({"error": f"{type(e).__name__}: {text}", "collective": is_collective_error(e)})

    def done(self) -> None:
        self._send({"done": True})
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
