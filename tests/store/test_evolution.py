"""Schema evolution: add, widen, rename as new versions of the same shards, read through the new schema
everywhere (Arrow, pandas, filters, SQL, the loader and its cache, Spark, verify), refused changes, races,
damage the lineage must still catch, a writer killed mid-alter."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest

import tensorgrid as tg
from tensorgrid import fs as tgfs
from tensorgrid.store import encoding, evolution, manifest, writer
from tensorgrid.store.manifest import Manifest

X = np.arange(6 * 4, dtype=np.float32).reshape(6, 2, 2)
IDS = np.array([-2**31, -1, 0, 1, 2**31 - 2, 2**31 - 1], dtype=np.int32)  # int32's extremes survive widening
LABELS = list("abcdef")


def old_rows() -> pd.DataFrame:
    return pd.DataFrame({"id": IDS, "lbl": LABELS, "x": list(X)})


def new_rows() -> pd.DataFrame:
    return pd.DataFrame({"id": np.array([2**40, 7], dtype=np.int64), "label": ["g", "h"], "x": list(X[:2] + 100),
                         "score": np.array([0.5, 1.5], dtype=np.float32)})


def altered(url: str):
    """Two shards written as (id int32, lbl, x), then add score + widen id + rename lbl -> label."""
    tg.write(url, old_rows(), shard_rows=3)
    return tg.open(url).alter(add={"score": pa.float32()}, widen={"id": "int64"}, rename={"lbl": "label"})


def shard_files(url: str) -> dict:
    fs, root = tgfs.resolve(url)
    fs.invalidate_cache()
    return {tgfs.name(p): fs.size(p) for p in fs.ls(tgfs.join(root, "data"), detail=False)}


def latest_version(url: str) -> int:
    fs, root = tgfs.resolve(url)
    return manifest.list_versions(fs, root)[-1]


def test_alter_is_a_new_version_of_the_same_shards_read_through_the_new_schema(any_url):
    tg.write(any_url, old_rows(), shard_rows=3)
    files = shard_files(any_url)
    v1 = tg.open(any_url)
    ds = v1.alter(add={"score": pa.float32()}, widen={"id": "int64"}, rename={"lbl": "label"})
    assert (ds.version, ds.added_rows, ds.num_rows) == (2, 0, 6)
    assert ds.versions()[-1].operation == "alter"
    assert ds.shards == v1.shards and shard_files(any_url) == files  # no data rewritten, nothing added
    assert [(f.name, f.type) for f in ds.schema] == [("id", pa.int64()), ("label", pa.string()),
                                                      ("x", pa.fixed_shape_tensor(pa.float32(), [2, 2])),
                                                      ("score", pa.float32())]
    assert not any(f.metadata and evolution.HISTORY_KEY in f.metadata for f in ds.schema)  # kept in the manifest
    t = ds.to_arrow()
    assert t.schema.field("id").type == pa.int64() and t.column("id").to_pylist() == IDS.tolist()
    assert t.column("label").to_pylist() == LABELS and t.column("score").null_count == 6
    assert np.array_equal(t.column("x").combine_chunks().to_numpy_ndarray(), X)
    # projection and pushdown name the new columns
    part = ds.to_arrow(columns=["score", "label"], filter=pc.field("label") >= "d")
    assert part.column_names == ["score", "label"] and part.column("label").to_pylist() == ["d", "e", "f"]
    assert ds.to_arrow(columns=["id"], filter=pc.field("id") > 2**31 - 3).column("id").to_pylist() == [2**31 - 2,
                                                                                                      2**31 - 1]
    assert ds.to_arrow(filter=pc.field("score").is_null()).num_rows == 6
    assert list(ds.head(2).columns) == ["id", "label", "x", "score"] and ds.head(2)["label"].tolist() == ["a", "b"]
    got = ds.sql("SELECT label, id, score FROM ds WHERE label <> 'a' ORDER BY id").to_pandas()
    assert got["label"].tolist() == ["b", "c", "d", "e", "f"] and got["score"].isna().all()
    assert got["id"].tolist() == IDS[1:].tolist()
    assert ds.verify() == {"shards": 2, "bytes": sum(files.values()), "rows": 6}
    loader = ds.to_torch(batch_size=4, columns=["id", "label", "x"])
    batches = list(loader)
    assert loader.source.wait_filled(60)  # (the cache's background fill, before the fixture removes the data)
    import torch

    assert torch.cat([b["id"] for b in batches]).tolist() == IDS.tolist() and batches[0]["id"].dtype == torch.int64
    assert sum((b["label"] for b in batches), []) == LABELS
    assert torch.equal(torch.cat([b["x"] for b in batches]), torch.from_numpy(X))


def test_appends_take_the_new_schema_only_and_time_travel_reads_the_old(any_url):
    altered(any_url)
    with pytest.raises(tg.SchemaMismatchError, match="lbl"):
        tg.write(any_url, old_rows(), mode="append")
    assert latest_version(any_url) == 2
    ds = tg.write(any_url, new_rows(), mode="append")
    assert (ds.version, ds.num_rows) == (3, 8)
    t = ds.to_arrow()
    assert t.column("id").to_pylist() == IDS.tolist() + [2**40, 7]
    assert t.column("label").to_pylist() == LABELS + ["g", "h"]
    assert t.column("score").to_pylist() == [None] * 6 + [0.5, 1.5]
    assert np.array_equal(t.column("x").combine_chunks().to_numpy_ndarray(), np.concatenate([X, X[:2] + 100]))
    # shards of both schemas in one scan: filter, projection, SQL
    assert ds.to_arrow(columns=["label"], filter=pc.field("score") > 1).column("label").to_pylist() == ["h"]
    got = ds.sql("SELECT label, score FROM ds WHERE id > 1 ORDER BY id").to_pandas()
    assert got["label"].tolist() == ["h", "e", "f", "g"] and got["score"].tolist()[0] == 1.5
    assert ds.sql("SELECT count(*) AS n, count(score) AS s FROM ds").to_pandas().values.tolist() == [[8, 2]]
    ds.verify()
    v1 = tg.open(any_url, version=1)
    assert v1.schema.names == ["id", "lbl", "x"] and v1.schema.field("id").type == pa.int32()
    assert v1.to_arrow().column("lbl").to_pylist() == LABELS
    assert v1.sql("SELECT max(id) AS m FROM ds").to_pandas()["m"].tolist() == [2**31 - 1]


def test_refused_changes_name_what_is_allowed_and_change_nothing(tmp_path):
    url = str(tmp_path / "d")
    ds = altered(url)
    manifests = sorted(os.listdir(tmp_path / "d" / "_tensorgrid"))
    refused = [
        (tg.SchemaMismatchError, dict(widen={"id": pa.int32()})),  # narrowing
        (tg.SchemaMismatchError, dict(widen={"id": "int64"})),  # no change
        (tg.SchemaMismatchError, dict(widen={"label": "int64"})),  # string -> int
        (tg.SchemaMismatchError, dict(widen={"id": "float64"})),  # int64 -> float64 rounds above 2**53
        (tg.SchemaMismatchError, dict(widen={"score": "float16"})),
        (tg.SchemaMismatchError, dict(widen={"x": pa.fixed_shape_tensor(pa.float64(), [2, 2])})),  # a tensor's dtype
        (tg.SchemaMismatchError, dict(add={"n": pa.field("n", pa.int64(), nullable=False)})),
        (tg.SchemaMismatchError, dict(add={"label": "string"})),  # exists
        (tg.SchemaMismatchError, dict(rename={"label": "id"})),  # to an existing name
        (tg.SchemaMismatchError, dict(rename={"label": "y", "score": "y"})),
        (tg.SchemaMismatchError, dict(rename={"label": "y"}, add={"y": "int8"})),
        (tg.SchemaMismatchError, dict(add={"ok": "int8"}, widen={"label": "int64"})),  # all or nothing
        (tg.ColumnNotFoundError, dict(widen={"lbl": "int64"})),  # the old name is gone
        (tg.ColumnNotFoundError, dict(rename={"nope": "y"})),
        (tg.ArgumentError, dict(add={"y": "flot32"})),
        (tg.ArgumentError, dict(add={"y": pa.null()})),
        (tg.ArgumentError, dict()),
        (tg.ArgumentError, dict(add=["y"])),
        (tg.ArgumentError, dict(rename={"label": ""})),
    ]
    for error, change in refused:
        with pytest.raises(error) as e:
            ds.alter(**change)
        if error is tg.SchemaMismatchError:
            assert "allowed: add a nullable column" in str(e.value), e.value
    assert sorted(os.listdir(tmp_path / "d" / "_tensorgrid")) == manifests
    assert tg.open(url).schema == ds.schema and tg.open(url).version == 2


NUMERIC = [pa.int8(), pa.int16(), pa.int32(), pa.int64(), pa.uint8(), pa.uint16(), pa.uint32(), pa.uint64(),
           pa.float16(), pa.float32(), pa.float64()]


def _extremes(t: pa.DataType) -> pa.Array:
    if pa.types.is_integer(t):
        info = np.iinfo(t.to_pandas_dtype())
        return pa.array(np.array([info.min, info.min + 1, 0, info.max - 1, info.max], dtype=info.dtype), t)
    info = np.finfo(t.to_pandas_dtype())
    return pa.array(np.array([info.min, -info.tiny, info.smallest_subnormal, info.max, np.inf], dtype=info.dtype), t)


@pytest.mark.parametrize("old", NUMERIC, ids=str)
def test_every_allowed_widening_keeps_every_value_exactly(old):
    """The rule (``widens``) against the casts themselves: a widening allowed reads each extreme value back
    as the same number; the integer pairs it refuses really do lose values."""
    values = _extremes(old)
    for new in NUMERIC:
        if evolution.widens(old, new):
            wide = values.cast(new)
            assert wide.cast(old).equals(values), (old, new)
            assert [float(v) for v in wide.to_pylist()] == [float(v) for v in values.to_pylist()], (old, new)
        elif old != new:  # refused: some extreme value does not survive (or the cast does not exist)
            try:
                lossless = values.cast(new).cast(old).equals(values)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                lossless = False
            assert not lossless, (old, new)


FILTERS = [pc.field("id") > 2, (pc.field("id") >= 0) & (pc.field("label") != "c"), pc.field("label") == "b",
           ~pc.field("label").isin(["a"]), pc.field("label").isin(["a", None]), pc.field("label").is_null(),
           pc.field("score").is_null(), pc.field("score") > 0, pc.utf8_length(pc.field("label")) > 0,
           pc.starts_with(pc.field("label"), "a") | (pc.field("id") == 2**31 - 1)]


def test_a_filter_on_older_shards_selects_what_it_selects_on_the_rows_read_whole(tmp_path):
    """Filters on renamed, widened and added columns are pushed into older shards with positional column
    references (or applied after the read when that would change them: ``is_in`` with nulls): either way the
    rows are those the filter selects from the version's rows read in full."""
    url = str(tmp_path / "d")
    tg.write(url, old_rows().assign(lbl=["a", None, "c", "b", "a", None]), shard_rows=4)
    ds = tg.open(url).alter(add={"score": "float32"}, widen={"id": "int64"}, rename={"lbl": "label"})
    full = ds.to_arrow()
    for expr in FILTERS:
        assert ds.to_arrow(filter=expr).equals(full.filter(expr)), expr
        assert ds.to_arrow(columns=["label"], filter=expr).equals(full.filter(expr).select(["label"])), expr


