"""Schema evolution: add a nullable column, widen a numeric column, rename a column, as a new version.

``StoreDataset.alter`` commits a manifest (operation "alter", no rows added) that names the SAME shards as
the latest version with a new schema: no data is rewritten, so an alter of a terabyte takes one manifest
write. Shards written before it keep their old columns; every read of the new version (``read_rows``,
``read_shard``, SQL, ``verify``, the loader's Arrow cache, Spark and Ray) reads them through the new schema.

The record. The manifest's schema is the version's schema; each field that an alter changed carries its own
history in its metadata, ``tensorgrid.history``: a JSON list of the states it had before, oldest first,
each ``{"before": V, "name": N}`` (named N until version V), plus ``"type": T`` when version V widened it
from T, or ``{"before": V, "absent": true}`` for a column version V added. From these the schemas of the
whole lineage are rebuilt (``lineage``: one per span between alters); a shard is read by the one its own
footer matches (names, types, tensor dtype and shape, in order), which maps each of its columns to the
version's by position in that schema: by name history, never by the shard's names alone (a column renamed
from ``a`` to ``b`` and a new column ``a`` added later are told apart). A shard whose footer matches no
schema of the lineage is damage (CorruptManifestError), as a mismatch was before evolution. The manifest
format stays "tensorgrid/2": the history is field metadata, which older TensorGrids carry but ignore (their
footer check refuses the old shards: an error, never wrong rows; only their ``to_spark``, which hands the
files to Spark, would not). The history is kept out of ``Dataset.schema`` and the tables reads return, so it
never travels into another dataset's writes.

Reading. A shard of the version's own schema is read as before. An older one: only the columns asked for
(under their names of then), decoded, then renamed, widened (an exact cast) and completed with nulls
(``Layout``); a filter is pushed into it with positional column references (``Layout.read``), or, when that
would change its meaning, applied after the read. SQL scans each group of shards of one layout as its own
Arrow dataset behind a view that renames (``SqlView``: projections and filters still reach the scans). The
loader's Arrow cache keys such a version's shards with a suffix (``cache_suffix``): a shard decoded under
one schema is never served to another. ``shard_urls()`` still lists the files as they are: a reader that
opens them in place (DuckDB by path, pandas) sees each file's own columns; ``to_spark`` reads an altered
version through the dataset on its executors instead of Spark's Parquet reader.

Allowed changes (anything else is SchemaMismatchError saying what is allowed, before anything is written):
  * add a nullable column at the end (older shards read it as nulls);
  * widen int8 -> int16 -> int32 -> int64, uint8 -> uint16 -> uint32 -> uint64, an unsigned type to a wider
    signed one, float16 -> float32 -> float64, and an integer to a float that holds every value of it
    exactly (8-bit to float16, 16-bit to float32, 32-bit to float64, or wider; never int64 -> float64,
    which would round values above 2**53): every value reads back the same number. Integers to floats are
    allowed because a label or count column that a model wants as floats is a common need and loses
    nothing; where values could round, the change is refused rather than made approximately;
  * rename a column to a name the version does not use.
Never: dropping or narrowing a column, other type changes, making a column non-nullable, adding a
non-nullable column, changing a tensor column's dtype or shape.

A lost race (another writer committed the version first) is rebased: the alter is checked again against the
new latest version and committed after it (its rows, written under the old schema, are read through the
new one), up to ``REBASES`` times; an append racing an alter fails to commit and its ``retry`` is refused as
a schema mismatch, so no row is silently lost. With ``expect_version`` a lost race is a ConflictError.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import xxhash

from ..args import check_int
from ..errors import (
    ArgumentError,
    ColumnNotFoundError,
    ConflictError,
    CorruptManifestError,
    SchemaMismatchError,
)
from . import encoding, manifest
from .dataset import decode_row_range
from .manifest import Manifest

HISTORY_KEY = b"tensorgrid.history"
REBASES = 20  # lost races an alter rebases over before it gives up with a ConflictError
_ABSENT_PREFIX = "__tensorgrid_absent_"  # SQL: the stand-in name of a column a group of shards lacks

# Test hook: called as _before_commit(fs, root, version) right before the manifest is published.
_before_commit = None

ALLOWED = ("allowed: add a nullable column (at the end), widen int8->int16->int32->int64, uint8->uint16->uint32->"
           "uint64, uint to a wider int, float16->float32->float64, an int to a float that holds all its values "
           "(8-bit -> float16, 16-bit -> float32, 32-bit -> float64, or wider), rename a column to an unused name")


# --- the changes -------------------------------------------------------------------------------------
def alter(fs: fsspec.AbstractFileSystem, root: str, url: str, add=None, widen=None, rename=None,
          expect_version: int | None = None) -> Manifest:
    """Commit the latest version's shards under a schema with ``add``/``widen``/``rename`` applied; the new
    version's manifest. See the module docstring for what is allowed and how races are handled."""
    add, widen, rename = _mapping("add", add), _mapping("widen", widen), _mapping("rename", rename)
    if not (add or widen or rename):
        raise ArgumentError("alter needs at least one change: add={name: type}, widen={name: type} or "
                            "rename={old: new}")
    expect_version = check_int("expect_version", expect_version, 1, none=True)
    add = {name: _added_field(name, value) for name, value in add.items()}
    widen = {name: parse_type(value, f"widen[{name!r}]") for name, value in widen.items()}
    for _ in range(REBASES):
        base = manifest.load(fs, root)
        if expect_version is not None and base.version != expect_version:
            raise ConflictError(f"{url} is at version {base.version}, not {expect_version}: another writer committed "
                                "since; nothing was changed")
        new = Manifest(base.version + 1, "alter", evolve(base.schema, base.version + 1, add, widen, rename, url),
                       list(base.shards), 0)
        if _before_commit is not None:
            _before_commit(fs, root, new.version)
        if manifest.commit(fs, root, new):
            return new
        if expect_version is not None:
            raise ConflictError(f"another writer committed version {new.version} of {url} first; nothing was changed")
    raise ConflictError(f"other writers committed {REBASES} versions of {url} while this alter was being committed; "
                        "nothing was changed: call .retry() on this error to try again",
                        retry=lambda: alter(fs, root, url, add, widen, rename))


