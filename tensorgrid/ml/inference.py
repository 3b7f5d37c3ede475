"""Batch inference in parallel and resumable per part: ``NNModel.transform(data, out, workers=, engine=)``.

The rows are cut into parts (contiguous row ranges, the same for the same data whatever the number of
workers); each worker runs the model over its parts and writes each as one shard file, whole, into a staging
folder inside the output dataset (``data/.stage-<key>/part-<k>.parquet`` and its ``.json``: rows, bytes,
checksum, schema). The key is a digest of the input's fingerprint, the model's weights and the inference
settings, so a rerun after a crash (a killed worker, a lost machine, Ctrl-C) finds the parts already done and
computes only the others. When every part is there, the driver renames them into place and commits one
version through the store's commit path (claim, conflict, clean-up); the staging folder goes. A failed
run's staging is vacuumed like any orphan once older than ``min_age_s``.

Workers are the Trainer's engines (local processes, Ray actors, Spark barrier tasks); one worker on the
local engine runs in this process.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa

from .. import fs as tgfs
from ..errors import (
    EmptyDataError,
    SchemaMismatchError,
    TensorGridError,
)
from ..store import from_arrow, subsets
from ..store import open as open_dataset
from ..store.dataset import keep_last_decoded
from ..store.manifest import DATA_DIR
from ..store.writer import check_target, latest, mark_dataset, publish, write_part, write_with
from ..train.loop import device_and_backend
from ..train.predict import Inference
from . import jobs
from .digest import stable_digest

PART_BYTES = 256 << 20  # the largest part, in input bytes (held in memory while it is encoded)
PART_ROWS = 16_384  # the smallest part: a part's set-up (loader, output file) stays a small share of its time
MAX_PARTS = 1_000  # larger data gets larger parts, so that a run never makes more than this many files
TAIL_SPLIT = 4  # the last parts are this many times smaller


def parts_of(num_rows: int, part_rows: int | None = None, row_bytes: float = 1.0) -> list[tuple[int, int]]:
    """Row ranges [start, stop) covering ``num_rows`` in order: ``part_rows`` each, or by default parts of
    at least PART_ROWS rows, few enough for at most MAX_PARTS parts, no more than PART_BYTES of input rows
    (``row_bytes`` each: a part is held in memory while it is encoded), and the rows after the last whole
    part that leaves at least two parts' worth cut in quarter parts (workers taking parts from one queue then end together: the last part any worker
    takes is small)."""
    if part_rows:
        return [(a, min(a + part_rows, num_rows)) for a in range(0, num_rows, part_rows)]
    size = min(max(PART_ROWS, -(-num_rows // (MAX_PARTS - 3 * TAIL_SPLIT))),
               max(1, int(PART_BYTES // max(row_bytes, 1.0))))
    body = max(0, num_rows - 2 * size) // size * size
    tail = max(1, -(-size // TAIL_SPLIT))
    return ([(a, a + size) for a in range(0, body, size)]
            + [(a, min(a + tail, num_rows)) for a in range(body, num_rows, tail)])


def run(model, job: Inference, out: str | None, mode: str, engine: str, workers: int,
        part_rows: int | None = None) -> tuple:
    """Run ``job`` with ``model`` (an nn.Module or a ``(loader, path)`` pair each worker calls) over every
    part not done yet; commit the parts as a version of ``out`` (None: a dataset in memory). Returns the
    dataset and ``{"parts", "computed", "reused"}``."""
    if job.ds.num_rows == 0:
        raise EmptyDataError(f"{job.ds.url or 'the dataset'} has no rows to run the model on")
    parts = parts_of(job.ds.num_rows, part_rows, job.ds.bytes_per_row())
    scratch = tempfile.mkdtemp(prefix="tensorgrid-infer-") if out is None else None
    try:
        target = os.path.join(scratch, "out") if scratch else out
        jobs.check_reachable(target, engine, workers, "out" if out else "the temporary folder (out=None)")
        fs, root = tgfs.resolve(target)
        staging = tgfs.join(root, DATA_DIR, f".stage-{_key(model, job, parts)}")
        done = [_done(fs, staging, k) for k in range(len(parts))]
        if all(done) and _committed(fs, root, done):  # a run that died after its commit, before its clean-up
            tgfs.remove_tree(fs, staging)
            return _result(open_dataset(target), scratch), {"parts": len(parts), "computed": 0, "reused": len(parts)}
        check_target(target, mode)  # refused before any work: an existing dataset to create, foreign files, nesting
        if latest(fs, root) is None:
            mark_dataset(fs, root)  # vacuum cleans a failed run's parts; they are never foreign files
        fs.makedirs(staging, exist_ok=True)
        todo = [k for k, m in enumerate(done) if m is None]
        if todo:
            _compute(_Work(model, job, parts, todo, tgfs.to_url(fs, staging)), fs, staging, engine, workers)
        metas = [_done(fs, staging, k) for k in range(len(parts))]
        if not all(metas):
            lost = [k for k, m in enumerate(metas) if m is None]
            raise TensorGridError(f"inference parts {lost[:5]} are missing from {tgfs.to_url(fs, staging)} after the "
                                  "workers ended; the parts done are kept: run it again")
        physical = _one_schema(metas)
        # the staged parts stay (linked or copied into place) until the commit is done: a failed commit loses none
        ds = write_with(target, mode, physical, lambda fs, root, txn: publish(fs, root, staging, txn, metas, [],
                                                                                   keep=True))
        tgfs.remove_tree(fs, staging)
        return _result(ds, scratch), {"parts": len(parts), "computed": len(todo), "reused": len(parts) - len(todo)}
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)


def _result(ds, scratch: str | None):
    return from_arrow(ds.to_arrow()) if scratch else ds


def _compute(work: _Work, fs, staging: str, engine: str, workers: int) -> None:
    """The parts still to do, in this process (one local worker) or on the engine's workers; a worker's
    TensorGrid error (TransformError, ModelInputError...) is raised here as itself."""
    if engine == "local" and workers == 1:
        work.run_rank(0, 1)
    elif engine == "local" and jobs.can_fork(workers, work.job.ds):
        jobs.forked_else_fresh(work, workers, work.todo, tgfs.to_url(fs, staging), "inference", "parts",
                               lambda: [k for k in work.todo if _done(fs, staging, k) is None])
    else:
        jobs.run(work, engine, workers, fs, staging, "inference", "parts")


def _committed(fs, root: str, metas: list[dict]) -> bool:
    """Whether the newest version already holds every part (by checksum)."""
    base = latest(fs, root)
    return base is not None and {m["checksum"] for m in metas} <= {s.checksum for s in base.shards}


class _Work:
    """What each worker runs: its share of the parts still to do (``todo[rank::world]``, or those ``take``
    hands out)."""

    timeout_s = jobs.TIMEOUT_S  # the engines' rendezvous

    def __init__(self, model, job: Inference, parts, todo, staging_url: str):
        self.model, self.job, self.parts, self.todo, self.staging_url = model, job, parts, todo, staging_url

    def run_rank(self, rank: int, world: int, take=None) -> dict:
        model = self.model[0](self.model[1]) if isinstance(self.model, tuple) else self.model
        if world > 1 and any(True for _ in model.parameters()):
            model.to(device_and_backend()[0])  # a worker of its own: its GPU when there is one
        fs, staging = tgfs.resolve(self.staging_url)
        done = 0
        # a part's file is written (encoded, fsynced) by a thread while the model runs over the next part; one
        # write at a time, so at most one finished part waits in memory
        with jobs.errors_kept(fs, staging, rank, world, take), keep_last_decoded(), \
                ThreadPoolExecutor(1, thread_name_prefix="tensorgrid-part-writer") as writer:
            pending = None  # on an error the write under way finishes (leaving the executor waits): its part is kept
            # disjoint ranges in order: a row group shared by parts is decoded once
            for k in jobs.pieces(self.todo, rank, world, take):
                table = self._table(model, k)
                if pending is not None:
                    pending.result()  # the previous part's write, and its error, before the next starts
                pending = writer.submit(self._write, fs, staging, k, table)
                done += 1
            if pending is not None:
                pending.result()
        if tgfs.is_local(fs):
            tgfs.fsync_dir(staging)
        return {"parts": done}

    def _table(self, model, k: int) -> pa.Table:
        start, stop = self.parts[k]
        batches = list(self.job.batches(model, subsets.rows(self.job.ds, start, stop)))
        table = pa.Table.from_batches(batches) if batches else None
        if table is None or table.num_rows != stop - start:
            raise TensorGridError(f"inference part {k} gave {0 if table is None else table.num_rows} rows for "
                                  f"{stop - start}")
        return table

    @staticmethod
    def _write(fs, staging: str, k: int, table: pa.Table) -> None:
        # each file's bytes are durable before its name appears; the names are synced once per worker (after
        # a power loss a lost name only means a part computed again: ``_done`` needs both, of the same size)
        meta = write_part(fs, tgfs.join(staging, _name(k)), table, sync_dir=False)
        tgfs.put_atomic(fs, tgfs.join(staging, _name(k, ".json")), json.dumps({"path": _name(k), **meta}).encode(),
                        sync_dir=False)


def _name(k: int, ext: str = ".parquet") -> str:
    return f"part-{k:05d}{ext}"


def _done(fs, staging: str, k: int) -> dict | None:
    """Part ``k``'s description if it was written whole (its description names its file, of its size)."""
    try:
        meta = json.loads(fs.cat_file(tgfs.join(staging, _name(k, ".json"))))
        if fs.size(tgfs.join(staging, meta["path"])) == meta["bytes"]:
            return meta
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        pass
    return None


