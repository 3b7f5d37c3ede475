"""The ``tensorgrid`` command. User mistakes end in one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

from rich.table import Table

from . import fs as tgfs
from . import store
from .args import check_int, check_number
from .errors import (
    ArgumentError,
    DatasetExistsError,
    EmptyDataError,
    ReadOnlyError,
    TensorGridError,
    UnsupportedFormatError,
)
from .show import human_bytes, out, print_frame, print_info, progress, safe, text
from .store import export
from .store.vacuum import vacuum as store_vacuum

TABULAR_EXT = store.foreign.PARQUET_EXT + store.foreign.CSV_EXT
INT64_MAX = (1 << 63) - 1  # the largest count Arrow and DuckDB take
MAX_SHARD_MB = float(1 << 20)  # 1 TiB

def _version(a) -> int | None:
    return check_int("--version", a.version, 1, INT64_MAX, none=True)


def cmd_info(a) -> None:
    ds = store.open(a.ds, version=_version(a))
    print_info(ds)
    _print_cache_usage(ds)


def _print_cache_usage(ds) -> None:
    """How much of the dataset the loader's Arrow cache holds (the default folder)."""
    from .loader import cache

    u = cache.dataset_usage(ds)
    if u is None:
        out.print("loader cache: not cached (its shards have no content key; in-memory data is zero-copy already)",
                  markup=False)
    else:
        out.print(safe(f"loader cache: {u['cached']} of {u['shards']} shards, {human_bytes(u['bytes'])} in "
                       f"{u['dir']}" + ("" if cache.env_enabled() else " (off: $TENSORGRID_CACHE)")), markup=False)


def cmd_cache(a) -> None:
    from .loader import cache

    c = cache.default_cache(a.dir)
    if a.action == "clear":
        r = c.clear()
        busy = f"; kept {r['busy']} being filled by a running loader" if r["busy"] else ""
        out.print(safe(f"removed {r['removed']} file(s), {human_bytes(r['bytes'])} from {c.dir}{busy}"), markup=False)
        return
    entries = c.entries()
    held = sum(e["bytes"] for e in entries)
    t = Table("dataset", "version", "shard", "rows", "size", "last used (UTC)", title=text(c.dir), title_justify="left")
    for e in reversed(entries):  # most recently used first
        t.add_row(text(str(e.get("url") or "?")), str(e.get("version", "?")), str(e.get("shard", "?")),
                  f"{e['rows']:,}" if isinstance(e.get("rows"), int) else "?", human_bytes(e["bytes"]),
                  time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e["used"])))
    if entries:
        out.print(t)
    state = "on" if a.dir or cache.env_enabled() else "off ($TENSORGRID_CACHE)"
    limit, why = cache.describe_limit(c, held)
    out.print(safe(f"{len(entries)} file(s), {human_bytes(held)}; limit {'none' if limit is None else human_bytes(limit)} "
                   f"({why}); the default cache is {state}"), markup=False)


def cmd_head(a) -> None:
    n = check_int("-n", a.n, 0, INT64_MAX)
    ds = store.open(a.ds, version=_version(a))
    print_frame(ds.head(n), title=f"{ds.url}: first {n} of {ds.num_rows:,} rows")


def cmd_versions(a) -> None:
    ds = store.open(a.ds)
    t = Table("version", "time (UTC)", "operation", "rows", "added", "shards", title=text(ds.url),
              title_justify="left")
    for v in ds.versions():
        t.add_row(str(v.version), v.timestamp[:23].replace("T", " "), v.operation, f"{v.rows:,}",
                  f"{v.added_rows:,}", str(v.shards))
    out.print(t)


def cmd_verify(a) -> None:
    ds = store.open(a.ds, version=_version(a))
    t0 = time.perf_counter()
    r = ds.verify()
    dt = time.perf_counter() - t0
    out.print(f"ok: {r['shards']} shards, {r['rows']:,} rows, {human_bytes(r['bytes'])} verified in {dt:.2f} s",
              markup=False)


def _alter_pairs(flag: str, values: list[str] | None) -> dict[str, str]:
    """``--add``/``--widen`` NAME:TYPE or ``--rename`` OLD:NEW values as a dict (split at the first colon)."""
    out: dict[str, str] = {}
    for value in values or []:
        key, sep, rest = value.partition(":")
        if not sep or not key or not rest:
            raise ArgumentError(f"{flag} takes {'OLD:NEW' if flag == '--rename' else 'NAME:TYPE'}, got {value!r}")
        if key in out:
            raise ArgumentError(f"{flag} names the column {key!r} twice")
        out[key] = rest
    return out


