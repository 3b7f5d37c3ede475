"""A digest of a Python object that is the same in every process for equal objects: cloudpickle's bytes,
with what cloudpickle or torch make process-specific replaced by content. Keys work folders that must be
found again by a later run (a rerun of the script, a new notebook kernel).

- tensors by their bytes (torch pickles a storage under its memory address);
- classes and functions defined in ``__main__`` or a notebook (pickled by value) by their names, code,
  constants, defaults, closure and class body (cloudpickle adds a random tracker id per class and keeps
  the code's file name, which a notebook kernel changes on every restart);
- importable functions by their name and code too (pickle names them only: a fixed bug would look the same);
- sets by their elements in a stable order (string hashing is randomised per process).
"""

from __future__ import annotations

import io
import types

import cloudpickle
import torch
import xxhash
from cloudpickle import cloudpickle as _cp


def _stand_in(*content):  # never called: the digest only reads the bytes
    raise TypeError("a digest's stand-in is not meant to be unpickled")


def _by_value(obj) -> bool:
    try:
        return not _cp._should_pickle_by_reference(obj)
    except Exception:  # noqa: BLE001 - cloudpickle's private helper moved: the module says enough
        return getattr(obj, "__module__", None) == "__main__"


def _code(code: types.CodeType) -> tuple:
    """A code object without its file name and line numbers."""
    consts = tuple(_code(c) if isinstance(c, types.CodeType) else c for c in code.co_consts)
    return ("code", code.co_name, code.co_code, consts, code.co_names, code.co_varnames, code.co_freevars,
            code.co_argcount, code.co_kwonlyargcount, code.co_flags)


def _function(fn: types.FunctionType) -> tuple:
    cells = tuple(_named(c.cell_contents) if _filled(c) else None for c in (fn.__closure__ or ()))
    refs = {n: fn.__globals__[n] for n in fn.__code__.co_names if n in fn.__globals__}
    named = tuple(sorted((n, _named(v)) for n, v in refs.items()))  # the globals it reads, by value or name
    return ("function", fn.__qualname__, _code(fn.__code__), fn.__defaults__, fn.__kwdefaults__, cells, named)


def _named(value):
    """A global or closure value a function reads: modules, functions and classes by name (they are keyed
    where defined; a method's ``__class__`` cell would otherwise lead back to its class), other values
    themselves."""
    if isinstance(value, (types.ModuleType, types.FunctionType, type)):
        return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', value.__name__)}"
    return value


def _filled(cell) -> bool:
    try:
        return cell.cell_contents is not cell  # always true: reading the contents is the test
    except ValueError:  # an empty cell (a name not yet bound)
        return False


def _class(cls: type) -> tuple:
    skip = {"__dict__", "__weakref__", "__module__", "__qualname__"}
    body = tuple(sorted(((k, v) for k, v in vars(cls).items() if k not in skip), key=lambda kv: kv[0]))
    return ("class", cls.__qualname__, cls.__bases__, body)


class _Pickler(cloudpickle.Pickler):
    def persistent_id(self, obj):  # the one hook pickle calls for sets too (reducer_override is skipped)
        if type(obj) in (set, frozenset):
            return (type(obj).__name__, tuple(sorted(stable_digest(x) for x in obj)))
        return None

    def reducer_override(self, obj):
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous()
            extra = ()
            if t.is_quantized:
                extra = (str(t.qscheme()), *((t.q_scale(), t.q_zero_point()) if t.qscheme() in (
                    torch.per_tensor_affine, torch.per_tensor_symmetric) else (
                    t.q_per_channel_scales().tolist(), t.q_per_channel_zero_points().tolist(), t.q_per_channel_axis())))
                t = t.int_repr()
            raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
            return _stand_in, ("tensor", type(obj).__qualname__, str(obj.dtype), tuple(t.shape), raw, extra)
        if isinstance(obj, types.FunctionType) and obj is not _stand_in:  # importable: name and code too
            return _stand_in, _function(obj) if _by_value(obj) else (
                "function", obj.__module__, obj.__qualname__, _code(obj.__code__))
        if isinstance(obj, type) and _by_value(obj):
            return _stand_in, _class(obj)
        return super().reducer_override(obj)


def stable_digest(*objects) -> str:
    """Hex digest of ``objects`` (cloudpickled; see the module's notes)."""
    h = xxhash.xxh3_128()
    for obj in objects:
        buf = io.BytesIO()
        _Pickler(buf, protocol=5).dump(obj)
        h.update(buf.getvalue())
    return h.hexdigest()
