"""One grid on several servers: partitions placed by rendezvous hashing with replicas, read from a live one.

A grid of several servers is a list of members (``tensorgrid serve --grid a:8815,b:8815,c:8815 --replicas
2``, each server told the same list; or servers started on Ray). Each server is a cache of the store, which
stays the durable truth: a server that comes back reloads its partitions from the store (its catalog names
them). ``tg.connect`` to any member returns a ``GridCluster``: the same calls as ``Grid``.

- ``load``: the dataset's rows cut into P equal partitions (default 4 per server); each member is asked to
  hold the partitions ``placement.replicas_of`` gives it, all at one pinned store version.
- ``dataset(name)`` -> ``ClusterDataset``, a Dataset kind: each partition is read from its first live
  replica; when a server dies mid-read, the read goes on from the next replica at the next row it had not
  received (batches arrive whole or not at all), so no row is lost or repeated, and the loader's guarantees
  (exactly once, shuffle, resume) hold as over one server.
- SQL, ``get``, ``put`` and ``tables`` go, on servers with a shared store (``--store``: mirror.py), to the
  grid's table owner: the first live member of placement's ranking for the tables (every client computes
  it), asked to adopt the tables (``grid.adopt``: load what the store has newer) when this client did not
  use it last; without a store, to the first member that answers (a table lives where it was made). A query over a
  loaded dataset sees all its rows (a member holding only some partitions reads the dataset once from the
  store for SQL).
"""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import xxhash

from .. import fs as tgfs
from ..allocator import tune_malloc
from ..args import check_int
from ..errors import ArgumentError, ColumnNotFoundError, TensorGridError
from . import placement
from .client import Grid, _pem, _server_url
from .grid import writes_sql
from .griddataset import (
    GridAuthenticationError,
    GridConnectionError,
    GridError,
    GridPermissionError,
    ServedRows,
    Session,
    ticket_bytes,
    translate,
)

PARTITIONS_PER_SERVER = 4  # a dataset loaded without partitions=P: this many per member
TABLES_KEY = "\x00sql-tables"  # placement's key for the grid's SQL tables (no dataset can be named so)
RETRY_DEAD_S = 5.0  # a member that failed is tried last for this long
_NOT_FAILOVER = (ArgumentError, ColumnNotFoundError, GridAuthenticationError, GridPermissionError)


def connect(url: str | None = None, username: str | None = None, password: str | None = None,
            token: str | None = None, tls_root_certs: bytes | str | os.PathLike | None = None,
            cert_chain: bytes | str | os.PathLike | None = None, private_key: bytes | str | os.PathLike | None = None,
            timeout: float | None = None):
    """A connection to the grid server at ``url`` (``grpc://host:port``, ``grpc+tls://host:port``; default from
    ``TENSORGRID_HOST`` / ``TENSORGRID_PORT``, else localhost:8815). Credentials: a bearer ``token``, or
    ``username``/``password``; ``tls_root_certs`` (PEM bytes or a file) to trust the server's certificate,
    ``cert_chain``/``private_key`` for mutual TLS; ``timeout`` in seconds for every call. The server is asked
    once here, so a wrong address or password fails now, not at the first query. A server that is a member of
    a grid of several servers (``tensorgrid serve --grid``) gives a ``GridCluster`` over all of them: the same
    calls, partitions read from live replicas (cluster.py)."""
    tune_malloc()  # gRPC's receive buffers reuse freed memory instead of faulting in fresh pages (allocator.py)
    roots, chain, key = (_pem(n, v) for n, v in (("tls_root_certs", tls_root_certs), ("cert_chain", cert_chain),
                                                 ("private_key", private_key)))
    session = Session(_server_url(url, tls=roots is not None), username, password, token, roots, chain, key, timeout)
    grid = json.loads(session.action("grid.members")[0])  # asked once: a wrong address or password fails here
    if len(grid["members"]) <= 1:
        return Grid(session)
    sessions = [session if m == session.url else Session(m, username, password, token, roots, chain, key, timeout)
                for m in grid["members"]]
    return GridCluster(sessions, grid["replicas"], mirrored=bool(grid.get("store")))


