"""Who may do what on the grid server. Without users configured every caller may read and write (a server
on loopback for one user); with users, each call is checked against the caller's role by ``require``."""

from __future__ import annotations

import pyarrow.flight as flight

READ, WRITE = "read", "write"
MIDDLEWARE = "auth"  # the key of the authentication middleware on a call's context


def caller(context):
    """The authenticated caller of this call (the middleware's), or None when the server has no users."""
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
