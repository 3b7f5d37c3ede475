"""Who may do what on the grid server.

Users live in a TOML file, each with a salted scrypt hash of its password and a role::

    [users.ignite]
    password_hash = "scrypt$16384$8$1$..."   # tensorgrid serve --hash-password  (or hash_password())
    role = "admin"                          # admin: read and write; reader: read only

A client proves who it is with ``authorization: Basic base64(user:password)`` (on a Handshake, as
``FlightClient.authenticate_basic_token`` and the ADBC driver do, or on any call); the answer carries
``authorization: Bearer <token>``, a random token that expires after ``token_ttl`` seconds without use, which the
client sends on later calls. All of it happens in one server middleware (``AuthMiddlewareFactory``, registered
under ``MIDDLEWARE``); ``HandshakeAccepted`` only lets pyarrow answer Handshakes at all. Unauthenticated or wrongly
authenticated calls are refused with UNAUTHENTICATED, calls beyond the caller's role (``require``) with
PERMISSION_DENIED. Without users configured every caller may read and write (a server on loopback for one user).

Secrets are compared in constant time (``hmac.compare_digest``; tokens are looked up by their SHA-256, never by
their text) and never logged.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import pyarrow.flight as flight
import tomllib

from ..errors import TensorGridError

READ, WRITE = "read", "write"
MIDDLEWARE = "auth"  # the key of the authentication middleware on a call's context
ROLES = {"admin": frozenset({READ, WRITE}), "reader": frozenset({READ})}

log = logging.getLogger(__name__)

# scrypt's cost: 2**14 x 8 x 128 bytes = 16 MiB and ~50 ms per check (OWASP's minimum for scrypt is 2**17 x 8 x 1
# at 128 MiB; a server that checks a password on every Handshake keeps it lower and relies on tokens after that)
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 1 << 14, 8, 1
_MAX_SCRYPT_N = 1 << 20  # a hash in the users file may not ask for more than 1 GiB per check


class UsersFileError(TensorGridError):
    """The users file is missing, not TOML, or holds an entry that is not a user with a hash and a role."""


def hash_password(password: str, *, n: int = _SCRYPT_N, r: int = _SCRYPT_R, p: int = _SCRYPT_P) -> str:
    """``scrypt$n$r$p$salt$hash`` (salt and hash in base64) for a users file's ``password_hash``."""
    if not isinstance(password, str) or not password:
        raise TensorGridError("a password must be a non-empty string")
    salt = os.urandom(16)
    digest = _scrypt(password, salt, n, r, p)
    return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, password_hash: str) -> bool:
    """Whether ``password`` matches a ``hash_password`` result (constant-time comparison)."""
    n, r, p, salt, digest = _parse_hash(password_hash)
    return hmac.compare_digest(_scrypt(password, salt, n, r, p), digest)


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=32,
                          maxmem=256 * n * r * p + (1 << 20))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _parse_hash(text: str) -> tuple[int, int, int, bytes, bytes]:
    parts = text.split("$") if isinstance(text, str) else []
    try:
        if len(parts) != 6 or parts[0] != "scrypt":
            raise ValueError
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        salt, digest = base64.b64decode(parts[4], validate=True), base64.b64decode(parts[5], validate=True)
        if n < 2 or n & (n - 1) or n > _MAX_SCRYPT_N or not 1 <= r <= 64 or not 1 <= p <= 16 or not salt or not digest:
            raise ValueError
    except (ValueError, binascii.Error):
        raise UsersFileError("a password_hash must look like scrypt$N$r$p$salt$hash, as made by "
                             "`tensorgrid serve --hash-password`") from None
    return n, r, p, salt, digest


@dataclass(frozen=True)
class User:
    name: str
    password_hash: str
    role: str

    @property
    def rights(self) -> frozenset[str]:
        return ROLES[self.role]


