"""Checkpoints at any fsspec URL: one file per checkpoint, written under a temporary name and committed
whole (readers never see a partial file); the newest ``keep`` are kept."""

from __future__ import annotations

import io
import re
from collections.abc import Mapping

import torch

from .. import fs as tgfs
from ..errors import CheckpointError

_NAME = re.compile(r"^ckpt-e(\d{5})-s(\d{9})\.pt$")


def _list(url: str) -> list[tuple[int, int, str]]:
    fs, root = tgfs.resolve(url)
    fs.invalidate_cache(root)  # object stores' listings are cached per process: never trust one here
    try:
        names = fs.ls(root, detail=False)
    except FileNotFoundError:
        return []
    out = []
    for n in names:
        m = _NAME.match(tgfs.name(n))
        if m:
            out.append((int(m.group(1)), int(m.group(2)), tgfs.to_url(fs, n)))
    return sorted(out)


def latest(url: str | None) -> str | None:
    """URL of the newest checkpoint in ``url``, or None."""
    if not url:
        return None
    found = _list(url)
    return found[-1][2] if found else None


def save(url: str, epoch: int, step: int, state: dict, keep: int) -> str:
    fs, root = tgfs.resolve(url)
    buf = io.BytesIO()
    torch.save(state, buf)
    path = tgfs.join(root, f"ckpt-e{epoch:05d}-s{step:09d}.pt")
    tgfs.put_atomic(fs, path, buf.getvalue())
    written = tgfs.to_url(fs, path)
    found = [u for _, _, u in _list(url)]
    older = found[:found.index(written)] if written in found else []
    for old in older[:max(0, len(older) - (keep - 1))] if keep > 0 else []:
        ofs, opath = tgfs.resolve(old)
        ofs.rm_file(opath)
    return written


def load(url: str) -> dict:
    fs, path = tgfs.resolve(url)
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {url}") from None
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a damaged file
        raise CheckpointError(f"checkpoint {url} cannot be read: {e}") from None
    _check_state(state, url)
    return state


# what the trainer reads from every checkpoint, and its type
_FIELDS = {"model": Mapping, "optimizer": Mapping, "loader": Mapping, "history": list, "step": int}


def _check_state(state, url: str) -> None:
    """Raise CheckpointError unless ``state`` has the shape of a training checkpoint (a file that torch
    reads but something else wrote fails here, named, not as an AttributeError deep in the trainer)."""
    if not isinstance(state, Mapping):
        raise CheckpointError(f"checkpoint {url} is not a TensorGrid checkpoint: it holds a {type(state).__name__}, "
                              "not a dict of training state")
    missing = [k for k in _FIELDS if k not in state]
    wrong = [f"{k} is a {type(state[k]).__name__}" for k, t in _FIELDS.items()
             if k in state and (not isinstance(state[k], t) or isinstance(state[k], bool))]
    loader = state.get("loader")
    if isinstance(loader, Mapping) and (not isinstance(loader.get("epoch"), int) or isinstance(loader.get("epoch"), bool)):
        wrong.append("loader has no epoch")
    if missing or wrong:
        detail = "; ".join(filter(None, [f"missing {missing}" if missing else "", ", ".join(wrong)]))
        raise CheckpointError(f"checkpoint {url} is not a TensorGrid checkpoint ({detail})")


def check_fits(state: dict, model: torch.nn.Module, url: str) -> None:
    """Raise CheckpointError unless the checkpoint's parameters match the model's names and shapes."""
    saved = state.get("model", {})
    mine = model.state_dict()
    missing = [k for k in mine if k not in saved]
    extra = [k for k in saved if k not in mine]
    shapes = [f"{k}: checkpoint {tuple(saved[k].shape)}, model {tuple(v.shape)}" for k, v in mine.items()
              if k in saved and tuple(saved[k].shape) != tuple(v.shape)]
    if missing or extra or shapes:
        detail = "; ".join(filter(None, [
            f"missing {missing[:3]}" if missing else "", f"unexpected {extra[:3]}" if extra else "",
            "shapes differ: " + ", ".join(shapes[:3]) if shapes else ""]))
        raise CheckpointError(f"checkpoint {url} is from a different model ({detail})")


def load_weights(url: str, model):
    """``model`` (an nn.Module, or a zero-argument factory returning one) with the weights of checkpoint
    ``url`` (any checkpoint the trainer wrote, e.g. ``FitResult.best_checkpoint``); returns the model."""
    state = load(url)
    model = model if isinstance(model, torch.nn.Module) else model()
    check_fits(state, model, url)
    model.load_state_dict(state["model"])
    return model


def history(state: dict) -> list[dict]:
    """The checkpoint's history with epochs numbered from 1 (checkpoints written before numbering from 1
    hold rows numbered from 0)."""
    rows = [dict(r) for r in state["history"]]
    if state.get("history_epochs_from", 0) != 1:
        for r in rows:
            if isinstance(r.get("epoch"), int):
                r["epoch"] += 1
    return rows


def type_name(obj) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def check_optimizer_fits(state: dict, optimizer: torch.optim.Optimizer, url: str) -> None:
    """Raise CheckpointError unless the checkpoint's optimizer state can continue in ``optimizer``: the
    same optimizer type (another one's state fails only at its first step) and the same parameter groups."""
    saved = state.get("optimizer_type")
    if saved is not None and saved != type_name(optimizer):
        raise CheckpointError(f"checkpoint {url} was trained with {saved}, this trainer's optimizer is "
                              f"{type_name(optimizer)}: resume with the same optimizer, or start a new run")
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {url} holds optimizer state that does not fit this trainer's "
                              f"optimizer: {e}") from None