def test_a_renamed_column_and_a_new_column_of_its_old_name_are_told_apart(mem_url):
    tg.write(mem_url, pd.DataFrame({"a": [1, 2, 3], "k": ["x", "y", "z"]}))
    tg.open(mem_url).alter(rename={"a": "b"})
    ds = tg.open(mem_url).alter(add={"a": pa.float64()})
    ds = tg.write(mem_url, pd.DataFrame({"a": [9.5], "k": ["w"], "b": [4]})[["b", "k", "a"]], mode="append")
    t = ds.to_arrow()
    assert t.column_names == ["b", "k", "a"]
    assert t.column("b").to_pylist() == [1, 2, 3, 4] and t.column("a").to_pylist() == [None, None, None, 9.5]
    assert ds.to_arrow(columns=["a"], filter=pc.field("b") >= 2).column("a").to_pylist() == [None, None, 9.5]
    got = ds.sql("SELECT b, a FROM ds ORDER BY b").to_pandas()
    assert got["b"].tolist() == [1, 2, 3, 4] and got["a"].isna().tolist() == [True, True, True, False]
    assert [r.to_pylist() for r in (ds.read_rows(0, 1, 3, ["a", "b"]).columns)] == [[None, None], [2, 3]]


def test_a_dataset_of_the_same_columns_without_history_is_never_taken_for_an_altered_one(tmp_path):
    """Schemas that differ only in metadata (the history, a tensor's dtype) are equal to pyarrow's ``==``:
    what is kept per schema must not be shared between them."""
    plain = tg.write(str(tmp_path / "plain"), pd.DataFrame({"b": [7, 8]}))
    assert plain.to_arrow().column("b").to_pylist() == [7, 8] and plain.verify()
    tg.write(str(tmp_path / "alt"), pd.DataFrame({"a": [1, 2]}))
    ds = tg.open(str(tmp_path / "alt")).alter(rename={"a": "b"})
    assert ds.schema.equals(plain.schema) and ds.altered and not plain.altered
    assert ds.to_arrow().column("b").to_pylist() == [1, 2] and ds.verify()["rows"] == 2
    assert ds.sql("SELECT sum(b) AS s FROM ds").to_pandas()["s"].tolist() == [3]
    assert plain.to_arrow().column("b").to_pylist() == [7, 8]


