"""``Dataset.to_torch``: the epoch plan executed by torch's own DataLoader workers, chunk by chunk.

A chunk is this rank's batches of one shuffle window (in this process), or of a budget-sized part of one
(in workers; a single batch when a transform runs there). Worker w builds chunks w, w+n, w+2n, ... and
torch's DataLoader hands them back round-robin, so batches come out in plan order whatever the number of
workers or the start method. A chunk's rows are gathered once per column (or sliced, zero-copy), turned
into tensors once, and sliced into batches; ``transform`` runs per batch.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import threading
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import cloudpickle
import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .. import forking
from ..args import check_choice, check_int, check_number
from ..errors import ArgumentError, EmptyDataError, ResumeError, TransformError
from ..rng import batch_keys, seed_all
from ..store.dataset import Dataset
from .collate import (
    LENGTHS,
    concat_then_take,
    concatenated,
    copied,
    is_ragged_type,
    packed,
    pinned,
    slice_batch,
    stacked,
    table_to_torch,
    take_per_table,
    take_to_torch,
)
from .locality import Share
from .locality import check_resume as check_locality
from .plan import Plan
from .source import Source
from .workers import Watch

VALID = "_valid"
DEFAULT_MEMORY_BUDGET = 512 << 20
REMOTE_IN_FLIGHT = 2  # chunks fetched at once over a network
REMOTE_CHUNK_BYTES = 8 << 20  # in process over a network: a chunk fetched while the previous one is used
WINDOWS_IN_FLIGHT = 4  # in process: the window being consumed, the next being built, their gather copies


def padding_columns(plan: Plan, source: Source, pos: np.ndarray) -> dict:
    """Columns of padding positions (past the epoch's rows, which they repeat from the epoch's start: up to a
    world size's worth with global batches, up to a share's difference with locality), read as real
    positions are, run by run within one window: never a read per row (measured: 16% of an epoch of padding
    read row by row took 3.6x the epoch's time)."""
    wrapped = pos % plan.num_rows
    win = wrapped // plan.window
    breaks = np.flatnonzero((np.diff(win) != 0) | (np.diff(wrapped) != 1)) + 1
    out = None
    for run in np.split(wrapped, breaks):
        part = window_columns(plan, source, run)
        out = _copied(part) if out is None else concatenated(out, part)
    return out


def window_columns(plan: Plan, source: Source, pos: np.ndarray) -> dict:
    """Columns of the rows at epoch positions ``pos`` (all in one window). The window's row ranges are
    read (decoded row groups, or zero-copy slices of the Arrow cache: then one range per shard, since
    cached blocks are small), then one zero-copy slice when the rows are a contiguous run. Otherwise,
    when the rows wanted are at least half of the span read over several shards, the ranges are copied end
    to end and gathered once per column; when they are spread thin (a rank's share of a window, one batch of a
    chunk), each source table's rows are gathered to their output positions."""
    j, local = plan.window_local(pos)
    a, _ = plan.window_range(j)
    lo, hi = int(local.min()), int(local.max()) + 1
    local = local - lo
    n = len(local)
    empty = source.buffers.empty  # reused blocks: no fresh pages per window (buffers.py)
    segs = np.asarray(plan.segments(a + lo, a + hi), dtype=np.int64).reshape(-1, 3)
    contiguous = local[-1] - local[0] == n - 1 and (n == 1 or bool(np.all(np.diff(local) == 1)))
    one_shard = len(np.unique(segs[:, 0])) == 1
    if source.cache_dir and len(segs) > 1 and not contiguous and 2 * n >= hi - lo and not one_shard:
        # the rows wanted are most of the span, over several shards: copy the span's pieces end to end, then
        # one gather (a window inside one cache file is gathered straight from it, below: one copy, not two;
        # 1 M shuffled records 12.4 M rows/s against 9.4 M, measured)
        ranges: dict[int, tuple[int, int]] = {}
        for sh, s0, s1 in segs.tolist():
            r0, r1 = ranges.get(sh, (s0, s1))
            ranges[sh] = (min(r0, s0), max(r1, s1))
        tables = {sh: source.read(sh, r0, r1) for sh, (r0, r1) in ranges.items()}
        packs = {sh: source.packs(sh, r0, r1) for sh, (r0, r1) in ranges.items()}
        return concat_then_take(tables, [(sh, s0 - ranges[sh][0], s1 - ranges[sh][0]) for sh, s0, s1 in segs.tolist()],
                                local, packs, empty)
    if source.takes_rows and not contiguous:  # over a network: fetch only these rows (a rank's share)
        shard, row = _shard_rows(segs, local)
        tables, groups = [], []
        for s in np.unique(shard):
            out = np.flatnonzero(shard == s)
            wanted, where = np.unique(row[out], return_inverse=True)
            groups.append((len(tables), None if len(out) == n else out, where))
            tables.append(source.take(int(s), wanted))
        return take_per_table(tables, groups, n, empty=empty)
    if source.cache_dir and len(segs) > 1 and not contiguous:
        shard, row = _shard_rows(segs, local)
        shards = np.unique(segs[:, 0])
        if len(shards) == 1:
            r0, r1 = int(row.min()), int(row.max()) + 1
            sh = int(shards[0])
            return take_per_table([source.read(sh, r0, r1)], [(0, None, row - r0)], n, [source.packs(sh, r0, r1)],
                                  empty)
        tables, groups, packs = [], [], []
        for s in shards:
            out = np.flatnonzero(shard == s)
            if len(out):
                rows = row[out]
                r0, r1 = int(rows.min()), int(rows.max()) + 1
                groups.append((len(tables), out, rows - r0))
                tables.append(source.read(int(s), r0, r1))
                packs.append(source.packs(int(s), r0, r1))
        return take_per_table(tables, groups, n, packs, empty)
    parts = source.read_all(segs)
    table = parts[0] if len(parts) == 1 else pa.concat_tables(parts)
    if contiguous:
        a0 = int(local[0])
        packs = None
        if source.cache_dir and len(segs) == 1:  # one slice of a cache file: its packs are views too
            sh, s0, _ = (int(x) for x in segs[0])
            packs = source.packs(sh, s0 + a0, s0 + a0 + n)
        cols = table_to_torch(table.slice(a0, n), packs)
        # decoded row groups outlive a shuffled epoch, and an in-memory table is the user's own data:
        # hand out copies (the Arrow cache is mapped copy-on-write afresh each epoch instead)
        if not source.cache_dir and (plan.shuffle or source.dataset.zero_copy_reads):
            cols = _copied(cols)
        return cols
    if 2 * n >= len(table):
        return concat_then_take({i: p for i, p in enumerate(parts)}, [(i, 0, p.num_rows) for i, p in enumerate(parts)],
                                local, empty=empty)
    return take_to_torch(table, local, empty)


def _shard_rows(segs: np.ndarray, local: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(shard, row) of each position ``local`` of the concatenation of the row ranges ``segs``."""
    lens = segs[:, 2] - segs[:, 1]
    seg_start = np.concatenate([[0], np.cumsum(lens)])
    seg = np.repeat(np.arange(len(segs)), lens)[local]  # a gather, cheaper than a search per row
    return segs[seg, 0], segs[seg, 1] + (local - seg_start[seg])


class Chunk:
    """Batches ``first``, ``first + 1``, ... of one window: columns for all of them plus boundaries (and a
    transform still to apply per batch), or the finished batches."""

    def __init__(self, first: int, cols: dict | None, bounds: list[int], batches: list | None = None,
                 transform=None, plan: Plan | None = None, pos: np.ndarray | None = None):
        self.first, self.cols, self.bounds, self.batches = first, cols, bounds, batches
        self.transform, self.plan, self.pos = transform, plan, pos
        self.keys = (plan.seed, plan.epoch, plan.rank) if plan is not None else (0, 0, 0)
        self.pin = None  # set in the main process only: pinned memory is valid where it is allocated
        self.reads: dict | None = None  # a worker's reads from a grid's servers since its last chunk (by partition)

    def pin_memory(self, pin) -> None:
        """Pin what the batches will be views of, once per chunk (a block once for all its columns);
        what is new per batch (padded lists, a transform's output) is pinned as it is made."""
        self.pin = pin
        if self.cols is not None:
            self.cols = pinned(self.cols, pin)
        if self.batches is not None:
            self.batches = [pinned(b, pin) for b in self.batches]

    def __getstate__(self):  # the plan and positions only serve error messages in the building process
        return {**self.__dict__, "plan": None, "pos": None}

    def __iter__(self):
        if self.batches is not None:
            for i, batch in enumerate(self.batches):
                yield self.first + i, batch
            return
        for i in range(len(self.bounds) - 1):
            batch = slice_batch(self.cols, self.bounds[i], self.bounds[i + 1], self.pin)
            if self.transform is not None:
                try:
                    with batch_keys(*self.keys, self.first + i):  # random transforms draw per batch (rng.py)
                        batch = self.transform(batch)
                except Exception as e:  # noqa: BLE001 - re-raised with where it happened
                    k = self.first + i
                    where = _describe(self.plan, self.plan.rows_at(self.pos[self.bounds[i]:self.bounds[i + 1]]))
                    raise TransformError(f"transform failed on batch {k} of epoch {self.plan.epoch} ({where}): "
                                         f"{type(e).__name__}: {e}") from e
                if self.pin is not None and isinstance(batch, dict):
                    batch = {k: self.pin(v) if isinstance(v, torch.Tensor) and not v.is_pinned() else v
                             for k, v in batch.items()}
            yield self.first + i, batch


def _describe(plan: Plan, gids: np.ndarray) -> str:
    shard, row = plan.layout.locate(gids)
    parts = []
    for s in np.unique(shard)[:3]:
        rows = row[shard == s]
        parts.append(f"shard {int(s)} rows {int(rows.min())}..{int(rows.max())}")
    return ", ".join(parts) + (", ..." if len(np.unique(shard)) > 3 else "")


def build_chunk(plan: Plan, source: Source, c: int, first: int, transform=None, add_valid: bool = False,
                eager: bool = True, stack: dict | None = None) -> Chunk:
    """This rank's batches of chunk c. The transform runs here when ``eager`` (in a worker), else as each
    batch is taken from the chunk."""
    ks = plan.chunk_batches(c, first)
    pos, bounds = plan.positions(ks)
    real = pos < plan.num_rows  # padding (repeated rows) only ever ends the epoch
    nreal = int(real.sum())
    cols = window_columns(plan, source, pos[:nreal]) if nreal else None
    if nreal < len(pos):
        pad = padding_columns(plan, source, pos[nreal:])  # copies already
        cols = pad if cols is None else concatenated(cols, pad)
    cols = packed(cols)  # a gather's columns already are (one block per dtype); a view or padding: one copy
    if stack:
        cols = stacked(cols, stack)
    if add_valid:
        cols[VALID] = torch.from_numpy(real)
    chunk = Chunk(ks.start, cols, bounds, transform=transform, plan=plan, pos=pos)
    if transform is not None and eager:
        return Chunk(ks.start, None, bounds, batches=[b for _, b in chunk])
    return chunk


def _copied(cols: dict) -> dict:
    return copied(cols)


def _pin(t: torch.Tensor) -> torch.Tensor:
    return t.pin_memory()


def _chunks_from(state: bytes) -> _Chunks:
    chunks = _Chunks.__new__(_Chunks)
    chunks.__dict__.update(cloudpickle.loads(state))
    return chunks


class _Chunks(IterableDataset):
    def __init__(self, plan: Plan, source: Source, first: int, transform, add_valid: bool, stack: dict | None = None):
        self.plan, self.source, self.first, self.transform, self.add_valid = plan, source, first, transform, add_valid
        self.stack = stack

    def __reduce__(self):
        # to a spawned worker by value (cloudpickle): a transform defined in a script's or a notebook's
        # __main__, or a lambda, is not importable by name there
        return _chunks_from, (cloudpickle.dumps(self.__dict__),)

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        # In this process the next epoch reuses decoded row groups (no second Parquet decode) when shuffled.
        self.source.reset(keep_decoded=info is None and self.plan.shuffle)
        c0 = self.plan.chunk_of(self.first) if self.plan.num_batches else 0
        mine = range(c0 + wid, self.plan.num_chunks, nw)
        reads = _Reads(self.source.dataset) if info is not None else None  # counted in the rank's process

        def build(c: int) -> Chunk:
            if info is not None and self.transform is not None:
                # a worker's random transform depends on (seed, epoch, rank, chunk) only: its draws repeat for
                # any number of workers and after a resume in the middle of an epoch
                seed_all(self.plan.seed, self.plan.epoch, self.plan.rank, c)
            chunk = build_chunk(self.plan, self.source, c, self.first, self.transform, self.add_valid,
                                eager=info is not None, stack=self.stack)
            if reads is not None:
                chunk.reads = reads.since_last()
            return chunk

        if not self.source.dataset.is_remote or len(mine) < 2:
            for c in mine:
                chunk = build(c)
                self.source.start_fills()  # the cache fills once the chunk is out, not while it is built
                yield chunk
            return
        # remote storage: fetch and build the next chunks while this one is consumed (REMOTE_IN_FLIGHT
        # requests at a time: one round trip's latency hides behind another's transfer; only where rows are
        # fetched by number, which touches none of the source's caches)
        depth = REMOTE_IN_FLIGHT if self.source.takes_rows else 1
        with ThreadPoolExecutor(max_workers=depth) as pool:
            pending = deque(pool.submit(build, c) for c in mine[:depth])
            for c in mine[depth:]:
                ready = pending.popleft().result()
                self.source.start_fills()
                pending.append(pool.submit(build, c))
                yield ready
            while pending:
                ready = pending.popleft().result()
                self.source.start_fills()
                yield ready


class _Reads:
    """A loader worker's reads from a grid's servers (``network_reads`` by partition), handed to the rank's
    process with each chunk: the rows read since the chunk before."""

    def __init__(self, dataset: Dataset):
        self.dataset, self.seen, self.lock = dataset, {}, threading.Lock()  # chunks may be built by threads

    def since_last(self) -> dict | None:
        with self.lock:
            now = self.dataset.network_reads()
            if not now:
                return None
            parts = {k: tuple(v) for k, v in now.get("partitions", {}).items()}
            delta = {k: [v[0] - self.seen.get(k, (0, 0))[0], v[1] - self.seen.get(k, (0, 0))[1]]
                     for k, v in parts.items() if v != self.seen.get(k)}
            self.seen = parts
        return {"partitions": delta} if delta else None


def _identity(x):
    return x


def _rank_world(rank, world_size) -> tuple[int, int]:
    """rank and world_size as given, else from torch.distributed, else $RANK and $WORLD_SIZE, else 0 and 1."""
    names = ["rank", "world_size"]
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            found, where = (torch.distributed.get_rank(), torch.distributed.get_world_size()), "torch.distributed"
        else:
            found, where = (_env_int("RANK", 0), _env_int("WORLD_SIZE", 1)), "the environment"
        names = [n if given is not None else f"{n} (from {where})" for n, given in zip(names, (rank, world_size))]
        rank, world_size = (found[0] if rank is None else rank), (found[1] if world_size is None else world_size)
    world_size = check_int(names[1], world_size, 1)
    return check_int(names[0], rank, 0, world_size - 1), world_size


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or not value.strip():
        return default
    try:
        return int(value)
    except ValueError:
        raise ArgumentError(f"${name} must be an int, got {value!r}") from None


def _flag(name: str, value) -> bool:
    return bool(check_choice(name, value.item() if isinstance(value, np.bool_) else value, (False, True)))


def _pin_choice(pin_memory) -> bool:
    """None: pin when CUDA is there (so ``.to(device, non_blocking=True)`` overlaps the copy). True without
    CUDA warns and pins nothing, as torch's DataLoader does (the same script runs on a laptop)."""
    if pin_memory is None:
        return torch.cuda.is_available()
    pin_memory = _flag("pin_memory", pin_memory)
    if pin_memory and not torch.cuda.is_available():
        warnings.warn("pin_memory=True but no CUDA device is available: batches are not pinned (leave "
                      "pin_memory unset to pin exactly when CUDA is there)", UserWarning, stacklevel=3)
        return False
    return pin_memory


def _check_lengths_names(schema: pa.Schema, columns: list[str] | None) -> None:
    """A list-of-numbers column x arrives as x and x_lengths: a column already named x_lengths is refused."""
    names = columns or schema.names
    for name in names:
        if is_ragged_type(schema.field(name).type) and name + LENGTHS in names:
            raise ArgumentError(f"column {name!r} is a list of numbers, which the loader hands over padded with its "
                                f"lengths as {name + LENGTHS!r}, but the data has a column of that name too: "
                                f"rename one, or leave one out with columns=")


def _check_stack(stack, schema: pa.Schema, columns: list[str] | None) -> dict | None:
    """``stack`` as {new name: [columns]}: each a list of two or more distinct int/float columns loaded (and in
    no other group), the new name not another loaded column's."""
    if stack is None:
        return None
    if not isinstance(stack, dict) or not stack:
        raise ArgumentError(f"stack must be a dict {{name: [column, ...]}}, got {_short(stack)}")
    loaded = columns or schema.names
    seen: set = set()
    out = {}
    for name, members in stack.items():
        if not isinstance(name, str) or not isinstance(members, (list, tuple)) or len(members) < 2 \
                or not all(isinstance(m, str) for m in members):
            raise ArgumentError(f"stack: {_short(name)} must map to a list of two or more column names, got "
                                f"{_short(members)}")
        missing = [m for m in members if m not in loaded]
        if missing:
            raise ArgumentError(f"stack: {name!r} names columns that are not loaded: {missing}")
        twice = sorted({m for m in members if m in seen or list(members).count(m) > 1})
        if twice:
            raise ArgumentError(f"stack: columns {twice} are stacked twice")
        seen.update(members)
        wrong = [m for m in members if not (pa.types.is_integer(schema.field(m).type)
                                            or pa.types.is_floating(schema.field(m).type))]
        if wrong:
            raise ArgumentError(f"stack: {name!r} stacks int and float columns; {wrong} are not")
        if name in loaded and name not in members:
            raise ArgumentError(f"stack: {name!r} is already a column: name the stacked tensor otherwise")
        out[name] = list(members)
    return out


def _context(ctx, dataset: Dataset, workers: int = 1):
    """None (fork), a start method's name, or a multiprocessing context. Unset in a process that runs Ray, or
    over a dataset that is not fork-safe (a grid server's gRPC client): "spawn" (forking a process whose gRPC
    threads are running can abort or hang the child). Unset in a process whose threads make a forked child
    hang before it runs any Python (a training rank's gloo threads: ``forking.hazard``), where ``__main__``
    allows it: a fork server's context (a fresh single-threaded process, torch and this module preloaded,
    forks the workers; a flat script run by path keeps fork, since every such worker would run it again)."""
    if ctx is None:
        ray = sys.modules.get("ray")
        ray_on = ray is not None and getattr(ray, "is_initialized", lambda: False)()
        if ray_on or not dataset.fork_safe:
            return "spawn"
        if workers and forking.hazard() is not None and forking.main_reimportable():
            return _forkserver()
        return None
    if callable(getattr(ctx, "get_start_method", None)):
        return ctx
    return check_choice("multiprocessing_context", ctx, mp.get_all_start_methods())


def _forkserver():
    """The fork server's context, started now (it preloads torch and the loader while this process goes on
    building its model): its workers then start in a fraction of a second, not an interpreter's seconds."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])  # only read when the server starts
    from multiprocessing import forkserver

    forkserver.ensure_running()
    return ctx


class Loader:
    """A PyTorch loader over a Dataset (``ds.to_torch(batch_size, ...)``): iterate it for one epoch of dict
    batches (numeric and tensor columns as stacked tensors). Every row once per epoch across ranks and
    workers, equal batch counts per rank, seeded shuffle, exact mid-epoch resume via
    ``state_dict()``/``load_state_dict()``.

    A list-of-numbers column ``x`` (token ids, ragged arrays) arrives as ``x``, a (rows, longest in the batch)
    tensor padded with 0, and ``x_lengths`` (int64); a null list is an empty row, a null inside a list is 0.
    Strings and other nested values arrive as Python lists. ``pin_memory`` (default: when CUDA is
    available) pins batches in this process, so ``.to(device, non_blocking=True)`` overlaps the copy.

    rank/world_size default to torch.distributed, else $RANK/$WORLD_SIZE, else 0/1. Unless drop_last, the
    epoch is padded to a multiple of world_size by repeating rows, flagged False in a "_valid" column
    (present when world_size > 1). Shards are kept as memory-mapped Arrow IPC for zero-copy reads (the
    cache, ``loader/cache.py``): on by default in $TENSORGRID_CACHE_DIR, else ~/.cache/tensorgrid, filled by a
    background thread while the first epoch reads Parquet, each file checked once per process, shared by the
    processes of one machine. ``cache_dir`` names another folder, ``cache_dir=False`` (or
    $TENSORGRID_CACHE=off) turns it off; ``cache_limit`` (bytes, or "20G"; 0: none) bounds it, by default
    $TENSORGRID_CACHE_LIMIT, else half of the free disk plus what it holds. Also:
    ``multiprocessing_context`` ("fork"/"spawn"), ``timeout``, ``shuffle_buffer``, ``memory_budget``.
    ``cache_fill=False`` reads the cache files that exist but builds none: for a single pass (inference,
    a look at one batch), where filling would only cost a second decode and a disk write.

    ``locality=True`` (a grid of several servers' dataset): this rank reads only the partitions held on its
    own node (``rank_partitions``), shuffled within them, padded with its repeated rows (flagged padding) to
    the batch count of the rank with the most rows; a state resumes only under the same world size and
    placement (loader/locality.py).

    ``stack={"x": ["f0", "f1", ...]}`` hands numeric columns over as one (rows, k) tensor ``x`` in their
    place (their common dtype, by torch's promotion): a wide table's features as a model takes them. From the Arrow cache this is
    a view of the rows as gathered (no per-column work at all: a 25-column table loads as fast as one
    25-wide tensor column), else one copy per chunk.
    """

    def __init__(self, dataset: Dataset, batch_size: int, columns=None, shuffle: bool = False, seed: int = 0,
                 transform=None, num_workers: int = 0, rank: int | None = None, world_size: int | None = None,
                 drop_last: bool = False, prefetch: int = 2, shuffle_buffer: int | None = None,
                 memory_budget: int | None = None, cache_dir=None, cache_limit: int | str | None = None,
                 multiprocessing_context: str | None = None, timeout: float = 0, pin_memory: bool | None = None,
                 cache_fill: bool = True, stack: dict | None = None, locality: bool = False):
        batch_size, num_workers = check_int("batch_size", batch_size, 1), check_int("num_workers", num_workers, 0)
        prefetch, seed = check_int("prefetch", prefetch, 1), check_int("seed", seed)
        memory_budget = check_int("memory_budget", memory_budget, 1, none=True)
        shuffle_buffer = check_int("shuffle_buffer", shuffle_buffer, 1, none=True)
        if transform is not None and not callable(transform):
            raise ArgumentError(f"transform must be callable, got {type(transform).__name__}")
        self.shuffle, self.drop_last = _flag("shuffle", shuffle), _flag("drop_last", drop_last)
        self.timeout = check_number("timeout", timeout, 0)
        self.context = _context(multiprocessing_context, dataset, num_workers)
        self.pin_memory = _pin_choice(pin_memory)
        self.rank, self.world_size = _rank_world(rank, world_size)
        self.dataset = dataset
        self.memory_budget = memory_budget or DEFAULT_MEMORY_BUDGET
        # locality=True: this rank reads only the partitions on its own node (locality.py)
        self.share = Share.of(dataset, self.world_size, batch_size, self.drop_last) \
            if _flag("locality", locality) else None
        self.source = Source(dataset if self.share is None else self.share.dataset(dataset, self.rank), columns,
                             cache_dir, cache_limit, self.memory_budget, fill=_flag("cache_fill", cache_fill))
        if self.source.layout.num_rows == 0:
            raise EmptyDataError(f"{dataset.url or 'dataset'} has no rows to load")
        _check_lengths_names(dataset.schema, self.source.columns)
        self.stack = _check_stack(stack, dataset.schema, self.source.columns)
        self.batch_size, self.seed, self.transform = batch_size, seed, transform
        self.num_workers, self.prefetch = num_workers, prefetch
        row_bytes = max(1.0, self.source.row_bytes)
        # The window decides the order, so it depends on the budget and the data only, never on workers or
        # prefetch (a run resumed with other workers continues the same order). Workers split it into chunks:
        # prefetch per worker, one being consumed, one being built; x2 for gather copies.
        self.window_rows = shuffle_buffer or max(1, int(self.memory_budget / WINDOWS_IN_FLIGHT / 2 / row_bytes))
        # The span: permuted blocks whose pieces a window interleaves (plan.py), what half the budget holds
        # decoded (the Arrow cache and in-memory data need no decoding: there it costs nothing).
        self.span_rows: int | None = max(self.window_rows, int(self.memory_budget / 2 / row_bytes))
        # the first chunks grow 1, 2, 4... batches for a quick first batch; a job reading many pieces of one
        # dataset one after the other (inference parts) turns that off: its next piece's first batch is not waited on
        self.ramp = True
        inflight = max(1, num_workers) * prefetch + 2
        self.chunk_rows = max(1, int(self.memory_budget / inflight / 2 / row_bytes))
        if num_workers and transform is not None and self._start_method() != "fork":
            try:
                cloudpickle.dumps(transform)
            except Exception as e:  # noqa: BLE001
                raise ArgumentError(f"transform must be picklable (with cloudpickle) for "
                                    f"{self._start_method()} workers: {e}") from None
        self.epoch = 0
        self._start = 0
        self._pos = 0
        self._fingerprint: str | None = None

    def _start_method(self) -> str:
        if self.context is None:
            return mp.get_start_method()
        return self.context if isinstance(self.context, str) else self.context.get_start_method()

    def plan(self, epoch: int | None = None) -> Plan:
        local = self.share is not None  # this rank's share alone, padded to every rank's batch count
        return Plan(self.source.layout, self.batch_size, 1 if local else self.world_size, 0 if local else self.rank,
                    self.shuffle, self.seed, self.epoch if epoch is None else epoch, self.drop_last, self.window_rows,
                    max_chunk_batches=self._in_process_chunk() if self.in_process else (
                        1 if self.transform is not None else max(1, self.chunk_rows // self.batch_size)),
                    span_rows=self.span_rows, ramp=self.ramp and not self.source.cache_complete(),
                    pad_batches=self.share.batches if local else None)

    def real_rows(self, k: int) -> int:
        """Rows of global batch ``k`` (every rank's batch k) that are real, not padding."""
        if self.share is not None:
            return self.share.real_rows(k)
        g = self.batch_size * self.world_size
        return max(0, min(g, self.source.layout.num_rows - k * g))

    def _in_process_chunk(self) -> int | None:
        """Batches per chunk built in this process: a whole window; over a network, about REMOTE_CHUNK_BYTES,
        so the next chunk's fetch (a background thread) overlaps this one's gather and use."""
        if not self.dataset.is_remote:
            return None
        return max(1, int(REMOTE_CHUNK_BYTES / max(1.0, self.source.row_bytes) / self.batch_size))

    @property
    def in_process(self) -> bool:
        """Whether chunks are built in this process. Zero-copy views of the Arrow cache cannot cross into
        another process without a copy: without a transform to run, workers would only add copies."""
        return self.num_workers == 0 or (self.transform is None and self.source.cache_complete())

    def __len__(self) -> int:
        return self.plan().num_batches

    @property
    def add_valid(self) -> bool:
        return self.world_size > 1 and not self.drop_last

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._start, self._pos = check_int("epoch", epoch, 0), 0, 0

    @property
    def fingerprint(self) -> str | None:
        """The identity of the rows this loader reads (computed once); None for a Dataset kind without one."""
        if self._fingerprint is None:
            try:
                self._fingerprint = self.dataset.fingerprint
            except NotImplementedError:
                self._fingerprint = ""
        return self._fingerprint or None

    def state_dict(self) -> dict:
        """Where this loader is (epoch, next batch) and what fixes its order, for load_state_dict anywhere."""
        return {"epoch": self.epoch, "batch": self._pos, "seed": self.seed, "shuffle": self.shuffle,
                "global_batch": self.batch_size * self.world_size, "num_rows": self.source.layout.num_rows,
                "drop_last": self.drop_last, "version": self.dataset.version, "url": self.dataset.url,
                "layout": self.source.layout.digest,  # the blocks the order is built from
                "window": self.plan().window, "span": self.span_rows or 0, "fingerprint": self.fingerprint,
                **({} if self.share is None else {  # the same on every rank: the whole data, the share's placement
                    "num_rows": self.dataset.num_rows, "layout": self.share.digest, "locality": self.share.state()})}

    def load_state_dict(self, state: dict) -> None:
        """Continue where ``state`` (from state_dict(), in any process) left off. A state over other rows, or
        with another seed, shuffle, global batch or shuffle window, is refused with ResumeError."""
        if not isinstance(state, dict) or not {"epoch", "batch"} <= state.keys():
            raise ResumeError(f"not a loader state (a dict from state_dict() with 'epoch' and 'batch'): {state!r}"[:200])
        if self.shuffle and not state.get("span"):  # saved before pieces (whole blocks; or 0): resume in that order
            self.span_rows = None
        mine = self.state_dict()
        check_locality(state, mine)
        _check_same_order(state, mine, self.shuffle)
        epoch = check_int("the state's epoch", state["epoch"], 0, error=ResumeError)
        batch = check_int("the state's batch", state["batch"], 0, len(self), error=ResumeError)
        self.epoch, self._start, self._pos = epoch, batch, batch

    def __iter__(self):
        plan = self.plan()
        first, self._start = self._start, 0
        self._pos = first
        if first >= plan.num_batches:
            self.epoch, self._pos = self.epoch + 1, 0
            return
        for chunk in self._chunks(_Chunks(plan, self.source, first, self.transform, self.add_valid, self.stack)):
            if self.pin_memory:  # here, after the chunk arrived: pinned memory is valid in this process only
                chunk.pin_memory(_pin)
            for k, batch in chunk:
                self._pos = k + 1
                yield batch
        self.epoch, self._pos = self.epoch + 1, 0

    def _chunks(self, chunks: _Chunks):
        """This epoch's chunks, built here or by DataLoader workers (watched: a dead one is LoaderWorkerError)."""
        if self.in_process:
            yield from chunks
            return
        self.source.check_cache()  # here, once: the workers inherit what was checked
        watch = Watch.start(lambda: iter(DataLoader(
            chunks, batch_size=None, num_workers=self.num_workers, collate_fn=_identity,
            prefetch_factor=self.prefetch, multiprocessing_context=self.context, timeout=self.timeout,
            pin_memory=False)))
        try:
            while (chunk := watch.next()) is not None:
                if chunk.reads:
                    self.dataset.add_network_reads(chunk.reads)
                yield chunk
        finally:
            watch.close()


def _check_same_order(state: dict, mine: dict, shuffle: bool) -> None:
    """Refuse a state whose rows or order differ from this loader's, saying which and why."""
    compared = state.get("fingerprint") is not None and mine["fingerprint"] is not None  # older states: no field
    if compared and not _same(state["fingerprint"], mine["fingerprint"]):
        raise ResumeError("cannot resume: the state was saved over other data (another dataset, or this one "
                          f"before an append/overwrite): it read {_short(state.get('url'))} version "
                          f"{_short(state.get('version'))}, this loader reads {mine['url']!r} version {mine['version']!r}")
    for key in ("seed", "shuffle", "global_batch", "num_rows", "drop_last"):
        if key in state and not _same(state[key], mine[key]):
            raise ResumeError(f"cannot resume: the state has {key}={_short(state[key])}, this loader {mine[key]!r}"
                              + (" (keep world_size * batch_size unchanged)" if key == "global_batch" else ""))
    if shuffle and "layout" in state and not _same(state["layout"], mine["layout"]):
        raise ResumeError(
            "cannot resume: the state comes from a loader over the same rows in another block layout (cache_dir on "
            "in one, off in the other), whose shuffle order differs" if compared else
            "cannot resume: the state comes from a loader over another block layout (cache_dir on or off, another "
            "kind of dataset, or data changed since), whose shuffle order differs")
    if shuffle and "window" in state and not _same(state["window"], mine["window"]):
        raise ResumeError(f"cannot resume: the state's shuffle window holds {_short(state['window'])} rows, this "
                          f"loader's {mine['window']} (keep memory_budget and shuffle_buffer as they were)")
    if shuffle and "span" in state and not _same(state["span"], mine["span"]):
        raise ResumeError(f"cannot resume: the state interleaves blocks in spans of {_short(state['span'])} rows, "
                          f"this loader in spans of {mine['span']} (keep memory_budget as it was)")


def _same(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - anything a malformed state holds (arrays...) is simply not equal
        return False


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
