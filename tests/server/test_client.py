"""tg.connect against a real grid server on loopback: the issue's flow as written, upserts, key lookups, loads
of store datasets (allowed places only), SQL over them, errors as named TensorGrid errors, and a restart."""

import os
import uuid

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

import tensorgrid as tg
from tensorgrid.errors import ArgumentError, DatasetExistsError, DatasetNotFoundError, SQLError
from tensorgrid.server import GridConnectionError, GridPermissionError, GridServer


def _name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def _kitten(g) -> str:
    name = _name("kitten")
    assert g.sql(f"CREATE TABLE {name} (id BIGINT PRIMARY KEY, name VARCHAR)") == 0
    assert g.sql(f"INSERT INTO {name} VALUES (1, 'WARM KITTY'), (2, 'SOFT KITTY'), (3, 'LITTLE BALL OF FUR')") == 3
    return name


def test_the_kitten_flow_as_the_issue_writes_it(g):
    kitten = _kitten(g)
    rows = [{"id": 1, "name": "WARM KITTY"}, {"id": 2, "name": "SOFT KITTY"}, {"id": 3, "name": "LITTLE BALL OF FUR"}]
    assert list(g.dataset(kitten)) == rows
    assert g.dataset(kitten).to_arrow().to_pylist() == rows
    assert g.dataset(kitten).to_pandas().to_dict("records") == rows
    assert g.get(kitten, 2) == {"id": 2, "name": "SOFT KITTY"}
    assert g.sql(f"SELECT name FROM {kitten} WHERE id = ?", params=[3]).to_pandas()["name"].tolist() == \
        ["LITTLE BALL OF FUR"]
    assert g.sql(f"DELETE FROM {kitten} WHERE id >= $1", params=(3,)) == 1


def test_put_upserts_on_the_primary_key_from_pandas_and_arrow(g):
    kitten = _kitten(g)
    assert g.put(kitten, pd.DataFrame({"id": [2, 4], "name": ["SOFTER KITTY", "PURR"]})) == 2
    assert g.put(kitten, pa.table({"name": ["WARMEST"], "id": pa.array([1], pa.int64())})) == 1  # by name
    assert g.sql(f"SELECT * FROM {kitten} ORDER BY id").to_pandas().to_dict("records") == [
        {"id": 1, "name": "WARMEST"}, {"id": 2, "name": "SOFTER KITTY"}, {"id": 3, "name": "LITTLE BALL OF FUR"},
        {"id": 4, "name": "PURR"}]
    assert g.get(kitten, np.int64(4)) == {"id": 4, "name": "PURR"}  # numpy keys too


def test_a_failed_put_changes_nothing(g):
    kitten = _kitten(g)
    with pytest.raises(tg.TensorGridError, match="(?i)not null|constraint|convert|cast"):
        g.put(kitten, pd.DataFrame({"id": [5, None], "name": ["A", "B"]}))
    assert g.get(kitten, 5) is None


def test_get_of_a_missing_key_is_none_and_bad_lookups_are_named_errors(g):
    kitten = _kitten(g)
    assert g.get(kitten, 99) is None
    with pytest.raises(ArgumentError, match=r"the key of .* is \['id'\]: give 1 value"):
        g.get(kitten, (1, 2))
    with pytest.raises(DatasetNotFoundError, match="no table named 'nope_"):
        g.get(_name("nope"), 1)
    plain = _name("plain")
    g.sql(f"CREATE TABLE {plain} (a INT)")
    with pytest.raises(ArgumentError, match="has no primary key"):
        g.get(plain, 1)
    assert g.put(plain, pd.DataFrame({"a": [1, 1]})) == 2  # without a key, put appends


def test_composite_keys_by_tuple_or_dict(g):
    t = _name("pairs")
    g.sql(f"CREATE TABLE {t} (a INT, b VARCHAR, v DOUBLE, PRIMARY KEY (a, b))")
    g.put(t, [{"a": 1, "b": "x", "v": 0.5}, {"a": 1, "b": "y", "v": 1.5}])
    assert g.get(t, (1, "y"))["v"] == 1.5
    assert g.get(t, {"b": "x", "a": 1})["v"] == 0.5