def test_an_added_tensor_column_reads_as_nulls_in_older_shards(tmp_path):
    url = str(tmp_path / "d")
    tg.write(url, pd.DataFrame({"id": [0, 1]}))
    ds = tg.open(url).alter(add={"emb": pa.fixed_shape_tensor(pa.float32(), [3])})
    ds = tg.write(url, pd.DataFrame({"id": [2], "emb": [np.float32([1, 2, 3])]}), mode="append")
    t = ds.to_arrow()
    assert t.schema.field("emb").type == pa.fixed_shape_tensor(pa.float32(), [3])
    assert t.column("emb").null_count == 2
    df = ds.to_pandas()
    assert df["emb"][0] is None and df["emb"][2].tolist() == [1, 2, 3]
    assert ds.sql("SELECT count(emb) AS n FROM ds").to_pandas()["n"].tolist() == [1]


def test_the_loader_cache_never_serves_a_shard_decoded_under_the_old_schema(tmp_path):
    import torch

    url, cache = str(tmp_path / "d"), str(tmp_path / "cache")
    tg.write(url, old_rows(), shard_rows=3)
    for _ in range(2):  # the cache filled, then served
        loader = tg.open(url).to_torch(batch_size=6, cache_dir=cache)
        assert [sorted(b) for b in loader] == [["id", "lbl", "x"]]
        assert loader.source.wait_filled(60)
    assert loader.source.cache_dir is not None
    ds = tg.open(url).alter(add={"score": "float32"}, widen={"id": "int64"}, rename={"lbl": "label"})
    for _ in range(2):
        loader = ds.to_torch(batch_size=6, cache_dir=cache)
        (batch,) = list(loader)
        assert sorted(batch) == ["id", "label", "score", "x"] and batch["label"] == LABELS
        assert batch["id"].dtype == torch.int64 and batch["id"].tolist() == IDS.tolist()
        assert batch["score"] == [None] * 6
        assert loader.source.wait_filled(60)
    assert loader.source.cache_dir is not None  # the second epoch came from the new version's own cache files
    (batch,) = list(tg.open(url, version=1).to_torch(batch_size=6, cache_dir=cache))  # and the old version's
    assert sorted(batch) == ["id", "lbl", "x"] and batch["id"].dtype == torch.int32


