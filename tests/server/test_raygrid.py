"""A grid of three servers started on a real three-node Ray cluster (the session's ``ray_cluster``): a server
process SIGKILLed mid-read is restarted by Ray and holds its partitions again; the read never notices."""

import os
import signal
import time

import numpy as np
import pyarrow as pa
import pytest

import tensorgrid as tg

from .procs_grid import KillAfterFirstEpoch, linear, sgd

ROWS, PAD = 30_000, 4096  # ~120 MB: 3 partitions of ~40 MB, each streamed as five 8 MiB batches (more than
# gRPC and the sockets buffer: a kill after the first batch lands mid-stream)


@pytest.fixture(scope="module")
def ray_grid(ray_cluster, tmp_path_factory):
    base = tmp_path_factory.mktemp("raygrid")
    data = str(base / "data")
    x = np.random.default_rng(0).random(ROWS).astype(np.float32)
    table = pa.table({"id": np.arange(ROWS), "x": x, "y": (x > 0.5).astype(np.int64),
                      "pad": pa.array([bytes([i % 251]) * PAD for i in range(ROWS)])})
    tg.write(f"{data}/numbers", table, shard_rows=ROWS // 2)
    tg.write(f"{data}/plain", table.drop_columns(["pad"]), shard_rows=ROWS // 2)  # the same rows, without pad
    grid = tg.grid.start_on_ray(servers=3, replicas=2, root=str(base / "servers"), allow=[data],
                                memory_limit="256MB")
    try:
        yield grid, data
    finally:
        grid.shutdown()


def test_a_ray_grid_survives_a_killed_server_and_ray_restarts_it_with_its_partitions(ray_grid):
    grid, data = ray_grid
    import ray

    alive = sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive"))
    assert len(alive) == 3 and sorted(grid.nodes()) == alive  # one server on each node
    info = grid.load("numbers", f"{data}/numbers", partitions=3)
    assert sorted(k for held in info["held"].values() for k in held) == sorted(list(range(3)) * 2)
    g = grid.connect()
    ds = g.dataset("numbers")
    assert ds.num_rows == ROWS
    victim = ds.replicas(0)[0]
    index = grid.members.index(victim)
    pid = grid.pids()[index]
    stream = ds.stream(0, columns=["id", "pad"])
    first = next(stream)
    assert 0 < first.num_rows < ds.shard_rows[0]
    os.kill(pid, signal.SIGKILL)  # the server's process, as a crash: Ray restarts the actor
    rest = list(stream)
    ids = np.concatenate([first.column(0).to_numpy()] + [b.column(0).to_numpy() for b in rest])
    assert ids.tolist() == list(range(ds.shard_rows[0]))
    assert g.failovers and g.failovers[0]["server"] == victim
    # Ray starts the server again (a new process); it reloads its catalog: the same partitions, same version
    deadline = time.monotonic() + 90
    while True:
        try:
            if grid.pids()[index] != pid:
                break
        except Exception:  # noqa: BLE001 - being restarted
            pass
        assert time.monotonic() < deadline, "Ray did not restart the killed grid server"
        time.sleep(0.5)
    restarted = tg.connect(grid.urls()[index])
    held = restarted.tables().set_index("name").loc["numbers"]
    assert int(held["version"]) == 1
    mine = [k for k in range(3) if victim in ds.replicas(k)]
    one = tg.server.GridDataset(restarted.session, "numbers")
    for k in mine:  # it serves them again, from its own memory
        assert one.read_rows(k, 0, 3, ["id"]).column("id").to_pylist() == ds.read_rows(k, 0, 3, ["id"]).column(
            "id").to_pylist()
    assert np.array_equal(ds.to_arrow().column("id").to_numpy(), np.arange(ROWS))


def test_ray_training_over_a_ray_grid_finishes_after_a_server_is_killed(ray_grid):
    import torch

    grid, data = ray_grid
    grid.load("numbers", f"{data}/numbers", partitions=3)
    ds = grid.connect().dataset("numbers")
    victim = grid.members.index(ds.replicas(1)[0])
    pid = grid.pids()[victim]
    result = tg.Trainer(model=linear, loss=torch.nn.CrossEntropyLoss(), optimizer=sgd, features=["x"], label="y",
                        batch_size=1000, epochs=3, workers=2, engine="ray", quiet=True,
                        callbacks=[KillAfterFirstEpoch(pid)]).fit(ds)
    assert len(result.history) == 3 and result.history[-1]["accuracy"] > 0.9
    assert len({p.node for p in result.placement}) == 2  # one rank on each node
    # every row read once an epoch across the ranks, each from its node's replica when its node has one
    reads = [(r["grid_rows_local"], r["grid_rows_remote"]) for r in result.history]
    assert sum(a + b for a, b in reads) == 3 * ROWS and sum(a for a, _ in reads) > 0, reads
    deadline = time.monotonic() + 90
    while grid.pids()[victim] == pid:  # it was killed during training: Ray starts it again
        assert time.monotonic() < deadline, "the grid server was not killed, or Ray did not restart it"
        time.sleep(0.5)


def test_ray_training_with_locality_places_each_rank_beside_its_partitions_and_survives_a_kill(ray_grid):
    import torch

    grid, data = ray_grid
    grid.load("placed", f"{data}/plain", partitions=4)
    ds = grid.connect().dataset("placed")
    pid = grid.pids()[0]
    result = tg.Trainer(model=linear, loss=torch.nn.CrossEntropyLoss(), optimizer=sgd, features=["x"], label="y",
                        batch_size=1000, epochs=2, workers=2, engine="ray", quiet=True, locality=True,
                        callbacks=[KillAfterFirstEpoch(pid)]).fit(ds)
    assert len(result.history) == 2 and result.history[-1]["accuracy"] > 0.9
    node_of = dict(zip(grid.members, grid.nodes()))
    where = result.placement
    # rank r ran beside member r's node (Ray node affinity), and read there every partition held on it
    assert [p.node for p in where] == [node_of[grid.members[r]] for r in range(2)]
    assert sorted(k for p in where for k in p.partitions) == list(range(4))
    for p in where:
        beside = [k for k in p.partitions if any(node_of[m] == p.node for m in ds.replicas(k))]
        assert beside and set(beside) <= set(p.local_partitions), (p, beside)
    deadline = time.monotonic() + 90
    while grid.pids()[0] == pid:  # killed during training: Ray starts it again
        assert time.monotonic() < deadline, "the grid server was not killed, or Ray did not restart it"
        time.sleep(0.5)
    grid.connect().drop("placed")
