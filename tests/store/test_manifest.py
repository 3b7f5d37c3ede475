"""The manifest's own integrity: a checksum over its content, a strict validator, shards' footers checked
against it, format versions. Any edit yields the same rows or a named error, never other data."""

import base64
import copy
import json
import random

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tensorgrid as tg
from tensorgrid.store import manifest


def _latest(path):
    return sorted((path / "_tensorgrid").glob("v*.json"))[-1]


def _rewrite(path, body: dict, rechecksum: bool = True) -> None:
    if rechecksum and "checksum" in body:
        body["checksum"] = manifest._content_checksum(body)
    path.write_text(json.dumps(body, indent=1))


@pytest.fixture
def three_versions(tmp_path):
    """create (2 shards) + append (1 shard) + append (2 shards): 5 shards from 3 writes."""
    url = tmp_path / "d"
    tg.write(str(url), pa.table({"a": np.arange(0, 40), "s": [f"r{i}" for i in range(40)]}), shard_rows=20)
    tg.write(str(url), pa.table({"a": np.arange(40, 50), "s": [f"r{i}" for i in range(40, 50)]}), mode="append")
    tg.write(str(url), pa.table({"a": np.arange(50, 90), "s": [f"r{i}" for i in range(50, 90)]}), mode="append",
             shard_rows=20)
    return url, tg.open(str(url)).to_arrow()


def test_an_edit_that_keeps_valid_json_is_caught_by_the_checksum(three_versions):
    url, _ = three_versions
    path = _latest(url)
    body = json.loads(path.read_text())
    body["shards"][0][1] -= 1
    body["num_rows"] -= 1
    _rewrite(path, body, rechecksum=False)
    with pytest.raises(tg.CorruptShardError, match="checksum does not match") as e:
        tg.open(str(url))
    assert str(path) in e.value.shards
    assert isinstance(e.value, tg.errors.CorruptManifestError)


@pytest.mark.parametrize("edit, message", [
    (lambda b: b["shards"][0].__setitem__(0, "../other/data/part-0123456789ab-00000.parquet"), "not a shard of"),
    (lambda b: b["shards"][0].__setitem__(0, "/etc/passwd"), "not a shard of"),
    (lambda b: b["shards"].append(list(b["shards"][0])), "listed twice"),
    (lambda b: b["shards"].pop(1), "not the sum"),
    (lambda b: b.__setitem__("version", 2), "is the file of version 3"),
    (lambda b: b["shards"][0].__setitem__(1, -5), "rows must be an int >= 0"),
    (lambda b: b.__setitem__("num_rows", 10**18), "not the sum"),
    (lambda b: b["shards"][0].__setitem__(1, "20"), "rows must be an int"),
    (lambda b: b.__setitem__("operation", "upsert"), "unknown operation"),
    (lambda b: b.__setitem__("added_rows", 10**6), "added_rows"),
    (lambda b: b["shards"].insert(0, b["shards"].pop(1)), "out of its write's order"),
    (lambda b: b.__setitem__("shards", {"a": 1}), "shards must be a list"),
    (lambda b: b.pop("schema"), "missing or unexpected"),
])
def test_validator_names_each_inconsistency_even_when_rechecksummed(three_versions, edit, message):
    url, _ = three_versions
    path = _latest(url)
    body = json.loads(path.read_text())
    edit(body)
    _rewrite(path, body)
    with pytest.raises(tg.errors.CorruptManifestError, match=message):
        tg.open(str(url)).to_arrow()