def evolve(physical: pa.Schema, version: int, add: dict[str, pa.Field], widen: dict[str, pa.DataType],
           rename: dict[str, str], url: str = "the dataset") -> pa.Schema:
    """``physical`` with the changes applied at ``version``, each changed field's history extended; refused
    changes raise before anything is built."""
    lineage(physical)  # a history that cannot be read is CorruptManifestError, before it is extended
    logical = encoding.logical_schema(physical)
    names = logical.names
    for name in [*widen, *rename]:
        if name not in names:
            raise ColumnNotFoundError(f"no column {name!r} in {url}; columns: {names}")
    targets = list(rename.values())
    for old, new in rename.items():
        if not isinstance(new, str) or not new:
            raise ArgumentError(f"rename[{old!r}] must be a non-empty column name, got {new!r}")
        if new in names or targets.count(new) > 1 or new in add:
            raise SchemaMismatchError(f"cannot rename {old!r} to {new!r} in {url}: that name is taken (columns: "
                                      f"{names}); {ALLOWED}")
    for name in add:
        if name in names:
            raise SchemaMismatchError(f"cannot add column {name!r} to {url}: it exists "
                                      f"({logical.field(name).type}); {ALLOWED}")
    for name, target in widen.items():
        _check_widening(name, logical.field(name).type, target, url)
    fields = []
    for f in physical:
        states = []
        if f.name in rename or f.name in widen:
            states.append({"before": version, "name": f.name, **({"type": str(f.type)} if f.name in widen else {})})
        g = f.with_name(rename.get(f.name, f.name)).with_type(widen.get(f.name, f.type))
        fields.append(_with_history(g, states) if states else g)
    for field in add.values():
        fields.append(_with_history(encoding.physical_schema(pa.schema([field])).field(0),
                                    [{"before": version, "absent": True}]))
    return pa.schema(fields, metadata=physical.metadata)


