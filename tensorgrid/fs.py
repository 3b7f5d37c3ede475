"""URL -> filesystem. Everything goes through fsspec, so any URL it knows (local, memory://, s3://, gs://,
hdfs://, ...) works; local paths take faster native paths (memory maps, hard links)."""

from __future__ import annotations

import os
import threading
import uuid
import warnings

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from .errors import UnsupportedURLError

_memory_lock = threading.Lock()


def resolve(url: str | os.PathLike) -> tuple[fsspec.AbstractFileSystem, str]:
    """Split a URL or path into (filesystem, path inside it). Unknown schemes raise UnsupportedURLError."""
    if not isinstance(url, (str, os.PathLike)):
        raise UnsupportedURLError(f"expected a URL or path, got {type(url).__name__} {url!r}")
    url = os.fspath(url)
    if not isinstance(url, str) or not url:
        raise UnsupportedURLError(f"expected a URL or path, got {url!r}")
    protocol, _ = fsspec.core.split_protocol(url)
    if protocol in (None, "file", "local"):
        path = url.split("://", 1)[1] if protocol else url
        return LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
    try:
        fsspec.get_filesystem_class(protocol)
    except ValueError:
        raise UnsupportedURLError(f"unknown URL scheme '{protocol}://' in {url!r}") from None
    except ImportError as e:
        raise UnsupportedURLError(f"'{protocol}://' needs a package that is not installed: {e}") from None
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path.rstrip("/") or path


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def join(*parts: str) -> str:
    return "/".join(p.rstrip("/") if i == 0 else p.strip("/") for i, p in enumerate(parts) if p)


def name(path: str) -> str:
    """The last part of a path as listings return it (directories may end in "/")."""
    return path.rstrip("/").rsplit("/", 1)[-1]


def to_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The full URL of a path (plain path for local files, so other tools can use it as is)."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def fsync_dir(path: str) -> None:
    """Make a local directory's entries (files created, linked or renamed in it) durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; their entries are durable by other means
    finally:
        os.close(fd)


def _write_local(tmp: str, data: bytes, durable: bool) -> None:
    with open(tmp, "wb") as f:
        f.write(data)
        if durable:
            f.flush()
            os.fsync(f.fileno())


def create_exclusive(fs: fsspec.AbstractFileSystem, path: str, data: bytes, durable: bool = True) -> bool:
    """Create ``path`` holding ``data`` only if it does not exist; True if this call created it.

    The file appears whole or not at all. Race-free on local disks (hard link of a complete temporary
    file), on memory:// (one lock per process, which is all that can share it) and on filesystems whose
    fsspec driver implements exclusive "xb" opens (object stores with conditional writes). Elsewhere it
    falls back to check-then-write, which two simultaneous writers can race. ``durable``: on local disks
    the file and its directory entry are fsynced, so a created file survives a power loss.
    """
    if is_local(fs):
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        for _ in range(3):  # a vacuum may remove a temporary it takes for a dead writer's: write it again
            tmp = os.path.join(directory, f".tmp-{uuid.uuid4().hex}")
            try:
                _write_local(tmp, data, durable)
                os.link(tmp, path)
            except FileExistsError:
                return False
            except FileNotFoundError:
                continue  # the temporary is gone: nothing was created
            finally:
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass
            if durable:
                fsync_dir(directory)
            return True
        raise FileNotFoundError(f"{path}: its temporary file kept vanishing before it could be linked")
    if isinstance(fs, MemoryFileSystem):
        with _memory_lock:
            if fs.exists(path):
                return False
            fs.pipe_file(path, data)
            return True
    try:
        with fs.open(path, "xb") as f:
            f.write(data)
        return True
    except FileExistsError:
        return False
    except (ValueError, NotImplementedError, TypeError):
        warnings.warn(
            f"{type(fs).__name__} has no exclusive create: concurrent commits are not race-free here",
            stacklevel=3,
        )
        if fs.exists(path):
            return False
        fs.pipe_file(path, data)
        return True


def remove_tree(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Delete a folder and everything under it; nothing if it is already gone."""
    try:
        fs.rm(path, recursive=True)
    except (FileNotFoundError, OSError):
        pass


def put_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes, sync_dir: bool = True) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the new one, never a partial one. On local
    disks the file's bytes are durable before its name appears; ``sync_dir`` also makes the name durable now
    (else a power loss may lose the name, never expose a partial file: for callers that sync the folder
    once for many files, or that recompute a file whose name is lost)."""
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    if is_local(fs):
        tmp = os.path.join(parent, f".tmp-{uuid.uuid4().hex}")
        try:
            _write_local(tmp, data, durable=True)
            os.replace(tmp, path)
        finally:
            if os.path.lexists(tmp):  # a failed write (disk full) leaves nothing behind
                os.unlink(tmp)
        if sync_dir:
            fsync_dir(parent)
        return
    if isinstance(fs, MemoryFileSystem):
        fs.pipe_file(path, data)  # a single dict assignment: atomic
        return
    # Object stores publish a PUT atomically on completion.
    fs.pipe_file(path, data)
