"""The ``grid`` service: which servers make up this server's grid (``tensorgrid serve --grid ... --replicas``),
so that a client that connects to any of them reads the whole grid (``cluster.py``)."""

from __future__ import annotations

import json

import pyarrow.flight as flight

from ..args import check_int
from ..errors import ArgumentError
from . import auth
from .services import Service


def member_urls(grid, scheme: str = "grpc") -> list[str]:
    """``host:port`` entries (or URLs) as ``<scheme>://host:port``, distinct, in the order given."""
    if isinstance(grid, str):
        grid = [g for g in grid.split(",") if g.strip()]
    urls = []
    for entry in grid or []:
        entry = str(entry).strip()
        if "://" not in entry:
            entry = f"{scheme}://{entry}"
        host, _, port = entry.split("://", 1)[1].rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ArgumentError(f"a grid member is host:port, got {entry!r}")
        if entry in urls:
            raise ArgumentError(f"grid member {entry} is listed twice")
        urls.append(entry)
    return urls


class MembersService(Service):
    prefix = "grid"

    def __init__(self, server, members: list[str] | None = None, replicas: int = 1):
        self.server = server
        self.members = list(members or [])
        self.replicas = check_int("replicas", replicas, 1)

    def actions(self) -> dict[str, str]:
        return {"members": "the servers of this grid and how many hold each partition: {members, replicas}",
                "adopt": "become the grid's table owner: load the tables the store has newer (with --store)"}

    def do_action(self, context, verb: str, body: bytes) -> list[bytes]:
        auth.require(context, auth.READ)
        if verb == "members":
            return [json.dumps({"members": self.members, "replicas": self.replicas,
                                "store": getattr(getattr(self.server, "mirror", None), "url", None)}).encode()]
        if verb == "adopt":  # a client's new table owner: its copies brought to the store's latest versions
            mirror = getattr(self.server, "mirror", None)
            if mirror is None:
                return [json.dumps({"store": None, "loaded": {}}).encode()]
            with self.server.writing(), self.server._cursor() as cur:
                loaded = mirror.sync(cur)
            return [json.dumps({"store": mirror.url, "loaded": loaded}).encode()]
        raise flight.FlightServerError(f"unknown action 'grid.{verb[:40]}': this service knows ['members', 'adopt']")