def test_consistent_forgeries_are_caught_by_the_shards_own_footers(three_versions):
    """Rows and num_rows lowered together, or the schema swapped for another valid one: the manifest
    validates, but the shard's footer disagrees on first read."""
    url, _ = three_versions
    path = _latest(url)
    original = json.loads(path.read_text())
    body = copy.deepcopy(original)
    body["shards"][0][1] -= 1
    body["shards"][0][4] -= 1
    body["num_rows"] -= 1
    _rewrite(path, body)
    ds = tg.open(str(url))
    with pytest.raises(tg.errors.CorruptManifestError, match="holds 19 rows; the shard holds 20"):
        ds.to_arrow()
    with pytest.raises(tg.errors.CorruptManifestError):
        list(ds.to_torch(batch_size=16))
    with pytest.raises(tg.CorruptShardError):
        ds.verify()
    body = copy.deepcopy(original)
    for new_type in (pa.int32(), pa.string()):
        schema = pa.schema([pa.field("a", new_type), pa.field("s", pa.string())])
        body["schema"] = base64.b64encode(schema.serialize().to_pybytes()).decode()
        _rewrite(path, body)
        with pytest.raises(tg.errors.CorruptManifestError, match="another schema"):
            tg.open(str(url)).to_arrow()


def test_a_shard_verified_under_the_true_manifest_is_rechecked_under_a_forged_one(three_versions):
    url, _ = three_versions
    ds = tg.open(str(url))
    assert len(list(ds.to_torch(batch_size=16))) == 6  # every shard verified (once per process)
    path = _latest(url)
    body = json.loads(path.read_text())
    body["shards"][0][1] -= 1
    body["shards"][0][4] -= 1
    body["num_rows"] -= 1
    _rewrite(path, body)
    with pytest.raises(tg.errors.CorruptManifestError):
        list(tg.open(str(url)).to_torch(batch_size=16))


def _mutations(body: dict, draw) -> dict:
    b = copy.deepcopy(body)
    kind = draw(st.sampled_from(["drop_key", "type", "int", "shard_field", "shard_list", "schema", "string"]))
    keys = sorted(k for k in b if k != "checksum")
    if kind == "drop_key":
        b.pop(draw(st.sampled_from(keys)))
    elif kind == "type":
        b[draw(st.sampled_from(keys))] = draw(st.sampled_from([None, [], {}, "x", 1.5, True, -1, 10**30]))
    elif kind == "int":
        key = draw(st.sampled_from(["version", "num_rows", "added_rows"]))
        b[key] = b[key] + draw(st.integers(-3, 3))
    elif kind == "shard_field":
        entry = b["shards"][draw(st.integers(0, len(b["shards"]) - 1))]
        i = draw(st.integers(0, 4))
        if i == 0:
            entry[0] = draw(st.sampled_from([s[0] for s in b["shards"]] + [
                "data/../../x/data/part-000000000000-00000.parquet", "data/part-000000000000-00000.parquet", ""]))
        elif i == 3:
            entry[3] = draw(st.sampled_from([s[3] for s in b["shards"]] + ["xxh3_64:0000000000000000", "crc:1"]))
        else:
            entry[i] = entry[i] + draw(st.integers(-2, 2)) if draw(st.booleans()) else draw(
                st.sampled_from([None, "1", -1, 2**70]))
    elif kind == "shard_list":
        n = len(b["shards"])
        op = draw(st.sampled_from(["drop", "dup", "swap", "empty"]))
        i, j = draw(st.integers(0, n - 1)), draw(st.integers(0, n - 1))
        if op == "drop":
            b["shards"].pop(i)
        elif op == "dup":
            b["shards"].insert(j, list(b["shards"][i]))
        elif op == "swap":
            b["shards"][i], b["shards"][j] = b["shards"][j], b["shards"][i]
        else:
            b["shards"] = []
    elif kind == "schema":
        schema = draw(st.sampled_from([
            pa.schema([("a", pa.int32()), ("s", pa.string())]), pa.schema([("s", pa.string()), ("a", pa.int64())]),
            pa.schema([("a", pa.int64())]), pa.schema([("a", pa.int64()), ("s", pa.large_string())]),
            pa.schema([("a", pa.float64()), ("s", pa.string())])]))
        b["schema"] = base64.b64encode(schema.serialize().to_pybytes()).decode()
    else:
        key = draw(st.sampled_from(["timestamp", "operation", "format", "schema"]))
        b[key] = draw(st.sampled_from(["", "create", "append", "tensorgrid/1", "tensorgrid/3", "not base64!",
                                       "2026-13-45T99:00:00"]))
    return b


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), rechecksum=st.booleans())
def test_any_manifest_mutation_gives_the_same_rows_or_a_named_error(three_versions, data, rechecksum):
    url, expected = three_versions
    path = _latest(url)
    original = path.read_bytes()
    try:
        body = _mutations(json.loads(original), data.draw)
        _rewrite(path, body, rechecksum)
        try:
            ds = tg.open(str(url))
            got = ds.to_arrow()
            loaded = pa.Table.from_pylist([{"a": int(a)} for b in ds.to_torch(batch_size=32) for a in b["a"]])
        except tg.TensorGridError:
            return
        key = [("a", "ascending")]
        assert got.sort_by(key).equals(expected.sort_by(key))  # same rows (a swap of writes may reorder them)
        assert loaded.sort_by(key).column("a").to_pylist() == list(range(90))
    finally:
        path.write_bytes(original)