def cmd_alter(a) -> None:
    changes = {"add": _alter_pairs("--add", a.add), "widen": _alter_pairs("--widen", a.widen),
               "rename": _alter_pairs("--rename", a.rename)}
    if not any(changes.values()):
        raise ArgumentError("alter needs at least one change: --add NAME:TYPE, --widen NAME:TYPE or --rename OLD:NEW")
    ds = store.open(a.ds)
    if not isinstance(ds, store.StoreDataset):
        raise ReadOnlyError(f"{a.ds} is not a versioned TensorGrid dataset: alter changes only datasets tg.write made")
    new = ds.alter(**changes)
    done = [f"{k} {n}:{v}" for k, pairs in changes.items() for n, v in pairs.items()]
    out.print(safe(f"altered {new.url}: version {new.version} ({', '.join(done)}); no data rewritten"), markup=False)
    print_info(new)


def cmd_vacuum(a) -> None:
    min_age = check_number("--min-age", a.min_age, 0)
    # also a folder holding only an interrupted first write; a user's own files in data/ are kept unless asked
    r = store_vacuum(a.ds, min_age_s=min_age, delete_unknown=a.delete_unknown)
    msg = f"removed {r['removed']} unreferenced file(s), {human_bytes(r['bytes'])}"
    if r["kept_young"]:
        msg += f"; kept {r['kept_young']} younger than {min_age:g} s (a writer may be at work; see --min-age)"
    out.print(msg, markup=False)
    if r["unknown"]:
        n = len(r["unknown"])
        out.print(f"kept {n} file(s) TensorGrid did not write ({safe(r['unknown'][0])}{', ...' if n > 1 else ''}); "
                  "--delete-unknown deletes them", markup=False)


def cmd_expire(a) -> None:
    from .store import retention

    if (a.keep_last is None) == (a.older_than is None):
        raise ArgumentError("expire takes one of --keep-last N or --older-than AGE (e.g. 30d)")
    if a.keep_last is not None:
        try:
            keep_last = int(a.keep_last)
        except ValueError:
            raise ArgumentError(f"--keep-last must be an int >= 1, got {a.keep_last!r}") from None
        r = retention.expire(a.ds, keep_last=check_int("--keep-last", keep_last, 1))
    else:
        r = retention.expire(a.ds, older_than=retention.parse_age(a.older_than))
    done = (f"expired {len(r['expired'])} version(s) ({_span(r['expired'])})" if r["expired"]
            else "nothing to expire")
    out.print(safe(f"{done}; kept {len(r['kept'])} ({_span(r['kept'])}); `tensorgrid vacuum` frees the shards "
                   "only expired versions use once its --min-age has passed since"), markup=False)


def _span(versions: list[int]) -> str:
    """Version numbers, a consecutive run as first..last."""
    if len(versions) > 2 and versions[-1] - versions[0] == len(versions) - 1:
        return f"{versions[0]}..{versions[-1]}"
    return ", ".join(map(str, versions))


def _versioned(url: str, what: str):
    """The latest version of the dataset at ``url``, refusing data read in place (nothing of ours to rewrite)."""
    ds = store.open(url)
    if not isinstance(ds, store.StoreDataset):
        raise ReadOnlyError(f"{url} is not a versioned TensorGrid dataset (Parquet/CSV is read in place): {what} "
                            "rewrites only datasets tg.write made")
    return ds


def cmd_compact(a) -> None:
    target_mb = check_number("--target-mb", a.target_mb, 0.001, MAX_SHARD_MB)
    ds = _versioned(a.ds, "compact")
    t0 = time.perf_counter()
    new = ds.compact(int(target_mb * (1 << 20)))
    dt = time.perf_counter() - t0
    if new.version == ds.version:
        out.print(safe(f"nothing to compact: {ds.url} version {ds.version} has {ds.num_shards:,} shards, no run of "
                       f"small ones (under {target_mb / 2:g} MB in memory) worth merging"), markup=False)
        return
    out.print(safe(f"compacted {ds.url}: {ds.num_shards:,} shards -> {new.num_shards:,} in version {new.version} "
                   f"({new.num_rows:,} rows, same order) in {dt:.1f} s; `tensorgrid vacuum` frees the old files once "
                   "older versions have expired"), markup=False)


