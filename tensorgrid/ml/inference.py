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

import cloudpickle
import pyarrow as pa
import torch
import xxhash

from .. import fs as tgfs
from ..errors import SchemaMismatchError, TensorGridError
from ..store import from_arrow, subsets
from ..store.manifest import DATA_DIR
from ..store.writer import check_target, publish, write_part, write_with
from ..train import engines
from ..train.loop import device_and_backend
from ..train.predict import Inference

PART_ROWS = 16_384  # the smallest part: a part's set-up (loader, output file) stays a small share of its time
MAX_PARTS = 1_000  # larger data gets larger parts, so that a run never makes more than this many files
TIMEOUT_S = 300.0  # how long the workers' rendezvous waits for a slow one


def parts_of(num_rows: int, part_rows: int | None = None) -> list[tuple[int, int]]:
    """Row ranges [start, stop) covering ``num_rows`` in order: ``part_rows`` each, by default at least
    PART_ROWS and few enough for at most MAX_PARTS parts."""
    size = part_rows or max(PART_ROWS, -(-num_rows // MAX_PARTS))
    return [(a, min(a + size, num_rows)) for a in range(0, num_rows, size)]


def run(model, job: Inference, out: str | None, mode: str, engine: str, workers: int,
        part_rows: int | None = None) -> tuple:
    """Run ``job`` with ``model`` (an nn.Module or a ``(loader, path)`` pair each worker calls) over every
    part not done yet; commit the parts as a version of ``out`` (None: a dataset in memory). Returns the
    dataset and ``{"parts", "computed", "reused"}``."""
    parts = parts_of(job.ds.num_rows, part_rows)
    scratch = tempfile.mkdtemp(prefix="tensorgrid-infer-") if out is None else None
    try:
        target = os.path.join(scratch, "out") if scratch else out
        check_target(target, mode)  # refused before any work: an existing dataset to create, foreign files, nesting
        fs, root = tgfs.resolve(target)
        staging = tgfs.join(root, DATA_DIR, f".stage-{_key(model, job, parts)}")
        fs.makedirs(staging, exist_ok=True)
        todo = [k for k in range(len(parts)) if _done(fs, staging, k) is None]
        if todo:
            work = _Work(model, job, parts, todo, tgfs.to_url(fs, staging))
            if engine == "local" and workers == 1:
                work.run_rank(0, 1)  # in this process
            else:
                engines.get(engine)(cloudpickle.dumps(work), workers, 0, TIMEOUT_S, None)
        metas = [_done(fs, staging, k) for k in range(len(parts))]
        if any(m is None for m in metas):
            lost = [k for k, m in enumerate(metas) if m is None]
            raise TensorGridError(f"inference parts {lost[:5]} were not written by the workers; run it again "
                                  "(the parts done are kept)")
        physical = _one_schema(metas)
        moved: list[str] = []

        def produce(fs, root, txn):
            try:
                return publish(fs, root, staging, txn, metas, moved)
            except BaseException:
                for p in moved:
                    fs.rm_file(p)
                raise

        ds = write_with(target, mode, physical, produce)
        tgfs.remove_tree(fs, staging)
        if scratch:
            ds = from_arrow(ds.to_arrow())
        return ds, {"parts": len(parts), "computed": len(todo), "reused": len(parts) - len(todo)}
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)


class _Work:
    """What each worker runs: its share of the parts still to do (``todo[rank::world]``)."""

    timeout_s = TIMEOUT_S  # the engines' rendezvous

    def __init__(self, model, job: Inference, parts, todo, staging_url: str):
        self.model, self.job, self.parts, self.todo, self.staging_url = model, job, parts, todo, staging_url

    def run_rank(self, rank: int, world: int) -> dict:
        model = self.model[0](self.model[1]) if isinstance(self.model, tuple) else self.model
        if world > 1 and any(True for _ in model.parameters()):
            model.to(device_and_backend()[0])  # a worker of its own: its GPU when there is one
        fs, staging = tgfs.resolve(self.staging_url)
        mine = self.todo[rank::world]
        for k in mine:
            start, stop = self.parts[k]
            rows = subsets.rows(self.job.ds, start, stop)
            batches = list(self.job.batches(model, rows))
            table = pa.Table.from_batches(batches) if batches else None
            if table is None or table.num_rows != stop - start:
                raise TensorGridError(f"inference part {k} gave {0 if table is None else table.num_rows} rows for "
                                      f"{stop - start}")
            meta = write_part(fs, tgfs.join(staging, _name(k)), table)
            tgfs.put_atomic(fs, tgfs.join(staging, _name(k, ".json")), json.dumps({"path": _name(k), **meta}).encode())
        return {"parts": len(mine)}


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
    """A digest of what decides the outputs: the input rows, the model's weights, the settings, the parts."""
    h = xxhash.xxh3_64(job.ds.fingerprint.encode())
    h.update(repr((parts, job.features, job.keep, job.names, job.outputs, job.classifier, _describe(job.transform))).encode())
    if isinstance(model, tuple):
        h.update(model[1].encode())
        fs, path = tgfs.resolve(model[1])
        h.update(fs.cat_file(path))
    else:
        h.update(type(model).__qualname__.encode())
        for name, t in model.state_dict().items():
            t = t.detach().cpu().contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")
        h.update(getattr(model, "_bytes", b""))  # an ONNX model's file
    return h.hexdigest()[:12]


def _describe(fn) -> str:
    """A transform's description that is the same in every run (not its memory address)."""
    if fn is None:
        return ""
    text = repr(fn)
    return getattr(fn, "__qualname__", type(fn).__qualname__) if " at 0x" in text else text
