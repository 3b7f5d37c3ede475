"""Class names of labelled datasets: ``label_index`` i is ``label_names[i]`` (like HF's ClassLabel).

The names live in the Arrow field metadata of the ``label_index`` column, so they travel with the schema:
in the manifest (an append that adds classes updates them: see ``writer._appended_schema``), in each
shard's footer, and through every subset of the dataset. Datasets written before the names were kept get
them from their rows (one group-by over the two small columns).
"""

from __future__ import annotations

import json

import pyarrow as pa

INDEX_COLUMN = "label_index"
NAME_COLUMN = "label"
NAMES_KEY = b"tensorgrid.label_names"


def with_names(field: pa.Field, names: list[str]) -> pa.Field:
    """``field`` (the label_index column) carrying ``names`` in index order."""
    meta = dict(field.metadata or {})
    meta[NAMES_KEY] = json.dumps(list(names)).encode()
    return field.with_metadata(meta)


def appended(old: bytes | None, new: bytes | None, url: str) -> bytes | None:
    """The kept class names after an append whose rows carry ``new`` onto a dataset keeping ``old`` (both
    the raw metadata): the longer, when one list starts with the other (rows written from an older version
    know fewer classes); else the same index would name two classes: SchemaMismatchError."""
    if old is None or new is None or old == new:
        return new if old is None else old
    a, b = _decoded(old), _decoded(new)
    if a is None or b is None:
        return new if a is None else old
    if a[:len(b)] == b or b[:len(a)] == a:
        return old if len(a) >= len(b) else new
    from ..errors import SchemaMismatchError

    raise SchemaMismatchError(f"cannot append to {url}: its label_index class names are {a}, the new rows' are "
                              f"{b} (the same index would name two classes): renumber the new rows' label_index "
                              "to the dataset's names, adding new classes at the end")


def _decoded(raw: bytes) -> list | None:
    try:
        names = json.loads(raw)
    except ValueError:
        return None
    return names if isinstance(names, list) and all(isinstance(n, (str, type(None))) for n in names) else None


def names_in(schema: pa.Schema) -> list[str] | None:
    """The names kept in a schema's label_index field, or None."""
    if INDEX_COLUMN not in schema.names:
        return None
    raw = (schema.field(INDEX_COLUMN).metadata or {}).get(NAMES_KEY)
    return None if raw is None else _decoded(raw)


def label_names(ds) -> list[str | None] | None:
    """The dataset's class names in index order; None when it has no label_index column. Without kept
    names, derived from the (label, label_index) pairs of its rows (an index no row has is None), or None
    when the rows hold no such mapping: a label_index that is not an integer, an index with two labels,
    or indices so sparse the list would be mostly holes (a column that only shares the name)."""
    names = names_in(ds.schema)
    if names is not None or INDEX_COLUMN not in ds.schema.names or NAME_COLUMN not in ds.schema.names:
        return names
    if "_derived_label_names" not in ds.__dict__:
        ds.__dict__["_derived_label_names"] = _derived(ds)
    cached = ds.__dict__["_derived_label_names"]
    return None if cached is None else list(cached)


_MIN_SPAN = 1 << 16  # indices up to this are kept whatever the number of classes; beyond, 64 slots a class


def _derived(ds) -> list[str | None] | None:
    index_type, name_type = ds.schema.field(INDEX_COLUMN).type, ds.schema.field(NAME_COLUMN).type
    if not pa.types.is_integer(index_type) or not (pa.types.is_string(name_type) or pa.types.is_large_string(name_type)):
        return None
    pairs = ds.to_arrow(columns=[NAME_COLUMN, INDEX_COLUMN]).group_by([NAME_COLUMN, INDEX_COLUMN]).aggregate([])
    mapping: dict[int, str] = {}
    for name, i in zip(pairs.column(NAME_COLUMN).to_pylist(), pairs.column(INDEX_COLUMN).to_pylist()):
        if i is None or name is None or i < 0:  # unlabelled rows (-1, torch's -100) have no class
            continue
        if mapping.setdefault(i, name) != name:
            return None
    if not mapping:
        return []
    span = max(mapping) + 1
    if span > max(_MIN_SPAN, 64 * len(mapping)):
        return None
    out: list[str | None] = [None] * span
    for i, name in mapping.items():
        out[i] = name
    return out
