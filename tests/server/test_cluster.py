"""One grid on several servers: placement by rendezvous hashing (properties), and a static-list grid of three
real `tensorgrid serve` processes with two replicas, one of them SIGKILLed while a partition streams from it."""

import signal
import socket

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tensorgrid as tg
from tensorgrid.server import placement
from tensorgrid.server.cluster import ClusterDataset, GridCluster

from .procs_grid import KillAfterFirstEpoch, kill_server, linear, sgd, start_server, stop_server

MEMBERS = st.lists(st.text("abcdefgh:0123456789", min_size=1, max_size=12), min_size=1, max_size=9, unique=True)


@settings(max_examples=150, deadline=None)
@given(MEMBERS, st.integers(1, 4), st.integers(0, 40), st.text(min_size=1, max_size=8))
def test_placement_is_a_function_of_its_inputs_and_moves_only_what_it_must(members, replicas, parts, name):
    before = {k: placement.replicas_of(name, k, members, replicas) for k in range(parts)}
    for k, holders in before.items():
        assert len(holders) == min(replicas, len(members)) and len(set(holders)) == len(holders)
        assert placement.replicas_of(name, k, list(reversed(members)), replicas) == holders  # order-free
    if len(members) > 1:  # a member leaves: only partitions it held change holders, the others keep theirs
        gone = members[0]
        rest = members[1:]
        for k, holders in before.items():
            after = placement.replicas_of(name, k, rest, replicas)
            if gone not in holders:
                assert after == holders
            else:
                assert [m for m in holders if m != gone] == after[:len(holders) - 1]
    new = "new-member:1"  # one joins: a partition moves only to it
    if new not in members:
        for k, holders in before.items():
            after = placement.replicas_of(name, k, members + [new], replicas)
            assert [m for m in after if m != new] == holders[:len(after) - (new in after)]


def test_placement_spreads_partitions_evenly():
    members = [f"grpc://10.0.0.{i}:8815" for i in range(5)]
    held = placement.assignment("digits", 1000, members, 2)
    counts = [len(v) for v in held.values()]
    assert sum(counts) == 2000 and min(counts) > 320 and max(counts) < 480  # 400 each, give or take


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 6), st.integers(1, 3), st.integers(1, 3), st.lists(st.integers(0, 500), min_size=1, max_size=24),
       st.integers(1, 8))
def test_locality_gives_every_partition_to_one_rank_on_a_node_holding_it(servers, nodes, replicas, rows, world):
    members = [f"grpc://h{i}:8815" for i in range(servers)]
    node_of = {m: f"node{i % nodes}" for i, m in enumerate(members)}
    parts = placement.rank_partitions("ds", rows, members, replicas, node_of, world)
    assert sorted(k for p in parts for k in p) == list(range(len(rows)))  # each partition exactly once
    homes = placement.rank_nodes(members, node_of, world)
    load = [sum(rows[k] for k in p) for p in parts]
    moved = 0
    for r, p in enumerate(parts):
        for k in p:
            holders = {node_of[m] for m in placement.replicas_of("ds", k, members, replicas)}
            eligible = [q for q in range(world) if homes[q] in holders]
            moved += homes[r] not in holders and bool(eligible)  # given across nodes although a rank sat beside it
    # only a rank that had no rows takes a partition from across nodes, one each
    assert moved <= sum(1 for n in load if n) and moved <= world
    if sum(1 for n in rows if n) >= world:  # partitions with rows go round: no rank is left without
        assert min(load) > 0


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


ROWS, PAD = 60_000, 4096  # ~250 MB: 6 partitions of ~40 MB, each streamed as five 8 MiB batches (more than
# gRPC and the sockets buffer: a kill after the first batch lands mid-stream)