def cmd_delete(a) -> None:
    ds = _versioned(a.ds, "delete")
    new = ds.delete(a.where)
    if not new.deleted_rows:
        out.print(safe(f"no row matches {a.where!r}: nothing deleted, {ds.url} stays at version {new.version}"),
                  markup=False)
        return
    out.print(safe(f"deleted {new.deleted_rows:,} rows from {ds.url}: version {new.version} has {new.num_rows:,} "
                   f"rows (version {new.version - 1} still has them: time travel)"), markup=False)


def cmd_ls(a) -> None:
    entries = store.list_datasets(a.root)
    if not entries:
        out.print(f"no datasets under {safe(a.root)}", markup=False)
        return
    t = Table("dataset", "version", "rows", "shards", "size", title=text(a.root), title_justify="left")
    for e in entries:
        if e.error:
            t.add_row(text(e.url), "?", "?", "?", text(e.error))
        else:
            t.add_row(text(e.url), str(e.version), f"{e.rows:,}", str(e.shards), human_bytes(e.bytes))
    out.print(t)


def _tables(specs: list[str]) -> dict[str, str]:
    """``--ds`` values (each NAME=URL) as name -> url."""
    urls: dict[str, str] = {}
    for spec in specs:
        name, sep, url = spec.partition("=")
        if not sep or not name.isidentifier():
            raise ArgumentError(f"--ds takes name=url, got {spec!r}")
        if name in urls:
            raise ArgumentError(f"--ds names the table {name!r} twice")
        urls[name] = url
    return urls


def cmd_sql(a) -> None:
    limit = check_int("--limit", a.limit, 0, INT64_MAX, none=True)
    specs = [x for group in a.ds or [] for x in group]
    query = a.query
    if query is None and specs and "=" not in specs[-1].split(" ", 1)[0]:
        query = specs.pop()  # `--ds a=x "SELECT ..."`: --ds took the query too
    if query is None:
        raise ArgumentError("sql needs a query: tensorgrid sql \"SELECT ...\" --ds name=url")
    fmt = _output_format(a)
    if a.out is not None:
        _refuse_existing_dataset(a.out, a.mode)
    if a.out_file is not None:
        _refuse_existing_file(a.out_file, a.mode)
    tables = {name: store.open(url) for name, url in _tables(specs).items()}
    result = store.sql(query, **tables)
    if a.out is not None:
        ds = store.write(a.out, result, mode=a.mode)
        _stderr_line(f"wrote {ds.added_rows:,} rows to {ds.url} version {ds.version}")
    table = result.to_arrow() if limit is None else result.to_arrow().slice(0, limit)
    if a.out_file is not None:
        export.write_file(table, a.out_file, fmt, overwrite=a.mode == "overwrite")
        _stderr_line(f"wrote {table.num_rows:,} rows to {a.out_file} ({fmt})")
    elif fmt is not None:
        export.write_stream(table, fmt, sys.stdout.buffer)
    elif a.out is None:
        shown = 20 if limit is None else limit
        print_frame(result.head(shown), title=f"{result.num_rows:,} rows" +
                    (f" (first {shown})" if result.num_rows > shown else ""))


def _output_format(a) -> str | None:
    """--format, or the --out-file's extension; None: the table on the terminal."""
    if a.out_file is None:
        if a.format == "parquet" and sys.stdout.isatty():
            raise ArgumentError("--format parquet writes binary: give --out-file PATH, or pipe the output")
        return a.format
    fmt = export.format_of(a.out_file)
    if a.format is not None and fmt is not None and fmt != a.format:
        raise ArgumentError(f"--format {a.format} but --out-file {a.out_file} names {fmt}: give one of them, or a "
                            f"file name that ends in .{a.format}")
    if a.format is not None:
        return a.format
    if fmt is None:
        raise ArgumentError(f"--out-file {a.out_file}: say --format csv, json or parquet (its extension names none)")
    return fmt


