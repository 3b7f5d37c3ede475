"""SQL tables of a grid mirrored to a shared store (`tensorgrid serve --store`): three real `tensorgrid serve`
processes; the table owner is SIGKILLed and another server takes the tables over from the store with every
committed row; the old owner comes back stale and is brought up to date; two servers writing one table lose
nothing; a transaction's commit is exported; a dropped table leaves the store."""

import os

import pytest

import tensorgrid as tg
from tensorgrid.server.client import Grid
from tensorgrid.server.cluster import GridCluster
from tensorgrid.server.griddataset import Session

from .procs_grid import kill_server, start_server, stop_server
from .test_cluster import _free_ports


@pytest.fixture(scope="module")
def mirrored_grid(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("mirror")
    store = str(tmp_path / "store")
    ports = _free_ports(3)
    grid = ",".join(f"127.0.0.1:{p}" for p in ports)
    procs, urls = [None] * 3, [None] * 3

    def start(i):  # server i on its port and root: again after a kill, with its old database
        procs[i], urls[i] = start_server(str(tmp_path / f"server{i}"), ports[i], 60.0, "--grid", grid,
                                         "--replicas", "2", "--store", store)

    try:
        for i in range(3):
            start(i)
        yield procs, urls, store, start
    finally:
        for proc in procs:
            if proc is not None:
                stop_server(proc)


def _count(g, table="ledger") -> int:
    return int(g.sql(f"SELECT count(*) AS n FROM {table}").to_pandas()["n"][0])


def test_a_killed_table_owner_is_taken_over_from_the_store_with_every_committed_row(mirrored_grid):
    procs, urls, store, start = mirrored_grid
    g = tg.connect(urls[2])
    assert isinstance(g, GridCluster)
    owner = g.table_owners()[0]
    g.sql("CREATE TABLE ledger (id BIGINT PRIMARY KEY, batch INTEGER, note VARCHAR NOT NULL)")
    for b in range(4):  # each acknowledged write is a new version of the table in the store
        g.sql(f"INSERT INTO ledger SELECT {b} * 10 + i, {b}, 'n' FROM range(10) t(i)")
    g.put("ledger", [{"id": 1000, "batch": 9, "note": "put"}])
    acked = 41
    exported = tg.open(f"{store}/tables/ledger")
    assert exported.num_rows == acked and exported.version == 6  # created, 4 inserts, 1 put
    victim = urls.index(owner)
    kill_server(procs[victim])
    # the first write after the kill cannot know whether it reached the dead owner: it says so, and is not sent
    # again; run again, it goes to the next owner, which takes the tables over from the store first
    with pytest.raises(tg.server.GridConnectionError, match="may or may not have committed"):
        g.sql("INSERT INTO ledger VALUES (2000, 20, 'after')")
    g.sql("INSERT INTO ledger VALUES (2000, 20, 'after')")
    assert g.table_owners()[0] != owner and _count(g) == acked + 1  # no committed row lost
    with pytest.raises(tg.TensorGridError, match="(?i)constraint|duplicate"):  # its keys came along
        g.sql("INSERT INTO ledger VALUES (2000, 21, 'twice')")
    with pytest.raises(tg.TensorGridError, match="(?i)not null|constraint"):
        g.sql("INSERT INTO ledger (id, batch) VALUES (3000, 1)")
    assert tg.open(f"{store}/tables/ledger").num_rows == acked + 1
    # the old owner comes back with its old copy (41 rows); a new client goes to it first: it is brought up
    # to the store's version before it answers
    start(victim)
    fresh = tg.connect(urls[victim])
    assert fresh.table_owners()[0] == owner
    assert _count(fresh) == acked + 1
    fresh.sql("INSERT INTO ledger VALUES (4000, 40, 'back')")
    assert _count(fresh) == acked + 2 and tg.open(f"{store}/tables/ledger").num_rows == acked + 2
    g.close()
    fresh.close()


def test_two_servers_writing_one_table_lose_nothing_and_a_drop_leaves_the_store(mirrored_grid):
    procs, urls, store, start = mirrored_grid
    a, b = (Grid(Session(u)) for u in urls[:2])  # each server on its own, as two clients that disagree
    a.sql("CREATE TABLE t (id INTEGER PRIMARY KEY)")
    a.sql("INSERT INTO t VALUES (1)")
    b.session.action("grid.adopt")  # b has t at the store's version
    a.sql("INSERT INTO t VALUES (2)")  # a moves on; b's copy is stale now
    b.sql("INSERT INTO t VALUES (3)")  # b brings t up to date before writing: nothing of a's is replaced
    assert sorted(tg.open(f"{store}/tables/t").to_arrow().column("id").to_pylist()) == [1, 2, 3]
    a.sql("INSERT INTO t VALUES (4)")
    assert sorted(a.sql("SELECT id FROM t").to_arrow().column("id").to_pylist()) == [1, 2, 3, 4]
    # a write under a transaction (ADBC) is exported when it commits, not before
    dbapi = pytest.importorskip("adbc_driver_flightsql.dbapi", reason="adbc-driver-flightsql is in the dev extras")
    with dbapi.connect(urls[0], autocommit=False) as conn, conn.cursor() as cur:
        cur.execute("INSERT INTO t VALUES (5)")
        assert tg.open(f"{store}/tables/t").num_rows == 4
        conn.commit()
    assert tg.open(f"{store}/tables/t").num_rows == 5
    # a transaction whose table another write changed after it began cannot replace that write: its commit
    # is ConflictError, rolled back; run again, it commits on top
    with dbapi.connect(urls[0], autocommit=False) as conn, conn.cursor() as cur:
        cur.execute("INSERT INTO t VALUES (6)")
        a.sql("INSERT INTO t VALUES (7)")  # autocommit, meanwhile: exported as the next version
        with pytest.raises(Exception, match="wrote table .* meanwhile"):
            conn.commit()
    with dbapi.connect(urls[0], autocommit=False) as conn, conn.cursor() as cur:
        cur.execute("INSERT INTO t VALUES (6)")
        conn.commit()
    assert sorted(tg.open(f"{store}/tables/t").to_arrow().column("id").to_pylist()) == [1, 2, 3, 4, 5, 6, 7]
    # names that are keywords, comments, and statements whose table it cannot tell (all tables exported)
    a.sql('CREATE TABLE data (value INTEGER)')
    a.sql("/* note */ INSERT INTO data VALUES (1)")
    a.sql("WITH v AS (SELECT 2 AS value) INSERT INTO data SELECT value FROM v")
    assert sorted(tg.open(f"{store}/tables/data").to_arrow().column("value").to_pylist()) == [1, 2]
    a.sql("DROP TABLE data")
    a.sql("DROP TABLE t")
    assert not os.path.exists(f"{store}/tables/t")
    b.session.action("grid.adopt")
    assert "t" not in set(b.tables()["name"])
    for g in (a, b):
        g.close()


def test_a_write_the_store_refuses_is_rolled_back(mirrored_grid):
    import shutil

    procs, urls, store, start = mirrored_grid
    g = Grid(Session(urls[0]))
    g.sql("CREATE TABLE u (id INTEGER)")
    g.sql("INSERT INTO u VALUES (1)")
    data = f"{store}/tables/u/data"
    shutil.move(data, data + ".moved")
    with open(data, "w") as f:  # the store cannot take the next version's shard: its folder is a file now
        f.write("in the way")
    with pytest.raises(tg.TensorGridError, match=r"store .* did not take table \['u'\]: this write was rolled back"):
        g.sql("INSERT INTO u VALUES (2)")
    # after a refused export this server reloads the table from the store before its next write: here the
    # store cannot be read either, and nothing is written
    with pytest.raises(tg.TensorGridError, match=r"store .* could not be read for table \['u'\]: nothing was written"):
        g.put("u", [{"id": 3}])
    assert g.sql("SELECT id FROM u").to_arrow().column("id").to_pylist() == [1]  # the grid never claims what
    # the store does not have
    os.remove(data)
    shutil.move(data + ".moved", data)  # the store is back: writes go on from its version
    g.put("u", [{"id": 3}])
    assert sorted(tg.open(f"{store}/tables/u").to_arrow().column("id").to_pylist()) == [1, 3]
    g.close()