def test_spark_reads_an_altered_version_through_its_schema(spark, tmp_path):
    url = str(tmp_path / "d")
    altered(url)
    ds = tg.write(url, new_rows(), mode="append")
    rows = sorted(ds.to_spark(spark).select("id", "label", "score").collect())
    assert [tuple(r) for r in rows] == sorted([(int(i), lbl, None) for i, lbl in zip(IDS, LABELS)] +
                                              [(2**40, "g", 0.5), (7, "h", 1.5)])


# --- races -------------------------------------------------------------------------------------------------
def test_an_append_that_loses_to_an_alter_is_refused_on_retry_and_no_row_is_lost(tmp_path, monkeypatch):
    url = str(tmp_path / "d")
    tg.write(url, old_rows())

    def alter_first(fs, root, version):
        monkeypatch.setattr(writer, "_before_commit", None)
        tg.open(url).alter(rename={"lbl": "label"})  # takes the version the append wanted

    monkeypatch.setattr(writer, "_before_commit", alter_first)
    with pytest.raises(tg.ConflictError) as e:
        tg.write(url, old_rows(), mode="append")
    with pytest.raises(tg.SchemaMismatchError, match="lbl"):
        e.value.retry()
    ds = tg.open(url)
    assert (ds.version, ds.to_arrow().column("label").to_pylist()) == (2, LABELS)
    ds = tg.write(url, old_rows().rename(columns={"lbl": "label"}), mode="append")  # written again, new schema
    assert ds.to_arrow().column("label").to_pylist() == LABELS * 2