def test_random_byte_flips_in_a_manifest_are_named_errors(three_versions):
    url, expected = three_versions
    path = _latest(url)
    original = path.read_bytes()
    rng = random.Random(0)
    for _ in range(300):
        data = bytearray(original)
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(data))
        try:
            got = tg.open(str(url)).to_arrow()
        except tg.TensorGridError:
            continue
        assert got.equals(expected)  # a flip in JSON whitespace changes nothing
    path.write_bytes(original)


def test_legacy_v1_manifests_are_read_validated_and_upgraded_on_the_next_commit(tmp_path):
    url = tmp_path / "d"
    tg.write(str(url), pa.table({"a": [1, 2, 3]}))
    path = _latest(url)
    body = json.loads(path.read_text())
    body.pop("checksum")
    body["format"] = "tensorgrid/1"
    path.write_text(json.dumps(body, indent=1))  # as the previous release wrote it
    assert tg.open(str(url)).to_arrow().column("a").to_pylist() == [1, 2, 3]
    tg.write(str(url), pa.table({"a": [4]}), mode="append")
    new = json.loads(_latest(url).read_text())
    assert new["format"] == manifest.FORMAT and new["checksum"] == manifest._content_checksum(new)
    assert tg.open(str(url)).to_arrow().column("a").to_pylist() == [1, 2, 3, 4]
    body["shards"][0][0] = "../x/data/part-000000000000-00000.parquet"  # v1 is validated too
    path.write_text(json.dumps(body, indent=1))
    with pytest.raises(tg.errors.CorruptManifestError, match="not a shard of"):
        tg.open(str(url), version=1)


def test_a_manifest_from_a_newer_format_is_refused_by_name(tmp_path):
    url = tmp_path / "d"
    tg.write(str(url), pa.table({"a": [1]}))
    path = _latest(url)
    body = json.loads(path.read_text())
    body["format"] = "tensorgrid/3"
    _rewrite(path, body)
    with pytest.raises(tg.UnsupportedFormatError, match="newer TensorGrid.*upgrade"):
        tg.open(str(url))


def test_a_listed_manifest_that_cannot_be_read_is_corrupt_not_missing(tmp_path):
    """A dangling link or a folder where the latest manifest should be: never taken for "no version" (a
    write would then conflict forever or think the dataset new)."""
    url = tmp_path / "d"
    tg.write(str(url), pa.table({"a": [1]}))
    tg.write(str(url), pa.table({"a": [2]}), mode="append")
    path = _latest(url)
    path.unlink()
    path.symlink_to(tmp_path / "nowhere.json")
    for action in (lambda: tg.open(str(url)), lambda: tg.write(str(url), pa.table({"a": [3]}), mode="append")):
        with pytest.raises(tg.errors.CorruptManifestError, match="cannot be read"):
            action()
    path.unlink()
    path.mkdir()
    with pytest.raises(tg.errors.CorruptManifestError):
        tg.open(str(url))
    (entry,) = tg.list_datasets(str(tmp_path))
    assert entry.version is None and "cannot be read" in entry.error
