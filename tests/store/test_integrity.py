"""Checksums: flipped, truncated or missing shard bytes are caught on read and by verify()."""

import os

import fsspec
import numpy as np
import pyarrow as pa
import pytest

import tensorgrid as tg


def _flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


@pytest.fixture
def three_shards(tmp_path):
    url = str(tmp_path / "c")
    t = pa.table({"a": np.arange(3000), "x": pa.FixedShapeTensorArray.from_numpy_ndarray(
        np.arange(3000 * 16, dtype=np.float32).reshape(3000, 4, 4))})
    ds = tg.write(url, t, shard_rows=1000)
    assert ds.num_shards == 3
    return url, ds.shard_urls()


def test_flipped_byte_in_data_is_caught_on_read(three_shards):
    url, shards = three_shards
    _flip(shards[1], os.path.getsize(shards[1]) // 2)
    ds = tg.open(url)
    ds.read_shard(0)  # untouched shards still read
    with pytest.raises(tg.CorruptShardError, match=os.path.basename(shards[1])) as e:
        ds.to_arrow()
    assert e.value.shards == [shards[1]]


def test_verify_lists_every_bad_shard(three_shards):
    url, shards = three_shards
    _flip(shards[0], 100)
    with open(shards[2], "r+b") as f:  # truncated
        f.truncate(os.path.getsize(shards[2]) - 10)
    with pytest.raises(tg.CorruptShardError) as e:
        tg.open(url).verify()
    assert sorted(e.value.shards) == sorted([shards[0], shards[2]])
    msg = str(e.value)
    assert "2 of 3 shards" in msg and "checksum" in msg and "bytes" in msg


def test_missing_shard_is_named(three_shards):
    url, shards = three_shards
    os.remove(shards[1])
    with pytest.raises(tg.CorruptShardError, match="missing"):
        tg.open(url).to_arrow()


def test_same_size_rewrite_caught_even_after_a_verified_read(three_shards):
    """Verification is cached per process by (size, mtime): a rewrite of the bytes is still caught."""
    url, shards = three_shards
    ds = tg.open(url)
    ds.to_arrow()
    _flip(shards[0], 50)
    st = os.stat(shards[0])
    os.utime(shards[0], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    with pytest.raises(tg.CorruptShardError):
        ds.read_shard(0)


def test_corrupt_shard_on_memory_fs(mem_url):
    ds = tg.write(mem_url, pa.table({"a": np.arange(100)}))
    fs = fsspec.filesystem("memory")
    path = ds.shard_urls()[0].replace("memory://", "")
    data = bytearray(fs.cat_file(path))
    data[len(data) // 2] ^= 0x01
    fs.pipe_file(path, bytes(data))
    with pytest.raises(tg.CorruptShardError, match="checksum"):
        tg.open(mem_url).to_arrow()
    with pytest.raises(tg.CorruptShardError):
        tg.open(mem_url).verify()


def test_corrupt_manifest_is_a_clear_error(tmp_path):
    url = str(tmp_path / "cm")
    tg.write(url, pa.table({"a": [1]}))
    (tmp_path / "cm" / "_tensorgrid" / "v0000000001.json").write_text("{not json")
    with pytest.raises(tg.CorruptShardError, match="manifest"):
        tg.open(url)
