"""``tg.grid``: one grid on several servers. ``start_on_ray`` starts and restarts them on Ray; a static list
is ``tensorgrid serve --grid h1:8815,h2:8815 --replicas 2`` on each machine and ``tg.connect`` to any of them.
Partitions are placed by rendezvous hashing (``replicas_of``) and read from live replicas."""

from .server.cluster import ClusterDataset, GridCluster
from .server.placement import assignment, rank_partitions, replicas_of
from .server.raygrid import RayGrid, start_on_ray

__all__ = ["start_on_ray", "RayGrid", "GridCluster", "ClusterDataset", "replicas_of", "assignment", "rank_partitions"]
