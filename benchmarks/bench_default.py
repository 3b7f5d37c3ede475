"""Issue 10 ("fast by default"): the issue's table re-measured in one run, with DEFAULT loader options.

    .venv/bin/python benchmarks/bench_default.py [--data benchmarks/_data/default] [--peers hf,lance]
        [--only rows1mb,records,mnist,ttfb,rank,quality] [--rows rows1mb=200,records100=20000,mnist=10000]

Every loader reads the same source arrays (benchmarks/peers/datagen.py), each written by its own writer:
- tensorgrid default: ``ds.to_torch(batch_size=B, shuffle=S)`` exactly as the README shows (the cache is on
  by default; $TENSORGRID_CACHE_DIR points into --data, never at ~/.cache). The loader object is made once
  and iterated once per epoch, as a training loop does; its first epoch (empty cache folder, filled in the
  background) is reported apart.
- tensorgrid cache off: the same with ``cache_dir=False``.
- a plain pyarrow loop: one Parquet file written by pyarrow (one row group per ~64 MB), read with pyarrow
  each epoch: sequential = ``ParquetFile.iter_batches(B)``, shuffled = ``read_table().combine_chunks()``
  then ``take`` of an exact permutation per batch; columns to numpy views, ``torch.from_numpy``. Two
  layouts: plain columns (25 float32 columns; fixed_size_list<uint8> for images and 1 MiB rows, the
  storage of Arrow's tensor type) and fixed_size_binary.
- peers, each in its own venv (benchmarks/peers/: install.py, the writers and readers of run_peer.py),
  timed by this file's --peer-child mode in that venv with the same protocol and consumer.

Protocol: page cache warm (every file read once first), 1 warm-up epoch, then 3 passes; in-process variants
of one workload alternate pass by pass (order reversed every other round) so drift on this shared 2-core
machine hits them alike. Reported: the best pass and the spread (worst..best). memcpy ceiling measured at the
start and the end of the run. The 1 MiB rows are reported twice: as handed over (batches may be views: a
figure above memcpy measures the loader's per-batch overhead, not bandwidth) and with a consumer that reads
every byte (np.copyto into a preallocated buffer, single-threaded like the memcpy ceiling).

Predictions (written before measuring; memcpy ~10-20 GB/s here):
- 1 MiB rows, handed over: default = zero-copy views of the mapped cache -> 100-300 GB/s (overhead, not
  bandwidth); cache off = one Parquet decode copy ~3-5 GB/s; pyarrow fsb ~3.5 GB/s, fixed_size_list
  ~0.07 GB/s; HF Arrow mmap 10-20 GB/s (views too), Lance 1-5 GB/s.
- 1 MiB rows, every byte read: default ~0.3-0.5x memcpy (each epoch maps the cache afresh, so every page is
  faulted in again, then copied); HF about the same or better (its map persists across epochs); pyarrow
  fsb ~2 GB/s (decode copy + consumer copy).
- 1 M x (25 float32 + label), shuffled: default 5-12 M rows/s (one gather per window from the cache); cache
  off 3-6 M; pyarrow 1.3-3 M (fsb better); HF iterable 0.7-2 M; Lance 0.1-0.5 M. Sequential: default
  20-50 M (slices), pyarrow fsb ~6 M. 25 float columns: 0.8-0.95x the one tensor column (one-pass gather).
- 200 k x 28x28 shuffled: default 2-3.5 M rows/s; pyarrow 1-1.8 M; Lance 0.5-1.3 M; HF iterable ~0.2 M.
- Time to first batch, fresh cache folder: warm page cache 0.05-0.3 s; files evicted from this VM's page
  cache (posix_fadvise; the host may still hold them; dropping the page cache is not possible here)
  0.3-1 s, highest for the shuffled figures, whose first window interleaves pieces of every block of its span.
- Rank 1 after rank 0 filled the cache: 0 bytes filled, first epoch = a cached epoch + the one-time check
  (xxh3 at ~1.5x memcpy); two ranks started together: the files are filled once between them.
- First 4,096 shuffled rows: >= 95% of the blocks (default path), ~100% for an exact shuffle.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import warnings

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
PEERS_DIR = os.path.join(HERE, "peers")
sys.path.insert(0, HERE)
sys.path.insert(0, PEERS_DIR)
from common import DATA, machine, memcpy_gbs, table  # noqa: E402

warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
ROWS = {"rows1mb": 2000, "records100": 1_000_000, "mnist": 200_000}  # the sizes
BATCH = {"rows1mb": 16, "records100": 256, "mnist": 256}
SPEC = {"rows1mb": ((1024, 1024), np.uint8, "x"), "records100": ((25,), np.float32, "x"),
        "mnist": ((28, 28), np.uint8, "image")}
SLOW_S = 20.0  # a warm-up epoch slower than this gets one timed pass, not three
PASSES = 3


# ====================================================================== consumers
class Copy:
    """Reads every byte: each tensor copied into a preallocated buffer (np.copyto, one thread)."""

    def __init__(self, nbytes: int = 80 << 20):
        self.dst = np.empty(nbytes, dtype=np.uint8)
        self.dst.fill(0)  # touched: no page faults on the consumer's side

    def __call__(self, tensors) -> int:
        n = None
        for t in tensors:
            a = t.numpy().reshape(-1).view(np.uint8)
            np.copyto(self.dst[:a.size], a)
            n = n if n is not None else len(t)
        return n


def count(tensors) -> int:
    """As handed over: the batch is not touched."""
    for t in tensors:
        return len(t)
    return 0


def run_epoch(batches, consume) -> tuple[int, float, float]:
    """(rows, seconds, seconds to the first batch) of one epoch; a batch is a dict or a tuple of tensors."""
    t0 = time.perf_counter()
    first, rows = None, 0
    for b in batches:
        if first is None:
            first = time.perf_counter() - t0
        rows += consume(b.values() if isinstance(b, dict) else b)
    return rows, time.perf_counter() - t0, first or 0.0


def timed_passes(variants: list[tuple[str, object]], consume, passes: int = PASSES) -> dict:
    """A warm-up epoch each, then ``passes`` epochs each, alternating variants (order reversed every other
    round). ``variants``: (name, make) where make() returns one epoch's batches."""
    out = {}
    for name, make in variants:
        rows, secs, first = run_epoch(make(), consume)
        out[name] = {"rows": rows, "warmup_s": secs, "passes": [], "first": []}
        print(f"  warm-up {name}: {rows} rows in {secs:.2f}s", file=sys.stderr, flush=True)
    for r in range(passes):
        for name, make in (variants if r % 2 == 0 else variants[::-1]):
            o = out[name]
            if r and o["warmup_s"] > SLOW_S:
                continue
            rows, secs, first = run_epoch(make(), consume)
            o["passes"].append(secs)
            o["first"].append(first)
            print(f"  pass {r + 1} {name}: {rows / secs:,.0f} rows/s", file=sys.stderr, flush=True)
    return out


