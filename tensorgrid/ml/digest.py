"""A digest of a Python object that is the same in every process for equal objects: cloudpickle's bytes,
with each tensor pickled by its content (torch pickles a storage under its memory address, so two equal
models would otherwise never match). Keys work folders that must be found again by a later run."""

from __future__ import annotations

import io

import cloudpickle
import torch
import xxhash


def _tensor(kind: str, dtype: str, shape: tuple, data: bytes):  # never called: the digest only reads bytes
    raise TypeError("a digest's tensor stand-in is not meant to be unpickled")


class _Pickler(cloudpickle.Pickler):
    def reducer_override(self, obj):
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous()
            data = t.int_repr() if t.is_quantized else t
            raw = data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b""
            return _tensor, (type(obj).__qualname__, str(t.dtype), tuple(t.shape), raw)
        return super().reducer_override(obj)


def stable_digest(*objects) -> str:
    """Hex digest of ``objects`` (cloudpickled; tensors by content)."""
    h = xxhash.xxh3_128()
    for obj in objects:
        buf = io.BytesIO()
        _Pickler(buf, protocol=5).dump(obj)
        h.update(buf.getvalue())
    return h.hexdigest()
