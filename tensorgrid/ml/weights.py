"""Pretrained weights a user has, from any URL, into a model: ``load_weights(model, url)``.

The file is a PyTorch state dict (``torch.save(model.state_dict(), f)``), or a checkpoint holding one under
``"state_dict"`` or ``"model"`` (a TensorGrid checkpoint, most training scripts'); the ``module.`` prefix
DistributedDataParallel adds is dropped. It is read with ``weights_only=True``: tensors and plain
containers, never code. Local paths and every URL the store takes (``s3://``, ``gs://``, ``grid://``,
``memory://``...) go through fsspec; ``http(s)://`` through the standard library.
"""

from __future__ import annotations

import io
import os
import urllib.error
import urllib.request
from collections.abc import Mapping

import numpy as np
import torch

from .. import fs as tgfs
from ..errors import ArgumentError, ModelLoadError

# what unpickling a numpy array needs (TensorGrid checkpoints hold numpy's RNG state beside the weights)
# (``_reconstruct`` lives in numpy.core before numpy 2 and numpy._core after: taken from an array's own pickle)
_NUMPY = [np.zeros(0).__reduce__()[0], np.ndarray, np.dtype, *(t for t in vars(np.dtypes).values()
                                                                if isinstance(t, type))]


def load_weights(model: torch.nn.Module, url: str | os.PathLike, strict: bool = True) -> torch.nn.Module:
    """Load the state dict at ``url`` into ``model`` (in place; returned). ``strict=False`` loads the
    tensors whose names match and leaves the others (a new head); a tensor of another shape is always an
    error. Every problem is a ``ModelLoadError`` naming the file."""
    if not isinstance(model, torch.nn.Module):
        raise ArgumentError(f"model must be an nn.Module, got {type(model).__name__}")
    url = os.fspath(url)
    try:
        with torch.serialization.safe_globals(_NUMPY):  # a checkpoint's numpy RNG state: arrays, no code
            state = torch.load(io.BytesIO(_read(url)), map_location="cpu", weights_only=True)
    except ModelLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - torch.load's errors for a file that is not a state dict vary
        raise ModelLoadError(f"{url}: not a state dict torch.load reads ({type(e).__name__}: {e})"[:300]) from None
    state = _state_dict(state, url)
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} (the model's: {tuple(own[k].shape)})" for k, v in state.items()
             if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        raise ModelLoadError(f"{url}: {len(wrong)} tensors have another shape than the model's: {wrong[:3]}")
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if strict and (missing or unexpected):
        raise ModelLoadError(f"{url}: the weights do not fit the model: missing {missing[:5]}, unexpected "
                             f"{unexpected[:5]}; strict=False loads the tensors that match")
    if not set(state) & set(own):
        raise ModelLoadError(f"{url}: no tensor name matches the model's (it has {list(own)[:3]}, the file "
                             f"{list(state)[:3]})")
    model.load_state_dict(state, strict=False)
    return model


def _read(url: str) -> bytes:
    if url.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(url, timeout=60) as r:  # noqa: S310 - the user's own URL
                return r.read()
        except (urllib.error.URLError, OSError) as e:
            raise ModelLoadError(f"{url}: cannot be downloaded ({e})") from None
    fs, path = tgfs.resolve(url)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise ModelLoadError(f"{url}: no such weights file") from None
    except OSError as e:
        raise ModelLoadError(f"{url}: cannot be read ({e})") from None


def _state_dict(state, url: str) -> dict:
    """The tensors of a state dict or of a checkpoint that holds one; DDP's ``module.`` prefix dropped."""
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{url}: holds no state dict (a mapping of names to tensors, or a checkpoint with "
                             "one under 'state_dict' or 'model')")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)
