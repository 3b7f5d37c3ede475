"""URL -> filesystem. Everything goes through fsspec, so any URL it knows (local, memory://, s3://, gs://,
hdfs://, ...) works; local paths take faster native paths (memory maps, hard links)."""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from .errors import ArgumentError, UnsafeStoreError, UnsupportedURLError

_memory_lock = threading.Lock()

# Storage options (credentials, endpoints, ...) given to an entry point, remembered for their location
# (``s3://bucket``) in this process only: every later URL there resolves with them (a vacuum, a checkpoint
# beside the data, the loader's workers re-opening it). Never written anywhere. ``_DEFAULT`` (the CLI's
# ``--storage-option``, a Ray grid's ``storage_options``) is merged under every location's own, except
# ``_NO_DEFAULTS`` (see ``_options_for``).
_options: dict[str, dict] = {}
_DEFAULT = "*"
_NO_DEFAULTS = ("memory", "grid")
_options_lock = threading.Lock()


def location(url: str) -> str | None:
    """The part of a remote URL its storage options belong to: scheme and bucket (``s3://bucket``); None
    for local paths."""
    protocol, rest = fsspec.core.split_protocol(url)
    if protocol in (None, "file", "local"):
        return None
    return f"{protocol}://{rest.lstrip('/').split('/', 1)[0]}"


def check_storage_options(options) -> dict:
    """``storage_options=`` as a dict of option name -> value (None: none)."""
    if options is None:
        return {}
    if not isinstance(options, dict) or not all(isinstance(k, str) and k for k in options):
        raise ArgumentError(f"storage_options must be a dict of option name -> value (as fsspec takes them, e.g. "
                            f"{{'endpoint_url': ..., 'key': ...}}), got {type(options).__name__}")
    return dict(options)


def remember(url: str, storage_options) -> None:
    """Use ``storage_options`` for every URL at ``url``'s location in this process (merged over what was
    given before)."""
    options = check_storage_options(storage_options)
    if not options or not isinstance(url, (str, os.PathLike)):
        return  # nothing to keep (a URL of the wrong type is refused by ``resolve``, by name)
    key = location(os.fspath(url))
    if key is None:
        return  # local paths take no options (the same call works on a laptop's path and on s3://)
    with _options_lock:
        _options[key] = {**_options.get(key, {}), **options}


@contextlib.contextmanager
def default_options(options: dict):
    """While open, ``options`` apply to every remote location without its own (the CLI's
    ``--storage-option``); what applied before comes back on exit."""
    with _options_lock:
        before = _options.get(_DEFAULT)
        if options:
            _options[_DEFAULT] = {**(before or {}), **options}
    try:
        yield
    finally:
        with _options_lock:
            if before is None:
                _options.pop(_DEFAULT, None)
            else:
                _options[_DEFAULT] = before


def remembered(*urls) -> dict[str, dict]:
    """The options remembered for these URLs' locations (to hand to another process: trainer ranks), as
    location -> options; give it to ``adopt`` there."""
    with _options_lock:
        out = {loc: dict(_options[loc]) for loc in {location(os.fspath(u)) for u in urls if u} if loc in _options}
        if _DEFAULT in _options:
            out[_DEFAULT] = dict(_options[_DEFAULT])
    return out


def adopt(options: dict[str, dict] | None) -> None:
    """Remember what ``remembered`` gave in another process."""
    for loc, opts in (options or {}).items():
        with _options_lock:
            _options[loc] = {**_options.get(loc, {}), **opts}


def _options_for(url: str) -> dict:
    key = location(url)
    protocol = key.split("://", 1)[0] if key else None
    with _options_lock:
        # the CLI's defaults reach object stores, never memory:// or grid:// (whose own arguments are a grid
        # server's user and token: a store's secret must never become them); a bucket's own options win
        default = {} if protocol in _NO_DEFAULTS else _options.get(_DEFAULT, {})
        return {**default, **_options.get(key, {})}


def resolve(url: str | os.PathLike, storage_options: dict | None = None,
            keep: bool = True) -> tuple[fsspec.AbstractFileSystem, str]:
    """Split a URL or path into (filesystem, path inside it). Unknown schemes raise UnsupportedURLError.

    ``storage_options``: fsspec's options for the URL's filesystem (``key``/``secret``/``endpoint_url`` for
    s3://, ``token`` for gs://, ...), remembered for its location in this process (see ``remember``);
    without them, those remembered, then fsspec's own sources (environment, config files: AWS_* variables,
    ~/.aws, fsspec's config). Ignored for local paths. ``keep=False``: for this call only, not remembered
    (a grid server opening a dataset with one client's options)."""
    if not isinstance(url, (str, os.PathLike)):
        raise UnsupportedURLError(f"expected a URL or path, got {type(url).__name__} {url!r}")
    url = os.fspath(url)
    if not isinstance(url, str) or not url:
        raise UnsupportedURLError(f"expected a URL or path, got {url!r}")
    check_storage_options(storage_options)
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
    if storage_options and keep:
        remember(url, storage_options)
    options = {**_options_for(url), **(storage_options or {})}
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
    except TypeError as e:  # an option the filesystem does not take: named, never echoing values (secrets)
        raise ArgumentError(f"storage_options {sorted(options)} do not fit {protocol}:// ({e})") from None
    # fsspec keeps one instance per options, with a listing cache that never expires: a long-lived process
    # (a notebook, a grid server) would miss what others wrote since. Each call starts from fresh listings.
    fs.invalidate_cache()
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


