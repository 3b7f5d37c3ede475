"""``grid://host:port/path``: the grid server's files (``<root>/files`` on the server) as an fsspec filesystem.

Registered for the ``grid`` protocol by an entry point, so ``fsspec.open("grid://host:8815/run1/x")``, the
trainer's ``checkpoint_dir``/``log_dir`` and TensorBoard's reader all take such URLs. Paths inside the
filesystem keep the server: ``host:port/run1/x`` (as fsspec's http filesystem keeps the host), so a path from
``ls`` or ``glob`` turns back into the full URL with ``unstrip_protocol`` and reaches the same server.

Writes stream to the server as they are made and become visible only when the file is closed (whole or not
at all); a ``with`` block left by an exception discards the upload. Reads fetch byte ranges. Credentials
come from storage options or the env vars TENSORGRID_USERNAME/TENSORGRID_PASSWORD/TENSORGRID_TOKEN. The
filesystem pickles as its options; each process opens its own connection on first use.
"""

from __future__ import annotations

import errno
import json
import os
import re
from datetime import datetime, timezone
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.flight as flight
from fsspec.spec import AbstractBufferedFile, AbstractFileSystem
from fsspec.utils import stringify_path

from .griddataset import Session

CHUNK = 1 << 20  # bytes per record batch of an upload
SCHEMA = pa.schema([("data", pa.binary())])
DEFAULT_PORT = 8815
_NETLOC = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):\d+$")


