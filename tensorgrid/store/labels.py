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


def names_in(schema: pa.Schema) -> list[str] | None:
    """The names kept in a schema's label_index field, or None."""
    if INDEX_COLUMN not in schema.names:
        return None
    raw = (schema.field(INDEX_COLUMN).metadata or {}).get(NAMES_KEY)
    if raw is None:
        return None
    try:
        names = json.loads(raw)
    except ValueError:
        return None
    return names if isinstance(names, list) and all(isinstance(n, (str, type(None))) for n in names) else None


def label_names(ds) -> list[str | None] | None:
    """The dataset's class names in index order; None when it has no label_index column. Without kept
    names, derived from the (label, label_index) pairs of its rows; an index no row has is None."""
    names = names_in(ds.schema)
    if names is not None or INDEX_COLUMN not in ds.schema.names or NAME_COLUMN not in ds.schema.names:
        return names
    cached = ds.__dict__.get("_derived_label_names")
    if cached is None:
        pairs = ds.to_arrow(columns=[NAME_COLUMN, INDEX_COLUMN]).group_by([NAME_COLUMN, INDEX_COLUMN]).aggregate([])
        index = [i for i in pairs.column(INDEX_COLUMN).to_pylist()]
        valid = [i for i in index if i is not None and i >= 0]
        cached = [None] * (max(valid) + 1 if valid else 0)
        for name, i in zip(pairs.column(NAME_COLUMN).to_pylist(), index):
            if i is not None and i >= 0:
                cached[i] = name
        ds.__dict__["_derived_label_names"] = cached
    return list(cached)