def test_sql_errors_are_one_line_without_grpc_noise(g):
    with pytest.raises(SQLError) as e:
        g.sql("SELEC 1")
    assert str(e.value).startswith("Parser Error") and "\n" not in str(e.value)
    assert "gRPC" not in str(e.value) and "Detail" not in str(e.value)
    with pytest.raises(GridPermissionError, match="disabled by configuration"):
        g.sql("SELECT * FROM read_csv('/etc/passwd')")


def test_load_a_store_dataset_then_sql_over_it(g, grid_digits):
    counts = g.sql("SELECT label, count(*) AS n FROM digits GROUP BY label ORDER BY label").to_pandas()
    expected = grid_digits.to_pandas()["label"].value_counts().sort_index()
    assert counts["n"].tolist() == expected.tolist()
    row = g.tables().set_index("name").loc["digits"]
    assert (row["kind"], row["rows"], row["partitions"], row["version"]) == ("dataset", 1797, 4, 1)
    assert row["bytes"] > 1797 * 64 and row["source"] == os.path.realpath(grid_digits.url)
    # the tensor column stays a tensor when read as a dataset
    images = g.dataset("digits").to_pandas()["image"]
    assert images[0].shape == (8, 8) and images[0].dtype == np.uint8
    np.testing.assert_array_equal(images[5], grid_digits.to_pandas()["image"][5])


def test_a_loaded_dataset_keeps_its_version_until_refresh(g, grid):
    url = os.path.join(grid.root, "store", _name("grow"))
    tg.write(url, pd.DataFrame({"x": np.arange(10)}))
    name = _name("grow")
    assert g.load(name, url, partitions=3)["partitions"] == 3
    assert [p["rows"] for p in g.dataset(name).partitions()] == [3, 3, 4]
    tg.write(url, pd.DataFrame({"x": np.arange(10, 15)}), mode="append")
    assert g.load(name, url, partitions=3)["version"] == 1  # pinned: loading again changes nothing
    assert g.sql(f"SELECT count(*) AS n FROM {name}").to_pandas()["n"][0] == 10
    info = g.load(name, refresh=True, partitions=3)
    assert (info["version"], info["rows"]) == (2, 15)
    assert g.sql(f"SELECT count(*) AS n FROM {name}").to_pandas()["n"][0] == 15
    with pytest.raises(DatasetExistsError, match="is loaded from"):
        g.load(name, os.path.join(grid.root, "store", "digits"))
    g.drop(name)
    assert name not in g.tables()["name"].tolist()


def test_load_outside_the_allowed_places_is_refused(g, grid, tmp_path):
    outside = tg.write(str(tmp_path / "outside"), pd.DataFrame({"x": [1]}))
    for url in (outside.url, "../" + os.path.basename(os.path.dirname(grid.root)), f"file://{tmp_path}/outside",
                "/etc"):
        with pytest.raises(GridPermissionError, match="this server does not load from"):
            g.load(_name("sneaky"), url)
    link = os.path.join(grid.root, _name("link"))  # a symlink planted under the root leads outside: refused
    os.symlink(tmp_path / "outside", link)
    with pytest.raises(GridPermissionError):
        g.load(_name("sneaky"), link)
    with pytest.raises(DatasetNotFoundError):
        g.load(_name("missing"), "store/nothing-here")


def test_a_server_that_is_gone_is_a_connection_error(tmp_path):
    server = GridServer(tmp_path / "gone", memory_limit="256MB", threads=1)
    url = server.url
    g = tg.connect(url)
    server.close()
    with pytest.raises(GridConnectionError, match=f"cannot reach the grid server at {url}"):
        g.sql("SELECT 1")
    with pytest.raises(GridConnectionError):
        tg.connect(url)


def test_connect_takes_the_server_from_the_environment(grid, monkeypatch):
    monkeypatch.setenv("TENSORGRID_HOST", "127.0.0.1")
    monkeypatch.setenv("TENSORGRID_PORT", str(grid.port))
    with tg.connect() as g:
        assert g.url == f"grpc://127.0.0.1:{grid.port}"
        assert g.sql("SELECT 42 AS x").to_pandas()["x"][0] == 42
    with pytest.raises(ArgumentError, match="grpc://host:port"):
        tg.connect("http://localhost:1")