def _mapping(what: str, value) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and k for k in value):
        raise ArgumentError(f"{what} must be a dict keyed by column name, got {value!r}")
    return dict(value)


def parse_type(value, what: str) -> pa.DataType:
    """A type given as a pyarrow type, a name pyarrow knows (int64, float32, string, bool, timestamp[ms]...)
    or a numpy dtype."""
    if isinstance(value, pa.DataType):
        return value
    if isinstance(value, str):
        try:
            return pa.type_for_alias(value.strip())
        except (ValueError, KeyError):
            raise ArgumentError(f"{what}: unknown type {value!r}; give a pyarrow type or a name such as int64, "
                                "float32, float64, string, bool") from None
    try:
        return pa.from_numpy_dtype(np.dtype(value))
    except (TypeError, ValueError, pa.ArrowNotImplementedError):
        raise ArgumentError(f"{what} must be a type (pyarrow, numpy or a name such as float32), got {value!r}") from None


def _added_field(name: str, value) -> pa.Field:
    if isinstance(value, pa.Field):
        if value.name != name:
            raise ArgumentError(f"add[{name!r}] is a field named {value.name!r}: the key and the name must agree")
        field = value
    else:
        field = pa.field(name, parse_type(value, f"add[{name!r}]"))
    if not field.nullable:
        raise SchemaMismatchError(f"cannot add column {name!r} as non-nullable: the rows already written have no "
                                  f"value for it; {ALLOWED}")
    if pa.types.is_null(field.type):
        raise ArgumentError(f"add[{name!r}]: type null holds no values; give the column's type (float32, string...)")
    meta = {k: v for k, v in (field.metadata or {}).items() if k != HISTORY_KEY} or None
    return encoding.normalize_schema(pa.schema([field.with_metadata(meta)])).field(0)


_MANTISSA = {16: 11, 32: 24, 64: 53}  # bits a float holds exactly


def widens(old: pa.DataType, new: pa.DataType) -> bool:
    """Whether every value of ``old`` is exactly a value of ``new`` (and the two differ): the casts allowed."""
    if old.equals(new) or not (pa.types.is_integer(old) or pa.types.is_floating(old)):
        return False
    if pa.types.is_floating(new):
        if pa.types.is_floating(old):
            return new.bit_width > old.bit_width
        magnitude = old.bit_width - pa.types.is_signed_integer(old)  # bits of the largest value
        return magnitude <= _MANTISSA[new.bit_width]
    if not pa.types.is_integer(new) or pa.types.is_floating(old):
        return False
    if pa.types.is_signed_integer(old) and pa.types.is_unsigned_integer(new):
        return False  # negative values
    return new.bit_width > old.bit_width


def _check_widening(name: str, old: pa.DataType, new: pa.DataType, url: str) -> None:
    if isinstance(old, pa.FixedShapeTensorType):
        raise SchemaMismatchError(f"cannot change column {name!r} of {url} to {new}: a tensor column keeps its dtype "
                                  f"and shape ({old}); {ALLOWED}")
    if not widens(old, new):
        why = "it is already that type" if old.equals(new) else "that is not a lossless widening"
        raise SchemaMismatchError(f"cannot change column {name!r} of {url} from {old} to {new}: {why}; {ALLOWED}")


def _with_history(field: pa.Field, states: list[dict]) -> pa.Field:
    meta = dict(field.metadata or {})
    meta[HISTORY_KEY] = json.dumps(_history(field) + states, separators=(",", ":")).encode()
    return field.with_metadata(meta)


def _history(field: pa.Field) -> list[dict]:
    raw = (field.metadata or {}).get(HISTORY_KEY)
    return json.loads(raw) if raw else []


# --- what the record says: the lineage of schemas and how a shard maps to the version --------------------
def has_history(physical: pa.Schema) -> bool:
    """Whether an alter changed this schema (its shards may hold earlier ones)."""
    return any(HISTORY_KEY in (f.metadata or {}) for f in physical)


