"""Loader worker processes watched, so that a dead worker is always ``LoaderWorkerError``.

torch notices a dead DataLoader worker in three ways, none of them a named error: its SIGCHLD handler
raises RuntimeError in whatever code the main thread runs at that moment (often the user's training step);
unpickling a batch fails with ConnectionResetError or EOFError when the worker died while handing over a
tensor's shared memory; a queue read that timed out finds it dead (RuntimeError). A ``Watch`` keeps one
iterator's workers instead: a SIGCHLD while the loader waits for data raises LoaderWorkerError at once (a
read from a dead worker may never return), one while the user's code runs is kept for the next fetch, and
any error while fetching is checked against the workers' exit codes.
"""

from __future__ import annotations

import signal
import threading
import time

from ..errors import LoaderWorkerError, TensorGridError, TransformError

_watches: set[Watch] = set()
_previous = None  # the SIGCHLD handler ours replaced (torch's): still called for every other child
_installed = False
_TORCH_MARKERS = ("exited unexpectedly", "killed by signal")


class Watch:
    """The worker processes of one torch DataLoader iterator, checked for deaths."""

    def __init__(self, it):
        self._it = it
        self._procs = list(getattr(it, "_workers", ()))
        self.waiting = False  # the main thread is inside next(it)
        self.death: str | None = None
        if self._procs and _install():
            _untrack_in_torch(it)
        _watches.add(self)

    @classmethod
    def start(cls, make_iterator) -> Watch:
        """Start the workers (``make_iterator()``) and watch them; a worker killed even now is LoaderWorkerError."""
        try:
            return cls(make_iterator())
        except RuntimeError as e:  # torch's own SIGCHLD handler, before ours took over
            if any(m in str(e) for m in _TORCH_MARKERS):
                raise LoaderWorkerError(f"a loader worker died: {e}") from None
            raise

    def notice(self) -> None:
        """Record a dead worker; raise LoaderWorkerError if the loader is waiting for data."""
        if self.death is None and not getattr(self._it, "_shutdown", False):  # torch stops its workers itself
            self.death = _dead(self._procs)
        if self.death is not None and self.waiting:
            self.waiting = False
            raise LoaderWorkerError(self.message())

    def message(self) -> str:
        return f"a loader worker died ({self.death}): this epoch cannot go on; resume from a saved state_dict()"

    def next(self):
        """The iterator's next item (None at its end); every sign of a dead worker is LoaderWorkerError."""
        self.waiting = True
        try:
            self.notice()  # a death noticed while the user's code ran
            return next(self._it, None)
        except Exception as e:  # noqa: BLE001 - re-raised as is unless a worker died
            self.waiting = False
            raise self._explained(e) from None
        finally:
            self.waiting = False

    def _explained(self, e: Exception) -> Exception:
        if isinstance(e, TransformError):  # torch wraps the worker's message in its traceback text
            return TransformError(_last_line(str(e), "TransformError: "))
        if isinstance(e, TensorGridError):  # ours (the SIGCHLD handler), or a worker's own, re-raised by torch
            return e
        deadline = time.monotonic() + 1.0  # a broken channel: the exit status can come a moment after it
        while self.death is None and time.monotonic() < deadline:
            self.notice()
            if self.death is None:
                time.sleep(0.01)
        if self.death is not None:
            return LoaderWorkerError(f"{self.message()} [the main process saw {type(e).__name__}: {e}]")
        if isinstance(e, RuntimeError) and any(m in str(e) for m in _TORCH_MARKERS):
            return LoaderWorkerError(f"a loader worker died: {e}")
        return e

    def close(self) -> None:
        """Stop watching and stop the workers (a worker killed from now on loses nothing)."""
        _watches.discard(self)
        shutdown = getattr(self._it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def _last_line(message: str, marker: str) -> str:
    """The original error's own message out of the traceback text torch puts around a worker's error."""
    lines = [ln for ln in message.splitlines() if marker in ln]
    return lines[-1].split(marker, 1)[1] if lines else message


def _dead(procs) -> str | None:
    for p in procs:
        code = p.exitcode  # waitpid(WNOHANG): never blocks
        if code is not None and code != 0:
            try:
                how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            except ValueError:
                how = f"killed by signal {-code}"
            return f"pid {p.pid}, {how}"
    return None


def _on_sigchld(signum, frame) -> None:
    for watch in list(_watches):
        watch.notice()
    if callable(_previous):
        _previous(signum, frame)


def _install() -> bool:
    """Our SIGCHLD handler, once per process, chained to the one before it. Only the main thread may set
    handlers: elsewhere torch's timed checks (every 5 s) remain."""
    global _installed, _previous
    if not _installed and threading.current_thread() is threading.main_thread():
        _previous = signal.getsignal(signal.SIGCHLD)
        signal.signal(signal.SIGCHLD, _on_sigchld)
        _installed = True
    return _installed


def _untrack_in_torch(it) -> None:
    """Keep torch's handler from raising RuntimeError for these workers (ours raises LoaderWorkerError)."""
    try:
        from torch.utils.data._utils import signal_handling

        if getattr(it, "_worker_pids_set", False):
            signal_handling._remove_worker_pids(id(it))
            it._worker_pids_set = False
    except (ImportError, AttributeError, RuntimeError):  # another torch: its own handler stays, also caught
        pass