@pytest.fixture(scope="module")
def static_grid(tmp_path_factory):
    base = tmp_path_factory.mktemp("cluster")
    data = str(base / "data")
    rng = np.random.default_rng(0)
    x = rng.random((ROWS,)).astype(np.float32)
    table = pa.table({"id": np.arange(ROWS), "x": x, "y": (x > 0.5).astype(np.int64),
                      "pad": pa.array([bytes([i % 251]) * PAD for i in range(ROWS)], pa.binary())})
    tg.write(f"{data}/numbers", table, shard_rows=ROWS // 3)
    tg.write(f"{data}/plain", table.drop_columns(["pad"]), shard_rows=ROWS // 3)  # the same rows, 1 MB not 250
    ports = _free_ports(3)
    grid = ",".join(f"127.0.0.1:{p}" for p in ports)
    procs, urls = [], []

    def start(i):  # server i, again on its port and root: it reloads its catalog (its partitions) by itself
        proc, url = start_server(str(base / f"server{i}"), ports[i], 60.0, "--grid", grid, "--replicas", "2",
                                 "--allow", data)
        if i < len(procs):
            procs[i], urls[i] = proc, url
        else:
            procs.append(proc)
            urls.append(url)

    try:
        for i in range(len(ports)):
            start(i)
        yield procs, urls, data, start
    finally:
        for proc in procs:
            stop_server(proc)


def test_a_static_grid_reads_every_row_once_while_a_server_is_killed_mid_stream(static_grid):
    procs, urls, data, start = static_grid
    g = tg.connect(urls[1])  # any member: the whole grid
    assert isinstance(g, GridCluster) and g.replicas == 2 and len(g.members) == 3
    info = g.load("numbers", f"{data}/numbers", partitions=6)
    assert sorted(k for held in info["held"].values() for k in held) == sorted(list(range(6)) * 2)
    ds = g.dataset("numbers")
    assert isinstance(ds, ClusterDataset) and ds.num_rows == ROWS and ds.num_shards == 6
    # SQL on any member sees every row, also where it holds only some partitions
    assert g.sql("SELECT count(*) AS n FROM numbers").to_pandas()["n"][0] == ROWS
    # stream partition 0 from its first replica; kill that server after the first batch
    victim = ds.replicas(0)[0]
    proc = procs[[u for u in urls].index(victim)]
    stream = ds.stream(0, columns=["id", "pad"])
    first = next(stream)
    assert 0 < first.num_rows < ds.shard_rows[0]
    kill_server(proc)
    rest = list(stream)
    ids = np.concatenate([first.column(0).to_numpy()] + [b.column(0).to_numpy() for b in rest])
    assert ids.tolist() == list(range(ds.shard_rows[0]))  # no row lost, none twice, in order
    # the failure shows where the client stood: at or after the first batch (gRPC may have buffered more)
    assert g.failovers and g.failovers[0]["server"] == victim
    assert first.num_rows <= g.failovers[0]["rows_done"] < ds.shard_rows[0]
    # every other partition, some of whose first replicas are now dead: the whole dataset once
    got = ds.to_arrow().column("id").to_numpy()
    assert np.array_equal(got, np.arange(ROWS))
    reads = ds.network_reads()  # every server of this grid runs on this machine: no row crossed machines
    assert reads["remote"] == 0 and reads["local"] >= ROWS + ds.shard_rows[0]
    # a loader over the grid (shuffled, two ranks): every row exactly once across the ranks
    seen = []
    for rank in range(2):
        loader = ds.select(["id"]).to_torch(batch_size=500, shuffle=True, seed=3, rank=rank, world_size=2)
        seen.extend(int(i) for b in loader for i in b["id"])
    assert sorted(seen) == list(range(ROWS))
    start(urls.index(victim))  # back on its port: it holds its partitions again, from its catalog
    again = GridCluster([tg.server.griddataset.Session(victim)], 1)
    assert again.tables().set_index("name").loc["numbers", "version"] == 1
    mine = [k for k in range(6) if victim in ds.replicas(k)]
    one = tg.server.GridDataset(again.sessions[victim], "numbers")
    assert [one.read_rows(k, 0, 2, ["id"]).column(0).to_pylist() for k in mine] == \
        [ds.read_rows(k, 0, 2, ["id"]).column(0).to_pylist() for k in mine]


def test_training_on_two_ranks_over_a_static_grid_finishes_after_a_server_is_killed(static_grid):
    import torch

    procs, urls, data, start = static_grid
    g = tg.connect(urls[0])
    ds = g.dataset("numbers")
    victim = 2
    result = tg.Trainer(model=linear, loss=torch.nn.CrossEntropyLoss(), optimizer=sgd, features=["x"], label="y",
                        batch_size=1000, epochs=3, workers=2, engine="local", quiet=True,
                        callbacks=[KillAfterFirstEpoch(procs[victim].pid)]).fit(ds)
    procs[victim].communicate(timeout=30)
    assert procs[victim].returncode == -signal.SIGKILL  # it died during training
    assert len(result.history) == 3 and result.history[-1]["accuracy"] > 0.9
    start(victim)


def test_with_locality_each_rank_reads_only_its_own_partitions_once_padded_to_equal_batches(static_grid):
    from tensorgrid.loader.locality import Share

    procs, urls, data, start = static_grid
    g = tg.connect(urls[0])
    g.load("spread", f"{data}/plain", partitions=5)  # uneven shares: padding on the smaller one
    ds = g.dataset("spread").select(["id"])  # a view of some columns keeps the partitions
    share = Share.of(ds, 2, 700, False)
    bounds = np.concatenate([[0], np.cumsum(ds.shard_rows)])
    mine = [set().union(*(range(bounds[k], bounds[k + 1]) for k in parts)) for parts in share.partitions]
    assert share.rows[0] != share.rows[1] and sorted(k for p in share.partitions for k in p) == list(range(5))

    def epoch(rank, world=2, state=None, take=None):
        loader = ds.to_torch(batch_size=700, shuffle=True, seed=1, rank=rank, world_size=world, locality=True)
        if state is not None:
            loader.load_state_dict(state)
        out = []
        for batch in loader:
            out.append((batch["id"].tolist(), batch["_valid"].tolist()))
            if take is not None and len(out) == take:
                return out, loader.state_dict()
        return out, loader.state_dict()

    seen = []
    lengths = set()
    for rank in range(2):
        batches, _ = epoch(rank)
        lengths.add(len(batches))
        real = [i for ids, valid in batches for i, v in zip(ids, valid) if v]
        pads = [i for ids, valid in batches for i, v in zip(ids, valid) if not v]
        assert sorted(real) == sorted(mine[rank])  # its own partitions' rows, each once
        assert set(pads) <= mine[rank] and real != sorted(real)  # padding repeats its own rows; shuffled
        flags = [v for _, valid in batches for v in valid]
        assert flags == sorted(flags, reverse=True)  # padding only at the end
        seen += real
    assert len(lengths) == 1 and lengths == {-(-max(share.rows) // 700)}  # every rank as many batches
    assert sum(share.real_rows(k) for k in range(share.batches)) == ROWS  # the loss's weights: real rows only
    assert sorted(seen) == list(range(ROWS))  # every row once over the ranks
    assert ds.network_reads()["remote"] == 0 and set(ds.network_reads()["partitions"]) == set(range(5))
    # exact mid-epoch resume on the same world size and placement; refused on another
    whole, _ = epoch(1)
    head, state = epoch(1, take=3)
    rest, _ = epoch(1, state=state)
    assert head + rest == whole
    with pytest.raises(tg.ResumeError, match="same world size"):
        epoch(0, world=3, state=state)
    with pytest.raises(tg.ResumeError, match="locality=True"):
        ds.to_torch(batch_size=700, shuffle=True, seed=1, rank=1, world_size=2).load_state_dict(state)
    with pytest.raises(tg.ArgumentError, match="grid of several servers"):
        tg.from_arrow(pa.table({"id": [1, 2, 3]})).to_torch(batch_size=1, locality=True)
    with pytest.raises(tg.ArgumentError, match="would read no rows"):
        ds.to_torch(batch_size=10, rank=0, world_size=6, locality=True)  # 5 partitions, 6 ranks
    g.drop("spread")


def test_training_with_locality_reads_on_each_ranks_node_and_resumes_only_as_it_was_placed(static_grid, tmp_path):
    import torch

    procs, urls, data, start = static_grid
    g = tg.connect(urls[0])
    g.load("placed", f"{data}/plain", partitions=6)  # 6 partitions, 2 replicas each, on three servers
    ds = g.dataset("placed")

    def trainer(workers, epochs, loader_workers=0):
        return tg.Trainer(model=linear, loss=torch.nn.CrossEntropyLoss(), optimizer=sgd, features=["x"], label="y",
                          batch_size=1000, epochs=epochs, workers=workers, engine="local", quiet=True, locality=True,
                          checkpoint_dir=str(tmp_path / "ck"), loader_workers=loader_workers)

    result = trainer(2, 1, loader_workers=1).fit(ds)  # reads in the loader's worker processes count too
    assert len(result.history) == 1 and result.history[-1]["accuracy"] > 0.9
    where = result.placement
    assert [p.rank for p in where] == [0, 1] and len({p.node for p in where}) == 1  # one machine
    assert sorted(k for p in where for k in p.partitions) == list(range(6))
    for p in where:  # every server runs on this machine: each rank read its partitions there, nothing across
        assert p.local_partitions == p.partitions and p.rows_remote == 0 and p.rows_local >= sum(
            ds.shard_rows[k] for k in p.partitions)
    assert all(r["grid_rows_remote"] == 0 and r["grid_rows_local"] >= ROWS for r in result.history)
    with pytest.raises(tg.CheckpointError, match="same world size"):  # refused before any worker starts
        trainer(1, 2).fit(ds, resume=True)
    assert len(trainer(2, 2).fit(ds, resume=True).history) == 2  # as it was placed: it goes on
    g.drop("placed")


def test_a_dead_grid_is_one_clear_error(tmp_path):
    ports = _free_ports(2)
    sessions = [tg.server.griddataset.Session(f"grpc://127.0.0.1:{p}", timeout=2.0) for p in ports]
    g = GridCluster(sessions, 2)
    with pytest.raises(tg.server.GridConnectionError, match="no server of the grid answered"):
        g.sql("SELECT 1")
    with pytest.raises(tg.server.GridConnectionError, match="did not take its partitions"):
        g.load("x", str(tmp_path / "x"))
    g.close()


def test_a_member_holding_no_partition_still_knows_the_dataset(static_grid):
    procs, urls, data, start = static_grid
    live = [u for u, p in zip(urls, procs) if p.poll() is None]
    assert len(live) >= 2
    g = GridCluster([tg.server.griddataset.Session(u) for u in live], 1)
    info = g.load("one", f"{data}/plain", partitions=1)  # one partition, one replica: the others hold none
    assert [m for m, held in info["held"].items() if not held]
    for member in g.members:  # each answers for it, and SQL on each sees every row
        alone = GridCluster([g.sessions[member]], 1)
        assert alone.dataset("one").num_rows == ROWS
        assert alone.sql("SELECT count(*) AS n FROM one").to_pandas()["n"][0] == ROWS
    g.close()


def test_when_every_replica_of_a_partition_is_down_it_is_read_from_the_store(static_grid):
    procs, urls, data, start = static_grid
    g = tg.connect(urls[0])
    g.load("lastresort", f"{data}/plain", partitions=3)
    ds = g.dataset("lastresort")
    expected = ds.read_rows(0, 0, ds.shard_rows[0], ["id", "x"])
    gone = [urls.index(m) for m in ds.replicas(0)]  # both servers holding partition 0
    try:
        for i in gone:
            kill_server(procs[i])
        again = GridCluster([g.sessions[m] for m in g.members], g.replicas)  # nobody marked dead yet
        got = again.dataset("lastresort").read_rows(0, 0, ds.shard_rows[0], ["id", "x"])
        assert got.equals(expected)  # the same rows, read from the store at the version the grid loaded
        assert again.failovers[-1]["server"] == "store"
        whole = again.dataset("lastresort").to_arrow().column("id").to_numpy()
        assert np.array_equal(np.sort(whole), np.arange(ROWS))  # every partition, from a live server or the store
    finally:
        for i in gone:
            start(i)
    g.close()