def visible(schema: pa.Schema) -> pa.Schema:
    """``schema`` without the history (what users see and tables carry)."""
    if not any(HISTORY_KEY in (f.metadata or {}) for f in schema):
        return schema
    return pa.schema([f.with_metadata({k: v for k, v in f.metadata.items() if k != HISTORY_KEY} or None)
                      if f.metadata and HISTORY_KEY in f.metadata else f for f in schema], metadata=schema.metadata)


def cache_suffix(physical: pa.Schema) -> str:
    """A suffix of the loader cache's key of every shard of a version with a history: a shard read through
    another schema is other rows than its bytes alone say ("" when there is none: keys stay as they were)."""
    if not has_history(physical):
        return ""
    h = xxhash.xxh3_64()
    for f in physical:
        h.update(f"{f.name}|{f.type}|{f.nullable}|".encode() + (f.metadata or {}).get(HISTORY_KEY, b"") + b";")
    return "-s" + h.hexdigest()


@dataclass(frozen=True)
class Layout:
    """The columns of shards written under one schema of a version's lineage, and how they map onto the
    version's: ``sources[i]`` is the name the version's field i has in such shards, None if it was added since."""

    schema: pa.Schema  # physical, as such shards were written (names and types of then)
    sources: tuple
    target: pa.Schema  # the version's logical schema, without the history
    current: bool  # the version's own schema: read as is
    # the version's physical fields under the names such shards give them (a stand-in name for a column they
    # lack): pyarrow's dataset reader then casts widened columns and fills added ones with nulls
    stand_in: pa.Schema

    @property
    def renames(self) -> bool:
        return any(s is not None and s != n for s, n in zip(self.sources, self.target.names))

    def _read_names(self, columns: list[str] | None) -> list[str] | None:
        if columns is None:
            return None
        names = [self.sources[self.target.get_field_index(c)] for c in columns]
        return list(dict.fromkeys(n for n in names if n is not None))

    def _conform(self, table: pa.Table, columns: list[str] | None, rows: int) -> pa.Table:
        """A table of such a shard (logical, its names) as the version's: renamed, widened, added columns null."""
        names = self.target.names if columns is None else columns
        if not names:
            return table.select([])
        cols, fields = [], []
        for name in names:
            i = self.target.get_field_index(name)
            field, source = self.target.field(i), self.sources[i]
            if source is None:
                col = pa.chunked_array([pa.nulls(rows, field.type)])
            else:
                col = table.column(source)
                if not col.type.equals(field.type):
                    col = col.cast(field.type)  # a widening: exact (``widens``)
            cols.append(col)
            fields.append(field)
        return pa.Table.from_arrays(cols, schema=pa.schema(fields, metadata=self.target.metadata))

    def read(self, buf, columns: list[str] | None, filter: pc.Expression | None) -> pa.Table:
        """A whole shard of this layout (its bytes: ``buf``) as the version's rows. A filter names the
        version's columns: it is pushed down with its column references made positional (through Substrait),
        which the stand-in schema's positions resolve to this shard's own columns; an expression Substrait
        cannot carry is applied once the whole shard is read through the version's schema."""
        if filter is None:
            pf = pq.ParquetFile(pa.BufferReader(buf))
            return self._conform(encoding.decode(pf.read(columns=self._read_names(columns)), like=self.schema),
                                 columns, pf.metadata.num_rows)
        positional = self._positional(filter)
        if positional is None:
            pf = pq.ParquetFile(pa.BufferReader(buf))
            table = self._conform(encoding.decode(pf.read(), like=self.schema), None, pf.metadata.num_rows)
            table = table.filter(filter)
            return table if columns is None else table.select(columns)
        at = range(len(self.target)) if columns is None else [self.target.get_field_index(c) for c in columns]
        table = pq.read_table(pa.BufferReader(buf), columns=[self.stand_in.names[i] for i in at], filters=positional,
                              schema=self.stand_in)
        table = encoding.decode(table, like=self.stand_in)
        schema = pa.schema([self.target.field(i) for i in at], metadata=self.target.metadata)
        if not at:  # no column asked for: the count of matching rows (from_arrays, and pyarrow's
            return table.select([])  # replace_schema_metadata, make a table of no columns 0 rows long)
        return pa.Table.from_arrays(table.columns, schema=schema)

    def _positional(self, filter: pc.Expression) -> pc.Expression | None:
        """``filter`` with its column references by position in the version's schema, or None: when Substrait
        cannot carry it, or carries it as another expression (``is_in`` comes back as ``==``s, which treat
        nulls otherwise): only an expression that prints the same, names for positions, is used."""
        names = self.target.names
        if any("FieldPath(" in n for n in names):
            return None
        named = pa.schema([f.with_name(n) for f, n in zip(self.stand_in, names)])
        try:
            positional = pc.Expression.from_substrait(filter.to_substrait(named))
        except (pa.ArrowException, AttributeError, ImportError):  # a function or type Substrait lacks
            return None
        same = re.sub(r"FieldPath\((\d+)\)", lambda m: names[int(m.group(1))], str(positional)) == str(filter)
        return positional if same else None

    def read_range(self, pf: pq.ParquetFile, start: int, stop: int, columns: list[str] | None) -> pa.Table:
        """Rows [start, stop) of a shard of this layout as the version's rows."""
        table = decode_row_range(pf, start, stop, self._read_names(columns), like=self.schema)
        return self._conform(table, columns, max(0, min(stop, pf.metadata.num_rows) - start))