class GridFileSystem(AbstractFileSystem):
    """Files of a grid server. ``host``/``port`` come from the URL; ``username``/``password`` or ``token``
    authenticate; ``tls_root_certs`` (PEM bytes or a file path) or ``tls=True`` use ``grpc+tls``."""

    protocol = "grid"
    root_marker = ""

    def __init__(self, host: str = "127.0.0.1", port: int = DEFAULT_PORT, username: str | None = None,
                 password: str | None = None, token: str | None = None, tls_root_certs: bytes | str | None = None,
                 tls: bool | None = None, timeout: float | None = None, block_size: int = 8 << 20, **kwargs):
        super().__init__(**kwargs)
        self.host, self.port = str(host).strip("[]"), int(port)
        self.netloc = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        self.username = username if username is not None else os.environ.get("TENSORGRID_USERNAME")
        self.password = password if password is not None else os.environ.get("TENSORGRID_PASSWORD")
        self.token = token if token is not None else os.environ.get("TENSORGRID_TOKEN")
        if isinstance(tls_root_certs, str):
            with open(tls_root_certs, "rb") as f:
                tls_root_certs = f.read()
        self.tls_root_certs = tls_root_certs
        self.tls = bool(tls) or tls_root_certs is not None
        self.timeout, self.blocksize = timeout, block_size
        # the connection (opened on first use in each process) and its sign-in again, shared with tg.connect
        self._session = Session(f"{'grpc+tls' if self.tls else 'grpc'}://{self.netloc}", self.username,
                                self.password, self.token, self.tls_root_certs, timeout=self.timeout)

    # -- URLs and paths ------------------------------------------------------------------------------------

    @classmethod
    def _strip_protocol(cls, path):
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        path = stringify_path(path)
        for prefix in ("grid://", "grid::"):
            if path.startswith(prefix):
                path = path[len(prefix):]
        return path.rstrip("/")

    @staticmethod
    def _get_kwargs_from_urls(path):
        if not stringify_path(path).startswith("grid://"):
            return {}
        parts = urlsplit(stringify_path(path))
        out = {"host": parts.hostname} if parts.hostname else {}
        if parts.port:
            out["port"] = parts.port
        return out

    def unstrip_protocol(self, name: str) -> str:
        return "grid://" + self._full(self._rel(name))

    def _rel(self, path) -> str:
        """The path relative to the server's files root ('' is the root)."""
        p = self._strip_protocol(path)
        head, _, rest = p.partition("/")
        if head == self.netloc:
            return rest
        if _NETLOC.match(head):
            raise ValueError(f"{path!r} is on grid server {head}; this filesystem talks to {self.netloc}")
        return p

    def _full(self, rel: str) -> str:
        return f"{self.netloc}/{rel}" if rel else self.netloc

    # -- connection and calls ------------------------------------------------------------------------------

    def _flight(self):
        """(client, options), opened on first use in each process (a forked or unpickled copy opens its own)."""
        return self._session.connection(self._errors(self.netloc))

    def _call(self, fn, where: str):
        """``fn(client, options)``, its Flight errors raised as OSErrors about ``where``; a filesystem that
        signed in with a password signs in again once when its token expired (``Session.call``)."""
        return self._session.call(fn, error=self._errors(where))

    def _errors(self, where: str):
        """A failed call's Flight error as the OSError about ``where`` (other errors as they are)."""
        return lambda exc: _error(exc, where, self.netloc) if isinstance(exc, flight.FlightError) else exc

    def _action(self, verb: str, where: str, **body):
        action = flight.Action(f"files.{verb}", json.dumps(body).encode())
        results = self._call(lambda client, options: list(client.do_action(action, options)), where)
        return json.loads(results[0].body.to_pybytes()) if results else None

    def _entry(self, e: dict) -> dict:
        return {"name": self._full(e["name"]), "size": e["size"], "type": e["type"], "mtime": e["mtime"]}

    def _read(self, path: str, offset: int, length: int | None) -> bytes:
        """Bytes [offset, offset + length) of a file (to its end when length is None), streamed in chunks."""
        ticket = flight.Ticket(b"files/" + json.dumps({"path": self._rel(path), "offset": offset,
                                                         "length": length}).encode())

        def read(client, options):
            parts = []
            for batch in client.do_get(ticket, options).to_reader():
                parts.extend(v.as_buffer() for v in batch.column(0) if v.is_valid)
            return parts

        parts = self._call(read, path)
        return parts[0].to_pybytes() if len(parts) == 1 else b"".join(parts)

    # -- fsspec --------------------------------------------------------------------------------------------

    def ls(self, path, detail=True, **kwargs):
        out = [self._entry(e) for e in self._action("ls", path, path=self._rel(path))]
        return out if detail else [e["name"] for e in out]

    def info(self, path, **kwargs):
        return self._entry(self._action("info", path, path=self._rel(path)))

    def modified(self, path):
        return datetime.fromtimestamp(self.info(path)["mtime"], tz=timezone.utc)

    def rm(self, path, recursive=False, maxdepth=None):
        for p in path if isinstance(path, list) else [path]:
            self._action("rm", p, path=self._rel(p), recursive=bool(recursive))

    def rm_file(self, path):
        self._action("rm", path, path=self._rel(path), recursive=False)

    _rm = rm_file

    def rmdir(self, path):
        if self.info(path)["type"] != "directory":
            raise NotADirectoryError(errno.ENOTDIR, f"not a directory: {path!r}")
        self._action("rm", path, path=self._rel(path), recursive=False)

    def mv(self, path1, path2, recursive=False, maxdepth=None, **kwargs):
        """Rename on the server: atomic for a file (readers of ``path2`` see the old file or the new one)."""
        self._action("mv", path1, src=self._rel(path1), dst=self._rel(path2))

    def mkdir(self, path, create_parents=True, **kwargs):
        self._action("mkdir", path, path=self._rel(path), parents=bool(create_parents), exist_ok=False)

    def makedirs(self, path, exist_ok=False):
        self._action("mkdir", path, path=self._rel(path), parents=True, exist_ok=bool(exist_ok))

    def cat_file(self, path, start=None, end=None, **kwargs):
        if (start is not None and start < 0) or (end is not None and end < 0):
            size = self.size(path)
            start = max(0, size + start) if start is not None and start < 0 else start
            end = max(0, size + end) if end is not None and end < 0 else end
        start = start or 0
        return self._read(path, start, None if end is None else max(0, end - start))

    def pipe_file(self, path, value, mode="overwrite", **kwargs):
        with self.open(path, "xb" if mode == "create" else "wb", **kwargs) as f:
            f.write(value)

    def cp_file(self, path1, path2, **kwargs):
        with self.open(path1, "rb") as src, self.open(path2, "wb") as dst:
            while chunk := src.read(self.blocksize):
                dst.write(chunk)

    def _open(self, path, mode="rb", block_size=None, autocommit=True, cache_options=None, **kwargs):
        return GridFile(self, path, mode, block_size or self.blocksize, autocommit,
                        cache_options=cache_options, **kwargs)


