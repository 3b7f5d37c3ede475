"""The model's input and the loss's target from a batch: ``features`` is one column (given to the model as
the loader made it) or a list of numeric columns stacked into one float32 (rows, columns) tensor, as for a
wide table (px0..px63); a classifier's integer labels widened to the int64 its loss wants."""

from __future__ import annotations

import re

import pyarrow as pa
import torch

from ..errors import ModelInputError, TrainingConfigError

ACCEPTED = "features must be a column name or a list of column names"
STACKED = "_features"  # the loader's one (rows, k) tensor of a list of features (``loader_stack``)


def check_features(features) -> str | tuple[str, ...] | None:
    """``features`` as a column name, a tuple of names (a list given), or None (only with ``step=``)."""
    if features is None or isinstance(features, str):
        return features
    if isinstance(features, (list, tuple)) and features and all(isinstance(c, str) for c in features):
        dup = sorted({c for c in features if features.count(c) > 1})
        if dup:
            raise TrainingConfigError(f"{ACCEPTED}, each once; repeated: {dup}")
        return tuple(features)
    raise TrainingConfigError(f"{ACCEPTED}, got {_short(features)}")


def feature_columns(features) -> list[str]:
    """The columns ``features`` names (none for None)."""
    if features is None:
        return []
    return [features] if isinstance(features, str) else list(features)


def loader_stack(schema: pa.Schema, features, keep=()) -> dict | None:
    """What to ask the loader for (its ``stack=``) so that a list of plain int/float features arrives as one
    (rows, k) tensor, which from the Arrow cache costs no per-column work: None for one column, for anything
    else in the list, or when a column is needed on its own too (``keep``: the label, kept columns)."""
    if features is None or isinstance(features, str) or len(features) < 2 or set(features) & set(keep):
        return None
    names = set(schema.names)
    if STACKED in names:
        return None
    if not all(f in names and (pa.types.is_integer(schema.field(f).type) or pa.types.is_floating(schema.field(f).type))
               for f in features):
        return None
    return {STACKED: list(features)}


def stack_features(batch: dict, features) -> torch.Tensor:
    """The model's input from a batch: ``batch[features]`` for one column; for a list, its columns side by
    side as one float32 tensor (rows, total width): the loader's stacked tensor when it made one
    (``loader_stack``), else one copy per batch, no per-row Python. A column that is itself a tensor per
    row contributes its values flattened (rows, k)."""
    if isinstance(features, str):
        return batch[features]
    if STACKED in batch and STACKED not in features:
        return batch[STACKED].to(torch.float32)
    cols = []
    for c in features:
        v = batch[c]
        if not isinstance(v, torch.Tensor):
            raise TrainingConfigError(f"features: column {c!r} is not numeric (the loader gives a "
                                      f"{type(v).__name__}); a list of features takes numeric columns")
        cols.append(v.to(torch.float32))
    if all(v.ndim == 1 for v in cols):
        return torch.stack(cols, dim=1)
    return torch.cat([v.reshape(len(v), -1) for v in cols], dim=1)


# torch's words for an input the model cannot take (shapes, sizes, channels, dtypes), not for its own failures
_INPUT_MISMATCH = re.compile(r"shape|size|channel|dimension|mat1 and mat2|type|dtype|expected input", re.I)


def forward(model, x, features):
    """``model(x)``; an input the model cannot take is a ``ModelInputError`` naming the features and shape."""
    try:
        return model(x)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, torch.OutOfMemoryError) or not _INPUT_MISMATCH.search(first):
            raise
        shape = f"{tuple(x.shape)} {str(x.dtype).replace('torch.', '')}" if isinstance(x, torch.Tensor) else \
            type(x).__name__
        raise ModelInputError(f"the model cannot take the features {features!r} as the loader and the transform "
                              f"give them, a batch of {shape}: {first[:300]}") from None


def label_for_loss(y, classifier: bool):
    """A classifier's integer labels as int64 (datasets ingested earlier store label_index as int32, and
    CrossEntropyLoss/NLLLoss take int64 class indices only); anything else as it is."""
    if classifier and isinstance(y, torch.Tensor) and y.dtype != torch.int64 and not y.is_floating_point() \
            and not y.is_complex() and y.dtype != torch.bool:
        return y.long()
    return y


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 120 else text[:117] + "..."


def show_columns(names: list[str], limit: int = 12) -> str:
    """A dataset's columns for a message: all of a narrow table, the first ``limit`` of a wide one."""
    if len(names) <= limit:
        return str(list(names))
    return "[" + ", ".join(repr(n) for n in names[:limit]) + f", ...] ({len(names)} columns)"
