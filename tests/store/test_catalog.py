"""tg.list_datasets: the datasets under a root, nested ones and broken ones included, nothing inside them."""

import pyarrow as pa
import pytest

import tensorgrid as tg


def test_lists_every_dataset_under_a_root_with_its_size(any_url):
    root = any_url
    tg.write(f"{root}/a", pa.table({"x": [1, 2, 3]}))
    tg.write(f"{root}/group/b", pa.table({"x": [1]}), shard_rows=1)
    tg.write(f"{root}/group/b", pa.table({"x": [2]}), mode="append")
    entries = tg.list_datasets(root)
    assert [e.url.rsplit("/", 2)[-2:] for e in entries] == [["ds", "a"], ["group", "b"]]
    a, b = entries
    assert (a.version, a.rows, a.shards, b.version, b.rows, b.shards) == (1, 3, 1, 2, 2, 2)
    assert a.bytes == tg.open(a.url).size_bytes > 0 and a.error is None
    assert [e.url for e in tg.list_datasets(f"{root}/a")] == [a.url]  # the root itself may be one


def test_a_broken_dataset_is_listed_with_its_error(tmp_path):
    tg.write(str(tmp_path / "ok"), pa.table({"x": [1]}))
    tg.write(str(tmp_path / "bad"), pa.table({"x": [1]}))
    (tmp_path / "bad" / "_tensorgrid" / "v0000000001.json").write_text("{}")
    bad, ok = tg.list_datasets(str(tmp_path))
    assert bad.version is None and "corrupt" in bad.error and ok.version == 1


def test_nothing_there_and_bad_depth_are_named_errors(tmp_path):
    with pytest.raises(tg.DatasetNotFoundError):
        tg.list_datasets(str(tmp_path / "nope"))
    with pytest.raises(tg.ArgumentError):
        tg.list_datasets(str(tmp_path), max_depth=-1)
    assert tg.list_datasets(str(tmp_path)) == []