def load_users(path: str | os.PathLike) -> dict[str, User]:
    """The users of a TOML file (``[users.<name>]`` tables with ``password_hash`` and ``role``), checked whole."""
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise UsersFileError(f"users file {os.fspath(path)} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsersFileError(f"users file {os.fspath(path)} is not valid TOML: {exc}") from None
    return parse_users(doc, where=os.fspath(path))


def parse_users(doc: dict, where: str = "users") -> dict[str, User]:
    """Users from a parsed TOML document (see ``load_users``)."""
    extra = sorted(set(doc) - {"users"})
    table = doc.get("users")
    if extra or not isinstance(table, dict) or not table:
        raise UsersFileError(f"{where}: expected [users.<name>] tables with password_hash and role"
                             + (f" (unknown top-level keys: {', '.join(extra)})" if extra else ""))
    users = {}
    for name, entry in table.items():
        if not isinstance(entry, dict):
            raise UsersFileError(f"{where}: users.{name} must be a table with password_hash and role")
        if "password" in entry:
            raise UsersFileError(f"{where}: users.{name} holds a plain password: store password_hash instead "
                                 "(`tensorgrid serve --hash-password`)")
        unknown = sorted(set(entry) - {"password_hash", "role"})
        if unknown:
            raise UsersFileError(f"{where}: users.{name} has unknown keys {', '.join(unknown)} "
                                 "(expected password_hash and role)")
        role = entry.get("role")
        if role not in ROLES:
            raise UsersFileError(f"{where}: users.{name} role must be one of {', '.join(ROLES)}, got {role!r}")
        if not name or ":" in name:
            raise UsersFileError(f"{where}: user name {name!r} must be non-empty and hold no ':' (Basic auth)")
        if not isinstance(entry.get("password_hash"), str):
            raise UsersFileError(f"{where}: users.{name} needs a password_hash (`tensorgrid serve --hash-password`)")
        _parse_hash(entry["password_hash"])
        users[name] = User(name, entry["password_hash"], role)
    return users


class Caller(flight.ServerMiddleware):
    """The authenticated caller of one call (``context.get_middleware(MIDDLEWARE)``): ``name`` (None when the
    server has no users), ``role``, ``rights``; sends the caller's new bearer token back when it signed in."""

    def __init__(self, name: str | None, role: str, token: str | None = None, on_done=None):
        super().__init__()
        self.name, self.role, self.rights = name, role, ROLES[role]
        self._token, self._on_done = token, on_done

    def sending_headers(self):
        return {"authorization": f"Bearer {self._token}"} if self._token else {}

    def call_completed(self, exception):
        if self._on_done is not None:
            self._on_done()


class HandshakeAccepted(flight.ServerAuthHandler):
    """Lets pyarrow answer Handshakes (without an auth handler it refuses them as UNIMPLEMENTED); the
    middleware has already checked the call's credentials and adds the token to the answer. Every other call
    passes here and is checked by the middleware too."""

    def authenticate(self, outgoing, incoming):
        pass

    def is_valid(self, token):
        return b""


@dataclass
class _Session:
    user: User
    last_used: float


class AuthMiddlewareFactory(flight.ServerMiddlewareFactory):
    """Checks every call's ``authorization`` header against ``users`` (None: no users, everyone may read and
    write) and issues bearer tokens; also caps the calls in progress at ``max_calls`` (None: no cap), so that
    one client cannot take every server thread."""

    def __init__(self, users: dict[str, User] | None, *, token_ttl: float = 3600.0, max_tokens: int = 100_000,
                 max_calls: int | None = None):
        super().__init__()
        self.users = dict(users) if users else None
        self.token_ttl, self.max_tokens, self.max_calls = float(token_ttl), int(max_tokens), max_calls
        self._sessions: OrderedDict[bytes, _Session] = OrderedDict()  # by SHA-256 of the token, oldest use first
        self._lock = threading.Lock()
        self._calls = 0
        self._dummy_hash = hash_password(secrets.token_hex(8))  # unknown users cost one check too (no timing leak)

    def start_call(self, info, headers):
        caller = self._authenticate(info.method, _header(headers))
        if self.max_calls is not None:
            with self._lock:
                if self._calls >= self.max_calls:
                    raise flight.FlightUnavailableError(
                        f"server busy: {self._calls} calls in progress (its limit); retry shortly")
                self._calls += 1
        return caller

    def _done(self) -> None:
        with self._lock:
            self._calls -= 1

    def _authenticate(self, method, header: str | None) -> Caller:
        done = self._done if self.max_calls is not None else None
        scheme, _, credential = (header or "").strip().partition(" ")
        scheme, credential = scheme.lower(), credential.strip()
        if self.users is None:
            if header:
                raise flight.FlightUnauthenticatedError("this server has no users (started without --users): "
                                                        "connect without username, password or token")
            return Caller(None, "admin", on_done=done)
        if scheme == "bearer" and credential:
            user = self._session(credential)
            if user is None:
                raise flight.FlightUnauthenticatedError("invalid or expired token: sign in again with username "
                                                        "and password")
            return Caller(user.name, user.role, on_done=done)
        if scheme == "basic" and credential:
            user = self._check_password(credential)
            return Caller(user.name, user.role, token=self._new_token(user), on_done=done)
        if header:
            raise flight.FlightUnauthenticatedError("unsupported authorization header: send Basic base64(user:"
                                                    "password) or Bearer <token>")
        what = "Handshake" if method == flight.FlightMethod.HANDSHAKE else "call"
        raise flight.FlightUnauthenticatedError(f"unauthenticated {what}: this server needs a username and "
                                                "password (or a token it issued)")

    def _check_password(self, credential: str) -> User:
        try:
            raw = base64.b64decode(credential + "=" * (-len(credential) % 4), validate=True)  # Go omits padding
            name, sep, password = raw.decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise flight.FlightUnauthenticatedError("malformed Basic credentials: expected base64(user:password)") \
                from None
        user = self.users.get(name) if sep else None
        ok = verify_password(password, user.password_hash if user else self._dummy_hash) and user is not None
        if not ok:
            log.warning("failed sign-in for user %r", name[:64])
            raise flight.FlightUnauthenticatedError("wrong username or password")
        log.info("user %r signed in (%s)", user.name, user.role)
        return user

    def _new_token(self, user: User) -> str:
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._expire_locked(time.monotonic())
            self._sessions[_digest(token)] = _Session(user, time.monotonic())
            while len(self._sessions) > self.max_tokens:  # many sign-ins must not grow memory without bound
                self._sessions.popitem(last=False)
        return token

    def _session(self, token: str) -> User | None:
        key = _digest(token)  # looked up by hash: no timing signal about the token's text
        now = time.monotonic()
        with self._lock:
            self._expire_locked(now)
            session = self._sessions.get(key)
            if session is None:
                return None
            session.last_used = now
            self._sessions.move_to_end(key)
            return session.user

    def _expire_locked(self, now: float) -> None:
        while self._sessions:
            key, session = next(iter(self._sessions.items()))
            if now - session.last_used < self.token_ttl:
                break
            del self._sessions[key]

    def revoke_all(self) -> None:
        """Forget every token issued (clients must sign in again)."""
        with self._lock:
            self._sessions.clear()


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def _header(headers) -> str | None:
    values = headers.get("authorization") or headers.get("Authorization") or []
    value = values[0] if values else None
    return value.decode("latin-1") if isinstance(value, bytes) else value


def server_options(users: dict[str, User] | None, **factory_options) -> dict:
    """The ``GridServer`` keywords that install authentication: ``GridServer(root, url, **server_options(users))``
    (``factory_options``: ``token_ttl``, ``max_tokens``, ``max_calls``)."""
    return {"auth_handler": HandshakeAccepted(),
            "middleware": {MIDDLEWARE: AuthMiddlewareFactory(users, **factory_options)}}


def caller(context):
    """The authenticated caller of this call (the middleware's), or None when the server has no middleware."""
    try:
        return context.get_middleware(MIDDLEWARE)
    except Exception:  # noqa: BLE001 - a context without middleware
        return None


def require(context, right: str) -> None:
    """Refuse the call with PERMISSION_DENIED unless its caller has ``right`` (READ or WRITE)."""
    who = caller(context)
    if who is None:
        return
    if right not in who.rights:
        raise flight.FlightUnauthorizedError(f"user {who.name!r} ({who.role}) may not {right}")
