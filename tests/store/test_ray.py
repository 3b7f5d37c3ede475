"""The Ray Data bridge (tensorgrid/store/ray.py) on the session's three-node Ray cluster: Ray's tasks read
shards through the verified read and write blocks as shards; the driver commits once."""

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import tensorgrid as tg

ray = pytest.importorskip("ray", reason="ray is in the dev extras")


@pytest.fixture
def ordered(ray_cluster):
    """Ray keeps the dataset's order (its preserve_order option) while a test runs; no progress bars."""
    ctx = ray.data.DataContext.get_current()
    saved = ctx.execution_options.preserve_order, ctx.enable_progress_bars
    ctx.execution_options.preserve_order, ctx.enable_progress_bars = True, False
    yield ctx
    ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved


def _table(n: int = 100) -> pa.Table:
    images = (np.arange(n * 64) % 251).astype(np.uint8).reshape(n, 8, 8)
    return pa.table({"id": pa.array(range(n), pa.int64()), "label": pa.array([f"c{i % 3}" for i in range(n)]),
                     "image": pa.FixedShapeTensorArray.from_numpy_ndarray(images)})


def _left_over(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def test_to_ray_reads_each_shard_in_a_task_in_order_with_tensors_as_numpy_and_round_trips(ordered, tmp_path):
    table = _table()
    src = tg.write(str(tmp_path / "src"), table, shard_rows=25)
    rds = src.to_ray()
    batch = rds.take_batch(8)
    assert batch["image"].shape == (8, 8, 8) and batch["image"].dtype == np.uint8
    assert (batch["image"] == table.column("image").chunk(0).to_numpy_ndarray()[:8]).all()
    assert batch["id"].tolist() == list(range(8)) and batch["label"].tolist() == ["c0", "c1", "c2"] * 2 + ["c0", "c1"]
    done = rds.materialize()
    assert done.count() == 100 and done.num_blocks() == 4  # one block per shard
    assert "ReadTensorGrid" in done.stats()  # read by the datasource's tasks, not from this process
    assert [r["id"] for r in done.take_all()] == list(range(100))

    back = tg.write(str(tmp_path / "back"), src.to_ray())  # tensors and scalars come back equal
    assert back.to_arrow().equals(src.to_arrow()) and back.schema.equals(src.schema)
    assert isinstance(back.schema.field("image").type, pa.FixedShapeTensorType)

    only = src.to_ray(columns=["image"]).take_batch(3)
    assert list(only) == ["image"] and only["image"].shape == (3, 8, 8)
    with pytest.raises(tg.ColumnNotFoundError):
        src.to_ray(columns=["nope"])


def test_to_ray_of_foreign_files_and_of_datasets_only_this_process_reads(ordered, tmp_path):
    table = _table(30)
    (tmp_path / "pq").mkdir()
    for i in range(3):
        pq.write_table(table.select(["id", "label"]).slice(10 * i, 10), tmp_path / "pq" / f"{i}.parquet")
    foreign = tg.open(str(tmp_path / "pq")).to_ray()
    assert [r["id"] for r in foreign.take_all()] == list(range(30)) and "ReadTensorGrid" in foreign.stats()
    mem = tg.from_arrow(table).to_ray().take_batch(30)
    assert mem["id"].tolist() == list(range(30)) and mem["image"].shape == (30, 8, 8)
    train, test = tg.write(str(tmp_path / "d"), table, shard_rows=10).split([0.5, 0.5], seed=1)
    got = train.to_ray().take_all()
    assert [r["id"] for r in got] == train.to_pandas()["id"].tolist() and len(got) == 15
    assert got[0]["image"].shape == (8, 8)


def test_a_corrupt_shard_raises_corrupt_shard_error_through_to_ray(ordered, tmp_path):
    url = tmp_path / "d"
    ds = tg.write(str(url), _table(40), shard_rows=20)
    shard = ds.shard_urls()[1]
    data = bytearray(open(shard, "rb").read())
    data[len(data) // 3] ^= 0xFF  # same size: only the checksum tells
    open(shard, "wb").write(bytes(data))
    with pytest.raises(tg.CorruptShardError, match="checksum"):
        tg.open(str(url)).to_ray().take_all()


def _with_image(batch: dict) -> dict:
    ids = batch["id"]
    return {"id": ids, "image": np.stack([np.full((2, 3), i, np.float32) for i in ids]),
            "pid": np.full(len(ids), os.getpid())}


def test_a_ray_dataset_is_written_by_its_tasks_and_committed_once(ordered, tmp_path):
    url = tmp_path / "d"
    rds = ray.data.range(60, override_num_blocks=4).map_batches(_with_image)
    ds = tg.write(str(url), rds)
    assert ds.version == 1 and ds.num_shards == 4 and ds.shard_rows == [15] * 4  # a shard per block
    assert [n for n in os.listdir(url / "_tensorgrid") if n.endswith(".json")] == ["v0000000001.json"]  # one commit
    assert sorted(os.listdir(url / "data")) == sorted(os.path.basename(u) for u in ds.shard_urls())  # no staging
    ds.verify()
    got = ds.to_pandas()
    assert got["id"].tolist() == list(range(60))
    assert os.getpid() not in set(got["pid"])  # the blocks were made (and written) in Ray's workers
    tt = ds.schema.field("image").type
    assert isinstance(tt, pa.FixedShapeTensorType) and tt.shape == [2, 3] and tt.value_type == pa.float32()
    assert all((got["image"][i] == i).all() and got["image"][i].shape == (2, 3) for i in range(60))

    more = tg.write(str(url), ray.data.range(60, override_num_blocks=2).map_batches(_with_image), mode="append")
    assert more.version == 2 and more.num_rows == 120 and more.num_shards == 6
    assert more.to_pandas()["id"].tolist() == list(range(60)) * 2
    with pytest.raises(tg.SchemaMismatchError):
        tg.write(str(url), ray.data.range(3), mode="append")


def _boom(batch: dict) -> dict:
    if 37 in batch["id"]:
        raise ValueError("the block with row 37 is bad")
    return batch


def test_a_failing_task_leaves_no_version_and_no_files(ordered, tmp_path):
    bad = ray.data.range(60, override_num_blocks=4).map_batches(_boom)
    with pytest.raises(Exception, match="row 37 is bad"):
        tg.write(str(tmp_path / "new"), bad)
    assert not (tmp_path / "new").exists()  # a failed first write leaves no folder

    url = tmp_path / "old"
    tg.write(str(url), ray.data.range(10))
    before = _left_over(url)
    with pytest.raises(Exception, match="row 37 is bad"):
        tg.write(str(url), bad, mode="append")
    assert _left_over(url) == before and tg.open(str(url)).version == 1


def _null_tensors(batch: pa.Table) -> pa.Table:
    from ray.air.util.tensor_extensions.arrow import ArrowTensorTypeV2

    rows = pa.array([[1.0, 2.0] if i % 2 else None for i in range(batch.num_rows)], pa.large_list(pa.float32()))
    return pa.table({"id": batch["id"], "v": pa.ExtensionArray.from_storage(ArrowTensorTypeV2((2,), pa.float32()), rows)})


def test_a_tensorgrid_error_in_a_task_comes_back_as_itself(ordered, tmp_path):
    rds = ray.data.range(8, override_num_blocks=2).map_batches(_null_tensors, batch_format="pyarrow")
    with pytest.raises(tg.UnsupportedDataError, match="'v': a tensor column written from Ray cannot hold null rows"):
        tg.write(str(tmp_path / "d"), rds)
    assert not (tmp_path / "d").exists()


def test_empty_ray_datasets_and_what_cannot_be_stored_are_refused(ordered, tmp_path, mem_url, monkeypatch):
    with pytest.raises(tg.EmptyDataError):
        tg.write(str(tmp_path / "a"), ray.data.range(0))
    with pytest.raises(tg.EmptyDataError):
        tg.write(str(tmp_path / "b"), ray.data.range(10).filter(expr="id > 100"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    with pytest.raises(tg.UnsupportedURLError, match="memory://"):
        tg.write(mem_url, ray.data.range(3))
    ragged = ray.data.from_items([{"v": np.zeros(i + 1, np.float32)} for i in range(3)])
    with pytest.raises(tg.UnsupportedDataError, match="'v' holds tensors of varying shapes"):
        tg.write(str(tmp_path / "c"), ragged)
    assert not (tmp_path / "c").exists()
    nodes = ray.nodes()
    monkeypatch.setattr(ray, "nodes", lambda: nodes + [{"Alive": True, "NodeManagerAddress": "10.9.9.9"}])
    with pytest.raises(tg.TensorGridError, match="nodes on other machines"):  # a local path they cannot reach
        tg.write(str(tmp_path / "e"), ray.data.range(3))


def test_staging_a_killed_ray_driver_left_does_not_block_a_write_and_is_vacuumed(tmp_path):
    url = tmp_path / "d"
    left = url / "data" / ".ray-0123456789ab" / "data" / "part-aaaaaaaaaaaa-00000.parquet"
    left.parent.mkdir(parents=True)
    left.write_bytes(b"half a shard")
    tg.write(str(url), pa.table({"x": [1, 2]}))  # not taken for a folder of foreign files
    tg.vacuum(str(url), min_age_s=0)
    assert not left.parent.parent.exists() and tg.open(str(url)).to_pandas()["x"].tolist() == [1, 2]


def test_importing_tensorgrid_or_writing_other_data_does_not_import_ray(tmp_path):
    script = (f"import sys, json, pyarrow as pa, tensorgrid as tg; ds = tg.write({str(tmp_path / 'd')!r}, "
              "pa.table({'a': [1]})); ds.to_arrow(); print(json.dumps('ray' in sys.modules))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) is False
