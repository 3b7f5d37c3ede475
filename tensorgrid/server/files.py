"""The grid filesystem's server side: files under ``<root>/files`` (the ``files`` service), read and written by
``grid://host:port/path`` (gridfs.py).

- Metadata by actions ``files.ls|info|rm|mv|mkdir``: a JSON body in, one JSON result out.
- Reads by DoGet of a ticket ``b"files/" + JSON {"path", "offset", "length"}``: the range streams as record
  batches of one binary column, a chunk at a time (a big file is never held in memory). The file is opened
  before the stream starts, so a reader sees the file that was there when it asked, whole, even if a writer
  replaces it meanwhile.
- Writes by DoPut on PATH ``["files", *path]``: the bytes stream into a temporary file under
  ``<root>/files.tmp`` and are renamed into place only when the client's end marker arrives (app metadata
  ``{"size": n}``) with every byte it announced: a file is visible whole or not at all, and an upload that
  breaks off (client killed, connection lost) leaves nothing. Schema metadata ``mode``: ``w`` replaces,
  ``x`` creates only if absent (FileExistsError otherwise, race-free: a hard link), ``a`` appends.
- Paths are relative to ``<root>/files`` and never leave it: absolute paths, ``..``, NUL bytes and symlinks
  that resolve outside are refused (PermissionError). Errors reach the client as one line plus an errno name
  in the Flight error's extra info, which the client turns back into FileNotFoundError, IsADirectoryError...
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
import threading
import time
import uuid

import pyarrow as pa
import pyarrow.flight as flight

from . import auth
from .services import Service

CHUNK = 1 << 20  # bytes per streamed record batch, both ways
SCHEMA = pa.schema([("data", pa.binary())])
TMP_DIR = "files.tmp"  # beside files/, on the same disk (renames), never listed
STALE_AFTER = 60.0  # seconds: a temporary no upload of this process owns and idle this long is swept
_MAX_REQUEST = 64 << 10


class FilesService(Service):
    prefix = "files"

    def __init__(self, server):
        self.server = server
        self.root = os.path.join(server.root, "files")
        self.tmp = os.path.join(server.root, TMP_DIR)
        os.makedirs(self.root, exist_ok=True)
        os.makedirs(self.tmp, exist_ok=True)
        self.real_root = os.path.realpath(self.root)
        self._active: set[str] = set()  # temporaries of uploads running in this process
        self._lock = threading.Lock()
        self.sweep()

    # -- Service -------------------------------------------------------------------------------------------

    def actions(self) -> dict[str, str]:
        return {"ls": "list a directory of the grid filesystem (JSON {path})",
                "info": "size, type and mtime of a path (JSON {path})",
                "rm": "remove a file, or a directory (JSON {path, recursive})",
                "mv": "rename a file or directory (JSON {src, dst})",
                "mkdir": "make a directory (JSON {path, parents, exist_ok})"}

    def do_action(self, context, verb: str, body: bytes) -> list[bytes]:
        handler = _ACTIONS.get(verb)
        if handler is None:
            raise flight.FlightServerError(f"unknown action 'files.{verb[:40]}': this service knows "
                                           f"{', '.join('files.' + v for v in _ACTIONS)}")
        auth.require(context, auth.READ if verb in ("ls", "info") else auth.WRITE)
        request = _request(body)
        with _errors(request.get("path", request.get("src", ""))):
            return [json.dumps(handler(self, request)).encode()]

    def get_flight_info(self, context, descriptor, path: list[str]):
        """A file as a Flight stream (any Flight client can read it): its size and a ticket for all of it."""
        auth.require(context, auth.READ)
        rel = "/".join(path)
        with _errors(rel):
            entry = self._info(rel, self._resolve(rel))
            if entry["type"] != "file":
                raise IsADirectoryError(errno.EISDIR, "is a directory")
        ticket = flight.Ticket(b"files/" + json.dumps({"path": rel, "offset": 0, "length": entry["size"]}).encode())
        return flight.FlightInfo(SCHEMA, descriptor, [flight.FlightEndpoint(ticket, [])], -1, entry["size"])

    def do_get(self, context, ticket: bytes):
        auth.require(context, auth.READ)
        request = _request(ticket.partition(b"/")[2])
        rel = request.get("path")
        offset, length = request.get("offset", 0), request.get("length")
        if not isinstance(offset, int) or offset < 0 or not (length is None or isinstance(length, int) and length >= 0):
            raise flight.FlightServerError("invalid request: offset must be an int >= 0, length an int >= 0 or null")
        with _errors(rel):
            fd = _open_file(self._resolve(rel))
        return flight.GeneratorStream(SCHEMA, _chunks(fd, offset, length))

    def do_put(self, context, descriptor, path: list[str], reader, writer) -> None:
        auth.require(context, auth.WRITE)
        rel = "/".join(path)
        mode = (reader.schema.metadata or {}).get(b"mode", b"w").decode("ascii", "replace")
        if mode not in ("w", "x", "a") or reader.schema.names != ["data"]:
            raise flight.FlightServerError("invalid request: an upload is one binary column 'data' with schema "
                                           "metadata mode 'w', 'x' or 'a'")
        with _errors(rel):
            target = self._resolve(rel, follow_last=False)
            if target == self.real_root:
                raise IsADirectoryError(errno.EISDIR, "is a directory")
            size = self._upload(context, rel, target, mode, reader)
        writer.write(pa.py_buffer(json.dumps({"size": size}).encode()))

    # -- paths ---------------------------------------------------------------------------------------------

    def _resolve(self, rel, follow_last: bool = True) -> str:
        """The real path of ``rel`` inside the root; PermissionError for anything that would leave it.
        ``follow_last=False`` resolves the parent only (rm, mv and writes act on a link, not its target)."""
        if not isinstance(rel, str):
            raise _Invalid(f"a path must be a string, got {type(rel).__name__}")
        if "\x00" in rel:
            raise PermissionError(errno.EACCES, "refused: the path holds a NUL byte")
        if rel.startswith("/") or rel.startswith("\\"):
            raise PermissionError(errno.EACCES, "refused: absolute paths are not served; paths are relative to "
                                                "the grid filesystem's root")
        parts = [p for p in rel.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise PermissionError(errno.EACCES, "refused: '..' in a path would leave the grid filesystem's root")
        if not parts:
            return self.real_root
        if follow_last:
            real = os.path.realpath(os.path.join(self.real_root, *parts))
        else:
            real = os.path.join(os.path.realpath(os.path.join(self.real_root, *parts[:-1])), parts[-1])
        if not self._inside(real):
            raise PermissionError(errno.EACCES, "refused: a symlink on the path leads outside the grid "
                                                "filesystem's root")
        return real

    def _inside(self, real: str) -> bool:
        return real == self.real_root or real.startswith(self.real_root + os.sep)

    def _name(self, real: str) -> str:
        return os.path.relpath(real, self.real_root).replace(os.sep, "/") if real != self.real_root else ""

    # -- actions -------------------------------------------------------------------------------------------

    def _info(self, rel: str, real: str) -> dict:
        st = os.stat(real)
        name = "/".join(p for p in rel.split("/") if p not in ("", "."))
        kind = "directory" if stat.S_ISDIR(st.st_mode) else "file" if stat.S_ISREG(st.st_mode) else "other"
        return {"name": name, "size": st.st_size if kind == "file" else 0, "type": kind, "mtime": st.st_mtime}

    def info(self, request: dict) -> dict:
        return self._info(request["path"], self._resolve(request["path"]))

    def ls(self, request: dict) -> list[dict]:
        rel = request["path"]
        real = self._resolve(rel)
        entry = self._info(rel, real)
        if entry["type"] != "directory":
            return [entry]
        out = []
        prefix = entry["name"] + "/" if entry["name"] else ""
        with os.scandir(real) as it:
            for e in it:
                child = os.path.join(real, e.name)
                # a symlink whose target leaves the root is not part of the grid filesystem: not listed
                if e.is_symlink() and not self._inside(os.path.realpath(child)):
                    continue
                try:
                    out.append(self._info(prefix + e.name, child))
                except FileNotFoundError:
                    continue  # removed while listing, or a dangling link
        return sorted(out, key=lambda x: x["name"])

    def rm(self, request: dict) -> dict:
        real = self._resolve(request["path"], follow_last=False)
        if real == self.real_root:
            raise PermissionError(errno.EACCES, "refused: the grid filesystem's root cannot be removed")
        st = os.lstat(real)
        if stat.S_ISDIR(st.st_mode):
            if request.get("recursive"):
                shutil.rmtree(real)  # does not follow symlinks: a link inside is removed, not its target
            else:
                os.rmdir(real)
        else:
            os.unlink(real)
        _fsync_dir(os.path.dirname(real))
        return {}

    def mv(self, request: dict) -> dict:
        src = self._resolve(request["src"], follow_last=False)
        dst = self._resolve(request.get("dst"), follow_last=False)
        if self.real_root in (src, dst):
            raise PermissionError(errno.EACCES, "refused: the grid filesystem's root cannot be moved")
        if dst.startswith(src + os.sep):
            raise _Invalid("cannot move a directory into itself")
        st = os.lstat(src)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if stat.S_ISDIR(st.st_mode):
            os.rename(src, dst)  # an existing non-empty destination directory is refused by the OS
        elif os.path.isdir(dst) and not os.path.islink(dst):
            raise IsADirectoryError(errno.EISDIR, "the destination is a directory")
        else:
            os.replace(src, dst)  # atomic: readers of dst see the old file or the new one
        _fsync_dir(os.path.dirname(dst))
        _fsync_dir(os.path.dirname(src))
        return {}

    def mkdir(self, request: dict) -> dict:
        real = self._resolve(request["path"], follow_last=False)
        if request.get("parents", True):
            os.makedirs(real, exist_ok=bool(request.get("exist_ok", True)))
        else:
            os.mkdir(real)
        return {}

    # -- uploads -------------------------------------------------------------------------------------------

    def _upload(self, context, rel: str, target: str, mode: str, reader) -> int:
        """Stream the upload into a temporary file; commit it only on the client's end marker."""
        self.sweep()
        tmp = os.path.join(self.tmp, f"{uuid.uuid4().hex}.part")
        with self._lock:
            self._active.add(tmp)
        fd = -1
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            if mode == "x" and os.path.lexists(target):
                raise FileExistsError(errno.EEXIST, "exists already")
            size = _copy_existing(self._resolve(rel), fd) if mode == "a" else 0
            received, end = _receive(reader, fd)
            if end is None or context.is_cancelled():
                raise _Aborted("the upload ended without its commit (client gone?): nothing was written")
            if end.get("size") != received:
                raise _Aborted(f"the upload announced {end.get('size')} bytes but sent {received}: nothing was written")
            os.fsync(fd)
            parent = os.path.dirname(target)
            os.makedirs(parent, exist_ok=True)
            if os.path.isdir(target) and not os.path.islink(target):
                raise IsADirectoryError(errno.EISDIR, "is a directory")
            if mode == "x":
                os.link(tmp, target)  # fails if the target appeared meanwhile: exclusive, race-free
            else:
                os.replace(tmp, target)
            _fsync_dir(parent)
            return size + received
        finally:
            if fd >= 0:
                os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            with self._lock:
                self._active.discard(tmp)

    def sweep(self, stale_after: float = STALE_AFTER) -> int:
        """Remove temporaries of uploads that died with an earlier server process; returns how many."""
        now, removed = time.time(), 0
        with self._lock:
            active = set(self._active)
        try:
            entries = list(os.scandir(self.tmp))
        except FileNotFoundError:
            return 0
        for e in entries:
            path = os.path.join(self.tmp, e.name)
            try:
                if path not in active and now - e.stat(follow_symlinks=False).st_mtime > stale_after:
                    os.unlink(path)
                    removed += 1
            except FileNotFoundError:
                pass
        return removed

    def close(self) -> None:
        pass


