"""A grid of several servers on Ray: ``start_on_ray(servers=3, replicas=2)``.

Ray places, restarts and finds the servers; TensorGrid writes no cluster manager. Each server is a Ray actor
(no CPU reserved: it serves while training takes the cores), server i on node i mod n, running a ``GridServer``
with a root of its own on its node's disk. An actor that dies (its process killed, its node lost) is started
again by Ray (``max_restarts=-1``): the new server reads its catalog, so it holds its partitions again, at
their pinned version, reloaded from the store (the durable truth). It listens on the same port as before
when it can, and clients ask Ray for a member's address again after it failed (``GridCluster.resolve``).
Placement uses the members' stable names (``<grid>-<i>``), never their addresses, so a restart moves nothing.

    grid = tg.grid.start_on_ray(servers=3, replicas=2, allow=["s3://bucket/"])
    grid.load("digits", "s3://bucket/digits")
    g = grid.connect()            # a GridCluster: sql, dataset, tables, put, get
    grid.shutdown()
"""

from __future__ import annotations

import os
import tempfile
import time
import uuid

from .. import fs as tgfs
from ..args import check_int
from ..errors import ArgumentError, TensorGridError
from .cluster import GridCluster
from .griddataset import Session

START_TIMEOUT_S = 120.0


class _ServerActor:
    """One grid server inside a Ray actor (re-created by Ray, with the same arguments, after a crash)."""

    def __init__(self, root: str, allow: list[str] | None, options: dict, storage: dict | None = None):
        import pyarrow as pa
        import ray

        from .grid import GridServer
        from .serve import normalize_allow

        tgfs.adopt(storage)  # the driver's storage options, in this actor's memory (Ray keeps its arguments)
        os.makedirs(root, exist_ok=True)
        port_file = os.path.join(root, "ray-port")
        try:
            with open(port_file) as f:
                port = int(f.read().strip() or 0)
        except (OSError, ValueError):
            port = 0
        host = ray.util.get_node_ip_address()
        try:
            self.server = GridServer(root, f"grpc://{host}:{port}", **options)
        except (OSError, pa.ArrowException):
            if not port:
                raise
            self.server = GridServer(root, f"grpc://{host}:0", **options)  # its old port is taken: another one
        self.server.allow = normalize_allow(allow, self.server.root)
        with open(port_file + ".tmp", "w") as f:
            f.write(str(self.server.port))
        os.replace(port_file + ".tmp", port_file)

    def url(self) -> str:
        return self.server.url

    def pid(self) -> int:
        return os.getpid()

    def node(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def stop(self) -> None:
        self.server.close()


class RayGrid:
    """Grid servers running as Ray actors (``start_on_ray``)."""

    def __init__(self, name: str, actors: list, replicas: int, store: str | None = None):
        self.name, self.actors, self.replicas, self.store = name, actors, replicas, store
        self.members = [f"{name}-{i}" for i in range(len(actors))]

    def urls(self, timeout: float = START_TIMEOUT_S) -> list[str]:
        """Where each server listens now (waits for servers being restarted)."""
        import ray

        return ray.get([a.url.remote() for a in self.actors], timeout=timeout)

    def nodes(self) -> list[str]:
        """The Ray node id each server runs on."""
        import ray

        return ray.get([a.node.remote() for a in self.actors], timeout=START_TIMEOUT_S)

    def pids(self) -> list[int]:
        import ray

        return ray.get([a.pid.remote() for a in self.actors], timeout=START_TIMEOUT_S)

    def _resolve(self, member: str) -> str:
        import ray

        actor = self.actors[self.members.index(member)]
        return ray.get(actor.url.remote(), timeout=10.0)

    def connect(self, username: str | None = None, password: str | None = None, token: str | None = None,
                timeout: float | None = None) -> GridCluster:
        """A client of the whole grid: the calls of ``tg.connect``'s Grid, reads from live replicas."""
        sessions = [Session(url, username, password, token, timeout=timeout) for url in self.urls()]
        return GridCluster(sessions, self.replicas, names=self.members, resolve=self._resolve,
                           ray_nodes=self.nodes(), mirrored=self.store is not None)

    def load(self, name: str, url: str | None = None, partitions: int | None = None, refresh: bool = False,
             storage_options: dict | None = None) -> dict:
        g = self.connect()
        try:
            return g.load(name, url, partitions, refresh, storage_options)
        finally:
            g.close()

    def shutdown(self) -> None:
        """Stop every server (their roots stay on the nodes' disks)."""
        import ray

        for actor in self.actors:
            try:
                ray.get(actor.stop.remote(), timeout=30.0)
            except Exception:  # noqa: BLE001 - a dead server is stopped already
                pass
            ray.kill(actor, no_restart=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()

    def __repr__(self) -> str:
        return f"RayGrid({self.name!r}, servers={len(self.actors)}, replicas={self.replicas})"


def start_on_ray(servers: int | None = None, replicas: int = 1, root: str | None = None,
                 allow: list[str] | None = None, memory_limit: str = "2GB", store: str | None = None,
                 storage_options: dict | None = None, **server_options) -> RayGrid:
    """Start a grid of ``servers`` grid servers as Ray actors (default: one per alive Ray node), spread over
    the nodes, each partition of a loaded dataset held by ``replicas`` of them. ``root``: the folder, on each
    node's own disk, under which each server keeps its database and catalog (default: the temp folder);
    ``allow``: where datasets may be loaded from (URL or folder prefixes; default: local folders, "/");
    ``store``: a shared store URL (s3://..., a shared folder) that keeps every SQL table, a version per
    commit, so that another server takes them over when their owner dies (server/mirror.py).
    ``storage_options``: fsspec's options for ``store`` and the datasets the servers load (every remote
    location without its own), handed to each actor (Ray keeps an actor's arguments to restart it).
    Ray must be initialised (``ray.init(...)``); a new one is started on this machine otherwise."""
    try:
        import ray
    except ImportError:
        raise TensorGridError("start_on_ray needs Ray: pip install 'tensorgrid[ray]'") from None
    if not ray.is_initialized():
        ray.init(include_dashboard=False)
    if servers is None:
        servers = max(1, sum(1 for n in ray.nodes() if n.get("Alive")))
    servers = check_int("servers", servers, 1)
    replicas = check_int("replicas", replicas, 1)
    if replicas > servers:
        raise ArgumentError(f"replicas={replicas} needs at least that many servers, got servers={servers}")
    name = f"tg-grid-{uuid.uuid4().hex[:8]}"
    base = os.path.join(root or tempfile.gettempdir(), name)
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive"))
    remote = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(_ServerActor)
    options = {"memory_limit": memory_limit, "store": store, **server_options}
    given = tgfs.check_storage_options(storage_options)
    storage = {**tgfs.remembered(store), **({"*": given} if given else {})}
    # server i on node i mod n (round robin), restarted there after a crash. Ray's soft affinity put every
    # server on one node here (cluster_utils, zero-CPU actors), so it is hard: a server whose node is lost
    # stays down (its partitions are read from their other replicas) until it is started again
    actors = [remote.options(name=f"{name}-{i}", scheduling_strategy=NodeAffinitySchedulingStrategy(
        nodes[i % len(nodes)], soft=False)).remote(os.path.join(base, f"server-{i}"), allow or ["/"], options,
                                                    storage)
        for i in range(servers)]
    grid = RayGrid(name, actors, replicas, store)
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        grid.urls(timeout=max(1.0, deadline - time.monotonic()))
    except Exception as exc:
        grid.shutdown()
        raise TensorGridError(f"the grid servers did not start on Ray: {str(exc).splitlines()[0]}") from None
    return grid