def test_an_alter_that_loses_to_an_append_is_rebased_onto_it(tmp_path, monkeypatch):
    url = str(tmp_path / "d")
    tg.write(url, old_rows())
    seen = []

    def append_first(fs, root, version):
        seen.append(version)
        if len(seen) == 1:
            tg.write(url, old_rows().iloc[:2], mode="append")  # commits the version the alter wanted

    monkeypatch.setattr(evolution, "_before_commit", append_first)
    ds = tg.open(url).alter(rename={"lbl": "label"}, widen={"id": "int64"})
    assert seen == [2, 3] and ds.version == 3
    assert ds.to_arrow().column("label").to_pylist() == LABELS + ["a", "b"]  # the append's rows, renamed
    assert [v.operation for v in ds.versions()] == ["create", "append", "alter"]
    now = old_rows().rename(columns={"lbl": "label"}).astype({"id": "int64"})
    monkeypatch.setattr(evolution, "_before_commit", lambda fs, root, v: tg.write(url, now, mode="append"))
    with pytest.raises(tg.ConflictError, match="not 3|first"):
        ds.alter(add={"z": "int8"}, expect_version=3)  # a compare-and-swap does not rebase
    assert "z" not in tg.open(url).schema.names


def test_alters_racing_appends_in_threads_lose_no_committed_row(tmp_path):
    """Two threads append 12 times each (a lost race retried; once the schema changed under them, written
    again in the new one) while a third renames and widens: every append that returned is there once."""
    url = str(tmp_path / "d")
    tg.write(url, pd.DataFrame({"id": np.array([-1], np.int32), "v": ["seed"]}))
    done, errors = [], []

    def appender(k: int):
        for i in range(12):
            n = k * 100 + i
            for _ in range(100):
                schema = tg.open(url).schema  # the latest: its names and types
                row = pa.table({f.name: pa.array([n if f.name == "id" else str(n) if f.name in ("v", "value") else None],
                                                 f.type) for f in schema})
                try:
                    try:
                        tg.write(url, row, mode="append")
                    except tg.ConflictError as e:
                        e.retry()
                    done.append(n)
                    break
                except (tg.ConflictError, tg.SchemaMismatchError):
                    continue  # nothing of it was committed: write it again
            else:
                raise AssertionError(f"row {n} never committed")

    def alterer():
        for change in (dict(rename={"v": "value"}), dict(widen={"id": "int64"}), dict(add={"w": "float64"})):
            time.sleep(0.05)
            tg.open(url).alter(**change)

    def run(fn, *args):
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(appender, k)) for k in (1, 2)] + \
        [threading.Thread(target=run, args=(alterer,))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    ds = tg.open(url)
    assert ds.schema.names == ["id", "value", "w"] and ds.schema.field("id").type == pa.int64()
    t = ds.to_arrow()
    assert sorted(t.column("id").to_pylist()) == sorted([-1] + done) and len(done) == 24
    assert sorted(t.column("value").to_pylist()) == sorted(["seed"] + [str(n) for n in done])
    assert ds.sql("SELECT count(*) AS n FROM ds WHERE value = CAST(id AS VARCHAR)").to_pandas()["n"].tolist() == [24]
    ds.verify()


KILLED_ALTER = textwrap.dedent("""
    import sys, tensorgrid as tg
    url = sys.argv[1]
    for i in range(100_000):
        ds = tg.open(url)
        ds.alter(add={f"c{i}": "int64"}) if i % 2 == 0 else ds.alter(rename={f"c{i - 1}": f"r{i - 1}"})
""")


def test_a_process_killed_while_altering_in_a_loop_leaves_a_readable_dataset(tmp_path):
    url = str(tmp_path / "d")
    tg.write(url, old_rows(), shard_rows=3)
    proc = subprocess.Popen([sys.executable, "-c", KILLED_ALTER, url])
    try:
        deadline = time.time() + 60
        while latest_version(url) < 12 and time.time() < deadline:
            time.sleep(0.02)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    ds = tg.open(url)
    assert ds.version >= 12 and ds.schema.names[:3] == ["id", "lbl", "x"]
    assert all(n.startswith(("c", "r")) for n in ds.schema.names[3:])
    assert ds.to_arrow().column("lbl").to_pylist() == LABELS and ds.verify()["rows"] == 6
    assert ds.sql("SELECT count(*) AS n FROM ds").to_pandas()["n"].tolist() == [6]
    for v in range(1, ds.version + 1):  # every version on the way reads
        assert tg.open(url, version=v).to_arrow().num_rows == 6
    assert tg.open(url).alter(rename={"lbl": "label"}).to_arrow().column("label").to_pylist() == LABELS


# --- damage the lineage must still catch --------------------------------------------------------------------
def _forge(url: str, table: pa.Table) -> None:
    """The latest manifest edited consistently (its checksum recomputed) to list, instead of its last shard,
    a shard written from ``table`` into data/: a manifest that gives another dataset's bytes to this one."""
    fs, root = tgfs.resolve(url)
    m = manifest.load(fs, root)
    rel = f"data/part-{'f' * 12}-00000.parquet"
    info = writer.write_part(fs, tgfs.join(root, rel), table)
    shard = manifest.Shard(rel, info["rows"], info["bytes"], info["checksum"], info["row_group_rows"])
    forged = Manifest(m.version, m.operation, m.schema, m.shards[:-1] + [shard], m.added_rows, m.timestamp)
    fs.pipe_file(manifest.manifest_path(root, m.version), forged.to_json())


TENSOR = encoding.numpy_to_tensor(X[:1])  # as tg.write makes them (no permutation)


@pytest.mark.parametrize("columns", [
    {"id": pa.array([1], pa.int32()), "label": ["a"], "x": TENSOR},  # the new name in the old type
    {"id": pa.array([1], pa.int64()), "lbl": ["a"], "x": TENSOR},  # the old name in the new type
    {"id": pa.array([1], pa.int32()), "lbl": ["a"]},  # a column short
    {"id": pa.array([1], pa.int64()), "label": ["a"], "x": TENSOR, "score": pa.array([1.0], pa.float64())},
    {"lbl": ["a"], "id": pa.array([1], pa.int32()), "x": TENSOR},  # another order
], ids=["new-name-old-type", "old-name-new-type", "missing-column", "added-column-type", "order"])
def test_a_shard_whose_footer_matches_no_schema_of_the_lineage_is_named_as_damage(mem_url, columns):
    altered(mem_url)
    _forge(mem_url, pa.table(columns))
    ds = tg.open(mem_url)
    for read in (lambda: ds.to_arrow(), lambda: ds.read_rows(1, 0, 1), lambda: ds.sql("SELECT * FROM ds"),
                 lambda: ds.to_arrow(filter=pc.field("id") > 0)):
        with pytest.raises(tg.CorruptManifestError, match="another schema"):
            read()
    with pytest.raises(tg.CorruptShardError, match="(?s)1 of 2 shards .* another schema"):  # verify lists the bad ones
        ds.verify()


def test_a_shard_of_an_earlier_schema_still_checks_its_bytes_and_tensor_type(mem_url):
    altered(mem_url)
    fs = fsspec.filesystem("memory")
    _, root = tgfs.resolve(mem_url)
    # a shard of the first schema but a tensor of another shape: matches no schema of the lineage
    x = encoding.numpy_to_tensor(np.zeros((1, 4), np.float32))
    _forge(mem_url, pa.table({"id": pa.array([1], pa.int32()), "lbl": ["a"], "x": x}))
    with pytest.raises(tg.CorruptManifestError, match="another schema"):
        tg.open(mem_url).to_arrow()
    # a shard of the first schema whose bytes changed: named by its checksum
    _forge(mem_url, pa.table({"id": pa.array([1], pa.int32()), "lbl": ["a"], "x": TENSOR}))
    assert tg.open(mem_url).to_arrow().column("label").to_pylist() == LABELS[:3] + ["a"]  # a genuine one reads
    path = tgfs.join(root, f"data/part-{'f' * 12}-00000.parquet")
    data = bytearray(fs.cat_file(path))
    data[10] ^= 0xFF
    fs.pipe_file(path, bytes(data))
    with pytest.raises(tg.CorruptShardError, match="checksum"):
        tg.open(mem_url).verify()


def test_a_history_edited_into_nonsense_is_named_as_a_corrupt_manifest(mem_url):
    altered(mem_url)
    fs, root = tgfs.resolve(mem_url)
    m = manifest.load(fs, root)
    for bad in (b"[{", b'[{"before": "x", "name": "lbl"}]', b'[{"before": 2, "name": "lbl", "type": "no-such"}]',
                b'[{"before": 2, "name": 5}]', b'{"before": 2}'):
        i = m.schema.get_field_index("label")
        field = m.schema.field(i)
        schema = m.schema.set(i, field.with_metadata({**field.metadata, evolution.HISTORY_KEY: bad}))
        edited = Manifest(m.version, m.operation, schema, m.shards, m.added_rows, m.timestamp)
        fs.pipe_file(manifest.manifest_path(root, m.version), edited.to_json())
        with pytest.raises(tg.CorruptManifestError, match="history of column 'label'"):
            tg.open(mem_url).to_arrow()


# --- the command -------------------------------------------------------------------------------------------
def test_cli_alter_changes_the_schema_and_each_mistake_is_one_error_line(tmp_path, capsys):
    from tensorgrid.cli import main

    url = str(tmp_path / "d")
    tg.write(url, old_rows())
    assert main(["alter", url, "--add", "score:float32", "--widen", "id:int64", "--rename", "lbl:label",
                 "--add", "note:string"]) == 0
    out = capsys.readouterr().out
    assert "version 2" in out and "rename lbl:label" in out and "score" in out
    ds = tg.open(url)
    assert ds.schema.names == ["id", "label", "x", "score", "note"] and ds.schema.field("score").type == pa.float32()
    for argv in (["--add", "y:flot32"], ["--add", "y"], ["--rename", "label:id"], ["--widen", "nope:int64"],
                 ["--widen", "label:int64"], [], ["--add", "y:int8", "--add", "y:int16"]):
        assert main(["alter", url, *argv]) == 1, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and "internal error" not in err[0], (argv, err)
    assert main(["alter", str(tmp_path / "missing"), "--add", "y:int8"]) == 1
    assert capsys.readouterr().err.startswith("error: ")
    assert tg.open(url).version == 2


def test_counting_rows_through_a_filter_on_shards_from_before_an_alter(tmp_path):
    """No column asked for, a filter: the count of matching rows (pyarrow drops the length of a table of no
    columns in from_arrays and replace_schema_metadata)."""
    import pyarrow.compute as pc

    ds = tg.write(str(tmp_path / "c"), pa.table({"a": pa.array([1, 2, 3], pa.int32())}))
    new = ds.alter(widen={"a": "int64"})
    for f in (pc.field("a") > 1, pc.field("a").isin([2, 3])):
        assert new.to_arrow(columns=[], filter=f).num_rows == ds.to_arrow(columns=[], filter=f).num_rows == 2