def _refuse_existing_file(url: str, mode: str) -> None:
    from . import fs as tgfs

    problem = export.target_problem(url)  # before any work: a missing folder, a device or a pipe
    if problem is not None:
        raise TensorGridError(f"--out-file {url} {problem}")
    fsys, path = tgfs.resolve(url)
    if fsys.exists(path) and (mode != "overwrite" or fsys.isdir(path)):
        what = "a folder" if fsys.isdir(path) else "a file"
        raise TensorGridError(f"--out-file {url} is {what} that exists" + (
            ": pass --mode overwrite to replace it" if what == "a file" else ": give a file path"))


def _refuse_existing_dataset(url: str, mode: str) -> None:
    """A create onto a committed dataset, refused before any work, in the command's own words."""
    from . import fs as tgfs

    fsys, root = tgfs.resolve(url)
    versions = store.manifest.list_versions(fsys, root) if store.manifest.is_dataset(fsys, root) else []
    if mode == "create" and versions:
        raise DatasetExistsError(f"{url} already holds a dataset (version {versions[-1]}): pass --mode append to add "
                                 "rows, or --mode overwrite to make a new version of only these rows (older versions "
                                 "stay readable)")


def _source_kind(src: str) -> str:
    from . import fs as tgfs

    fsys, path = tgfs.resolve(src)
    low = path.lower()
    if low.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    if fsys.isdir(path) and not store.manifest.is_dataset(fsys, path):
        files, odd = store.images.walk(src) if tgfs.is_local(fsys) else ([], [])  # (no special files elsewhere)
        if odd and not any(f.lower().endswith(TABULAR_EXT) for f in files):
            # FIFOs, sockets or links that loop: not a table, and sniffing the files for Parquet would open
            # (and block on) them; ingest_images skips and reports them
            return "images"
        try:
            return store.foreign.find_files(src)[1]
        except UnsupportedFormatError as e:
            if "mixes Parquet" in str(e):
                raise  # tabular files, just not one kind: say so rather than look for images
            return "images"
    if not fsys.exists(path):
        raise TensorGridError(f"nothing at {src}")
    return "dataset" if fsys.isdir(path) else store.foreign.find_files(src)[1]


def cmd_ingest(a) -> None:
    shard_mb = check_number("--shard-mb", a.shard_mb, 0.001, MAX_SHARD_MB, none=True)
    shard_bytes = None if shard_mb is None else int(shard_mb * (1 << 20))
    _refuse_existing_dataset(a.dest, a.mode)
    kind = _source_kind(a.src)
    t0 = time.perf_counter()
    if kind == "images":
        total = len(store.images.walk(a.src)[0])
        with progress(total, "packing images") as bar, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", store.SkippedFilesWarning)
            task = bar.add_task("", total=total)
            ds = store.ingest_images(a.src, a.dest, mode=a.mode, shard_bytes=shard_bytes,
                                     progress=lambda n: bar.advance(task, n))
        for w in caught:
            _stderr_line(f"warning: {w.message}")
    elif kind == "jsonl":
        import pyarrow.json as pj

        from . import fs as tgfs

        fsys, path = tgfs.resolve(a.src)
        with fsys.open(path, "rb") as f:
            try:
                table = pj.read_json(f)
            except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid with the line at fault
                raise UnsupportedFormatError(f"{a.src} is not valid JSON Lines: {e}") from None
        ds = store.write(a.dest, table, mode=a.mode, shard_bytes=shard_bytes)
    else:  # parquet, csv or a dataset: stream it batch by batch
        src = store.open(a.src)
        if src.num_rows == 0:
            raise EmptyDataError(f"{a.src} holds no rows to ingest (columns: {', '.join(src.schema.names)})")
        ds = store.write(a.dest, (b for i in range(src.num_shards) for b in src.read_shard(i).to_batches()),
                         mode=a.mode, shard_bytes=shard_bytes)
    dt = time.perf_counter() - t0
    added = ds.added_rows
    total = f" ({ds.num_rows:,} in all)" if added != ds.num_rows else ""
    out.print(safe(f"ingested {added:,} rows from {a.src} ({kind}) into {ds.url} version {ds.version}{total} "
                   f"in {dt:.1f} s"), markup=False)
    print_info(ds)


def cmd_quickstart(a) -> None:
    from .quickstart import run

    run(a.root, train=not a.no_train, overwrite=a.overwrite)