_ACTIONS = {"ls": FilesService.ls, "info": FilesService.info, "rm": FilesService.rm, "mv": FilesService.mv,
            "mkdir": FilesService.mkdir}


class _Invalid(ValueError):
    """A malformed request (not a filesystem error)."""


class _Aborted(Exception):
    """An upload that did not finish: nothing is committed."""


def _request(body: bytes) -> dict:
    if len(body) > _MAX_REQUEST:
        raise flight.FlightServerError(f"invalid request: over {_MAX_REQUEST} bytes")
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise flight.FlightServerError("invalid request: the body must be a JSON object") from None
    if not isinstance(request, dict):
        raise flight.FlightServerError("invalid request: the body must be a JSON object")
    return request


@contextlib.contextmanager
def _errors(rel):
    """OS errors as Flight errors: a one-line message naming the client's path (never the server's) and the
    errno name in the extra info (the client raises the matching OSError subclass)."""
    try:
        yield
    except flight.FlightError:
        raise
    except _Invalid as exc:
        raise flight.FlightServerError(f"invalid request: {exc}") from None
    except _Aborted as exc:
        raise flight.FlightServerError(f"{rel!r}: {exc}", extra_info=b'{"errno": "EIO"}') from None
    except KeyError as exc:
        raise flight.FlightServerError(f"invalid request: missing {exc}") from None
    except OSError as exc:
        code = errno.errorcode.get(exc.errno or 0, "EIO")
        what = exc.strerror or str(exc)
        raise flight.FlightServerError(f"{what}: {rel!r}", extra_info=json.dumps({"errno": code}).encode()) from None