class GridFile(AbstractBufferedFile):
    """A file on the grid: reads fetch ranges; writes stream to a temporary on the server, committed (renamed
    into place) when the file closes, discarded when a ``with`` block ends by an exception."""

    def __init__(self, fs, path, mode="rb", block_size=None, autocommit=True, cache_options=None, **kwargs):
        super().__init__(fs, path, mode, block_size, autocommit, cache_options=cache_options, **kwargs)
        if mode == "rb" and self.details["type"] != "file":
            raise IsADirectoryError(errno.EISDIR, f"not a file: {path!r}")
        self._writer = self._acks = None

    def _fetch_range(self, start, end):
        return self.fs._read(self.path, start, max(0, end - start))

    def _initiate_upload(self):
        client, options = self.fs._flight()
        schema = SCHEMA.with_metadata({"mode": self.mode[0]})
        descriptor = flight.FlightDescriptor.for_path("files", *self.fs._rel(self.path).split("/"))
        try:
            self._writer, self._acks = client.do_put(descriptor, schema, options)
        except flight.FlightError as exc:
            raise _error(exc, self.path, self.fs.netloc) from None
        self._sent = 0

    def _upload_chunk(self, final=False):
        with self.buffer.getbuffer() as view:
            try:
                for i in range(0, len(view), CHUNK):
                    piece = pa.py_buffer(view[i:i + CHUNK])
                    values = pa.Array.from_buffers(pa.binary(), 1, [None, _offsets(len(piece)), piece])
                    self._writer.write_batch(pa.RecordBatch.from_arrays([values], schema=SCHEMA))
                    self._sent += len(piece)
            except flight.FlightError as exc:
                self._fail(exc)
        if final and self.autocommit:
            self.commit()
        return True

    def commit(self):
        """Send the end marker: the server renames the upload into place; its error (FileExistsError for an
        exclusive create that lost) is raised here."""
        if self._writer is None:
            return
        try:
            self._writer.write_metadata(pa.py_buffer(json.dumps({"size": self._sent}).encode()))
            self._writer.done_writing()
            self._acks.read()
            self._writer.close()
        except flight.FlightError as exc:
            self._fail(exc)
        self._writer = None

    def discard(self):
        """End the upload without its end marker: the server removes the temporary, nothing is visible."""
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.close()
            except flight.FlightError:
                pass  # the server's refusal of the unfinished upload is the point

    def _fail(self, exc):
        """A failed write: the server's own error (it surfaces when the stream closes) in place of the stream's."""
        writer, self._writer = self._writer, None
        try:
            writer.close()
        except flight.FlightError as closing:
            exc = closing
        except Exception:  # noqa: BLE001 - the first error is the one to report
            pass
        raise _error(exc, self.path, self.fs.netloc) from None

    def __exit__(self, exc_type, *args):
        if exc_type is not None and self.writable():
            self.discard()
            self.closed = True
            return
        self.close()


def _offsets(n: int):
    return pa.array([0, n], pa.int32()).buffers()[1]


def _error(exc: flight.FlightError, path, netloc: str) -> OSError:
    """The OSError a filesystem raises for a failed grid call: FileNotFoundError, PermissionError, ..."""
    message = str(exc).split(". Detail:", 1)[0]
    if isinstance(exc, (flight.FlightUnauthorizedError, flight.FlightUnauthenticatedError)):
        return PermissionError(errno.EACCES, f"grid server {netloc}: {message}")
    if isinstance(exc, flight.FlightUnavailableError):
        return ConnectionError(errno.ECONNREFUSED, f"grid server {netloc} unreachable: {message}")
    try:
        code = json.loads(exc.extra_info or b"{}").get("errno")
    except (ValueError, AttributeError):
        code = None
    number = getattr(errno, code, errno.EIO) if isinstance(code, str) else errno.EIO
    return OSError(number, f"{message} (grid://{netloc})" if code else f"grid://{netloc}/{path}: {message}")
