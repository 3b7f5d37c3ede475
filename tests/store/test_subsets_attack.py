"""Hostile inputs to subsets and class names: a filter is one condition (never more SQL), column names
that SQL cannot tell apart, label_index columns that ingest_images did not write, appends that disagree
about the class names."""

import numpy as np
import pyarrow as pa
import pytest

import tensorgrid as tg
from tensorgrid.store.labels import with_names
from tensorgrid.store.memory import ArrowDataset


def _ids(ds) -> list[int]:
    return ds.to_arrow(columns=["id"]).column(0).to_pylist()


@pytest.mark.parametrize("text", [
    "1=0) UNION ALL SELECT 5 UNION ALL SELECT 5 --",  # would add row 5 twice
    "1=0) UNION ALL SELECT 99 --",  # a position past the end
    "id > 3) OR (true",
    "id > 3 ORDER BY id",
    "id > 3 LIMIT 1",
    "1=1; DROP TABLE shard",
])
def test_a_filter_is_one_condition_not_more_sql(text):
    ds = ArrowDataset(pa.table({"id": np.arange(10)}))
    with pytest.raises(tg.SQLError, match="filter"):
        ds.filter(text)


def test_a_filter_may_end_in_a_comment_and_take_a_subquery():
    ds = ArrowDataset(pa.table({"id": np.arange(10)}))
    assert _ids(ds.filter("id > 7 -- the tail")) == [8, 9]
    assert _ids(ds.filter("id IN (SELECT 2 UNION ALL SELECT 2)")) == [2]


def test_a_filter_over_a_column_named_like_its_row_counter_and_with_quotes():
    ds = ArrowDataset(pa.table({"id": [0, 1, 2], "__tensorgrid_row__": [7, 8, 9], 'a"b': [1, 2, 3]}))
    assert _ids(ds.filter('"__tensorgrid_row__" > 7')) == [1, 2]
    assert _ids(ds.filter('"a""b" > 1')) == [1, 2]
    import pyarrow.compute as pc

    assert _ids(ds.filter(pc.field("__tensorgrid_row__") > 7)) == [1, 2]


def test_sql_filter_refuses_columns_that_differ_only_in_case():
    ds = ArrowDataset(pa.table({"id": [1, 2, 3], "ID": [3, 2, 1]}))
    with pytest.raises(tg.SQLError, match="'id' and 'ID' differ only in case"):
        ds.filter('"ID" > 1')
    import pyarrow.compute as pc

    assert ds.filter(pc.field("ID") > 1).to_arrow().column("id").to_pylist() == [1, 2]  # the way out


@pytest.mark.parametrize("frame", [
    {"label": ["x"], "label_index": [10**12]},  # one huge index: no list of a trillion names
    {"label": ["x", "y"], "label_index": ["0", "1"]},
    {"label": ["x", "y"], "label_index": [0.0, 1.5]},
    {"label": ["x", "y"], "label_index": [0, 0]},  # one index, two labels: no mapping
])
def test_label_names_of_label_index_columns_not_from_ingest_are_none_not_a_crash(tmp_path, frame):
    import pandas as pd

    ds = tg.write(str(tmp_path / "d"), pd.DataFrame(frame))
    assert ds.label_names is None


def test_label_names_derived_from_rows_keep_gaps_and_a_tensor_index_has_none(tmp_path):
    ds = tg.write(str(tmp_path / "d"), pa.table({"label": ["a", "c", None], "label_index": [0, 2, None]}))
    assert ds.label_names == ["a", None, "c"]
    t = pa.table({"label": ["a"], "label_index": pa.FixedShapeTensorArray.from_numpy_ndarray(np.zeros((1, 2)))})
    assert tg.write(str(tmp_path / "t"), t).label_names is None


def _labelled(names, rows=2):
    t = pa.table({"label": [names[i % len(names)] for i in range(rows)],
                  "label_index": pa.array([i % len(names) for i in range(rows)], pa.int64())})
    field = with_names(t.schema.field("label_index"), names)
    return t.cast(pa.schema([t.schema.field("label"), field]))


def test_an_append_of_rows_that_know_fewer_classes_keeps_the_datasets_names(tmp_path):
    url = str(tmp_path / "d")
    tg.write(url, _labelled(["a", "b"]))
    tg.write(url, _labelled(["a", "b", "c"], rows=3), mode="append")
    old = tg.open(url, version=1).to_arrow()  # rows of version 1 carry its names [a, b]
    assert tg.write(url, old, mode="append").label_names == ["a", "b", "c"]
    assert tg.write(url, _labelled(["a", "b", "c", "d"], rows=4), mode="append").label_names == ["a", "b", "c", "d"]


def test_an_append_whose_class_names_disagree_is_refused(tmp_path):
    url = str(tmp_path / "d")
    tg.write(url, _labelled(["a", "b"]))
    with pytest.raises(tg.SchemaMismatchError, match=r"class names.*\['a', 'b'\].*\['zebra', 'yak'\]"):
        tg.write(url, _labelled(["zebra", "yak"]), mode="append")
    assert tg.open(url).label_names == ["a", "b"] and tg.open(url).version == 1


def test_two_ingests_that_add_different_classes_cannot_both_number_theirs_2(tmp_path):
    """Two appends that each read [a, b] and number their new class 2: the retry of the loser, rebased on
    the winner's version, would give 'd' the index of 'c' (and rename every 'c' row): refused instead."""
    url = str(tmp_path / "d")
    tg.write(url, _labelled(["a", "b"]))
    from tensorgrid.store import writer

    def rival(fs, root, version):  # the other append commits first
        writer._before_commit = None
        tg.write(url, _labelled(["a", "b", "c"], rows=3), mode="append")

    writer._before_commit = rival
    try:
        with pytest.raises(tg.ConflictError) as info:
            tg.write(url, _labelled(["a", "b", "d"], rows=3), mode="append")
    finally:
        writer._before_commit = None
    with pytest.raises(tg.SchemaMismatchError, match="class names"):
        info.value.retry()
    assert tg.open(url).label_names == ["a", "b", "c"]


def test_ingest_append_onto_labels_without_a_mapping_is_refused(tmp_path):
    from PIL import Image

    url = str(tmp_path / "d")
    tg.write(url, pa.table({"image": [b""], "path": ["p"], "label": ["x"], "label_index": pa.array([5], pa.int64()),
                            "width": pa.array([1], pa.int32()), "height": pa.array([1], pa.int32()),
                            "format": ["png"]}))
    tg.write(url, pa.table({"image": [b""], "path": ["q"], "label": ["y"], "label_index": pa.array([5], pa.int64()),
                            "width": pa.array([1], pa.int32()), "height": pa.array([1], pa.int32()),
                            "format": ["png"]}), mode="append")
    (tmp_path / "src" / "z").mkdir(parents=True)
    Image.new("RGB", (2, 2)).save(tmp_path / "src" / "z" / "1.png")
    with pytest.raises(tg.SchemaMismatchError, match="label_index"):
        tg.ingest_images(str(tmp_path / "src"), url, mode="append")
    assert tg.open(url).version == 2


def test_a_filter_cannot_read_files(tmp_path):
    """A subquery in a condition is still one expression: it must not reach the file system or the network."""
    secret = tmp_path / "secret.csv"
    secret.write_text("a\n1\n")
    ds = tg.from_arrow(pa.table({"x": [1, 2, 3]}))
    with pytest.raises(tg.SQLError, match="disabled|Permission"):
        _ = ds.filter(f"x = (SELECT max(a) FROM read_csv('{secret}'))").num_rows