def _states(field: pa.Field) -> list[tuple[int, str | None, pa.DataType | None]]:
    """The field's states as (before, name, type), oldest first; the current one has before = inf (name
    None: absent before then). A state without a type has the type of the next one (only widening changes it)."""
    out, later = [(float("inf"), field.name, field.type)], field.type
    try:
        for entry in reversed(_history(field)):
            before = entry["before"]
            if not isinstance(before, int) or before >= out[-1][0]:
                raise ValueError(f"version {before!r} out of order")
            if entry.get("absent"):
                out.append((before, None, None))
                continue
            later = pa.type_for_alias(entry["type"]) if "type" in entry else later
            if not isinstance(entry["name"], str):
                raise ValueError(f"name {entry['name']!r}")
            out.append((before, entry["name"], later))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CorruptManifestError(f"the manifest's history of column {field.name!r} is unreadable "
                                   f"({type(e).__name__}: {e})") from None
    return out[::-1]


class _Exact:
    """A schema as a cache key: pyarrow's ``==`` ignores metadata, where a tensor's dtype and the history live."""

    __slots__ = ("schema", "_hash")

    def __init__(self, schema: pa.Schema):
        self.schema, self._hash = schema, hash(schema)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return isinstance(other, _Exact) and self.schema.equals(other.schema, check_metadata=True)


def lineage(physical: pa.Schema) -> tuple[tuple[tuple, Layout], ...]:
    """The layouts of every schema this version's shards may have been written under, the version's own
    first, each with the key its shards' footers match (``_layout_key``)."""
    return _lineage(_Exact(physical))


@lru_cache(maxsize=64)
def _lineage(key: _Exact) -> tuple[tuple[tuple, Layout], ...]:
    physical = key.schema
    target = visible(encoding.logical_schema(physical))
    plain = visible(physical)
    states = [_states(f) for f in physical]
    alters = sorted({before for s in states for before, _, _ in s[:-1]}, reverse=True)
    layouts = []
    for x in [*alters, 0]:  # a version of each span between alters, newest first, back to the first version
        fields, sources = [], []
        for f, s in zip(plain, states):
            _, name, typ = next(st for st in s if st[0] > x)  # the state the field had at version x
            sources.append(name)
            if name is not None:
                fields.append(f.with_name(name).with_type(typ))
        schema = pa.schema(fields, metadata=physical.metadata)
        key = _layout_key(schema)
        if all(key != k for k, _ in layouts):  # (tensor shapes are lists: no set)
            stand_in = pa.schema([f.with_name(s if s is not None else f"{_ABSENT_PREFIX}{i}")
                                  for i, (f, s) in enumerate(zip(plain, sources))])
            layouts.append((key, Layout(schema, tuple(sources), target, not layouts, stand_in)))
    return tuple(layouts)