# fsspec drivers whose "xb" open is an atomic create-if-absent on the server: s3fs sends S3's conditional
# write (PUT with If-None-Match: *; AWS S3 since 2024, MinIO, moto), the grid's files link on the server.
# Other drivers may accept "xb" yet write unconditionally: refused (UnsafeStoreError).
EXCLUSIVE_DRIVERS = {("s3fs.core", "S3FileSystem"), ("tensorgrid.server.gridfs", "GridFileSystem")}
SINGLE_WRITER_ENV = "TENSORGRID_SINGLE_WRITER"  # "1": the user vouches for one writer at a time
_probed: set = set()  # (driver, location) whose conditional writes were seen refusing a second create


def _exclusive_driver(fs: fsspec.AbstractFileSystem) -> bool:
    return any((c.__module__, c.__name__) in EXCLUSIVE_DRIVERS for c in type(fs).__mro__)


def _check_exclusive(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Refuse a store whose exclusive create may not be: a driver not known to make it atomic, or a server
    that ignores the condition (an S3-compatible store without conditional writes would let a second
    create overwrite the first: probed once per location and process, beside ``path``)."""
    if os.environ.get(SINGLE_WRITER_ENV) == "1":
        return
    where = to_url(fs, path)
    if not _exclusive_driver(fs):
        raise UnsafeStoreError(
            f"cannot commit to {where}: {type(fs).__name__} offers no atomic create-if-absent, so two writers "
            f"could both believe they committed the same version; use a store that does (local disks, s3:// with "
            f"conditional writes), or set {SINGLE_WRITER_ENV}=1 if only one process ever writes there")
    key = (type(fs).__name__, location(where) or "")
    if key in _probed:
        return
    probe = path.rsplit("/", 1)[0] + f"/.tmp-probe-{uuid.uuid4().hex}"  # a temporary: vacuum takes a lost one
    try:
        with fs.open(probe, "xb") as f:
            f.write(b"1")
        try:
            with fs.open(probe, "xb") as f:
                f.write(b"2")
        except FileExistsError:
            _probed.add(key)
            return
        raise UnsafeStoreError(
            f"cannot commit to {where}: the store ignores conditional writes (a second exclusive create of one "
            f"object succeeded), so two writers could both commit the same version; use a store with "
            f"If-None-Match support (AWS S3, recent MinIO), or set {SINGLE_WRITER_ENV}=1 if only one process "
            "ever writes there")
    finally:
        try:
            fs.rm_file(probe)
        except OSError:
            pass


def create_exclusive(fs: fsspec.AbstractFileSystem, path: str, data: bytes, durable: bool = True) -> bool:
    """Create ``path`` holding ``data`` only if it does not exist; True if this call created it.

    The file appears whole or not at all. Race-free on local disks (hard link of a complete temporary
    file), on memory:// (one lock per process, which is all that can share it) and on object stores whose
    fsspec driver sends a conditional write (``EXCLUSIVE_DRIVERS``; a server that ignores the condition is
    detected by a probe). Any other store is refused with UnsafeStoreError, unless the user vouches for a
    single writer (``TENSORGRID_SINGLE_WRITER=1``: check, then write). ``durable``: on local disks the file
    and its directory entry are fsynced, so a created file survives a power loss.
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
    _check_exclusive(fs, path)
    if not _exclusive_driver(fs):  # the user vouched for a single writer
        if fs.exists(path):
            return False
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)  # stores with real folders need its folder
        fs.pipe_file(path, data)
        return True
    for attempt in range(8):
        try:
            with fs.open(path, "xb") as f:
                f.write(data)
            return True
        except FileExistsError:
            return _ours(fs, path, data)
        except OSError as e:  # S3's 409 ConditionalRequestConflict: a racing create of the same key is under
            if "ConditionalRequestConflict" not in str(e) or attempt == 7:  # way; retry, one of the two wins
                raise
            time.sleep(0.05 * (attempt + 1))
    return False


def _ours(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
    """After a refused create: whether the object there is this very create's. A PUT can land while its
    response is lost; the client's retry is then refused by the object it made itself. Manifests carry a
    timestamp and claims a random token, so equal bytes mean this call created it."""
    try:
        return fs.cat_file(path) == data
    except OSError:
        return False


def mtime(info: dict, default: float) -> float:
    """A listing entry's modification time in seconds (each driver names it its own way); ``default`` when
    it gives none."""
    for key in ("mtime", "created", "LastModified", "last_modified", "updated"):
        v = info.get(key)
        if v is None:
            continue
        if hasattr(v, "timestamp"):
            return v.timestamp()
        try:
            return float(v)
        except (TypeError, ValueError):
            continue
    return default


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
