"""``tensorgrid serve``: a grid server with users, TLS and limits, served until SIGINT/SIGTERM.

``start(...)`` builds the ``GridServer`` (authentication middleware from ``auth``, TLS options, the ``--allow``
list as ``server.allow``, the time limit of a call); ``serve_until_signal(server)`` blocks until a signal and
closes it.
A server bound to an address other than loopback needs users (``--users``): without them anyone who can reach
the port could read, change and delete every table, so it is refused unless ``insecure_no_auth`` says so.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import socket
import sys
import threading

import duckdb
import pyarrow as pa

from ..errors import TensorGridError
from . import auth
from .grid import GridServer

log = logging.getLogger(__name__)

DEFAULT_PORT = 8815
DEFAULT_MAX_CALLS = 64
DEFAULT_QUERY_TIMEOUT = 600.0


class ServeError(TensorGridError):
    """A server that cannot start as asked: unreadable certificates, a port in use, an unsafe binding."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def tls_options(cert: str | None, key: str | None, client_ca: str | None = None) -> dict:
    """``GridServer`` keywords for TLS (server certificate and key, PEM files) and, with ``client_ca``, mutual
    TLS: clients must present a certificate signed by that CA."""
    if (cert is None) != (key is None):
        raise ServeError("TLS needs both --tls-cert and --tls-key")
    if cert is None:
        if client_ca is not None:
            raise ServeError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        return {}
    options = {"tls_certificates": [(_pem(cert, "--tls-cert", "CERTIFICATE"), _pem(key, "--tls-key", "PRIVATE KEY"))]}
    if client_ca is not None:
        options.update(verify_client=True, root_certificates=_pem(client_ca, "--tls-client-ca", "CERTIFICATE"))
    return options


def _pem(path: str, flag: str, kind: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ServeError(f"{flag} {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data or kind.encode() not in data:
        raise ServeError(f"{flag} {path} is not a PEM file holding a {kind.lower()}")
    return data


def normalize_allow(allow: list[str] | None, root: str) -> list[str]:
    """``--allow`` entries as prefixes: URLs as given, local folders absolute; default: the root only."""
    out = []
    for entry in allow or [root]:
        entry = str(entry)
        if not entry:
            raise ServeError("--allow takes a URL or folder, got an empty string")
        out.append(entry if "://" in entry else os.path.abspath(os.path.expanduser(entry)))
    return out


def start(root: str, host: str = "127.0.0.1", port: int = DEFAULT_PORT, *, tls_cert: str | None = None,
          tls_key: str | None = None, tls_client_ca: str | None = None, users: str | None = None,
          allow: list[str] | None = None, memory_limit: str = "4GB", threads: int | None = None,
          max_calls: int | None = DEFAULT_MAX_CALLS, query_timeout: float | None = DEFAULT_QUERY_TIMEOUT,
          token_ttl: float = 3600.0, insecure_no_auth: bool = False, grid: str | list[str] | None = None,
          replicas: int = 1, store: str | None = None) -> GridServer:
    """A running GridServer as ``tensorgrid serve`` makes it (see the module docstring); its ``url`` is where
    clients connect. Close it with ``server.close()`` (``serve_until_signal`` does). ``query_timeout``: seconds
    one call may keep DuckDB at work before it is interrupted (a query, and separately the streaming of its
    rows; a statement in a transaction from its own start); None or 0: no limit. ``grid``: the servers
    (``host:port``, this one among them) of a grid of several, each partition held by ``replicas`` of them.
    ``store``: a shared store URL where the SQL tables are mirrored (server/mirror.py)."""
    user_table = auth.load_users(users) if users is not None else None
    if user_table is None and not is_loopback(host) and not insecure_no_auth:
        raise ServeError(f"--host {host} is reachable from other machines, and without --users anyone there could "
                         "read, change and delete every table: give --users users.toml (or --insecure-no-auth "
                         "on a network you trust)")
    options = tls_options(tls_cert, tls_key, tls_client_ca)
    if user_table is not None and not options and not is_loopback(host):
        log.warning("--users without TLS on %s: passwords and tokens cross the network in clear text; give "
                    "--tls-cert and --tls-key", host)
    options.update(auth.server_options(user_table, token_ttl=token_ttl, max_calls=max_calls))
    scheme = "grpc+tls" if "tls_certificates" in options else "grpc"
    bracketed = f"[{host.strip('[]')}]" if ":" in host else host
    try:
        server = GridServer(root, f"{scheme}://{bracketed}:{port}", memory_limit=memory_limit, threads=threads,
                            query_timeout=query_timeout or None, grid=grid, replicas=replicas, store=store,
                            **options)
    except duckdb.Error as exc:
        raise ServeError(f"cannot open the grid database under {root}: {str(exc).splitlines()[0]}") from None
    except (pa.ArrowException, OSError) as exc:
        if isinstance(exc, OSError) and exc.filename is not None:
            raise
        raise ServeError(f"cannot serve on {host}:{port}: {_bind_problem(host, port) or _one_line(exc)}") from None
    server.allow = normalize_allow(allow, server.root)
    server.users_file = users
    server.tls = "off" if scheme == "grpc" else "mutual" if tls_client_ca else "on"
    return server


def _bind_problem(host: str, port: int) -> str | None:
    """Why gRPC could not listen (it says only "Server did not start properly"): the OS's reason, if a plain
    socket cannot bind there either."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except OSError as exc:
        return f"cannot resolve {host}: {exc.strerror or exc}"
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as sock:
            try:
                sock.bind(address)
            except OSError as exc:
                return exc.strerror or str(exc)
    return None


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def describe(server: GridServer) -> str:
    """The line ``tensorgrid serve`` prints: where it serves and how it is protected."""
    users = getattr(server, "users_file", None)
    tls = getattr(server, "tls", "on" if server.url.startswith("grpc+tls") else "off")
    return f"serving {server.url} (root {server.root}, users: {users or 'none'}, TLS: {tls})"


def serve_until_signal(server: GridServer, signals=(signal.SIGINT, signal.SIGTERM), out=None) -> None:
    """Print where ``server`` serves, block until one of ``signals``, then close it. A second signal while
    closing (calls that do not finish) exits at once."""
    stop = threading.Event()

    def on_signal(signum, frame):
        if stop.is_set():
            sys.stderr.write("second signal: exiting without waiting for calls in progress\n")
            sys.stderr.flush()
            os._exit(1)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in signals}
    try:
        out = out or sys.stdout
        out.write(describe(server) + "\n")
        out.flush()
        while not stop.wait(0.5):
            pass
    finally:
        try:
            server.close()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