class GridCluster:
    """A grid of several servers (from ``tg.connect`` to a member, or ``start_on_ray(...).connect()``)."""

    def __init__(self, sessions: list[Session], replicas: int, names: list[str] | None = None, resolve=None,
                 ray_nodes: list[str] | None = None, mirrored: bool = False):
        """``names``: the members' stable names (placement's input; default: their URLs); ``resolve(name)``:
        a member's URL now (servers on Ray that restarted elsewhere), asked again after a member failed;
        ``ray_nodes``: the Ray node each member runs on (a reader in a Ray worker prefers its node's replica;
        elsewhere a member is local when its host is this machine); ``mirrored``: the servers keep their SQL
        tables in a shared store (``--store``), so a table owner can be chosen and changed (``table_owners``);
        without, SQL goes to the first member that answers, where the tables were made."""
        if not sessions:
            raise ArgumentError("a grid needs at least one server")
        names = [s.url for s in sessions] if names is None else list(names)
        if len(names) != len(sessions) or len(set(names)) != len(names):
            raise ArgumentError(f"a grid's members need distinct names, one per server: {names}")
        self.sessions = dict(zip(names, sessions))
        self.members = names
        self.resolve = resolve
        self.ray_nodes = dict(zip(names, ray_nodes)) if ray_nodes is not None else None
        # rows this process read, from servers on its own node or others: (dataset, partition) -> [local, remote]
        self.part_reads: dict[tuple[str, int], list[int]] = {}
        self._local: dict[str, bool] | None = None  # member -> on this process's node (computed once per process)
        self.replicas = check_int("replicas", replicas, 1)
        self._dead: dict[str, float] = {}  # member -> when it last failed
        self._owner: str | None = None  # the table owner this client used last (it adopted the tables)
        self.mirrored = bool(mirrored)
        self._lock = threading.Lock()
        self.failovers: list[dict] = []  # reads that moved to another replica (this process's)

    @property
    def url(self) -> str:
        return ",".join(s.url for s in self.sessions.values())

    # --- where partitions live -----------------------------------------------------------------------------
    def replicas_of(self, name: str, partition: int) -> list[str]:
        """The members holding ``partition`` of dataset ``name``, in the order a reader tries them: those on
        this process's node first, members seen failing in the last RETRY_DEAD_S seconds last, placement's
        order within each group."""
        ranked = placement.replicas_of(name, partition, self.members, self.replicas)
        now = time.monotonic()
        with self._lock:
            dead = {m for m, t in self._dead.items() if now - t < RETRY_DEAD_S}
        local = self.local_members()
        return sorted(ranked, key=lambda m: (m in dead, not local[m]))  # stable: placement's order within

    def local_members(self) -> dict[str, bool]:
        """For each member, whether it runs on this process's node (its Ray node, or this machine)."""
        if self._local is None:
            self._local = _on_this_node(self.members, self.ray_nodes,
                                        {m: s.url for m, s in self.sessions.items()})
        return self._local

    def member_nodes(self) -> dict[str, str]:
        """member -> the node it runs on, the same answer in every process: its Ray node id on Ray, else
        its host as the member list names it (loopback names as one)."""
        if self.ray_nodes is not None:
            return dict(self.ray_nodes)
        loopback = {"127.0.0.1", "::1", "localhost"}
        hosts = {m: s.url.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]").lower() for m, s in self.sessions.items()}
        return {m: "localhost" if h in loopback else h for m, h in hosts.items()}

    def count(self, name: str, part: int, where: str, rows: int) -> None:
        """Record ``rows`` of partition ``part`` read from a server on this node ("local") or another."""
        with self._lock:  # a loader's chunks may be fetched by several threads
            counts = self.part_reads.setdefault((name, part), [0, 0])
            counts[where == "remote"] += rows

    def mark_failed(self, member: str) -> None:
        """Try ``member`` last for a while; where its address can change (``resolve``), look it up again."""
        with self._lock:
            self._dead[member] = time.monotonic()
        if self.resolve is not None:
            try:
                url = self.resolve(member)
            except Exception:  # noqa: BLE001 - the member is down: its old address stays, tried last
                return
            old = self.sessions[member]
            if url and url != old.url:
                with self._lock:
                    self.sessions[member] = Session(url, old.username, old.password, old.token, old.tls_root_certs,
                                                    old.cert_chain, old.private_key, old.timeout)

    # --- SQL tables: one owner, chosen by placement ---------------------------------------------------------
    def table_owners(self) -> list[str]:
        """The members in the order they own the grid's SQL tables: placement's ranking of the members for
        the tables (a pure function of the members), those seen failing lately last. The first that answers
        owns every table: a statement over several tables, or a transaction, stays on one database."""
        ranked = placement.replicas_of(TABLES_KEY, 0, self.members, len(self.members))
        now = time.monotonic()
        with self._lock:
            dead = {m for m, t in self._dead.items() if now - t < RETRY_DEAD_S}
        return sorted(ranked, key=lambda m: m in dead)

    def _on_owner(self, fn, write: bool):
        """``fn(Grid)`` on the grid's table owner. A member this client did not use last is asked first to
        adopt the tables (load what the store has newer: ``grid.adopt``). A read that fails goes on to the next
        member; a write whose owner fails is not sent again (it may have committed): GridConnectionError.
        Without a store (``mirrored`` False) a table lives where it was made: the first member that answers."""
        if not self.mirrored:
            return self._first_live(fn)
        last = None
        for member in self.table_owners():
            grid = Grid(self.sessions[member])
            try:
                if member != self._owner:
                    grid.session.action("grid.adopt")
                    self._owner = member
            except GridConnectionError as exc:
                self.mark_failed(member)
                last = exc
                continue
            try:
                return fn(grid)
            except GridConnectionError as exc:
                self.mark_failed(member)
                self._owner = None
                if write:
                    raise GridConnectionError(f"the grid's table owner {member} failed during a write, which may or "
                                              f"may not have committed: check, then run it again ({exc})") from None
                last = exc
        raise GridConnectionError(f"no server of the grid answered ({', '.join(self.members)}): {last}")

    def _first_live(self, fn):
        """``fn(Grid)`` on the first member that answers (members seen failing lately last)."""
        now = time.monotonic()
        with self._lock:
            dead = {m for m, t in self._dead.items() if now - t < RETRY_DEAD_S}
        order = [m for m in self.members if m not in dead] + [m for m in self.members if m in dead]
        last = None
        for member in order:
            try:
                return fn(Grid(self.sessions[member]))
            except GridConnectionError as exc:
                self.mark_failed(member)
                last = exc
        raise GridConnectionError(f"no server of the grid answered ({', '.join(self.members)}): {last}")

    # --- the calls of Grid -----------------------------------------------------------------------------------
    def load(self, name: str, url: str | None = None, partitions: int | None = None, refresh: bool = False,
             storage_options: dict | None = None) -> dict:
        """Hold the store dataset at ``url`` as ``name`` on the grid: P partitions (default 4 per server),
        each on ``replicas`` servers, all at one pinned version. Every member must answer (a member down now
        would leave its partitions with fewer replicas): otherwise GridConnectionError naming it.
        ``storage_options``: as ``Grid.load`` takes them, sent to every member."""
        partitions = check_int("partitions", partitions, 1, none=True) or PARTITIONS_PER_SERVER * len(self.members)
        held = placement.assignment(name, partitions, self.members, self.replicas)
        request = {"name": name, "url": url, "partitions": partitions, "refresh": bool(refresh)}
        if storage_options:
            request["storage_options"] = tgfs.check_storage_options(storage_options)
        # every member knows the dataset (its schema and partitions, for SQL), also one that holds no partition
        first, *rest = self.members
        info = self._load_on(first, {**request, "hold": held[first]})
        pinned = {**request, "version": info["version"], "url": info["source"]}  # the first one's version
        with ThreadPoolExecutor(max(1, len(rest))) as pool:
            answers = list(pool.map(lambda m: self._load_on(m, {**pinned, "hold": held[m]}), rest))
        for member, answer in zip(rest, answers):
            if answer["version"] != info["version"]:  # cannot happen with a pinned version; checked anyway
                raise GridError(f"{member} loaded version {answer['version']} of {name!r}, not {info['version']}")
        return {**info, "held": {m: held[m] for m in self.members}, "replicas": self.replicas}

    def _load_on(self, member: str, request: dict) -> dict:
        try:
            return json.loads(self.sessions[member].action("datasets.load", request)[0])
        except GridConnectionError as exc:
            raise GridConnectionError(f"grid server {member} did not take its partitions of "
                                      f"{request['name']!r}: {exc}") from None

    def dataset(self, name: str) -> ClusterDataset:
        return ClusterDataset(self, name)

    def sql(self, query: str, params=None):
        """SQL on the grid's table owner (``table_owners``): its tables, and every loaded dataset."""
        return self._on_owner(lambda g: g.sql(query, params), writes_sql(query))

    def get(self, name: str, key):
        return self._on_owner(lambda g: g.get(name, key), False)

    def put(self, name: str, data) -> int:
        return self._on_owner(lambda g: g.put(name, data), True)

    def tables(self):
        return self._on_owner(lambda g: g.tables(), False)

    def drop(self, name: str) -> None:
        """Release a loaded dataset on every member (those down keep it in their catalog until they are asked)."""
        errors = []
        for member in self.members:
            try:
                Grid(self.sessions[member]).drop(name)
            except GridConnectionError as exc:
                errors.append(f"{member}: {exc}")
        if len(errors) == len(self.members):
            raise GridConnectionError(f"no server of the grid dropped {name!r}: {'; '.join(errors)}")

    def close(self) -> None:
        for session in self.sessions.values():
            session.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getstate__(self):
        state = self.__dict__.copy()
        # a copy (loader workers, trainer processes) keeps the members' addresses as they are now: it fails
        # over between replicas, but asks no one for a restarted member's new address (Ray's handles stay here)
        state.update(_lock=None, _dead={}, failovers=[], resolve=None, _local=None, part_reads={}, _owner=None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"GridCluster({self.members!r}, replicas={self.replicas})"


class ClusterDataset(ServedRows):
    """A loaded dataset of a grid of several servers: partition k is shard k, read from a live replica."""

    def __init__(self, cluster: GridCluster, name: str):
        self.cluster = cluster
        self.name = name
        info = cluster._first_live(lambda g: g.session.call(
            lambda c, o: c.get_flight_info(flight.FlightDescriptor.for_path("datasets", name), o)))
        meta = json.loads(info.app_metadata or b"{}")
        self._schema = info.schema
        self.kind, self.snapshot = meta.get("kind"), meta.get("snapshot")
        self.source, self.version = meta.get("source"), meta.get("version")
        self._rows = [int(n) for n in meta.get("partition_rows", [])]
        held = meta.get("held")
        # the server answering holds some partitions; bytes per row from what it holds
        held_rows = sum(self._rows[k] for k in held) if held is not None else sum(self._rows)
        self._row_bytes = max(1.0, int(meta.get("bytes") or 0) / held_rows) if held_rows else 1.0
        self.url = f"grid[{cluster.url}]/{name}"
        self._fingerprint = None

    @property
    def shard_rows(self) -> list[int]:
        return list(self._rows)

    def bytes_per_row(self) -> float:
        return self._row_bytes

    @property
    def fingerprint(self) -> str:
        """The snapshot (store version and partitions; the same on every member) and the name."""
        if self._fingerprint is None:
            h = xxhash.xxh3_64(f"{self.kind}|{self.name.lower()}|{self.snapshot}|None".encode())
            self._fingerprint = "grid:" + h.hexdigest()
        return self._fingerprint

    def network_reads(self) -> dict:
        """Rows this process read from servers on its node and on others, in all and by partition."""
        with self.cluster._lock:
            parts = {k: list(v) for (name, k), v in self.cluster.part_reads.items() if name == self.name}
        return {"local": sum(v[0] for v in parts.values()), "remote": sum(v[1] for v in parts.values()),
                "partitions": parts}

    def add_network_reads(self, counts: dict) -> None:
        """Add reads made in another process for this one (a loader worker's, by partition)."""
        for k, (local, remote) in counts.get("partitions", {}).items():
            self.cluster.count(self.name, int(k), "local", local)
            self.cluster.count(self.name, int(k), "remote", remote)

    # --- locality=True: each rank reads the partitions held on its own node ----------------------------------
    def rank_partitions(self, world_size: int) -> list[list[int]]:
        """The partitions each of ``world_size`` ranks reads with ``locality=True`` (placement.rank_partitions:
        rank r beside member r mod n, every partition once, to a rank on a node holding a replica)."""
        return placement.rank_partitions(self.name, self._rows, self.cluster.members, self.cluster.replicas,
                                         self.cluster.member_nodes(), world_size)

    def rank_nodes(self, world_size: int) -> list[str] | None:
        """The Ray node each rank should run on for ``locality=True`` (None off Ray: nothing to place)."""
        if self.cluster.ray_nodes is None:
            return None
        return placement.rank_nodes(self.cluster.members, self.cluster.ray_nodes, world_size)

    def replicas(self, partition: int) -> list[str]:
        """The servers holding ``partition``, in the order a read tries them."""
        return self.cluster.replicas_of(self.name, partition)

    def info(self) -> dict:
        return {**super().info(), "servers": self.cluster.members, "replicas": self.cluster.replicas,
                "name": self.name, "source": self.source, "snapshot": self.snapshot}

    def _fetch(self, shard: int, start, stop, columns, rows=None) -> pa.Table:
        if not 0 <= shard < self.num_shards:
            raise IndexError(f"{self.url} has {self.num_shards} shards, not {shard}")
        columns = self.check_columns(columns)
        schema = self._schema if columns is None else pa.schema([self._schema.field(c) for c in columns])
        return pa.Table.from_batches(list(self.stream(shard, start, stop, columns, rows)), schema=schema)

    def stream(self, part: int, start: int | None = None, stop: int | None = None, columns=None, rows=None):
        """Record batches of rows [start, stop) of partition ``part`` (or only ``rows``, sorted and distinct,
        of that range), from its first live replica; a replica that fails mid-stream is left for the next one,
        which goes on at the first row not yet received."""
        n = self._rows[part]
        start = 0 if start is None else start
        stop = n if stop is None else stop
        if not 0 <= start <= stop <= n:
            raise ArgumentError(f"rows [{start}, {stop}) are outside partition {part} of {self.name!r} ({n} rows)")
        wanted = None if rows is None else np.asarray(rows, dtype=np.int64)
        todo = (stop - start) if wanted is None else len(wanted)
        got, errors = 0, []
        for member in self.replicas(part):
            if got == todo:
                return
            ticket = ticket_bytes(self.name, part, self.snapshot, start + got, stop, columns) if wanted is None \
                else ticket_bytes(self.name, part, self.snapshot, start, stop, columns, wanted[got:])
            session = self.cluster.sessions[member]
            where = "local" if self.cluster.local_members()[member] else "remote"
            try:
                reader = session.call(lambda c, o, t=ticket: c.do_get(flight.Ticket(t), o))
                for chunk in reader:
                    batch = chunk.data
                    if batch.schema.metadata:
                        batch = batch.replace_schema_metadata(None)
                    got += batch.num_rows
                    self.cluster.count(self.name, part, where, batch.num_rows)
                    yield batch
                if got != todo:  # a stream that ended early: the server went away between batches
                    raise GridConnectionError(f"{member} ended partition {part} after {got} of {todo} rows")
                return
            except _NOT_FAILOVER:
                raise
            except (TensorGridError, flight.FlightError, pa.ArrowException, OSError) as exc:
                err = exc if isinstance(exc, TensorGridError) else translate(exc, member)
                if isinstance(err, _NOT_FAILOVER):
                    raise err from None
                self.cluster.mark_failed(member)
                errors.append(f"{member}: {err}")
                self.cluster.failovers.append({"dataset": self.name, "partition": part, "server": member,
                                               "rows_done": got, "time": time.time(), "error": str(err)})
        if got != todo:  # every replica is down: the store, the grid's durable truth, at the loaded version
            try:
                for batch in self._from_store(part, start + got, stop, columns,
                                              None if wanted is None else wanted[got:]):
                    got += batch.num_rows
                    self.cluster.count(self.name, part, "remote", batch.num_rows)
                    yield batch
            except (TensorGridError, OSError, pa.ArrowException) as exc:
                errors.append(f"the store {self.source}: {exc}")
            else:
                self.cluster.failovers.append({"dataset": self.name, "partition": part, "server": "store",
                                               "rows_done": todo, "time": time.time(), "error": "; ".join(errors)})
                return
            raise GridConnectionError(f"partition {part} of {self.name!r}: no replica could serve it, nor the store "
                                      f"({'; '.join(errors)})")

    def _from_store(self, part: int, start: int, stop: int, columns, rows):
        """Rows [start, stop) of partition ``part`` (or ``rows`` of it, sorted) read from the store at the
        version the grid loaded, when no replica answers (the store must be reachable from here: a shared
        URL, not a path on a server's own disk)."""
        if self.source is None:
            raise GridConnectionError("the grid names no store for this dataset")
        from ..store import open as open_store
        from ..store.subsets import SubsetDataset

        first = sum(self._rows[:part])
        ids = np.arange(start, stop, dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
        if not len(ids):
            return
        table = SubsetDataset(open_store(self.source, self.version), ids + first, columns, "a partition").to_arrow()
        schema = self._schema if columns is None else pa.schema([self._schema.field(c) for c in columns])
        yield from table.replace_schema_metadata(None).cast(schema).to_batches()


def _on_this_node(members: list[str], ray_nodes: dict | None, urls: dict) -> dict[str, bool]:
    """member -> whether it runs where this process does: by Ray node id inside a Ray worker or driver of the
    grid's cluster, else by its host being one of this machine's addresses."""
    import sys

    if ray_nodes is not None:
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            here = ray.get_runtime_context().get_node_id()
            return {m: ray_nodes[m] == here for m in members}
    import socket

    mine = {"127.0.0.1", "::1", "localhost"}
    try:
        mine.update(socket.gethostbyname_ex(socket.gethostname())[2])
    except OSError:
        pass
    out = {}
    for m in members:
        host = urls[m].split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
        try:
            out[m] = host in mine or socket.gethostbyname(host) in mine
        except OSError:
            out[m] = False
    return out