def cmd_curve(a) -> None:
    import runpy

    from .ml.curve import learning_curve
    from .store import open as open_dataset

    path, _, name = a.trainer.rpartition(":")
    if not path or not name:
        raise ArgumentError(f"--trainer is FILE.py:FUNCTION (a function that returns a Trainer or an estimator), "
                            f"got {a.trainer!r}")
    if not os.path.isfile(path):
        raise ArgumentError(f"--trainer: no such file {path!r}")
    make = runpy.run_path(path, run_name="tensorgrid_curve_trainer").get(name)  # its __main__ block does not run
    if not callable(make):
        raise ArgumentError(f"{path} defines no function {name!r}")
    try:
        sizes = "auto" if a.sizes == "auto" else [int(x) for x in a.sizes.split(",") if x.strip()]
    except ValueError:
        raise ArgumentError(f"--sizes is 'auto' or row counts separated by commas, got {a.sizes!r}") from None
    curve = learning_curve(make(), open_dataset(a.data), open_dataset(a.val), sizes=sizes, repeats=a.repeats,
                           parallel=a.parallel, work_dir=a.work_dir, seed=a.seed)
    print(curve.table.to_string(index=False))
    print(curve)
    if curve.law is not None:
        top = int(curve.table["size"].max())
        value, low, high = curve.predict(top * 10)
        print(f"predicted error with 10x the data ({top * 10:,} rows): {value:.4f} (95%: {low:.4f}..{high:.4f})")
    print(f"plot: {curve.plot(a.png)}")