def test_a_restarted_server_has_its_tables_and_loaded_datasets_back(tmp_path):
    root = tmp_path / "root"
    ds = tg.write(str(root / "data"), pd.DataFrame({"x": np.arange(100)}), shard_rows=30)
    with GridServer(root, memory_limit="256MB", threads=1) as server, tg.connect(server.url) as g:
        g.sql("CREATE TABLE t (id INT PRIMARY KEY, v VARCHAR)")
        g.put("t", pd.DataFrame({"id": [1, 2], "v": ["a", "b"]}))
        g.load("d", "data")
        before = (g.dataset("d").fingerprint, g.dataset("t").fingerprint, g.tables())
    tg.write(ds.url, pd.DataFrame({"x": [100]}), mode="append")  # a newer version meanwhile: not picked up
    with GridServer(root, memory_limit="256MB", threads=1) as server, tg.connect(server.url) as g:
        assert (g.dataset("d").fingerprint, g.dataset("t").fingerprint) == before[:2]
        pd.testing.assert_frame_equal(g.tables(), before[2])
        assert g.sql("SELECT sum(x) AS s FROM d").to_pandas()["s"][0] == sum(range(100))
        assert g.get("t", 2) == {"id": 2, "v": "b"}


def test_big_tensors_are_blobs_to_sql_and_come_back_as_tensors(g, grid):
    """A tensor of more than BLOB_BYTES a row is a BLOB inside DuckDB (an ARRAY of 1 MiB images asked DuckDB
    for 2 GiB per vector: out of memory); a result column with its name and size is a tensor again, for this
    client and for the ADBC driver; small tensors stay SQL arrays."""
    from tensorgrid.server.ingest import BLOB_BYTES

    n, name = 40, _name("big")
    rng = np.random.default_rng(3)
    big = rng.standard_normal((n, 80, 80)).astype(np.float32)  # 25 KiB a row
    small = rng.standard_normal((n, 2, 3)).astype(np.float32)
    assert big[0].nbytes > BLOB_BYTES > small[0].nbytes
    tg.write(os.path.join(grid.root, name), pa.table({
        "id": np.arange(n), "big": pa.FixedShapeTensorArray.from_numpy_ndarray(big),
        "small": pa.FixedShapeTensorArray.from_numpy_ndarray(small)}))
    g.load(name, name)
    types = g.sql(f"SELECT typeof(big) AS b, typeof(small) AS s FROM {name} LIMIT 1").to_pandas().iloc[0].tolist()
    assert types == ["BLOB", "FLOAT[3][2]"]
    got = g.sql(f"SELECT id, big FROM {name} WHERE id >= 30 ORDER BY id").to_arrow()
    assert isinstance(got.schema.field("big").type, pa.FixedShapeTensorType)
    np.testing.assert_array_equal(got.column("big").combine_chunks().to_numpy_ndarray(), big[30:])
    import adbc_driver_flightsql.dbapi as flight_sql  # the dev extras' Flight SQL driver

    with flight_sql.connect(grid.url, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(f"SELECT * FROM {name} ORDER BY id")
        table = cur.fetch_arrow_table()
    np.testing.assert_array_equal(table.column("big").combine_chunks().to_numpy_ndarray(), big)
    # under another name, or cut to another size, it is the bytes
    other = g.sql(f"SELECT big AS raw, big[1:4] AS big FROM {name} WHERE id = 0").to_arrow()
    assert other.column("raw").to_pylist() == [big[0].tobytes()]
    assert other.column("big").to_pylist() == [big[0].tobytes()[:4]]


def test_select_star_of_loaded_28x28_images_answers_tensors_to_adbc_and_tg_connect(g, grid):
    """A loaded dataset's small tensors are ARRAYs to SQL (indexable, typeof UTINYINT[28][28]) and come back
    to every client as Arrow's fixed-shape tensor type, the rows whole; the table schema says so too."""
    import adbc_driver_flightsql.dbapi as flight_sql

    n, name = 3000, _name("mnist")
    images = np.random.default_rng(5).integers(0, 256, (n, 28, 28), dtype=np.uint8)
    tg.write(os.path.join(grid.root, name), pa.table({
        "id": np.arange(n), "image": pa.FixedShapeTensorArray.from_numpy_ndarray(images)}), shard_rows=1000)
    g.load(name, name)
    tensor = pa.fixed_shape_tensor(pa.uint8(), [28, 28])
    ours = g.sql(f"SELECT * FROM {name}").to_arrow()
    with flight_sql.connect(grid.url, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(f"SELECT * FROM {name}")
        theirs = cur.fetch_arrow_table()
        schema = conn.adbc_get_table_schema(name)
    for table in (ours, theirs):
        assert table.num_rows == n and table.schema.field("image").type == tensor
        table = table.sort_by("id")
        np.testing.assert_array_equal(table.column("id").to_numpy(), np.arange(n))
        np.testing.assert_array_equal(table.column("image").combine_chunks().to_numpy_ndarray(), images)
    assert schema.field("image").type == tensor
    got = g.sql(f"SELECT typeof(image) AS t, image[2][3] AS px, image FROM {name} WHERE id IN (7, 17) "
                f"ORDER BY id").to_arrow()
    assert got.column("t").to_pylist() == ["UTINYINT[28][28]"] * 2
    assert got.column("px").to_pylist() == [int(images[7, 1, 2]), int(images[17, 1, 2])]
    np.testing.assert_array_equal(got.column("image").combine_chunks().to_numpy_ndarray(), images[[7, 17]])


def test_a_null_tensor_row_from_an_outer_join_comes_back_as_null(g, grid):
    """DuckDB marks a NULL row's sub-arrays null too: the row is null, the others whole (was an error)."""
    name = _name("small")
    images = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    tg.write(os.path.join(grid.root, name), pa.table({"id": [1, 2],
                                                      "image": pa.FixedShapeTensorArray.from_numpy_ndarray(images)}))
    g.load(name, name)
    got = g.sql(f"SELECT k.id, d.image FROM (SELECT unnest([1, 2, 3]) AS id) k LEFT JOIN {name} d USING (id) "
                "ORDER BY k.id").to_arrow()
    column = got.column("image").combine_chunks()
    assert got.num_rows == 3 and column.is_null().to_pylist() == [False, False, True]
    np.testing.assert_array_equal(column.storage.slice(0, 2).flatten().to_numpy().reshape(2, 3, 4), images)


def test_8_concurrent_gets_from_threads_are_all_right_and_not_held_up_by_a_running_query(g, grid):
    """Each get works on its own DuckDB cursor: 8 threads' gets all return their own rows, and all finish while
    a long query of another client is still at work in DuckDB (then cancelled)."""
    import threading
    import time

    import adbc_driver_flightsql.dbapi as flight_sql

    table = _name("many")
    g.sql(f"CREATE TABLE {table} (id BIGINT PRIMARY KEY, v VARCHAR)")
    g.sql(f"INSERT INTO {table} SELECT i, 'v' || i FROM range(10000) r(i)")
    conn = flight_sql.connect(grid.url, autocommit=True)
    cur = conn.cursor()
    failed = []

    def long_query():
        try:
            cur.execute("SELECT sum(hash(a * 7)) AS s FROM range(5000000000) t(a)")
        except flight_sql.Error:
            pass  # cancelled below

    runner = threading.Thread(target=long_query)
    runner.start()
    deadline = time.monotonic() + 10
    while not grid._running._calls and time.monotonic() < deadline:
        time.sleep(0.01)
    assert grid._running._calls, "the long query never started"
    start = threading.Barrier(8)
    got: dict[int, dict] = {}

    def gets(k):
        client = tg.connect(grid.url)
        start.wait()
        for i in range(k, 10000, 400):
            row = client.get(table, i)
            if row != {"id": i, "v": f"v{i}"}:
                failed.append((i, row))
            got[i] = row
        client.close()

    threads = [threading.Thread(target=gets, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    still_running = bool(grid._running._calls)
    cur.adbc_cancel()
    runner.join(10)
    conn.close()
    assert not failed and len(got) == 8 * 25
    assert still_running, "the gets waited for the long query"