def _open_file(real: str) -> int:
    fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    if stat.S_ISDIR(os.fstat(fd).st_mode):
        os.close(fd)
        raise IsADirectoryError(errno.EISDIR, "is a directory")
    return fd


def _batch(chunk: bytes) -> pa.RecordBatch:
    """One record batch of one binary value, built on ``chunk`` without copying it."""
    offsets = pa.array([0, len(chunk)], pa.int32()).buffers()[1]
    values = pa.Array.from_buffers(pa.binary(), 1, [None, offsets, pa.py_buffer(chunk)])
    return pa.RecordBatch.from_arrays([values], schema=SCHEMA)


def _chunks(fd: int, offset: int, length: int | None):
    """The bytes [offset, offset + length) of an open file, a chunk per batch; closes the file."""
    try:
        end = os.fstat(fd).st_size if length is None else offset + length
        pos = offset
        while pos < end:
            chunk = os.pread(fd, min(CHUNK, end - pos), pos)
            if not chunk:
                break  # end of file: a range past the end reads what there is
            yield _batch(chunk)
            pos += len(chunk)
    finally:
        os.close(fd)


def _receive(reader, fd: int) -> tuple[int, dict | None]:
    """Write the uploaded chunks to ``fd`` until the end marker (app metadata); (bytes, marker or None)."""
    received = 0
    while True:
        try:
            chunk = reader.read_chunk()
        except StopIteration:
            return received, None
        if chunk.data is not None:
            for value in chunk.data.column(0):
                if value.is_valid:
                    received += _write_all(fd, value.as_buffer())
        if chunk.app_metadata is not None:
            try:
                end = json.loads(chunk.app_metadata.to_pybytes())
            except ValueError:
                end = None
            return received, end if isinstance(end, dict) else None


def _write_all(fd: int, buf) -> int:
    view = memoryview(buf)
    while view:
        view = view[os.write(fd, view):]
    return len(buf)


def _copy_existing(real: str, fd: int) -> int:
    """Append mode: the temporary starts as a copy of the existing file (none: empty)."""
    try:
        src = _open_file(real)
    except FileNotFoundError:
        return 0
    try:
        size = os.fstat(src).st_size
        copied = 0
        while copied < size:
            n = os.sendfile(fd, src, copied, size - copied)
            if n == 0:
                break  # it shrank meanwhile
            copied += n
        return copied
    finally:
        os.close(src)


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