def cmd_serve(a) -> None:
    import logging

    # gRPC's own log (a line per failed TLS handshake, its bind errors) stays off unless asked for: our errors
    # are one line each; GRPC_VERBOSITY=INFO turns it back on (read when gRPC starts, so set before the import)
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")

    from .server import auth

    if a.hash_password:
        print(auth.hash_password(_new_password()), flush=True)
        return
    if a.root is None:
        raise ArgumentError("serve needs --root DIR: the folder that holds the grid's database and files")
    port = check_int("--port", a.port, 0, 65535)
    max_calls = check_int("--max-calls", a.max_calls, 1, none=True)
    timeout = check_number("--query-timeout", a.query_timeout, 0)
    token_ttl = check_number("--token-ttl", a.token_ttl, 1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .server import serve

    server = serve.start(a.root, a.host, port, tls_cert=a.tls_cert, tls_key=a.tls_key, tls_client_ca=a.tls_client_ca,
                         users=a.users, allow=[x for group in a.allow or [] for x in group],
                         memory_limit=a.memory_limit, max_calls=max_calls, query_timeout=timeout or None,
                         token_ttl=token_ttl, insecure_no_auth=a.insecure_no_auth, grid=a.grid,
                         replicas=check_int("--replicas", a.replicas, 1), store=a.store)
    serve.serve_until_signal(server)


def _new_password() -> str:
    """A password from the terminal (asked twice) or from stdin (one line, for scripts)."""
    import getpass

    if sys.stdin.isatty():
        first = getpass.getpass("password: ")
        if getpass.getpass("again: ") != first:
            raise TensorGridError("the two passwords differ")
    else:
        first = sys.stdin.readline().rstrip("\r\n")
    if not first:
        raise TensorGridError("empty password: give one on the terminal or as one line on stdin")
    return first


class UsageError(Exception):
    """A command line argparse cannot parse (reported in one line, exit code 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints the usage and exits; one line here instead
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tensorgrid", description="Deep learning on big data: datasets, loader, "
                                "training. Datasets are URLs: paths, file://, memory://, s3://, gs://, hdfs://...")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, fn, help_):
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(fn=fn)
        sp.add_argument("--storage-option", action="append", metavar="KEY=VALUE", dest="storage_options",
                        help="an fsspec option for remote URLs (repeatable): endpoint_url=http://..., anon=true, "
                             "profile=NAME; credentials are best left to the environment (AWS_ACCESS_KEY_ID...) or "
                             "config files, which are used by default")
        return sp

    sp = add("quickstart", cmd_quickstart, "write scikit-learn's digits as a dataset and tour the API")
    sp.add_argument("--root", default="grid", help="the demo writes only into ROOT/quickstart, which each run "
                                                    "replaces (default ./grid)")
    sp.add_argument("--no-train", action="store_true", help="skip the training part")
    sp.add_argument("--overwrite", action="store_true", help="replace ROOT/quickstart even if the demo did not make it")
    sp = add("ingest", cmd_ingest, "ingest CSV, Parquet, JSON Lines or a folder of images into a dataset")
    sp.add_argument("src")
    sp.add_argument("dest")
    sp.add_argument("--mode", choices=["create", "append", "overwrite"], default="create",
                    help="create (default) refuses an existing dataset; append adds rows; overwrite makes a new "
                         "version of only these rows (older versions stay readable)")
    sp.add_argument("--shard-mb", type=float, default=None, help="target shard size in MB (default 128)")
    sp = add("ls", cmd_ls, "list the datasets under a URL")
    sp.add_argument("root")
    for name, fn, help_ in (("info", cmd_info, "schema, rows, shards and size of a dataset"),
                            ("verify", cmd_verify, "recompute every shard's size and checksum")):
        sp = add(name, fn, help_)
        sp.add_argument("ds")
        sp.add_argument("--version", type=int, default=None)
    sp = add("head", cmd_head, "the first rows of a dataset")
    sp.add_argument("ds")
    sp.add_argument("-n", type=int, default=5)
    sp.add_argument("--version", type=int, default=None)
    sp = add("sql", cmd_sql, "run DuckDB SQL over datasets")
    sp.epilog = ("examples:\n"
                 "  tensorgrid sql \"SELECT label, count(*) FROM d GROUP BY label\" --ds d=grid/digits\n"
                 "  tensorgrid sql \"SELECT * FROM a JOIN b USING (id)\" --ds a=grid/a b=grid/b   (or --ds a=.. --ds b=..)\n"
                 "  tensorgrid sql \"SELECT * FROM d WHERE label = 3\" --ds d=grid/digits --out grid/threes\n"
                 "  tensorgrid sql \"SELECT id, label FROM d\" --ds d=grid/digits --format csv > labels.csv")
    sp.formatter_class = argparse.RawDescriptionHelpFormatter
    sp.add_argument("query", nargs="?", help="DuckDB SQL; each --ds dataset is a table")
    sp.add_argument("--ds", action="append", nargs="+", metavar="NAME=URL",
                    help="datasets as tables: --ds a=URL b=URL, or --ds repeated")
    sp.add_argument("--limit", type=int, default=None,
                    help="at most this many rows (shown on the terminal: 20; written: all)")
    sp.add_argument("--out", metavar="URL", help="write the result as a dataset at URL (see --mode)")
    sp.add_argument("--mode", choices=["create", "append", "overwrite"], default="create",
                    help="--out onto an existing dataset: append, or overwrite (a new version; old ones stay); "
                         "--out-file onto an existing file: overwrite (default create: refuse)")
    sp.add_argument("--format", choices=export.FORMATS, default=None,
                    help="print the rows as csv, json (JSON Lines) or parquet instead of a table (pipes)")
    sp.add_argument("--out-file", metavar="PATH", help="write the rows to a file (format from --format or the "
                                                       "extension: .csv, .json/.jsonl, .parquet)")
    sp = add("cache", cmd_cache, "the loader's Arrow cache: list its files, size and limit, or clear it")
    sp.add_argument("action", nargs="?", choices=["list", "clear"], default="list")
    sp.add_argument("--dir", default=None, help="a cache_dir= folder (default: $TENSORGRID_CACHE_DIR, else "
                                                "$XDG_CACHE_HOME/tensorgrid, else ~/.cache/tensorgrid)")
    sp = add("curve", cmd_curve, "a learning curve: train on growing subsets, fit the power law of error vs rows")
    sp.add_argument("--data", required=True, metavar="URL", help="the training dataset")
    sp.add_argument("--val", required=True, metavar="URL", help="the validation dataset (no rows of --data)")
    sp.add_argument("--trainer", required=True, metavar="FILE.py:FUNCTION",
                    help="a Python file and the function in it that builds the Trainer or estimator")
    sp.add_argument("--sizes", default="auto", help="'auto' (default) or row counts: 100,200,400,800")
    sp.add_argument("--repeats", type=int, default=3, help="runs per size (default 3)")
    sp.add_argument("--parallel", type=int, default=1, help="runs at once in worker processes (default 1)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--png", default="curve.png", help="where the plot goes (default curve.png)")
    sp.add_argument("--work-dir", default=None, help="where each run's result is kept (a rerun resumes)")
    _add_serve(add)
    sp = add("compact", cmd_compact, "merge runs of small shards (many small appends) into big ones: a new version, "
                                     "same rows in the same order")
    sp.add_argument("ds")
    sp.add_argument("--target-mb", type=float, default=128.0,
                    help="shard size to merge into, in MB in memory as --shard-mb (default 128); shards under half "
                         "of it are merged")
    sp = add("delete", cmd_delete, "delete the rows matching an SQL condition: a new version (older ones keep them)")
    sp.epilog = "example:\n  tensorgrid delete grid/digits --where \"label = 3\""
    sp.formatter_class = argparse.RawDescriptionHelpFormatter
    sp.add_argument("ds")
    sp.add_argument("--where", required=True, metavar="CONDITION", help="a DuckDB SQL condition over the columns")
    sp = add("versions", cmd_versions, "the history of a dataset")
    sp.add_argument("ds")
    sp = add("alter", cmd_alter, "change a dataset's schema as a new version, no data rewritten: add nullable "
                                 "columns, widen numeric ones, rename columns (older shards read through it)")
    sp.epilog = ("examples:\n"
                 "  tensorgrid alter grid/digits --add score:float32 --widen id:int64 --rename lbl:label\n"
                 "types: pyarrow names (int8..int64, uint8..uint64, float16/float32/float64, string, bool, "
                 "timestamp[ms]...)")
    sp.formatter_class = argparse.RawDescriptionHelpFormatter
    sp.add_argument("ds")
    sp.add_argument("--add", action="append", metavar="NAME:TYPE", help="a nullable column at the end (repeatable)")
    sp.add_argument("--widen", action="append", metavar="NAME:TYPE",
                    help="a lossless widening: int8->...->int64, uint->wider, float16->float32->float64 (repeatable)")
    sp.add_argument("--rename", action="append", metavar="OLD:NEW", help="rename a column to an unused name "
                                                                           "(repeatable)")
    sp = add("vacuum", cmd_vacuum, "delete files no version references (left by killed writers)")
    sp.add_argument("ds")
    sp.add_argument("--min-age", type=float, default=600.0,
                    help="keep unreferenced files younger than this many seconds (default 600)")
    sp.add_argument("--delete-unknown", action="store_true",
                    help="also delete files under data/ that TensorGrid did not write (refused without it)")
    sp = add("expire", cmd_expire, "retire old versions (never the latest): time travel to them ends, and "
                                   "vacuum frees the shards only they use")
    sp.add_argument("ds")
    sp.add_argument("--keep-last", metavar="N", help="keep the N newest versions, expire the older ones")
    sp.add_argument("--older-than", metavar="AGE",
                    help="expire versions committed more than AGE ago: seconds or 90s, 30m, 12h, 30d")
    return p


def _add_serve(add) -> None:
    from .server.serve import DEFAULT_MAX_CALLS, DEFAULT_PORT, DEFAULT_QUERY_TIMEOUT

    sp = add("serve", cmd_serve, "serve a grid: tables and datasets over Arrow Flight SQL, files over grid://")
    sp.epilog = ("examples:\n"
                 "  tensorgrid serve --root ./grid --port 8815\n"
                 "  tensorgrid serve --hash-password            (prints a password_hash for the users file)\n"
                 "  tensorgrid serve --root ./grid --host 0.0.0.0 --users users.toml --tls-cert server.pem "
                 "--tls-key server.key\n"
                 "  tensorgrid serve --root ./g1 --port 8815 --grid h1:8815,h2:8815,h3:8815 --replicas 2   "
                 "(one of 3)\n\n"
                 "users.toml:\n"
                 "  [users.ignite]\n"
                 "  password_hash = \"scrypt$16384$8$1$...\"\n"
                 "  role = \"admin\"     # or \"reader\": read only")
    sp.formatter_class = argparse.RawDescriptionHelpFormatter
    sp.add_argument("--root", help="folder for the grid's database and files (made if missing)")
    sp.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; any other "
                                                        "needs --users)")
    sp.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}; 0 picks a free one")
    sp.add_argument("--tls-cert", metavar="PEM", help="server certificate (with --tls-key): serve grpc+tls://")
    sp.add_argument("--tls-key", metavar="PEM", help="the server certificate's private key")
    sp.add_argument("--tls-client-ca", metavar="PEM", help="mutual TLS: clients must present a certificate "
                                                           "signed by this CA")
    sp.add_argument("--users", metavar="TOML", help="users and roles (admin, reader); without it everyone may "
                                                     "read and write")
    sp.add_argument("--allow", action="append", nargs="+", metavar="URL_OR_DIR",
                    help="where datasets may be loaded from (prefixes; default: under --root)")
    sp.add_argument("--memory-limit", default="4GB", help="DuckDB's memory limit (default 4GB)")
    sp.add_argument("--max-calls", type=int, default=DEFAULT_MAX_CALLS,
                    help=f"calls in progress at once; more are refused as busy (default {DEFAULT_MAX_CALLS})")
    sp.add_argument("--query-timeout", type=float, default=DEFAULT_QUERY_TIMEOUT,
                    help=f"seconds one call may keep DuckDB at work: a query, and separately the streaming of its "
                         f"rows (default {DEFAULT_QUERY_TIMEOUT:g}; 0: no limit)")
    sp.add_argument("--token-ttl", type=float, default=3600.0,
                    help="seconds a sign-in token stays valid without use (default 3600)")
    sp.add_argument("--insecure-no-auth", action="store_true",
                    help="allow a non-loopback --host without --users (anyone who reaches the port may do anything)")
    sp.add_argument("--grid", metavar="HOST:PORT,...",
                    help="the servers of a grid of several, this one among them (each given the same list): "
                         "clients read every partition from a live replica")
    sp.add_argument("--replicas", type=int, default=1,
                    help="with --grid: how many servers hold each partition of a loaded dataset (default 1)")
    sp.add_argument("--store", metavar="URL",
                    help="a shared store (s3://..., a shared folder) where every SQL table is kept as a dataset, a "
                         "new version on each commit: another server of the grid takes the tables over from it")
    sp.add_argument("--hash-password", action="store_true",
                    help="print a password_hash for the users file (password from the terminal or stdin) and exit")


_SECRET_KEYS = {"key", "secret", "token", "password", "session_token", "account_key", "sas_token",
                "client_secret", "username", "profile", "project", "account_name"}


def _storage_options(pairs: list[str] | None) -> dict:
    """``--storage-option KEY=VALUE`` pairs as fsspec options: a value that reads as JSON (true, 3, {...})
    is taken as such, anything else as a string."""
    import json

    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():  # the argument is never echoed: it may be a secret
            raise UsageError("--storage-option takes KEY=VALUE, got an argument without '='")
        key = key.strip()
        if key in _SECRET_KEYS:  # kept as given: an all-digit secret is still a string
            options[key] = value
            continue
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value
    return options


def _stderr_line(text: str) -> None:
    """One line on stderr: the message's lines joined, control characters escaped."""
    sys.stderr.write(safe(" ".join(part.strip() for part in str(text).splitlines() if part.strip())) + "\n")
    sys.stderr.flush()


def _os_error(e: OSError) -> str:
    """An OS error about a user's path as one sentence naming the path (errno numbers left out)."""
    if e.strerror and e.filename is not None:
        both = f" -> {e.filename2}" if e.filename2 is not None else ""
        return f"{e.strerror}: {e.filename}{both}"
    if e.strerror:  # no path: the output stream (stdout on a full disk)
        return f"{e.strerror} (writing the output)"
    return str(e).strip() or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    """Run the command; 0 on success, 1 on a user's error, 2 on a command line that does not parse, one
    line on stderr for every failure (never a traceback)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if any("\0" in str(arg) for arg in argv):  # no real process can pass one (C strings)
            raise UsageError("an argument holds a NUL character")
        args = build_parser().parse_args(argv)
        options = _storage_options(getattr(args, "storage_options", None))
    except UsageError as e:
        _stderr_line(f"error: {e}")
        return 2
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    try:
        with tgfs.default_options(options):
            args.fn(args)
        return 0
    except TensorGridError as e:
        _stderr_line(f"error: {str(e).strip() or type(e).__name__}")
        return 1
    except KeyboardInterrupt:
        _stderr_line("interrupted")
        return 130
    except BrokenPipeError:  # the reader went away (| head): nothing more to say
        return 0
    except OSError as e:  # a path that is too long, a folder where a file was expected, no permission...
        _stderr_line(f"error: {_os_error(e)}")
        return 1
    except Exception as e:  # noqa: BLE001 - a bug: still one line, never a traceback
        _stderr_line(f"error: internal error {type(e).__name__}: {e} (a bug in tensorgrid: please report it "
                     "with the command that caused it)")
        return 1


if __name__ == "__main__":
    sys.exit(main())