def _one_schema(metas: list[dict]) -> pa.Schema:
    schemas = {m["schema"] for m in metas}
    if len(schemas) > 1:
        raise SchemaMismatchError("the inference parts disagree on their columns' types (a model whose outputs "
                                  "change shape between rows?); nothing was committed")
    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(metas[0]["schema"])))


def _key(model, job: Inference, parts) -> str:
    """A digest of what decides the outputs: the input rows, the model (weights, and the architecture and
    settings its repr shows: LeakyReLU's slope...; a TorchScript file's bytes; an ONNX model's), the
    settings, the transform's code, arguments and closure (a fixed bug is other work), the parts. The same
    in a new process (``stable_digest``), so a rerun after a crash finds the parts done."""
    if isinstance(model, tuple):
        fs, path = tgfs.resolve(model[1])
        weights = (model[1], fs.cat_file(path))
    else:
        weights = (repr(model), model.state_dict(), getattr(model, "_bytes", b""))
    settings = (job.ds.fingerprint, parts, job.features, job.keep, job.names, job.outputs, job.classifier)
    return stable_digest(settings, _transform_key(job.transform), weights)[:12]


def _transform_key(fn):
    """A transform by its content; one that does not pickle (it could not go to workers either) by name."""
    try:
        return stable_digest(fn)
    except Exception:  # noqa: BLE001 - pickling errors vary
        return getattr(fn, "__qualname__", type(fn).__qualname__)