def _layout_key(schema: pa.Schema) -> tuple:
    return tuple(zip(footer_types(schema), (tensor_of(f) for f in schema)))


def layout_of(physical: pa.Schema, footer: pa.Schema) -> Layout | None:
    """The layout of a shard whose footer has schema ``footer``, or None when it matches no schema of the
    version's lineage (damage: a manifest that lists another dataset's shard, edited types...)."""
    key = tuple(((f.name, f.type), tensor_of(f)) for f in footer)
    return next((layout for k, layout in lineage(physical) if k == key), None)


def earlier_layout(physical: pa.Schema, shard) -> Layout | None:
    """The layout of a shard (a ParquetFile, or its bytes) written under an earlier schema of the version's
    lineage; None when it holds the version's own schema (read as is; damage is ``_check_footer``'s to name)."""
    if not has_history(physical):
        return None
    footer = shard.schema_arrow if isinstance(shard, pq.ParquetFile) else pq.read_schema(pa.BufferReader(shard))
    layout = layout_of(physical, footer)
    return None if layout is None or layout.current else layout


@lru_cache(maxsize=64)
def footer_types(schema: pa.Schema) -> list:
    """The (name, type) pairs a Parquet footer of shards written with ``schema`` reads back as."""
    sink = pa.BufferOutputStream()
    pq.write_table(schema.empty_table(), sink, store_schema=True)
    return [(f.name, f.type) for f in pq.read_metadata(pa.BufferReader(sink.getvalue())).schema.to_arrow_schema()]


def tensor_of(field: pa.Field):
    """A tensor column's dtype, shape and permutation from its field metadata (None for other columns):
    a manifest may not give a shard's bytes another tensor type."""
    raw = (field.metadata or {}).get(encoding.TENSOR_KEY)
    if raw is None:
        return None
    try:
        meta = json.loads(raw)
        return meta.get("dtype"), meta.get("shape"), meta.get("permutation")
    except (ValueError, AttributeError):
        return ("unreadable", raw)


# --- SQL ------------------------------------------------------------------------------------------------
class SqlView:
    """A version some of whose shards hold columns under earlier names, for DuckDB: the shards of each layout
    are one Arrow dataset (their own names, the version's types: pyarrow casts widened columns and fills
    added ones with nulls), registered under a hidden name, and the table is a view that renames their
    columns and unions them; DuckDB still pushes projections and filters into each scan."""

    def __init__(self, parts: list[tuple[pads.Dataset, list[str]]], names: list[str]):
        self.parts, self.names = parts, names

    def register(self, con, name: str) -> None:
        selects = []
        for i, (dataset, sources) in enumerate(self.parts):
            hidden = f"__tensorgrid_{name}_{i}"
            con.register(hidden, dataset)
            columns = ", ".join(f"{_quote(s)} AS {_quote(n)}" for s, n in zip(sources, self.names))
            selects.append(f"SELECT {columns} FROM {_quote(hidden)}")
        con.execute(f"CREATE OR REPLACE TEMP VIEW {_quote(name)} AS {' UNION ALL '.join(selects)}")


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def sql_source(physical: pa.Schema, paths: list[str], layouts: list[Layout | None], filesystem):
    """What DuckDB scans for a version: one Arrow dataset over its shards, or a ``SqlView`` when some shards
    hold columns under earlier names (``layouts``: each shard's ``earlier_layout``)."""
    if not any(layout is not None and layout.renames for layout in layouts):
        return pads.dataset(paths, schema=physical, format="parquet", filesystem=filesystem)
    groups: dict[tuple, tuple[pa.Schema, list[str]]] = {}
    for path, layout in zip(paths, layouts):
        schema = visible(physical) if layout is None else layout.stand_in
        groups.setdefault(tuple(schema.names), (schema, []))[1].append(path)
    parts = [(pads.dataset(files, schema=schema, format="parquet", filesystem=filesystem), schema.names)
             for schema, files in groups.values()]
    return SqlView(parts, physical.names)
