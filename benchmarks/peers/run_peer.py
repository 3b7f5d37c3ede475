"""Time one peer loader on one figure; runs inside that peer's venv (stdlib, numpy, torch, the peer).

    .venv-<peer>/bin/python benchmarks/peers/run_peer.py PEER FIGURE --data DIR [--workers N]

Writes the figure's source (datagen.py) with the peer's own writer into DIR/<peer>/<figure>/ once,
reads all its files once to warm the page cache and pulls 3 batches (imports, pools), then times
a full epoch (median of two when an epoch is under 30 s). Prints one JSON line; on failure the same line with "error" set, and exits 0.
PEER is hf, hf-map, hf-iterable, lance, petastorm, mosaic, webdataset, ray or files.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import sys
import time
import traceback
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import datagen  # noqa: E402  (ours, numpy only)

warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
BATCH = {"rows1mb": 16, "records100": 256, "mnist": 256, "jpeg64": 256}
SHUFFLE_BUFFER = 10_000  # for peers that shuffle approximately through a buffer
CHUNK_BYTES = 64 << 20  # rows per write call / row group / shard, by bytes
FILES_MAX = 200_000  # the files peer writes one file per sample, so it stops here


class Case:
    """What a reader needs: figure, source arrays, output dir, batch, shuffle, workers."""

    def __init__(self, figure: str, data: str, out: str, workers: int):
        self.figure, self.out, self.workers = figure, out, workers
        self.src = datagen.load(data, figure)
        self.meta = self.src["meta"]
        self.rows = self.meta["rows"]
        self.shape = tuple(self.meta["shape"])
        self.dtype = np.dtype(self.meta["dtype"])
        self.batch = BATCH[figure]
        self.shuffle = figure != "rows1mb"
        self.jpeg = figure == "jpeg64"
        self.row_bytes = int(np.prod(self.shape)) * self.dtype.itemsize
        self.note = ""

    def chunks(self):
        """(start, x chunk or list of jpeg bytes, labels) in ~64 MB pieces, in row order."""
        step = max(1, CHUNK_BYTES // (self.row_bytes if not self.jpeg else 8192))
        for i in range(0, self.rows, step):
            j = min(i + step, self.rows)
            yield i, self.x(i, j), np.asarray(self.src["label"][i:j])

    def x(self, i: int, j: int):
        if not self.jpeg:
            return np.ascontiguousarray(self.src["x"][i:j])
        off, blob = self.src["offsets"], self.src["jpeg"]
        return [blob[off[k]:off[k + 1]].tobytes() for k in range(i, j)]

    def chunk_rows(self) -> int:
        return max(1, CHUNK_BYTES // self.row_bytes)


def decode_jpeg(b: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))


def fsb_numpy(col, shape, dtype) -> np.ndarray:
    """Zero-copy numpy view of a pyarrow FixedSizeBinaryArray (or one-chunk ChunkedArray)."""
    if hasattr(col, "chunks"):
        col = col.chunks[0] if col.num_chunks == 1 else col.combine_chunks()
    width = col.type.byte_width
    buf = col.buffers()[1]
    a = np.frombuffer(buf, dtype=np.uint8, count=len(col) * width, offset=col.offset * width)
    return a.view(dtype).reshape((len(col), *shape))


def decode_list(items) -> torch.Tensor:
    return torch.from_numpy(np.stack([decode_jpeg(b) for b in items]))


# ---------------------------------------------------------------- Hugging Face datasets
def hf_write(c: Case) -> None:
    import datasets as hd

    if c.jpeg:
        x = hd.Image()
    elif len(c.shape) == 1:
        x = hd.List(hd.Value(c.dtype.name), length=c.shape[0])
    else:
        x = hd.Array2D(shape=c.shape, dtype=c.dtype.name)
    feats = hd.Features({"x": x, "label": hd.Value("int64")})
    parts = []
    for _, xs, ys in c.chunks():
        if c.jpeg:
            xs = [{"bytes": b, "path": None} for b in xs]
        parts.append(hd.Dataset.from_dict({"x": xs, "label": ys}, features=feats))
    hd.concatenate_datasets(parts).save_to_disk(c.out)


def hf_read(c: Case, variant: str):
    import datasets as hd

    ds = hd.load_from_disk(c.out)
    if c.jpeg:  # DataLoader over the map-style dataset; the Image feature decodes in the workers
        if variant == "hf-iterable":
            ids = ds.to_iterable_dataset(num_shards=64).shuffle(seed=0, buffer_size=SHUFFLE_BUFFER)
            loader = torch.utils.data.DataLoader(ids.with_format("torch"), batch_size=c.batch, num_workers=c.workers)
        else:
            loader = torch.utils.data.DataLoader(ds.with_format("torch"), batch_size=c.batch, shuffle=True,
                                                 num_workers=c.workers)
        c.note = f"Image feature, with_format('torch'), torch DataLoader ({variant})"
        for b in loader:
            yield b["x"], b["label"]
        return
    # arrow format + a view of the values buffer: zero-copy from the memory-mapped Arrow file
    # (HF's numpy/torch formats widen uint8 Array2D to int64 and copy)
    if variant == "hf-iterable":
        ids = ds.to_iterable_dataset(num_shards=64).shuffle(seed=0, buffer_size=SHUFFLE_BUFFER)
        it = ids.with_format("arrow").iter(batch_size=c.batch)
        c.note = f"to_iterable_dataset(64 shards).shuffle(buffer={SHUFFLE_BUFFER}), arrow format .iter()"
    elif c.shuffle:
        it = ds.shuffle(seed=0).with_format("arrow").iter(batch_size=c.batch)
        c.note = "map-style .shuffle() indices, arrow format .iter()"
    else:
        it = ds.with_format("arrow").iter(batch_size=c.batch)
        c.note = "arrow format .iter(), zero-copy numpy view"
    for b in it:
        yield torch.from_numpy(arrow_values(b["x"], c.shape)), torch.from_numpy(b["label"].to_numpy())


def arrow_values(col, shape) -> np.ndarray:
    """Flat values of a (nested, possibly extension-typed) list column as an (n, *shape) array."""
    arr = col.chunks[0] if col.num_chunks == 1 else col.combine_chunks()
    n = len(arr)
    arr = getattr(arr, "storage", arr)
    while hasattr(arr, "flatten"):
        arr = arr.flatten()
    return arr.to_numpy(zero_copy_only=False).reshape((n, *shape))


# ---------------------------------------------------------------- Lance
def _arrow_chunks(c: Case):
    import pyarrow as pa

    for _, xs, ys in c.chunks():
        x = pa.array(xs, pa.binary()) if c.jpeg else \
            pa.FixedSizeBinaryArray.from_buffers(pa.binary(c.row_bytes), len(xs), [None, pa.py_buffer(xs)])
        yield pa.record_batch([x, pa.array(ys)], names=["x", "label"])


def lance_write(c: Case) -> None:
    import lance
    import pyarrow as pa

    x_type = pa.binary() if c.jpeg else pa.binary(c.row_bytes)
    schema = pa.schema([("x", x_type), ("label", pa.int64())])
    lance.write_dataset(pa.RecordBatchReader.from_batches(schema, _arrow_chunks(c)), c.out)


class LanceJpeg(torch.utils.data.Dataset):
    """Map-style: take() a batch of rows, decode. Opens Lance lazily in each worker (not fork-safe)."""

    def __init__(self, uri: str, rows: int):
        self.uri, self.rows, self.ds = uri, rows, None

    def __len__(self):
        return self.rows

    def __getitems__(self, idx):
        import lance

        self.ds = self.ds or lance.dataset(self.uri)
        t = self.ds.take(sorted(idx), columns=["x", "label"])
        return [(torch.from_numpy(decode_jpeg(b)), y) for b, y in zip(t["x"].to_pylist(), t["label"].to_pylist())]


def lance_read(c: Case, variant: str):
    import lance

    if c.jpeg:
        ctx = "spawn" if c.workers else None
        loader = torch.utils.data.DataLoader(LanceJpeg(c.out, c.rows), batch_size=c.batch, shuffle=True,
                                             num_workers=c.workers, multiprocessing_context=ctx)
        c.note = "take() per shuffled batch in DataLoader workers (spawn: Lance is not fork-safe)"
        yield from loader
        return
    ds = lance.dataset(c.out)
    if c.shuffle:
        c.note = "take() of each shuffled index batch"
        perm = np.random.default_rng(0).permutation(c.rows)
        for i in range(0, c.rows, c.batch):
            t = ds.take(perm[i:i + c.batch], columns=["x", "label"])
            yield torch.from_numpy(fsb_numpy(t["x"], c.shape, c.dtype)), torch.from_numpy(t["label"].to_numpy())
    else:
        c.note = "to_batches(), fixed_size_binary zero-copy view"
        for b in ds.to_batches(batch_size=c.batch, columns=["x", "label"]):
            yield torch.from_numpy(fsb_numpy(b["x"], c.shape, c.dtype)), torch.from_numpy(b["label"].to_numpy())


# ---------------------------------------------------------------- Petastorm (make_batch_reader over Parquet)
def petastorm_write(c: Case) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    # list<value> columns: petastorm's batch reader stacks them into a matrix; binary for JPEG
    x_type = pa.binary() if c.jpeg else pa.list_(pa.from_numpy_dtype(c.dtype))
    schema = pa.schema([("x", x_type), ("label", pa.int64())])
    os.makedirs(c.out, exist_ok=True)
    rg = max(1, (8 << 20) // c.row_bytes)  # ~8 MB row groups: the unit of petastorm's shuffle
    with pq.ParquetWriter(os.path.join(c.out, "part-0.parquet"), schema) as w:
        for _, xs, ys in c.chunks():
            if c.jpeg:
                x = pa.array(xs, pa.binary())
            else:
                flat = xs.reshape(len(xs), -1)
                x = pa.ListArray.from_arrays(np.arange(0, flat.size + 1, flat.shape[1], dtype=np.int32),
                                             pa.array(flat.ravel()))
            w.write_table(pa.table([x, pa.array(ys)], schema=schema), row_group_size=rg)


def _decode_df(df):
    """Self-contained: petastorm's process pool unpickles it where run_peer's globals are missing."""
    import io

    import numpy as np
    from PIL import Image

    df["x"] = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")).ravel() for b in df["x"]]
    return df


def petastorm_read(c: Case, variant: str):
    from petastorm import TransformSpec, make_batch_reader
    from petastorm.pytorch import BatchedDataLoader

    kw = {"workers_count": max(1, c.workers), "reader_pool_type": "process" if c.workers else "dummy"}
    if c.jpeg:
        kw["transform_spec"] = TransformSpec(_decode_df, edit_fields=[("x", np.uint8, (64 * 64 * 3,), False)])
    with make_batch_reader("file://" + c.out, num_epochs=1, shuffle_row_groups=c.shuffle, **kw) as reader:
        loader = BatchedDataLoader(reader, batch_size=c.batch,
                                   shuffling_queue_capacity=SHUFFLE_BUFFER if c.shuffle else 0)
        c.note = (f"make_batch_reader({kw['reader_pool_type']} pool), BatchedDataLoader"
                  + (f" shuffle_row_groups + queue {SHUFFLE_BUFFER}" if c.shuffle else ""))
        for b in loader:
            yield b["x"].view(len(b["x"]), *c.shape), b["label"]


# ---------------------------------------------------------------- MosaicML Streaming
def mosaic_write(c: Case) -> None:
    from streaming import MDSWriter

    x_enc = "bytes" if c.jpeg else f"ndarray:{c.dtype.name}:{','.join(map(str, c.shape))}"
    with MDSWriter(out=c.out, columns={"x": x_enc, "label": "int64"}, size_limit=CHUNK_BYTES) as w:
        for _, xs, ys in c.chunks():
            for x, y in zip(xs, ys):
                w.write({"x": x, "label": int(y)})


def _mosaic_dataset(c: Case):
    from streaming import StreamingDataset

    class Decoded(StreamingDataset):
        def __getitem__(self, i):
            s = super().__getitem__(i)
            return (decode_jpeg(s["x"]) if c.jpeg else s["x"]), s["label"]

    return Decoded(local=c.out, shuffle=c.shuffle, shuffle_seed=0, batch_size=c.batch)


def mosaic_read(c: Case, variant: str):
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
    c.mosaic = getattr(c, "mosaic", None) or _mosaic_dataset(c)
    c.note = "MDSWriter + StreamingDataset(local) + torch DataLoader"
    loader = torch.utils.data.DataLoader(c.mosaic, batch_size=c.batch, num_workers=c.workers)
    yield from loader


# ---------------------------------------------------------------- WebDataset
def webdataset_write(c: Case) -> None:
    import webdataset as wds

    os.makedirs(c.out, exist_ok=True)
    per_shard = max(1, min(c.chunk_rows() * 4, -(-c.rows // 8)))  # >= 8 shards so workers can split
    with wds.ShardWriter(os.path.join(c.out, "shard-%05d.tar"), maxcount=per_shard, verbose=0) as w:
        for i, xs, ys in c.chunks():
            for k, (x, y) in enumerate(zip(xs, ys)):
                w.write({"__key__": f"{i + k:09d}", "jpg" if c.jpeg else "x.npy": x, "cls": int(y)})


def webdataset_read(c: Case, variant: str):
    import webdataset as wds

    urls = sorted(os.path.join(c.out, f) for f in os.listdir(c.out) if f.endswith(".tar"))
    ds = wds.WebDataset(urls, shardshuffle=len(urls) if c.shuffle else False, empty_check=False)
    if c.shuffle:
        ds = ds.shuffle(SHUFFLE_BUFFER)
    ds = ds.decode("rgb8").to_tuple("jpg" if c.jpeg else "x.npy", "cls").batched(c.batch, partial=True)
    loader = wds.WebLoader(ds, batch_size=None, num_workers=c.workers)
    c.note = f"{len(urls)} tar shards, WebDataset" + (f" shardshuffle + shuffle({SHUFFLE_BUFFER})" if c.shuffle else "")
    for x, y in loader:
        yield torch.as_tensor(x), torch.as_tensor(y)


# ---------------------------------------------------------------- Ray Data
def _ray_init():
    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
                 configure_logging=False)
        ray.data.DataContext.get_current().enable_progress_bars = False


def ray_write(c: Case) -> None:
    import pyarrow as pa
    import ray
    from ray.data.extensions import ArrowTensorArray

    _ray_init()
    tables = []
    for _, xs, ys in c.chunks():
        x = pa.array(xs, pa.binary()) if c.jpeg else ArrowTensorArray.from_numpy(xs)
        tables.append(pa.table({"x": x, "label": pa.array(ys)}))
    ray.data.from_arrow(tables).write_parquet(c.out)


def _ray_decode(b: dict) -> dict:
    return {"x": np.stack([decode_jpeg(x) for x in b["x"]]), "label": b["label"]}


def ray_read(c: Case, variant: str):
    import ray

    _ray_init()
    ds = ray.data.read_parquet(c.out)
    if c.jpeg:
        ds = ds.map_batches(_ray_decode, batch_format="numpy")
    c.note = "read_parquet().iter_torch_batches" + (f"(local_shuffle_buffer_size={SHUFFLE_BUFFER})" if c.shuffle else "")
    c.note += ", loopback-only netns" if os.environ.get("TG_LOOPBACK_ONLY") else ""
    it = ds.iter_torch_batches(batch_size=c.batch, local_shuffle_buffer_size=SHUFFLE_BUFFER if c.shuffle else None)
    for b in it:
        yield b["x"], b["label"]


# ---------------------------------------------------------------- files: one .npy (or JPEG) per sample
class Files(torch.utils.data.Dataset):
    def __init__(self, paths: list[str], labels: np.ndarray, jpeg: bool):
        self.paths, self.labels, self.jpeg = paths, labels, jpeg

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        if self.jpeg:
            with open(self.paths[i], "rb") as f:
                x = decode_jpeg(f.read())
        else:
            x = np.load(self.paths[i])
        return torch.from_numpy(x), int(self.labels[i])


def _file_paths(c: Case) -> list[str]:
    if c.jpeg:  # datagen's loose tree: files/<label>/<i>.jpg
        root = os.path.join(datagen.source_dir(os.path.dirname(os.path.dirname(c.out)), c.figure), "files")
        return [os.path.join(root, str(y), f"{i:07d}.jpg") for i, y in enumerate(c.src["label"])]
    return [os.path.join(c.out, f"{i // 10000:04d}", f"{i:08d}.npy") for i in range(c.rows)]


def files_write(c: Case) -> None:
    if c.jpeg:
        os.makedirs(c.out, exist_ok=True)
        return
    paths = _file_paths(c)
    for i, xs, _ in c.chunks():
        for k, x in enumerate(xs):
            os.makedirs(os.path.dirname(paths[i + k]), exist_ok=True)
            np.save(paths[i + k], x)


def files_read(c: Case, variant: str):
    ds = Files(_file_paths(c), np.asarray(c.src["label"]), c.jpeg)
    c.note = "torch DataLoader over " + ("loose JPEG files" if c.jpeg else "one .npy file per sample")
    yield from torch.utils.data.DataLoader(ds, batch_size=c.batch, shuffle=c.shuffle, num_workers=c.workers)


PEERS = {
    "hf": (hf_write, hf_read), "lance": (lance_write, lance_read), "petastorm": (petastorm_write, petastorm_read),
    "mosaic": (mosaic_write, mosaic_read), "webdataset": (webdataset_write, webdataset_read),
    "ray": (ray_write, ray_read), "files": (files_write, files_read),
}


def base_peer(peer: str) -> str:
    return peer.split("-")[0]  # hf-map, hf-iterable -> hf (same venv, same written data)


def epoch(c: Case, read, variant: str) -> dict:
    t0 = time.perf_counter()
    first, rows, row_bytes, kind = None, 0, 0.0, ""
    for x, y in read(c, variant):
        if first is None:
            first = time.perf_counter() - t0
            row_bytes = (x.numel() * x.element_size() + y.numel() * y.element_size()) / len(x)
            kind = f"x {str(x.dtype).replace('torch.', '')}{list(x.shape)}"
        rows += len(x)
    return {"seconds": time.perf_counter() - t0, "first_batch_s": first, "rows": rows, "row_bytes": row_bytes,
            "kind": kind}


def warm_page_cache(c: Case) -> None:
    """Read every byte the peer stored (and the loose JPEG tree) once, so timed epochs run warm."""
    roots = [c.out] + ([os.path.join(datagen.source_dir(os.path.dirname(os.path.dirname(c.out)), c.figure), "files")]
                       if c.jpeg else [])
    for root in roots:
        for d, _, names in os.walk(root):
            for n in names:
                with open(os.path.join(d, n), "rb") as f:
                    while f.read(16 << 20):
                        pass


def run(peer: str, figure: str, data: str, workers: int) -> dict:
    c = Case(figure, data, os.path.join(data, base_peer(peer), figure), workers)
    write, read = PEERS[base_peer(peer)]
    capped = base_peer(peer) == "files" and c.rows > FILES_MAX
    if capped:  # millions of tiny files: writing and cold-reading them alone would take half an hour
        c.rows = FILES_MAX
    stamp = c.out + ".tg-written.json"  # beside, not inside: readers list their directory
    meta = {**c.meta, "rows_used": c.rows}
    written = os.path.exists(stamp) and json.load(open(stamp)).get("meta") == meta
    write_s = None
    if not written:
        shutil.rmtree(c.out, ignore_errors=True)
        t0 = time.perf_counter()
        write(c)
        write_s = time.perf_counter() - t0
        with open(stamp, "w") as f:
            json.dump({"meta": meta, "write_s": write_s}, f)
    warm_page_cache(c)
    for _, _ in zip(range(3), read(c, peer)):  # lazy imports, pools, JIT: not part of the epoch
        pass
    runs = [epoch(c, read, peer)]
    if runs[0]["seconds"] < 30:
        runs.append(epoch(c, read, peer))
    r = runs[0] if len(runs) == 1 else \
        {**runs[0], "seconds": statistics.median(e["seconds"] for e in runs),
         "first_batch_s": statistics.median(e["first_batch_s"] for e in runs)}
    note = f"{c.note}; {r['kind']}; warm, median of {len(runs)}"
    if write_s is not None:
        note += f"; wrote in {write_s:.0f}s"
    if capped:
        note += f"; first {FILES_MAX:,} of {c.meta['rows']:,} rows only"
    if r["rows"] != c.rows:
        note += f"; DELIVERED {r['rows']} of {c.rows} rows"
    return {"rows": r["rows"], "seconds": round(r["seconds"], 3), "rows_per_s": round(r["rows"] / r["seconds"]),
            "gb_per_s": round(r["rows"] * r["row_bytes"] / r["seconds"] / 1e9, 3),
            "first_batch_s": round(r["first_batch_s"], 3), "note": note}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("peer")
    ap.add_argument("figure", choices=list(BATCH))
    ap.add_argument("--data", required=True)
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers (or the peer's own pool)")
    args = ap.parse_args()
    if args.peer == "ray" and not os.environ.get("TG_LOOPBACK_ONLY") and shutil.which("unshare"):
        # Ray's servers listen on every interface; a private network namespace holding only
        # loopback keeps them unreachable from outside (needs root, as here; else run as is).
        os.environ["TG_LOOPBACK_ONLY"] = "1"
        try:
            os.execvp("unshare", ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
                                  sys.executable, *sys.argv])
        except OSError:
            pass
    out = {"peer": args.peer, "figure": args.figure, "rows": None, "seconds": None, "rows_per_s": None,
           "gb_per_s": None, "first_batch_s": None, "workers": args.workers, "note": "", "error": None}
    real_stdout = os.dup(1)
    os.dup2(2, 1)  # peers' chatter goes to stderr; stdout carries only our JSON line
    try:
        if base_peer(args.peer) not in PEERS:
            raise ValueError(f"unknown peer {args.peer}")
        out.update(run(args.peer, args.figure, os.path.abspath(args.data), args.workers))
    except BaseException as e:  # noqa: BLE001 - one JSON line whatever happens
        traceback.print_exc(file=sys.stderr)
        out["error"] = f"{type(e).__name__}: {e}"[:400]
    if "ray" in sys.modules:
        sys.modules["ray"].shutdown()  # the raylet and workers outlive os._exit otherwise
    sys.stdout.flush()
    os.write(real_stdout, (json.dumps(out) + "\n").encode())
    os._exit(0)  # don't wait on peers' lingering threads/pools (ray, petastorm)


if __name__ == "__main__":
    main()
