"""The ``tensorgrid`` command. User mistakes end in one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import argparse
import sys
import time
import warnings

from rich.table import Table

from . import store
from .args import check_int, check_number
from .errors import ArgumentError, EmptyDataError, TensorGridError, UnsupportedFormatError
from .show import human_bytes, out, print_frame, print_info, progress, safe, text
from .store.vacuum import vacuum as store_vacuum

TABULAR_EXT = store.foreign.PARQUET_EXT + store.foreign.CSV_EXT
INT64_MAX = (1 << 63) - 1  # the largest count Arrow and DuckDB take
MAX_SHARD_MB = float(1 << 20)  # 1 TiB

def _version(a) -> int | None:
    return check_int("--version", a.version, 1, INT64_MAX, none=True)


def cmd_info(a) -> None:
    print_info(store.open(a.ds, version=_version(a)))


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


def cmd_vacuum(a) -> None:
    min_age = check_number("--min-age", a.min_age, 0)
    r = store_vacuum(a.ds, min_age_s=min_age)  # also a folder holding only an interrupted first write
    msg = f"removed {r['removed']} unreferenced file(s), {human_bytes(r['bytes'])}"
    if r["kept_young"]:
        msg += f"; kept {r['kept_young']} younger than {min_age:g} s (a writer may be at work; see --min-age)"
    out.print(msg, markup=False)


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


def cmd_sql(a) -> None:
    limit = check_int("--limit", a.limit, 0, INT64_MAX)
    urls: dict[str, str] = {}
    for spec in a.ds or []:
        name, sep, url = spec.partition("=")
        if not sep or not name.isidentifier():
            raise ArgumentError(f"--ds takes name=url, got {spec!r}")
        if name in urls:
            raise ArgumentError(f"--ds names the table {name!r} twice")
        urls[name] = url
    tables = {name: store.open(url) for name, url in urls.items()}
    result = store.sql(a.query, **tables)
    df = result.head(limit)
    print_frame(df, title=f"{result.num_rows:,} rows" + (f" (first {limit})" if result.num_rows > limit else ""))


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

    run(a.root, train=not a.no_train)


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
        return sp

    sp = add("quickstart", cmd_quickstart, "write scikit-learn's digits as a dataset and tour the API")
    sp.add_argument("--root", default="grid", help="where to put datasets and runs (default ./grid)")
    sp.add_argument("--no-train", action="store_true", help="skip the training part")
    sp = add("ingest", cmd_ingest, "ingest CSV, Parquet, JSON Lines or a folder of images into a dataset")
    sp.add_argument("src")
    sp.add_argument("dest")
    sp.add_argument("--mode", choices=["create", "append", "overwrite"], default="create")
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
    sp.add_argument("query")
    sp.add_argument("--ds", action="append", metavar="NAME=URL", help="a dataset as table NAME (repeatable)")
    sp.add_argument("--limit", type=int, default=20)
    sp = add("versions", cmd_versions, "the history of a dataset")
    sp.add_argument("ds")
    sp = add("vacuum", cmd_vacuum, "delete files no version references (left by killed writers)")
    sp.add_argument("ds")
    sp.add_argument("--min-age", type=float, default=600.0,
                    help="keep unreferenced files younger than this many seconds (default 600)")
    return p


def _stderr_line(text: str) -> None:
    """One line on stderr: the message's lines joined, control characters escaped."""
    sys.stderr.write(safe(" ".join(part.strip() for part in str(text).splitlines() if part.strip())) + "\n")
    sys.stderr.flush()


def _os_error(e: OSError) -> str:
    """An OS error about a user's path as one sentence naming the path (errno numbers left out)."""
    if e.strerror and e.filename is not None:
        both = f" -> {e.filename2}" if e.filename2 is not None else ""
        return f"{e.strerror}: {e.filename}{both}"
    return str(e).strip() or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    """Run the command; 0 on success, 1 on a user's error, 2 on a command line that does not parse, one
    line on stderr for every failure (never a traceback)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if any("\0" in str(arg) for arg in argv):  # no real process can pass one (C strings)
            raise UsageError("an argument holds a NUL character")
        args = build_parser().parse_args(argv)
    except UsageError as e:
        _stderr_line(f"error: {e}")
        return 2
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    try:
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