# ====================================================================== data
def source(data: str, figure: str, rows: int) -> dict:
    import datagen

    datagen.generate(data, figure, rows)
    return datagen.load(data, figure)


def chunks(src: dict, chunk_bytes: int = 64 << 20):
    x, y = src["x"], src["label"]
    step = max(1, chunk_bytes // (x.itemsize * int(np.prod(x.shape[1:]))))
    for i in range(0, len(x), step):
        yield np.ascontiguousarray(x[i:i + step]), np.asarray(y[i:i + step])


def write_tg(url: str, src: dict, col: str, wide: bool = False, shard_rows: int | None = None) -> None:
    """tg.write with its defaults: one tensor column (FixedShapeTensorArray), or 25 float columns."""
    import pyarrow as pa

    import tensorgrid as tg

    if os.path.exists(url):
        return

    def batches():
        for xs, ys in chunks(src):
            if wide:
                cols = {f"f{i:02d}": xs[:, i] for i in range(xs.shape[1])}
            else:
                cols = {col: pa.FixedShapeTensorArray.from_numpy_ndarray(xs)}
            yield pa.record_batch({**cols, "label": ys})

    tg.write(url, batches(), shard_rows=shard_rows)


def write_pa(path: str, src: dict, layout: str) -> None:
    """One Parquet file by pyarrow's ParquetWriter (defaults: snappy), one row group per ~64 MB written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if os.path.exists(path):
        return
    tmp = path + ".tmp"
    writer = None
    for xs, ys in chunks(src):
        n, width = len(xs), int(np.prod(xs.shape[1:]))
        if layout == "fsb":
            cols = {"x": pa.FixedSizeBinaryArray.from_buffers(pa.binary(width * xs.itemsize), n,
                                                             [None, pa.py_buffer(xs)])}
        elif xs.dtype == np.float32 and xs.ndim == 2:  # records: plain float columns
            cols = {f"f{i:02d}": xs[:, i] for i in range(width)}
        else:  # images, 1 MiB rows: fixed_size_list<uint8>, the storage of Arrow's tensor type
            cols = {"x": pa.FixedSizeListArray.from_arrays(pa.array(xs.reshape(-1)), width)}
        t = pa.table({**cols, "label": ys})
        writer = writer or pq.ParquetWriter(tmp, t.schema)
        writer.write_table(t, row_group_size=n)
    writer.close()
    os.replace(tmp, path)


def warm_files(root: str) -> None:
    """Read every file under root once: the figures that follow run with the page cache warm."""
    paths = [root] if os.path.isfile(root) else [os.path.join(d, n) for d, _, ns in os.walk(root) for n in ns]
    for p in paths:
        with open(p, "rb") as f:
            while f.read(16 << 20):
                pass


def evict(root: str) -> None:
    """Drop these files' pages from this VM's page cache (posix_fadvise DONTNEED; only ours: the machine is
    shared and dropping the whole page cache is not possible here; the host may still hold them)."""
    paths = [root] if os.path.isfile(root) else [os.path.join(d, n) for d, _, ns in os.walk(root) for n in ns]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ====================================================================== the plain pyarrow loop
def pa_columns(batch, shape, dtype) -> dict:
    """Columns of a RecordBatch/Table as torch tensors: numpy views where pyarrow allows, torch.from_numpy."""
    import pyarrow as pa
    import torch

    out = {}
    for name, col in zip(batch.schema.names, batch.columns):
        if isinstance(col, pa.ChunkedArray):
            col = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
        n = len(col)
        if pa.types.is_fixed_size_binary(col.type):
            w = col.type.byte_width
            a = np.frombuffer(col.buffers()[1], np.uint8, n * w, col.offset * w).view(dtype).reshape(n, *shape)
        elif pa.types.is_fixed_size_list(col.type):
            a = col.flatten().to_numpy(zero_copy_only=False).reshape(n, *shape)
        else:
            a = col.to_numpy(zero_copy_only=False)
        out[name] = torch.from_numpy(a)
    return out


def pa_epoch(path: str, batch: int, shuffle: bool, shape, dtype, seed: list):
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not shuffle:
        for rb in pq.ParquetFile(path).iter_batches(batch_size=batch):
            yield pa_columns(rb, shape, dtype)
        return
    t = pq.read_table(path).combine_chunks()
    seed[0] += 1
    perm = np.random.default_rng(seed[0]).permutation(t.num_rows)
    for i in range(0, t.num_rows, batch):
        yield pa_columns(t.take(pa.array(perm[i:i + batch])), shape, dtype)


# ====================================================================== peers (each in its own venv)
def peer_child(a) -> None:
    """Runs in a peer's venv: its writer (once), its reader, this file's protocol and consumer; one JSON line."""
    import run_peer as rp  # benchmarks/peers/: numpy, torch and the peer only

    out = {"peer": a.peer, "figure": a.figure, "shuffle": a.shuffle, "consume": a.consume, "error": None}
    real_stdout = os.dup(1)
    os.dup2(2, 1)  # peers' chatter to stderr
    try:
        c = rp.Case(a.figure, a.data, os.path.join(a.data, rp.base_peer(a.peer), a.figure), 0)
        c.shuffle = bool(a.shuffle)
        write, read = rp.PEERS[rp.base_peer(a.peer)]
        stamp = c.out + ".tg-written.json"  # as run_peer.run: shared with benchmarks/peers/run_all.py
        meta = {**c.meta, "rows_used": c.rows}
        if not (os.path.exists(stamp) and json.load(open(stamp)).get("meta") == meta):
            shutil.rmtree(c.out, ignore_errors=True)
            t0 = time.perf_counter()
            write(c)
            with open(stamp, "w") as f:
                json.dump({"meta": meta, "write_s": time.perf_counter() - t0}, f)
        if a.passes == 0:  # --prepare: write only
            raise SystemExit
        rp.warm_page_cache(c)
        consume = Copy() if a.consume == "copy" else count
        res = timed_passes([(a.peer, lambda: read(c, a.peer))], consume, a.passes)[a.peer]
        out.update(res, note=c.note)
    except SystemExit:
        out["note"] = "written"
    except BaseException as e:  # noqa: BLE001 - one JSON line whatever happens
        import traceback

        traceback.print_exc()
        out["error"] = f"{type(e).__name__}: {e}"[:300]
    if "ray" in sys.modules:
        sys.modules["ray"].shutdown()
    os.write(real_stdout, (json.dumps(out) + "\n").encode())
    os._exit(0)


def run_peer(peer: str, figure: str, shuffle: bool, consume: str, data: str, timeout: float,
             passes: int = PASSES) -> dict:
    import install

    base = peer.split("-")[0]
    py = install.venv_python(base)
    stamp = os.path.join(install.venv_dir(base), "tg-install.json")
    if not os.path.exists(stamp) or not json.load(open(stamp)).get("ok"):
        return {"peer": peer, "error": "not installed (benchmarks/peers/install.py)"}
    cmd = [py, os.path.abspath(__file__), "--peer-child", peer, "--figure", figure, "--data", data,
           "--shuffle", str(int(shuffle)), "--consume", consume, "--passes", str(passes)]
    env = dict(os.environ)
    if base == "ray":  # a new local cluster, never one another user's tests left running on this machine
        env["RAY_ADDRESS"] = "local"
    if base == "ray" and shutil.which("unshare"):  # Ray listens on every interface: loopback-only netns
        env["TG_LOOPBACK_ONLY"] = "1"
        cmd = ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *cmd]
    log = os.path.join(data, "logs", f"{peer}-{figure}-{int(shuffle)}-{consume}.log")
    os.makedirs(os.path.dirname(log), exist_ok=True)
    with open(log, "w") as err:
        try:
            p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, timeout=timeout, env=env,
                               start_new_session=True)
        except subprocess.TimeoutExpired:
            return {"peer": peer, "error": f"timeout after {timeout:.0f}s (log {log})"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else {"peer": peer, "error": f"exit {p.returncode}, log {log}"}


# ====================================================================== fresh processes: first batch, ranks
def child(a) -> None:
    """A fresh process (main venv): time to first batch, or one rank's first epoch; one JSON line."""
    t0 = time.perf_counter()
    import torch  # noqa: F401

    import tensorgrid as tg
    from tensorgrid.loader import cache as tgcache

    imported = time.perf_counter() - t0
    shape, dtype, _ = SPEC[a.figure]
    shuffle = bool(a.shuffle)
    out = {"variant": a.variant, "figure": a.figure, "import_s": imported}
    t0 = time.perf_counter()
    if a.variant.startswith("pa-"):
        it = iter(pa_epoch(a.url, BATCH[a.figure], shuffle, shape, dtype, [0]))
        loader = None
    else:
        kw = {"cache_dir": False} if a.variant == "tg-off" else {}
        if a.world:
            kw.update(rank=a.rank, world_size=a.world)
        loader = tg.open(a.url).to_torch(batch_size=BATCH[a.figure], shuffle=shuffle, **kw)
        it = iter(loader)
    next(it)
    out["first_batch_s"] = time.perf_counter() - t0
    if a.epoch:  # the rest of the epoch, then the fills this process did
        rows, secs, _ = run_epoch(it, count)
        out["first_epoch_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        if loader is not None:
            loader.source.wait_filled()
        out["fill_wait_s"] = time.perf_counter() - t1
        if loader is not None:
            rows, secs, _ = run_epoch(loader, count)
            out["second_epoch_s"] = secs
            out["second_from_cache"] = loader.source.cache_dir is not None
    out["fills"] = dict(tgcache.fills)
    out["checks"] = dict(tgcache.checks)
    print(json.dumps(out), flush=True)
    os._exit(0)  # a fill still running leaves a temporary file in a folder the parent deletes


def spawn(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", *args], env=env,
                            stdout=subprocess.PIPE, text=True)


def collect(p: subprocess.Popen) -> dict:
    out, _ = p.communicate(timeout=900)
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else {"error": f"exit {p.returncode}"}


# ====================================================================== the run
class Run:
    def __init__(self, a):
        self.a, self.data = a, os.path.abspath(a.data)
        self.rows = {**ROWS, **{k: int(v) for k, v in (i.split("=") for i in a.rows.split(",") if i)}} \
            if a.rows else dict(ROWS)
        self.results: list[dict] = []
        self.peers = [p for p in a.peers.split(",") if p]
        self.rows1mb_peers = [p for p in a.rows1mb_peers.split(",") if p]
        self.cache_root = os.path.join(self.data, "cache")  # $TENSORGRID_CACHE_DIR of the main process

    # --- datasets ---------------------------------------------------------------------------------
    def prepare(self, figure: str) -> dict:
        src = source(self.data, figure, self.rows[figure])
        _, _, col = SPEC[figure]
        paths = {"tg": os.path.join(self.data, "tg", figure),
                 "pa-plain": os.path.join(self.data, "pa", f"{figure}-plain.parquet"),
                 "pa-fsb": os.path.join(self.data, "pa", f"{figure}-fsb.parquet")}
        os.makedirs(os.path.join(self.data, "pa"), exist_ok=True)
        write_tg(paths["tg"], src, col)
        if figure == "records100":
            paths["tg-25"] = os.path.join(self.data, "tg", "records25")
            write_tg(paths["tg-25"], src, col, wide=True)
        write_pa(paths["pa-plain"], src, "plain")
        write_pa(paths["pa-fsb"], src, "fsb")
        for p in paths.values():
            warm_files(p)
        return paths

    def record(self, workload: str, variant: str, res: dict, row_bytes: float, note: str = "") -> None:
        r = {"workload": workload, "variant": variant, "note": note, "row_bytes": row_bytes, **res}
        if res.get("passes"):
            rates = sorted(res["rows"] / s for s in res["passes"])
            r.update(best=rates[-1], worst=rates[0], median=rates[len(rates) // 2],
                     first_batch_s=min(res["first"]))
        self.results.append(r)

    # --- throughput workloads -------------------------------------------------------------------
    def tg_default(self, url: str, figure: str, shuffle: bool, workload: str):
        """The default loader, made once; its first epoch (empty cache folder) is recorded apart."""
        import tensorgrid as tg

        shape, dtype, _ = SPEC[figure]
        row_bytes = int(np.prod(shape)) * np.dtype(dtype).itemsize + 8
        # the yardstick of a first epoch: a fresh loader with the cache off (it decodes Parquet too)
        rows, secs, first = run_epoch(tg.open(url).to_torch(batch_size=BATCH[figure], shuffle=shuffle, cache_dir=False),
                                      count)
        self.results.append({"workload": workload, "variant": "tensorgrid cache_dir=False: first epoch", "rows": rows,
                             "row_bytes": row_bytes, "first_epoch_s": secs, "first_batch_s": first,
                             "best": rows / secs, "worst": rows / secs, "median": rows / secs, "note": "1 pass"})
        loader = tg.open(url).to_torch(batch_size=BATCH[figure], shuffle=shuffle)
        filled = loader.source.cache_complete()  # an earlier workload over the same dataset filled it
        rows, secs, first = run_epoch(loader, count)
        t0 = time.perf_counter()
        loader.source.wait_filled()
        wait = time.perf_counter() - t0
        variant = "tensorgrid default: first epoch, " + ("cache already filled" if filled else "empty cache")
        self.results.append({"workload": workload, "variant": variant,
                             "rows": rows, "row_bytes": row_bytes, "first_epoch_s": secs, "first_batch_s": first, "fill_wait_s": wait,
                             "best": rows / secs, "worst": rows / secs, "median": rows / secs,
                             "note": f"the background fill finished {wait:.2f}s after this epoch"})
        return loader

    def throughput(self, figure: str, shuffle: bool, paths: dict, workload: str, consumers=("count",)) -> None:
        import tensorgrid as tg

        shape, dtype, _ = SPEC[figure]
        B = BATCH[figure]
        row_bytes = int(np.prod(shape)) * np.dtype(dtype).itemsize + 8
        default = self.tg_default(paths["tg"], figure, shuffle, workload)
        off = tg.open(paths["tg"]).to_torch(batch_size=B, shuffle=shuffle, cache_dir=False)
        seeds = {"plain": [0], "fsb": [0]}
        variants = [("tensorgrid default", lambda: default), ("tensorgrid cache_dir=False", lambda: off)]
        if "tg-25" in paths:
            default25 = self.tg_default(paths["tg-25"], figure, shuffle, workload + " [25 float columns]")
            off25 = tg.open(paths["tg-25"]).to_torch(batch_size=B, shuffle=shuffle, cache_dir=False)
            feats = [c for c in tg.open(paths["tg-25"]).schema.names if c != "label"]
            stack25 = tg.open(paths["tg-25"]).to_torch(batch_size=B, shuffle=shuffle, stack={"x": feats})
            variants += [("tensorgrid default, 25 float columns", lambda: default25),
                         ("tensorgrid cache_dir=False, 25 float columns", lambda: off25),
                         ("tensorgrid 25 float columns, stack=", lambda: stack25)]
        plain_name = "pyarrow loop, 25 float columns" if figure == "records100" else \
            "pyarrow loop, fixed_size_list"
        variants += [(plain_name, lambda: pa_epoch(paths["pa-plain"], B, shuffle, shape, dtype, seeds["plain"])),
                     ("pyarrow loop, fixed_size_binary",
                      lambda: pa_epoch(paths["pa-fsb"], B, shuffle, shape, dtype, seeds["fsb"]))]
        for consumer in consumers:
            wl = workload + (" [every byte read]" if consumer == "copy" else "")
            print(f"{wl}", file=sys.stderr, flush=True)
            res = timed_passes(variants, Copy() if consumer == "copy" else count)
            served = {"tensorgrid default": default.source.cache_dir is not None}
            if "tg-25" in paths:
                served["tensorgrid default, 25 float columns"] = default25.source.cache_dir is not None
            for name, r in res.items():
                note = ""
                if name in served:
                    note = "last pass served from the cache" if served[name] else "last pass NOT from the cache"
                self.record(wl, name, r, row_bytes, note)
            for peer in self.peer_variants(figure, shuffle):
                if consumer == "copy" and peer.split("-")[0] not in ("hf", "lance"):
                    continue  # the fastest peers only: the others are far below them as handed over
                print(f"  peer {peer} ...", file=sys.stderr, flush=True)
                r = run_peer(peer, figure, shuffle, consumer, self.data, self.a.peer_timeout)
                if r.get("error"):
                    self.results.append({"workload": wl, "variant": f"peer {peer}", "error": r["error"]})
                else:
                    self.record(wl, f"peer {peer}", r, row_bytes, r.get("note", ""))

    def peer_variants(self, figure: str, shuffle: bool) -> list[str]:
        out = []
        for p in self.peers + (self.rows1mb_peers if figure == "rows1mb" else []):
            if p == "hf":
                out += ["hf-map", "hf-iterable"] if shuffle else ["hf"]
            else:
                out.append(p)
        return out

    # --- fresh processes ---------------------------------------------------------------------------
    def env(self, cache_root: str) -> dict:
        return {**os.environ, "TENSORGRID_CACHE_DIR": cache_root, "PYTHONWARNINGS": "ignore"}

    def ttfb(self, paths_by_figure: dict, repeat: int = 2) -> None:
        cases = [("rows1mb", False), ("records100", True), ("mnist", True)]
        for figure, shuffle in cases:
            if figure not in paths_by_figure:
                continue
            paths = paths_by_figure[figure]
            for state in ("warm", "evicted"):
                for _ in range(repeat):
                    for variant in ("tg-default", "tg-off", "pa-fsb", "pa-plain"):
                        url = paths["tg"] if variant.startswith("tg") else paths[variant]
                        fresh = os.path.join(self.data, "cache-ttfb")
                        shutil.rmtree(fresh, ignore_errors=True)
                        if state == "warm":
                            warm_files(url)
                        else:
                            evict(url)
                        p = spawn(["--variant", variant, "--figure", figure, "--url", url,
                                   "--shuffle", str(int(shuffle))], self.env(fresh))
                        res = collect(p)
                        res.update(state=state, workload=f"time to first batch: {figure}"
                                   + (" shuffled" if shuffle else " sequential"))
                        self.results.append({"kind": "ttfb", **res})
                        print(f"  ttfb {figure} {state} {variant}: {res.get('first_batch_s')}", file=sys.stderr)
                shutil.rmtree(os.path.join(self.data, "cache-ttfb"), ignore_errors=True)
            warm_files(paths["tg"])

    def ranks(self, paths_by_figure: dict) -> None:
        """Rank 1 reusing the cache rank 0 filled (one after the other), and both started together."""
        for figure, shuffle in (("rows1mb", False), ("mnist", True)):
            if figure not in paths_by_figure:
                continue
            url = paths_by_figure[figure]["tg"]
            warm_files(url)
            shared = os.path.join(self.data, "cache-ranks")
            common_args = ["--variant", "tg-default", "--figure", figure, "--url", url, "--shuffle",
                           str(int(shuffle)), "--world", "2", "--epoch"]
            for mode in ("one after the other", "started together", "one after the other"):
                shutil.rmtree(shared, ignore_errors=True)
                if mode == "started together":
                    ps = [spawn([*common_args, "--rank", str(r)], self.env(shared)) for r in (0, 1)]
                    outs = [collect(p) for p in ps]
                else:
                    outs = [collect(spawn([*common_args, "--rank", str(r)], self.env(shared))) for r in (0, 1)]
                for r, o in enumerate(outs):
                    self.results.append({"kind": "rank", "workload": f"ranks: {figure}", "mode": mode, "rank": r, **o})
                    print(f"  rank {r} {figure} {mode}: {o}", file=sys.stderr)
            shutil.rmtree(shared, ignore_errors=True)

    def quality(self, paths_by_figure: dict, n_first: int = 4096) -> None:
        """Share of blocks the first 4,096 rows of an epoch touch: default path, cache off, exact shuffle."""
        import tensorgrid as tg

        for figure, name in (("records100", "tg"), ("records100", "tg-25"), ("mnist", "tg"),
                             ("records100", "tg-100"), ("mnist", "tg-100")):
            if figure not in paths_by_figure:
                continue
            src = source(self.data, figure, self.rows[figure])
            if name == "tg-100":  # the writer's blocks are 8 MB row groups: 13 and 20 here. 100 blocks (100
                # shards of one row group each) is the harder case
                url = os.path.join(self.data, "tg", f"{figure}-100blocks")
                write_tg(url, src, SPEC[figure][2], shard_rows=-(-self.rows[figure] // 100))
            else:
                url = paths_by_figure[figure][name]
            x = np.asarray(src["x"]).reshape(len(src["x"]), -1)
            keys = np.ascontiguousarray(x.view(np.uint8)[:, :8]).view(np.uint64).ravel()
            order = np.argsort(keys, kind="stable")
            skeys = keys[order]
            found = {}
            for variant, kw in (("default", {}), ("cache_dir=False", {"cache_dir": False})):
                loader = tg.open(url).to_torch(batch_size=BATCH[figure], shuffle=True, **kw)
                ids = []
                for b in loader:
                    if name == "tg-25":
                        xb = np.stack([b["f00"].numpy(), b["f01"].numpy()], axis=1)
                    else:
                        xb = b[SPEC[figure][2]].numpy().reshape(len(b["label"]), -1)
                    k = np.ascontiguousarray(xb.view(np.uint8)[:, :8]).view(np.uint64).ravel()
                    pos = np.clip(np.searchsorted(skeys, k), 0, len(skeys) - 1)
                    ids.append(np.where(skeys[pos] == k, order[pos], -1))
                    if sum(map(len, ids)) >= n_first:
                        break
                ids = np.concatenate(ids)[:n_first]
                layout = loader.source.layout
                found[variant] = ids
                self.results.append({"kind": "quality", "workload": f"shuffle quality: {figure}"
                                     + {"tg-25": " (25 float columns)", "tg-100": " (100 shards of 1 row group)"}
                                     .get(name, " (writer's default blocks)"), "variant": variant,
                                     "blocks": len(layout.blocks), "touched": self._touched(layout, ids),
                                     "unmatched": int((ids < 0).sum())})
            exact = np.random.default_rng(0).permutation(len(keys))[:n_first]
            self.results.append({"kind": "quality", "workload": self.results[-1]["workload"],
                                 "variant": "exact shuffle (np.random.permutation)",
                                 "blocks": len(layout.blocks), "touched": self._touched(layout, exact),
                                 "unmatched": 0,
                                 "same_order_cache_on_off": bool(np.array_equal(found["default"],
                                                                                found["cache_dir=False"]))})

    @staticmethod
    def _touched(layout, ids: np.ndarray) -> int:
        starts = np.sort(layout.block_gstart)
        ids = ids[ids >= 0]
        return len(np.unique(np.searchsorted(starts, ids, side="right") - 1))


# ====================================================================== report
def fmt_rate(r: dict, gb: bool) -> str:
    if r.get("error"):
        return "error"
    if gb:
        b = r["row_bytes"] / 1e9
        return f"{r['best'] * b:.2f} GB/s ({r['worst'] * b:.2f}-{r['best'] * b:.2f})"
    return f"{r['best'] / 1e6:.2f} M/s ({r['worst'] / 1e6:.2f}-{r['best'] / 1e6:.2f})"


def report(run: Run, ceilings: list[float]) -> str:
    lines = []
    res = [r for r in run.results if "kind" not in r]
    workloads = list(dict.fromkeys(r["workload"] for r in res))
    ceiling = min(ceilings)
    detail = []
    for w in workloads:
        gb = w.startswith("1 MiB")
        for r in (x for x in res if x["workload"] == w):
            if r.get("error"):
                detail.append((w, r["variant"], "-", "-", "-", "-", r["error"][:80]))
                continue
            b = r.get("row_bytes") or 0
            n = len(r.get("passes") or [1])
            detail.append((w, r["variant"], f"{r['best']:,.0f}", f"{r['worst']:,.0f}",
                           f"{r['best'] * b / 1e9:.2f}" if b else "-",
                           f"{r['best'] * b / 1e9 / ceiling:.2f}" if b else "-",
                           f"{n} pass{'es' if n > 1 else ''}; first batch {r.get('first_batch_s', 0) * 1e3:.1f} ms; "
                           + r.get("note", "")[:110]))
    lines.append(table(detail, ("workload", "variant", "best rows/s", "worst rows/s", "best GB/s", "x memcpy",
                                "note")))
    # the table: default vs cache off vs pyarrow (better layout) vs best peer
    summary = []
    for w in workloads:
        rs = {r["variant"]: r for r in res if r["workload"] == w and not r.get("error")}
        d = rs.get("tensorgrid default")
        if d is None or "first epoch" in w:
            continue
        gb = w.startswith("1 MiB")
        pa_best = max((r for k, r in rs.items() if k.startswith("pyarrow")), key=lambda r: r["best"], default=None)
        peer = max((r for k, r in rs.items() if k.startswith("peer")), key=lambda r: r["best"], default=None)
        peer_name = next((k for k, r in rs.items() if r is peer), "-")
        cells = [w, fmt_rate(d, gb), fmt_rate(rs["tensorgrid cache_dir=False"], gb)]
        cells.append(fmt_rate(pa_best, gb) + " " + next(k for k, r in rs.items() if r is pa_best)[14:])
        cells.append(f"{d['best'] / pa_best['best']:.2f}x")
        cells.append((f"{peer_name[5:]} " + fmt_rate(peer, gb)) if peer else "-")
        cells.append(f"{d['best'] / peer['best']:.2f}x" if peer else "-")
        if "tensorgrid default, 25 float columns" in rs:
            c25 = rs["tensorgrid default, 25 float columns"]
            cells[0] += " (25 float columns)"
            summary.append(tuple(cells))
            cells = [w + " (25 float columns)", fmt_rate(c25, gb),
                     fmt_rate(rs["tensorgrid cache_dir=False, 25 float columns"], gb),
                     cells[3], f"{c25['best'] / pa_best['best']:.2f}x", cells[5],
                     f"{c25['best'] / peer['best']:.2f}x" if peer else "-"]
            summary[-1] = (w + " (one 25-wide tensor column)", *summary[-1][1:])
            summary.append(tuple(cells))
            s25 = rs.get("tensorgrid 25 float columns, stack=")
            if s25:
                summary.append((w + " (25 float columns, stack={'x': [...]})", fmt_rate(s25, gb), "", cells[3],
                                f"{s25['best'] / pa_best['best']:.2f}x", cells[5],
                                f"{s25['best'] / peer['best']:.2f}x" if peer else "-"))
            summary.append((w + ": one tensor column / 25 columns", f"{d['best'] / c25['best']:.2f}x"
                            + (f" (stack=: {d['best'] / s25['best']:.2f}x)" if s25 else ""), "", "", "", "", ""))
            continue
        summary.append(tuple(cells))
    lines.append("")
    lines.append(table(summary, ("workload", "tensorgrid default", "cache_dir=False", "plain pyarrow loop (better layout)",
                                 "default / pyarrow", "best peer", "default / best peer")))
    ttfb = [r for r in run.results if r.get("kind") == "ttfb"]
    if ttfb:
        rows = {}
        for r in ttfb:
            key = (r["workload"], r["state"], r["variant"])
            rows.setdefault(key, []).append(r.get("first_batch_s"))
        t = [(w, s, v, " / ".join(f"{x:.3f}" for x in xs if x is not None)) for (w, s, v), xs in rows.items()]
        lines.append("")
        lines.append(table(t, ("time to first batch (fresh process, fresh cache folder)", "page cache", "variant",
                               "seconds (each run)")))
    ranks = [r for r in run.results if r.get("kind") == "rank"]
    if ranks:
        t = [(r["workload"], r["mode"], r["rank"], f"{r.get('first_batch_s', 0):.3f}", f"{r.get('first_epoch_s', 0):.3f}",
              f"{r.get('fill_wait_s', 0):.2f}", f"{r.get('second_epoch_s', 0):.3f}",
              f"{r.get('fills', {}).get('files', '-')} files / {r.get('fills', {}).get('bytes', 0) / 1e6:.0f} MB",
              f"{r.get('checks', {}).get('bytes', 0) / 1e6:.0f} MB") for r in ranks]
        lines.append("")
        lines.append(table(t, ("ranks (world_size=2, default options)", "mode", "rank", "first batch s",
                               "first epoch s", "then waited for fills s", "second epoch s", "filled by this process",
                               "hashed (checks + fills)")))
    qual = [r for r in run.results if r.get("kind") == "quality"]
    if qual:
        t = [(r["workload"], r["variant"], f"{r['touched']} of {r['blocks']}", f"{r['touched'] / r['blocks']:.1%}",
              r.get("unmatched", 0), r.get("same_order_cache_on_off", "")) for r in qual]
        lines.append("")
        lines.append(table(t, ("first 4,096 shuffled rows", "order", "blocks touched", "share",
                               "rows not identified", "same order cache on/off")))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.path.join(DATA, "default"))
    ap.add_argument("--peers", default="hf,lance,petastorm,ray", help="peers (benchmarks/peers/install.py) to run")
    ap.add_argument("--rows1mb-peers", default="mosaic,webdataset",
                    help="peers run on the 1 MiB rows only (4-17 k rows/s on small records: minutes per pass)")
    ap.add_argument("--only", default="rows1mb,records,mnist,ttfb,rank,quality")
    ap.add_argument("--rows", default="", help="overrides, e.g. rows1mb=200,records100=20000,mnist=10000")
    ap.add_argument("--peer-timeout", type=float, default=900)
    ap.add_argument("--json")
    ap.add_argument("--prepare", action="store_true", help="write every dataset (ours, pyarrow's, the peers'), no timing")
    # internal modes
    ap.add_argument("--peer-child")
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--figure")
    ap.add_argument("--variant")
    ap.add_argument("--url")
    ap.add_argument("--shuffle", type=int, default=0)
    ap.add_argument("--consume", default="count")
    ap.add_argument("--passes", type=int, default=PASSES)
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--world", type=int, default=0)
    ap.add_argument("--epoch", action="store_true")
    a = ap.parse_args()
    if a.peer_child:
        a.peer = a.peer_child
        return peer_child(a)
    if a.child:
        return child(a)

    run = Run(a)
    os.makedirs(run.data, exist_ok=True)
    shutil.rmtree(run.cache_root, ignore_errors=True)  # a fresh cache folder: the first epochs fill it
    os.environ["TENSORGRID_CACHE_DIR"] = run.cache_root  # never the real ~/.cache
    import pyarrow as pa
    import torch

    import tensorgrid as tg

    only = set(a.only.split(","))
    head = [f"machine: {machine()}, torch {torch.__version__}, pyarrow {pa.__version__}",
            f"tensorgrid from {os.path.dirname(tg.__file__)}; TENSORGRID_CACHE_DIR={run.cache_root}",
            f"git: {_git(os.path.dirname(tg.__file__))}"]
    print("\n".join(head), flush=True)
    ceilings = [] if a.prepare else [memcpy_gbs()]
    print(f"numpy memcpy ceiling: {ceilings[0]:.2f} GB/s" if ceilings else "preparing data", flush=True)
    paths = {}
    t_start = time.time()
    if "rows1mb" in only or "ttfb" in only or "rank" in only:
        paths["rows1mb"] = run.prepare("rows1mb")
    if "records" in only or "ttfb" in only or "quality" in only:
        paths["records100"] = run.prepare("records100")
    if "mnist" in only or "ttfb" in only or "quality" in only or "rank" in only:
        paths["mnist"] = run.prepare("mnist")
    n = run.rows
    if a.prepare:
        for fig, shuffle in (("rows1mb", False), ("records100", True), ("mnist", True)):
            for peer in run.peer_variants(fig, shuffle):
                print(peer, fig, run_peer(peer, fig, shuffle, "count", run.data, a.peer_timeout, passes=0))
        return
    if "rows1mb" in only:
        run.throughput("rows1mb", False, paths["rows1mb"], f"1 MiB rows x {n['rows1mb']:,}, batch 16, sequential",
                       consumers=("count", "copy"))
    if "records" in only:
        print(views_floor(), flush=True)
        name = f"{n['records100']:,} x (25 float32 + label), batch 256"
        run.throughput("records100", True, paths["records100"], name + ", shuffled")
        run.throughput("records100", False, paths["records100"], name + ", sequential")
    if "mnist" in only:
        run.throughput("mnist", True, paths["mnist"], f"{n['mnist']:,} x (28x28 uint8 + label), batch 256, shuffled")
    if "quality" in only:
        run.quality(paths)
    if "ttfb" in only:
        run.ttfb(paths)
    if "rank" in only:
        run.ranks(paths)
    ceilings.append(memcpy_gbs())
    print(f"\nnumpy memcpy ceiling at the end: {ceilings[1]:.2f} GB/s (x memcpy below uses the lower, "
          f"{min(ceilings):.2f}); run took {(time.time() - t_start) / 60:.1f} min\n")
    print(report(run, ceilings))
    out = a.json or os.path.join(run.data, "results.json")
    with open(out, "w") as f:
        json.dump({"head": head, "memcpy_gbs": ceilings, "results": run.results}, f, indent=1, default=str)


def views_floor(batch: int = 256, k: int = 26, reps: int = 20000) -> str:
    """The floor of a batch of k column tensors: k views of a gathered block made per batch (one unbind, the
    loader's way), against the 2 a one-tensor-column batch makes; per batch, in this process."""
    import torch

    block = torch.zeros(k, batch * 64)
    t0 = time.perf_counter()
    for i in range(reps):
        a = (i % 64) * batch
        block[:, a:a + batch].unbind(0)
    many = (time.perf_counter() - t0) / reps
    t0 = time.perf_counter()
    for i in range(reps):
        a = (i % 64) * batch
        block[0, a:a + batch], block[1, a:a + batch]
    two = (time.perf_counter() - t0) / reps
    return (f"tensor-view floor: {k} column views per batch {many * 1e6:.1f} us, 2 views {two * 1e6:.1f} us "
            f"(a batch of {k} columns costs at least {(many - two) * 1e6:.1f} us more than one of 2)")


def _git(pkg: str) -> str:
    """The commit measured: the repo's HEAD, or (tensorgrid imported from an export, PYTHONPATH=...) the
    COMMIT file written beside the exported package."""
    stamp = os.path.join(os.path.dirname(pkg), "COMMIT")
    if os.path.exists(stamp):
        return "exported tree of commit " + open(stamp).read().strip()
    try:
        sha = subprocess.run(["git", "-C", HERE, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", HERE, "status", "--porcelain", "--", "../tensorgrid"],
                               capture_output=True, text=True).stdout.strip()
        return f"HEAD {sha}" + (f"; tensorgrid/ has uncommitted changes: {len(dirty.splitlines())} files"
                                if dirty else "; tensorgrid/ clean")
    except OSError:
        return "unknown"


if __name__ == "__main__":
    main()
